"""SGLang's native API: POST /generate (text or token ids in; text, token ids and log-probs out)
and our POST /score (teacher-forced importance data of given completions).

/generate as SGLang answers it: one prompt with n = 1 gives an object, a batch or n > 1 a list
(prompt-major); `meta_info` has `id`, `finish_reason` ({"type": "stop", "matched": id or
string} / {"type": "length", "length": k} / {"type": "abort"}), `prompt_tokens`,
`completion_tokens`, with `return_logprob` `output_token_logprobs` as [log q, id, text or null]
(text with `return_text_in_logprobs`), and our fields (`fields.py`). Streamed chunks are
cumulative, as SGLang's default: each carries the text, ids and lists so far, plus `index`.
`sampling_params` may be a list, one per prompt; prompt i keeps its index (and seed) either way.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..outputs import Sample
from ..runtime.requests import StopRules
from .bridge import Disconnected
from .errors import APIError, error_body
from .fields import TextStream, delta_fields, finite, sample_fields, token_texts
from .inputs import max_tokens_for, prompt_items, prompt_pairs, sampling_params, stop_strings, ticket_of
from .inputs import token_ids as checked_ids
from .openai_routes import CLIENT_GONE, server_of
from .protocol import SGLANG_REFUSED, GenerateRequest, ScoreRequest, SGLangSampling, unsupported
from .state import EventStream, ServedPair, ServerState, new_id, sse

router = APIRouter()
NAMES = {
    name: f"sampling_params.{name}"
    for name in ("temperature", "top_k", "top_p", "min_p", "n", "stop", "seed")
}
NAMES["max_tokens"] = "sampling_params.max_new_tokens"


def one_of(body, first: str, second: str, required: bool = True):
    """(value, field name) of whichever of two alternative fields is given."""
    a, b = getattr(body, first), getattr(body, second)
    if a is not None and b is not None:
        raise APIError(f"give {first} or {second}, not both", second)
    if a is None and b is None and required:
        raise APIError(f"give {first} or {second}", first)
    return (a, first) if a is not None else (b, second)


def per_prompt(value, count: int, field: str, default) -> list:
    """A field that is one value for all prompts or a list of one per prompt."""
    if value is None:
        return [default] * count
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise APIError(f"{field} has {len(value)} entries but there are {count} prompts", field)
    return value


def is_single(prompts) -> bool:
    return isinstance(prompts, str) or (bool(prompts) and all(isinstance(t, int) for t in prompts))


# ------------------------------------------------------------------------------ /generate


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    server = server_of(request)
    prompts, field = one_of(body, "text", "input_ids")
    teacher, teacher_field = one_of(body, "teacher_text", "teacher_input_ids", required=False)
    pairs = prompt_pairs(server.pair, prompts, teacher, field, teacher_field or "teacher_text")
    settings = per_prompt(body.sampling_params, len(pairs), "sampling_params", SGLangSampling())
    groups = (
        [(0, len(pairs))]
        if not isinstance(body.sampling_params, list)
        else [(i, i + 1) for i in range(len(pairs))]
    )
    tickets = [generate_ticket(server, body, pairs[a:b], settings[a], a) for a, b in groups]
    rid = body.rid if isinstance(body.rid, str) else new_id("gen")
    outputs = Outputs(server, body, pairs, tickets, rid, settings)
    if body.stream:
        return EventStream(stream_generate(server, outputs, tickets, request))
    try:
        samples = await server.bridge.collect(tickets, rid, request.receive)
    except Disconnected:
        return Response(status_code=CLIENT_GONE)
    result = [outputs.whole(i, s) for i, s in enumerate(samples)]
    return JSONResponse(result[0] if is_single(prompts) and len(result) == 1 else result)


def generate_ticket(server: ServerState, body: GenerateRequest, pairs, sp: SGLangSampling, first_index: int):
    refused = unsupported(sp, SGLANG_REFUSED, "sampling_params.")
    if refused is not None:
        raise APIError(f"{refused} is not supported by this server", refused)
    max_new = max_tokens_for(server.pair, pairs, sp.max_new_tokens, NAMES["max_tokens"])
    params = sampling_params(
        NAMES, max_tokens=max_new, temperature=sp.temperature, n=sp.n, top_k=sp.top_k, top_p=sp.top_p,
        min_p=sp.min_p, stop=stop_strings(sp.stop, NAMES["stop"]),
        seed=sp.seed if sp.seed is not None else sp.sampling_seed, collect_diagnostics=body.collect_diagnostics,
    )  # fmt: skip
    stops = StopRules(params.stop, tuple(sp.stop_token_ids or ()), sp.ignore_eos, sp.skip_special_tokens)
    return ticket_of(server.pair, pairs, params, stops, body.stream, first_index)


class Outputs:
    """SGLang output objects of one /generate request, whole or as cumulative stream chunks."""

    def __init__(self, server: ServerState, body: GenerateRequest, pairs, tickets, rid: str, settings: list):
        self.tokenizer = server.pair.base_tokenizer
        self.body, self.rid, self.started = body, rid, time.time()
        self.prompt_of = [r.prompt_index for t in tickets for r in t.requests]  # output -> prompt
        self.prompt_tokens = [len(pairs[p].base_ids) for p in self.prompt_of]
        self.logprob = per_prompt(body.return_logprob, len(pairs), "return_logprob", False)
        self.ids = [rid if len(self.prompt_of) == 1 else f"{rid}-{i}" for i in range(len(self.prompt_of))]
        self.settings = [settings[p] for p in self.prompt_of]
        self.texts = [
            TextStream(self.tokenizer, sp.skip_special_tokens, stop_strings(sp.stop, "stop"))
            for sp in self.settings
        ]
        self.columns: list[dict[str, list[float]]] = [{} for _ in self.prompt_of]  # streamed so far

    def meta(self, index: int, finish_reason, ids: list[int], lps: list[float]) -> dict:
        meta = {
            "id": self.ids[index],
            "finish_reason": finish_reason,
            "prompt_tokens": self.prompt_tokens[index],
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "e2e_latency": time.time() - self.started,
        }
        if self.logprob[self.prompt_of[index]]:
            texts = (
                token_texts(self.tokenizer, ids) if self.body.return_text_in_logprobs else [None] * len(ids)
            )
            meta["output_token_logprobs"] = [list(t) for t in zip(finite(lps), ids, texts)]
            meta["input_token_logprobs"] = []
        return meta

    def whole(self, index: int, sample: Sample) -> dict:
        meta = self.meta(index, finish_reason(sample), sample.token_ids, sample.logprobs_q)
        fields = sample_fields(sample, self.body.collect_diagnostics)
        fields.pop("token_ids")
        meta.update(fields)
        text = sample.text
        if self.settings[index].no_stop_trim and isinstance(sample.stop_reason, str):
            text = self.texts[index].tokenizer.decode(
                sample.token_ids, skip_special_tokens=self.texts[index].skip
            )
        return {"text": text, "output_ids": sample.token_ids, "meta_info": meta, "index": index}

    def partial(self, index: int, ids: list[int], columns: dict[str, list[float]]) -> dict:
        """A stream chunk: everything so far (text held back where a stop string may begin)."""
        stream = self.texts[index]
        stream.add(ids)
        for name, values in columns.items():
            self.columns[index].setdefault(name, []).extend(values)
        meta = self.meta(index, None, stream.tokens, self.columns[index].get("logprob_q", []))
        fields = delta_fields([], self.columns[index], self.body.collect_diagnostics)
        fields.pop("token_ids")
        meta.update(fields)
        return {
            "text": stream.text[: stream.sent],
            "output_ids": list(stream.tokens),
            "meta_info": meta,
            "index": index,
        }


def finish_reason(sample: Sample) -> dict:
    if sample.finish_reason == "stop":
        return {"type": "stop", "matched": sample.stop_reason}
    if sample.finish_reason == "length":
        return {"type": "length", "length": len(sample.token_ids)}
    return {"type": "abort", "message": "the request was aborted"}


async def stream_generate(server: ServerState, outputs: Outputs, tickets, request: Request):
    try:
        async with server.bridge.open(tickets, outputs.rid, request.receive) as events:
            async for batch in events.batches():
                for event in batch.tokens:
                    yield sse(outputs.partial(event.index, event.tokens, event.columns))
                for event in batch.finished:
                    yield sse(outputs.whole(event.index, event.sample))
    except Disconnected:
        return
    except APIError as err:
        yield sse(error_body(err.message, err.param, err.status))
    yield sse("[DONE]")


# ------------------------------------------------------------------------------ /score


@router.post("/score")
async def score(body: ScoreRequest, request: Request) -> Response:
    server = server_of(request)
    pair = server.pair
    prompts, field = one_of(body, "text", "input_ids")
    teacher, teacher_field = one_of(body, "teacher_text", "teacher_input_ids", required=False)
    completions, completion_field = one_of(body, "output_text", "output_ids")
    pairs = prompt_pairs(pair, prompts, teacher, field, teacher_field or "teacher_text")
    items = prompt_items(completions, completion_field)
    if len(items) != len(pairs):
        raise APIError(
            f"{completion_field} has {len(items)} entries but there are {len(pairs)} prompts",
            completion_field,
        )
    items = [score_item(pair, prompt, item, completion_field) for prompt, item in zip(pairs, items)]
    params = sampling_params(
        {}, max_tokens=1, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
        collect_diagnostics=body.collect_diagnostics,
    )  # fmt: skip
    requests = pair.requests_from_ids(pairs, params, range(len(pairs)))
    samples = await server.bridge.call("score", requests, items, params)
    result = [scored(s, body.collect_diagnostics) for s in samples]
    return JSONResponse(result[0] if is_single(prompts) else result)


def score_item(pair: ServedPair, prompt, item, field: str):
    """A completion (text or ids), checked: not empty, in the vocabulary, within the context."""
    if isinstance(item, str):
        if not item:
            raise APIError(f"{field} must not be empty", field)
        length = len(pair.base_tokenizer(item, add_special_tokens=False)["input_ids"])
    else:
        item = list(checked_ids(pair, item, field))
        length = len(item)
    context = pair.max_context
    total = max(len(prompt.base_ids), len(prompt.teacher_ids)) + length
    if total > context:
        raise APIError(f"prompt and completion have {total} tokens; the models' context is {context}", field)
    return item


def scored(sample: Sample, diagnostics: bool) -> dict:
    out = {"text": sample.text, "output_ids": sample.token_ids}
    out.update(sample_fields(sample, diagnostics))
    out.pop("token_ids")
    return out
