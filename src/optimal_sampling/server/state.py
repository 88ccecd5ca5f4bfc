"""What every route reads: the served pair (tokenizers and facts about the models), the bridge
to the engine process, the server's settings; and small shared helpers (ids, server-sent events)."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi.responses import Response

from ..config import SamplingParams
from ..models.loading import load_tokenizer
from ..runtime.requests import PromptIds, Request, requests_from_ids
from .bridge import EngineBridge
from .engine_process import PairInfo
from .errors import APIError
from .tokenizing import fast_encoder, same_tokenizer


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str = "optimal-sampling"
    api_key: str | None = None
    model_base: str | None = None  # as given (None: the demo pair)
    model_teacher: str | None = None
    stream_interval_ms: float | None = None  # between two chunks of a stream (None: bridge.auto_interval)


@dataclass
class ServedPair:
    """The HTTP side's view of the pair: its tokenizers and the facts requests are checked against
    (the models themselves live in the engine process)."""

    info: PairInfo
    base_tokenizer: object
    teacher_tokenizer: object  # the base's own object where both read the same files

    def __post_init__(self) -> None:
        self.encode_base = fast_encoder(self.base_tokenizer)
        self.encode_teacher = (
            self.encode_base if self.shared_tokenizer else fast_encoder(self.teacher_tokenizer)
        )

    @classmethod
    def load(cls, info: PairInfo) -> ServedPair:
        base = load_tokenizer(info.base_path)
        same = same_tokenizer(info.base_path, info.teacher_path)
        return cls(info, base, base if same else load_tokenizer(info.teacher_path))

    @property
    def shared_tokenizer(self) -> bool:
        return self.teacher_tokenizer is self.base_tokenizer

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_context(self) -> int:
        return self.info.max_context

    def requests_from_ids(
        self, prompts: list[PromptIds], params: SamplingParams, indices: Sequence[int]
    ) -> list[Request]:
        """As `OptimalSampler.requests_from_ids`: the seed is params.seed, else the server's, else random."""
        seed = params.seed if params.seed is not None else self.info.seed
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 62)
        return requests_from_ids(
            prompts, indices, params.n, params.max_tokens, seed, self.max_context, self.vocab_size
        )


@dataclass
class ServerState:
    pair: ServedPair
    bridge: EngineBridge
    settings: ServerSettings
    started: float = field(default_factory=time.time)

    def check_model(self, model: str) -> None:
        if model != self.settings.served_model_name:
            raise APIError(
                f"the model `{model}` does not exist; this server serves `{self.settings.served_model_name}`",
                "model",
                404,
            )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# Line breaks JSON leaves raw outside ASCII: some SSE clients split lines on them.
LINE_BREAKS = (("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\x85", "\\u0085"))


ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def sse(payload: dict | str) -> str:
    """One server-sent event (strict JSON: non-finite floats were made null before)."""
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    data = ENCODER.encode(payload)
    for raw, escaped in LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return f"data: {data}\n\n"


class EventStream(Response):
    """A text/event-stream response: each string of `events` written as it comes.

    Unlike Starlette's StreamingResponse it starts no task group and no second reader of the
    connection per request: the bridge already watches for the client going away (and then ends
    `events`), and writing to a closed connection is a no-op in uvicorn."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        self.events, self.status_code, self.background = events, 200, None
        self.init_headers(None)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for text in self.events:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
