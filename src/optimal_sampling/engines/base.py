"""What an engine is: two models, their KV caches, and slots; an engine never samples.

A slot holds one sequence (a request) in both models' caches. The sampler
1. `add`s requests into free slots (prefill) and gets each model's next-token logits,
2. `decode`s one token for a set of active slots and gets the next logits,
3. `release`s slots whose sequence finished.

Logits are returned cut to the shared vocabulary width `vocab_size`, so ids the tokenizer does
not have are never sampled. Requests whose (base, teacher) prompt pair is identical are
prefilled once and their caches copied (n samples per prompt).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotRequest:
    slot: int
    base_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]


class Engine(ABC):
    vocab_size: int  # shared vocabulary width of the returned logits
    device: torch.device
    max_slots: int
    # Whether requests may be added while other slots are still decoding (continuous batching).
    supports_refill: bool = False

    def batch_limit(self) -> int:
        """Most rows the sampler puts in one decode step. An engine with more slots than this keeps
        the others for requests already prefilled (first token drawn) that wait for a free row."""
        return self.max_slots

    @abstractmethod
    def add(self, requests: list[SlotRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill requests into free slots; next-token logits of base and teacher, [k, V] each."""

    @abstractmethod
    def decode(self, slots: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append tokens ([B] int64) to slots ([B] int64); next-token logits [B, V] of each model."""

    @abstractmethod
    def release(self, slots: list[int]) -> None:
        """Free slots whose sequences are finished."""

    def max_context(self) -> int:
        """Longest sequence (prompt + generated) either model supports."""
        return 1 << 30


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
