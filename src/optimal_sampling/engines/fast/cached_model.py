"""A compact model with its static KV cache: what the fast engine (and its prefill) runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import CompactModel


@dataclass
class CachedModel:
    net: CompactModel
    k: torch.Tensor  # [layers, slots + 1, max_len, kv_heads, head_dim]
    v: torch.Tensor
    lengths: list[int]  # per slot, on the host
    counters: torch.Tensor  # [(slots + 1) * kv_heads] int32 zeros: decode attention's split counters


def new_cached_model(model, slots: int, max_len: int) -> CachedModel:
    """model: a Hugging Face model, or a CompactModel already built (e.g. a tensor-parallel shard)."""
    if isinstance(model, CompactModel):
        net = model
    else:
        device = next(model.parameters()).device
        net = CompactModel(model, max_len, fused=device.type == "cuda")
    s = net.spec
    shape = (s.layers, slots + 1, max_len, s.kv_heads, s.head_dim)
    k = torch.zeros(shape, dtype=net.dtype, device=net.device)
    counters = torch.zeros((slots + 1) * s.kv_heads, dtype=torch.int32, device=net.device)
    return CachedModel(net, k, torch.zeros_like(k), [0] * (slots + 1), counters)
