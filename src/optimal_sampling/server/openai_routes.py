"""The OpenAI API: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models.

A request becomes one ticket (n samples per prompt, choice index = prompt * n + sample) on the
shared engine loop. Streams are server-sent events, one choice per event, ended by
`data: [DONE]`; under load one event may carry several tokens. `max_tokens` left out means all
the context the prompt leaves (as vLLM); beyond the context it is a 400.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..config import SamplingParams
from ..runtime.requests import StopRules
from .bridge import Disconnected
from .errors import APIError, error_body
from .fields import TextStream, delta_fields, sample_fields
from .inputs import chat_pair, max_tokens_for, prompt_pairs, sampling_params, stop_strings, ticket_of
from .openai_format import Shape, chunk, delta_choice, logprobs_block, response, stop_reason, usage
from .protocol import OPENAI_REFUSED, ChatCompletionRequest, CompletionRequest, OpenAISampling, unsupported
from .state import EventStream, ServerState, new_id, sse

router = APIRouter()
CLIENT_GONE = 499  # nginx's code for a client that closed the connection


def server_of(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    server = server_of(request)
    card = {
        "id": server.settings.served_model_name,
        "object": "model",
        "created": int(server.started),
        "owned_by": "optimal-sampling",
        "max_model_len": server.pair.max_context,
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    server = server_of(request)
    check_request(server, body)
    pairs = prompt_pairs(server.pair, body.prompt, body.teacher_prompt, "prompt", "teacher_prompt")
    return await run(
        server, request, body, pairs, body.max_tokens, "max_tokens", chat=False, logprobs=body.logprobs
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    server = server_of(request)
    check_request(server, body)
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError("response_format other than text is not supported by this server", "response_format")
    pair = chat_pair(server.pair, body.messages, body.teacher_messages)
    asked, field = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        asked, field = body.max_completion_tokens, "max_completion_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await run(server, request, body, [pair], asked, field, chat=True, logprobs=logprobs)


def check_request(server: ServerState, body: OpenAISampling) -> None:
    server.check_model(body.model)
    refused = unsupported(body, OPENAI_REFUSED)
    if refused is not None:
        raise APIError(f"{refused} is not supported by this server", refused)


def openai_params(body: OpenAISampling, max_tokens: int, field: str) -> SamplingParams:
    names = {"max_tokens": field, "collect_diagnostics": "collect_diagnostics"}
    return sampling_params(
        names, max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        n=body.n, top_k=body.top_k, top_p=1.0 if body.top_p is None else body.top_p, min_p=body.min_p,
        stop=stop_strings(body.stop, "stop"), seed=body.seed, collect_diagnostics=body.collect_diagnostics,
    )  # fmt: skip


async def run(server: ServerState, request: Request, body, pairs, asked, field: str, chat: bool, logprobs):
    max_tokens = max_tokens_for(server.pair, pairs, asked, field)
    params = openai_params(body, max_tokens, field)
    stops = StopRules(
        params.stop, tuple(body.stop_token_ids or ()), body.ignore_eos, body.skip_special_tokens
    )
    ticket = ticket_of(server.pair, pairs, params, stops, body.stream)
    rid = new_id("chatcmpl" if chat else "cmpl")
    shape = Shape(
        chat, rid, int(time.time()), server.settings.served_model_name, logprobs, body.collect_diagnostics
    )
    prompt_tokens = sum(len(p.base_ids) for p in pairs)
    if body.stream:
        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_events(
            server, ticket, shape, stops, request.receive, prompt_tokens if with_usage else None
        )
        return EventStream(events)
    try:
        samples = await server.bridge.collect([ticket], rid, request.receive)
    except Disconnected:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(response(shape, server.pair.base_tokenizer, samples, prompt_tokens))


class ChoiceStreams:
    """Per choice of a stream: its text deltas and the chunks of its new tokens."""

    def __init__(self, server: ServerState, shape: Shape, stops: StopRules, count: int):
        self.tokenizer = server.pair.base_tokenizer
        self.shape = shape
        self.texts = [
            TextStream(self.tokenizer, stops.skip_special_tokens, stops.strings) for _ in range(count)
        ]
        self.offsets = [0] * count  # characters of token text so far (completion logprobs' text_offset)
        self.started = [False] * count

    def tokens(self, index: int, ids: list[int], columns: dict[str, list[float]]) -> dict:
        extra = delta_fields(ids, columns, self.shape.diagnostics)
        extra["logprobs"] = self.logprobs(index, ids, columns.get("logprob_q", []))
        return self.choice(index, self.texts[index].add(ids), extra)

    def finished(self, index: int, sample) -> dict:
        start = len(self.texts[index].tokens)
        extra = sample_fields(sample, self.shape.diagnostics, start)
        extra["logprobs"] = self.logprobs(index, sample.token_ids[start:], sample.logprobs_q[start:])
        extra["finish_reason"], extra["stop_reason"] = sample.finish_reason, stop_reason(sample)
        return self.choice(index, self.texts[index].finish(sample.text), extra)

    def logprobs(self, index: int, ids: list[int], lps: list[float]) -> dict | None:
        block = logprobs_block(self.shape, self.tokenizer, ids, lps, self.offsets[index])
        if block is not None and not self.shape.chat:
            self.offsets[index] += sum(len(t) for t in block["tokens"])
        return block

    def choice(self, index: int, text: str, extra: dict) -> dict:
        first, self.started[index] = not self.started[index], True
        return delta_choice(self.shape, index, text, extra, first)


async def stream_events(server: ServerState, ticket, shape: Shape, stops: StopRules, receive, prompt_tokens):
    """The SSE body of a streamed request; usage last when prompt_tokens is given."""
    choices = ChoiceStreams(server, shape, stops, len(ticket.requests))
    completion_tokens = 0
    try:
        async with server.bridge.open([ticket], shape.rid, receive) as events:
            async for batch in events.batches():
                for event in batch.tokens:
                    yield sse(chunk(shape, [choices.tokens(event.index, event.tokens, event.columns)]))
                for event in batch.finished:
                    completion_tokens += len(event.sample.token_ids)
                    yield sse(chunk(shape, [choices.finished(event.index, event.sample)]))
    except Disconnected:
        return
    except APIError as err:
        yield sse(error_body(err.message, err.param, err.status))
        yield sse("[DONE]")
        return
    if prompt_tokens is not None:
        yield sse(chunk(shape, [], usage(prompt_tokens, completion_tokens)))
    yield sse("[DONE]")
