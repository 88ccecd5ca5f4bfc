"""A stand-in for the models, to load the HTTP side alone (benchmarks/bench_serve.py --fake-engine).

`FakeSpec` goes where a `SamplerSpec` goes (`EngineProcess(spec)`): the engine process then runs
the real `SamplingService`, scheduler and pipe, over a `FakeEngine` that computes nothing and
answers like a GPU would: one device timeline, `step_ms` per decode step whatever its rows,
`prefill_us_per_token` per prompt token admitted, pipelined (step n + 1 is queued before step n
is read) and refilling (continuous batching). Tokens are a hash of (row seed, token index), so a
request's tokens do not depend on what else runs, drawn from the ids that decode to printable
ASCII (text that streams as a model's would, not stray UTF-8 bytes). No model, no torch work:
the whole CPU cost of a served token is what the server spends on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ..config import EngineConfig, MixConfig
from ..engines.base import Engine, spare_slots

MIX = 0x9E3779B97F4A7C15  # odd 64-bit constants of the token hash
STEP = 0xBF58476D1CE4E5B9


@dataclass(frozen=True)
class FakeSpec:
    tokenizer_path: str  # a tokenizer directory (both "models" read it)
    max_batch_size: int = 256
    step_ms: float = 10.0
    prefill_us_per_token: float = 5.0
    max_context: int = 32768
    seed: int | None = 0
    mix: MixConfig = field(default_factory=MixConfig)

    def load_sampler(self) -> FakeSampler:
        return FakeSampler(self)


class FakePending:
    """A step's results, ready at `done` (monotonic seconds); reading earlier sleeps until then."""

    def __init__(self, done: float, tokens: np.ndarray, logprobs: np.ndarray):
        self.done, self.tokens, self.logprobs = done, tokens, logprobs

    def ready(self) -> bool:
        return time.monotonic() >= self.done

    def to_host(self) -> dict[str, list]:
        wait = self.done - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        lp = self.logprobs.tolist()
        return {
            "tokens": self.tokens.tolist(),
            "logprob_base": lp,
            "logprob_teacher": lp,
            "logprob_q": lp,
            "alpha": [0.5] * len(lp),
        }


class FakeEngine(Engine):
    """The engine interface over a simulated device (module docstring)."""

    supports_refill = True
    pipelines = True

    def __init__(self, spec: FakeSpec, vocab: np.ndarray, vocab_size: int):
        self.spec, self.vocab, self.vocab_size = spec, vocab, vocab_size
        self.max_slots = spec.max_batch_size + spare_slots(spec.max_batch_size)
        self.clock = 0.0  # when the simulated device is next free

    def batch_limit(self) -> int:
        return self.spec.max_batch_size

    def max_context(self) -> int:
        return self.spec.max_context

    def add(self, requests):  # never called: admit and step are overridden
        raise NotImplementedError

    def decode(self, slots, tokens):
        raise NotImplementedError

    def release(self, slots: list[int]) -> None:
        return None

    def admit(self, requests, row_seeds, steps, mix, params) -> FakePending:
        tokens = sum(max(len(r.base_ids), len(r.teacher_ids)) for r in requests)
        return self._queue(tokens * self.spec.prefill_us_per_token / 1e6, row_seeds, steps)

    def step(self, slots, tokens, row_seeds, steps, mix, params) -> FakePending:
        return self._queue(self.spec.step_ms / 1e3, row_seeds, steps)

    def _queue(self, seconds: float, row_seeds: Sequence[int], steps: Sequence[int]) -> FakePending:
        self.clock = max(time.monotonic(), self.clock) + seconds
        seeds = np.asarray(row_seeds, dtype=np.uint64)
        keys = seeds * np.uint64(MIX) + np.asarray(steps, dtype=np.uint64) * np.uint64(STEP)
        keys ^= keys >> np.uint64(31)
        tokens = self.vocab[keys % np.uint64(len(self.vocab))]
        logprobs = -((keys >> np.uint64(40)) % np.uint64(1000)).astype(np.float64) / 100.0
        return FakePending(self.clock, tokens, logprobs)


def printable_ids(tokenizer) -> np.ndarray:
    """Ids whose text alone is printable ASCII (not special tokens)."""
    special = set(tokenizer.all_special_ids)
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    ids = [i for i, t in enumerate(texts) if t and t.isascii() and t.isprintable() and i not in special]
    return np.asarray(ids or range(size), dtype=np.int64)


class FakeSampler:
    """What the engine process and `SamplingService` read of an `OptimalSampler`."""

    def __init__(self, spec: FakeSpec):
        from ..models.loading import load_tokenizer

        tokenizer = load_tokenizer(spec.tokenizer_path)
        self.base = self.teacher = SimpleNamespace(tokenizer=tokenizer, path=spec.tokenizer_path)
        self.vocab_size = len(tokenizer)
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        self.engine = FakeEngine(spec, printable_ids(tokenizer), self.vocab_size)
        self.seed, self.mix, self.device = spec.seed, spec.mix, "cpu"
        self.engine_config = EngineConfig(engine="reference", max_batch_size=spec.max_batch_size)

    def close(self) -> None:
        return None
