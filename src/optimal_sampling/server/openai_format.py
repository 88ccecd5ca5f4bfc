"""OpenAI response bodies (completions and chat, whole and streamed) from samples and deltas.

`logprobs` are log q, the distribution each token was actually drawn from (after temperature,
teacher constraint and truncation); top alternatives are not computed, so a `top_logprobs` entry
holds the sampled token only. Each choice also carries our fields (`fields.py`), and a finished
one `stop_reason` (the stop string or token id that ended it, as vLLM reports it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..outputs import Sample
from .fields import finite, sample_fields, token_texts


@dataclass(frozen=True)
class Shape:
    """What a response looks like: which API, what was asked for."""

    chat: bool
    rid: str
    created: int
    model: str
    logprobs: int | None  # None: no logprobs; k: top-k asked (only the sampled token is given)
    diagnostics: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def completion_logprobs(tokenizer, ids: list[int], lps: list[float], top: int, offset: int = 0) -> dict:
    texts = token_texts(tokenizer, ids)
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    values = finite(lps)
    return {
        "tokens": texts,
        "token_logprobs": values,
        "top_logprobs": [{t: v} for t, v in zip(texts, values)] if top else None,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, ids: list[int], lps: list[float], top: int) -> dict:
    content = []
    for text, value in zip(token_texts(tokenizer, ids), finite(lps)):
        entry = {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
        entry["top_logprobs"] = [dict(entry)] if top else []
        content.append(entry)
    return {"content": content}


def logprobs_block(shape: Shape, tokenizer, ids: list[int], lps: list[float], offset: int = 0) -> dict | None:
    if shape.logprobs is None:
        return None
    if shape.chat:
        return chat_logprobs(tokenizer, ids, lps, shape.logprobs)
    return completion_logprobs(tokenizer, ids, lps, shape.logprobs, offset)


def stop_reason(sample: Sample):
    return sample.stop_reason if isinstance(sample.stop_reason, str) else None


def choice(shape: Shape, tokenizer, index: int, sample: Sample) -> dict:
    """A finished choice of a whole response."""
    out = {"index": index}
    if shape.chat:
        out["message"] = {"role": "assistant", "content": sample.text}
    else:
        out["text"] = sample.text
    out["logprobs"] = logprobs_block(shape, tokenizer, sample.token_ids, sample.logprobs_q)
    out["finish_reason"] = sample.finish_reason
    out["stop_reason"] = stop_reason(sample)
    out.update(sample_fields(sample, shape.diagnostics))
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(shape: Shape, tokenizer, samples: list[Sample], prompt_tokens: int) -> dict:
    return {
        "id": shape.rid,
        "object": shape.object,
        "created": shape.created,
        "model": shape.model,
        "choices": [choice(shape, tokenizer, i, s) for i, s in enumerate(samples)],
        "usage": usage(prompt_tokens, sum(len(s.token_ids) for s in samples)),
    }


def chunk(shape: Shape, choices: list[dict], usage_block: dict | None = None) -> dict:
    out = {
        "id": shape.rid,
        "object": shape.object + ".chunk" if shape.chat else shape.object,
        "created": shape.created,
        "model": shape.model,
        "choices": choices,
    }
    if usage_block is not None:
        out["usage"] = usage_block
    return out


def delta_choice(shape: Shape, index: int, text: str, extra: dict, first: bool = False) -> dict:
    """A streamed choice: new text and the new tokens' fields (logprobs go in extra)."""
    out: dict = {"index": index}
    if shape.chat:
        out["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        out["text"] = text
    out["logprobs"] = extra.pop("logprobs", None)
    out["finish_reason"] = extra.pop("finish_reason", None)
    out.update(extra)
    return out
