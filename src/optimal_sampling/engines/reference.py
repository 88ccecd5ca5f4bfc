"""The reference engine: any Hugging Face AutoModelForCausalLM pair, a KV cache per model.

It is the oracle every other engine is tested against, and the fallback for architectures the
fast engine does not cover. Requests run in waves: a wave is prefilled together (left padding,
positions counted over real tokens only, so padding never leaks into attention or positions),
finished rows are dropped from the caches, and a new wave starts when all slots are free.
Weight updates copy into the Hugging Face models' own parameters (tied ones under either name).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel

from ..models.loading import context_length_of
from .base import Engine, SlotRequest, unique_prompts
from .weights import WeightMap, hf_weight_map


def cache_keyword(model: PreTrainedModel) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_context_length(model: PreTrainedModel) -> int:
    return context_length_of(model.config)


class _CachedModel:
    """One model with the KV cache, attention mask and lengths of the rows of the current wave."""

    def __init__(self, model: PreTrainedModel, vocab_size: int):
        self.model = model
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [R, L] 1 = real token
        self.lengths: torch.Tensor | None = None  # [R] real tokens so far
        self.cache_kw = cache_keyword(model)

    @torch.inference_mode()
    def prefill(self, prompts: list[tuple[int, ...]], rows: torch.Tensor) -> torch.Tensor:
        """Left-padded prefill of distinct prompts, then rows (indices into prompts) are expanded."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: cache},
        )
        rows = rows.to(self.device)
        cache.reorder_cache(rows)
        self.cache, self.mask, self.lengths = cache, mask[rows], mask.sum(-1)[rows]
        return out.logits[:, -1, : self.vocab_size][rows]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:  # [R] -> [R, V]
        ones = torch.ones_like(self.lengths).unsqueeze(-1)
        self.mask = torch.cat([self.mask, ones], dim=-1)
        out = self.model(
            input_ids=tokens.unsqueeze(-1).to(self.device),
            attention_mask=self.mask,
            position_ids=self.lengths.unsqueeze(-1),
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        self.lengths = self.lengths + 1
        return out.logits[:, -1, : self.vocab_size]

    def keep_rows(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            self.cache = self.mask = self.lengths = None
            return
        rows = rows.to(self.device)
        self.cache.reorder_cache(rows)
        self.mask, self.lengths = self.mask[rows], self.lengths[rows]


class ReferenceEngine(Engine):
    supports_refill = False
    shares_model_weights = True

    def __init__(self, base: PreTrainedModel, teacher: PreTrainedModel, vocab_size: int, max_slots: int = 64):
        self.base = _CachedModel(base, vocab_size)
        self.teacher = _CachedModel(teacher, vocab_size)
        self.vocab_size = vocab_size
        self.device = self.base.device
        self.max_slots = max_slots
        self.row_slots: list[int] = []  # slot held by each cache row, in row order

    def max_context(self) -> int:
        return min(model_context_length(self.base.model), model_context_length(self.teacher.model))

    def weight_map(self, model: str) -> WeightMap:
        return hf_weight_map((self.base if model == "base" else self.teacher).model)

    def add(self, requests: list[SlotRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.row_slots:
            raise RuntimeError("the reference engine starts a new wave only when every slot is free")
        firsts, owner = unique_prompts(requests)
        rows = torch.tensor(owner, dtype=torch.long)
        logits_base = self.base.prefill([r.base_ids for r in firsts], rows)
        logits_teacher = self.teacher.prefill([r.teacher_ids for r in firsts], rows)
        self.row_slots = [r.slot for r in requests]
        return logits_base, logits_teacher

    def decode(self, slots: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if slots.tolist() != self.row_slots:
            raise RuntimeError("the reference engine decodes all active slots, in the order they were added")
        return self.base.decode(tokens), self.teacher.decode(tokens.to(self.teacher.device))

    def release(self, slots: list[int]) -> None:
        gone = set(slots)
        keep = [i for i, s in enumerate(self.row_slots) if s not in gone]
        rows = torch.tensor(keep, dtype=torch.long)
        self.base.keep_rows(rows)
        self.teacher.keep_rows(rows)
        self.row_slots = [self.row_slots[i] for i in keep]
