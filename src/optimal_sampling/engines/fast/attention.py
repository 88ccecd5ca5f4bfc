"""Attention over the static KV cache (already holding this step's keys): prefill and decode.

Cache layout per model: k, v `[layers, slots + 1, max_len, kv_heads, head_dim]`; the last slot is
scratch (padding rows of a CUDA-graph bucket write there, so real slots are never touched).
Invariant: slot s holds valid keys/values at positions [0, length_s); decode reads exactly those.

Decode reads only each slot's own prefix: on CUDA through the split-K Triton kernel of
`triton_attention.py` (GQA heads of one KV head share each key load; a slot's work stops at its
length, so prompts of different lengths batch without padding waste); on CPU (and as the
obviously-correct path) through `scaled_dot_product_attention` with a length mask.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Prefill SDPA backends on CUDA: not cuDNN's, which builds a plan per new shape (~1.7 ms per call
# of an unseen prompt length on an H100: 87 ms in a batch-256 first call of the benchmark pair)
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of right-padded prompts from position 0.

    q: [n, T, heads, D]; k, v: [n, T, kv_heads, D] -> [n, T, heads * D]. Padding sits after each
    prompt's last token, so causality alone keeps it out of every real query's keys.
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    with sdpa_kernel(PREFILL_BACKENDS) if q.is_cuda else nullcontext():
        # enable_gqa: each group of query heads reads its KV head in place (no repeated copy)
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # [n, heads, T, D]
    return out.transpose(1, 2).flatten(2)


def decode_attention_sdpa(
    q, cache_k_layer, cache_v_layer, slots, lengths, width: int, counters: torch.Tensor | None = None
) -> torch.Tensor:
    """q: [B, heads, D]; caches [S, L, kv_heads, D]; lengths [B] (keys per row) -> [B, heads * D].

    width: how many cache positions to look at (>= every length). counters: the Triton kernel's
    split counters (same signature); unused here.
    """
    groups = q.shape[1] // cache_k_layer.shape[2]
    keys = cache_k_layer[slots, :width].transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, heads, W, D]
    values = cache_v_layer[slots, :width].transpose(1, 2).repeat_interleave(groups, dim=1)
    visible = torch.arange(width, device=q.device)[None, :] < lengths[:, None]  # [B, W]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=visible[:, None, None, :])
    return out.flatten(1)
