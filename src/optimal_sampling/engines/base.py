"""What an engine is: two models, their KV caches, and slots; the interface the scheduler calls.

A slot holds one sequence (a request) in both models' caches. The scheduler
1. `admit`s requests into free slots: prefill, then the first token's draw (a `Pending`);
2. `step`s a set of active slots: decode one token and draw the next (a `Pending`);
3. `release`s slots whose sequence finished.
Those three, `batch_limit`, `max_context` and the flags below are every call the loop makes.
`warmup` (called by the sampler at construction) pays one-off costs such as graph captures and
kernel compiles before any call, so that no call pays them; it does nothing by default.
An engine implements `add` (prefill -> logits), `decode` (one token -> logits) and `release`;
the defaults of `sample`, `admit` and `step` then run the torch step (the oracle) on the host's
stream. The fast engine overrides them with its captured, pipelined versions.

Live weight updates: `load_weights(model, [(name, tensor), ...])` copies full Hugging Face
tensors into the engine's own weights in place (all validated first, see engines/weights.py).
An engine supports it by describing its weights (`weight_map`); the default refuses clearly.
The caller runs it between steps, never while one is being computed.

Logits are returned cut to the shared vocabulary width `vocab_size`, so ids the tokenizer does
not have are never sampled. Requests whose (base, teacher) prompt pair is identical are
prefilled once and their caches copied (n samples per prompt).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import MixConfig, SamplingParams
from ..mixing.step import sample_step
from .weights import NamedTensors, WeightMap, check_model_name, check_weights, load_checked


@dataclass(frozen=True)
class SlotRequest:
    slot: int
    base_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]


@dataclass(frozen=True)
class WarmupStats:
    """What `Engine.warmup` paid once so that no later call pays it: seconds, graphs captured, and
    the device memory it kept, as deltas of torch's allocated and reserved bytes and of the
    device's used memory (which also counts graph executables and library workspaces)."""

    seconds: float = 0.0
    graphs: int = 0
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    device_bytes: int = 0


class Pending(Protocol):
    """A draw's results on their way to the host (first draws, async prefills, step copies)."""

    def ready(self) -> bool:
        """True once `to_host` would not wait."""

    def to_host(self) -> dict[str, list]:
        """One list per result field (`tokens`, `logprob_q`, ...), one entry per row."""


class Ready:
    """Results already on the host: a `Pending` that never waits."""

    def __init__(self, result: dict[str, list]):
        self.result = result

    def ready(self) -> bool:
        return True

    def to_host(self) -> dict[str, list]:
        return self.result


class Engine(ABC):
    vocab_size: int  # shared vocabulary width of the returned logits
    device: torch.device
    max_slots: int
    # Whether requests may be admitted while other slots are still decoding (continuous batching).
    supports_refill: bool = False
    # Whether `step(tokens=None)` reads each slot's last token on the device, so the scheduler may
    # queue step n + 1 before it has read step n.
    pipelines: bool = False
    # Whether the engine computes with the tensors of the Hugging Face models it was built from, so
    # a weight update of the engine is one of those models too (False: it holds copies).
    shares_model_weights: bool = False

    def batch_limit(self) -> int:
        """Most rows the scheduler puts in one step. An engine with more slots than this keeps
        the others for requests already prefilled (first token drawn) that wait for a free row."""
        return self.max_slots

    def max_context(self) -> int:
        """Longest sequence (prompt + generated) either model supports."""
        return 1 << 30

    @abstractmethod
    def add(self, requests: list[SlotRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill requests into free slots; next-token logits of base and teacher, [k, V] each."""

    @abstractmethod
    def decode(self, slots: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append tokens ([B] int64) to slots ([B] int64); next-token logits [B, V] of each model."""

    @abstractmethod
    def release(self, slots: list[int]) -> None:
        """Free slots whose sequences are finished."""

    def sample(
        self, logits_b: torch.Tensor, logits_t: torch.Tensor, row_seeds: Sequence[int], steps: Sequence[int],
        mix: MixConfig, params: SamplingParams,
    ) -> Pending:  # fmt: skip
        """One token per row ([B, V] logits of each model): the torch step, read at once."""
        device = logits_b.device
        seeds_t = torch.tensor(list(row_seeds), dtype=torch.long, device=device)
        steps_t = torch.tensor(list(steps), dtype=torch.long, device=device)
        return Ready(sample_step(logits_b, logits_t.to(device), seeds_t, steps_t, mix, params).to_host())

    def admit(
        self, requests: list[SlotRequest], row_seeds: Sequence[int], steps: Sequence[int],
        mix: MixConfig, params: SamplingParams,
    ) -> Pending:  # fmt: skip
        """Prefill `requests` and draw their first tokens."""
        logits_b, logits_t = self.add(requests)
        return self.sample(logits_b, logits_t, row_seeds, steps, mix, params)

    def step(
        self, slots: Sequence[int], tokens: Sequence[int] | None, row_seeds: Sequence[int],
        steps: Sequence[int], mix: MixConfig, params: SamplingParams,
    ) -> Pending:  # fmt: skip
        """Append `tokens` (None: each slot's last token, where the engine `pipelines`) to `slots`
        and draw the next token of each."""
        slots_t = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        tokens_t = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        logits_b, logits_t = self.decode(slots_t, tokens_t)
        return self.sample(logits_b, logits_t, row_seeds, steps, mix, params)

    def warmup(self, mix: MixConfig, params: Sequence[SamplingParams]) -> WarmupStats:
        """Pay now the one-off costs (graph captures, kernel compiles) that runs with `mix` and these
        sampling settings would pay in their first calls; nothing to pay by default."""
        return WarmupStats()

    def weight_map(self, model: str) -> WeightMap:
        """Where each Hugging Face parameter of `model` ("base" or "teacher") lives in this engine."""
        raise NotImplementedError(
            f"the {type(self).__name__} cannot update its weights in place; build a new sampler instead"
        )

    def check_weights(
        self, model: str, shapes: Sequence[tuple[str, Sequence[int], torch.dtype | None]]
    ) -> None:
        """ValueError naming the first (name, shape, dtype) `load_weights` would refuse; touches nothing."""
        check_weights(self.weight_map(check_model_name(model)), shapes, model)

    def load_weights(self, model: str, weights: NamedTensors) -> None:
        """Copy full Hugging Face tensors, as (name, tensor) pairs (a whole or partial state dict,
        any floating dtype or device), into `model`'s weights in place; all checked first, so a
        ValueError leaves every weight as it was. Only between steps."""
        load_checked(self.weight_map(check_model_name(model)), weights, model)

    def close(self) -> None:
        """Release what the engine holds beyond memory (helper processes); idempotent."""
        return None


def admit_group(max_batch: int) -> int:
    """Free slots to wait for before a refill (or all that are waiting): one prefill and one
    first-token draw then serve many requests, instead of a small prefill on almost every step."""
    return max(1, min(16, max_batch // 16))


def spare_slots(max_batch: int) -> int:
    """Slots beyond the decode batch, for requests prefilled ahead (one admission group): an
    engine that prefills beside its decode steps then refills a finished row at once, instead of
    leaving it idle for the prefill's few steps."""
    return admit_group(max_batch)


def unique_prompts(requests: list[SlotRequest]) -> tuple[list[SlotRequest], list[int]]:
    """Distinct (base, teacher) prompt pairs and, per request, the index of its pair."""
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    firsts: list[SlotRequest] = []
    owner: list[int] = []
    for req in requests:
        key = (req.base_ids, req.teacher_ids)
        if key not in index:
            index[key] = len(firsts)
            firsts.append(req)
        owner.append(index[key])
    return firsts, owner
