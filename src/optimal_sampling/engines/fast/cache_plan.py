"""How long each slot's KV cache can be: the models' context, capped by the memory left.

One planner for the fast engine and its tensor-parallel variant (whose specs are per shard).
"""

from __future__ import annotations

import torch

CPU_CACHE_BYTES = 1 << 30  # the KV budget on the CPU, where free memory is not a meaningful bound
MIN_CACHE_LEN = 256  # shorter than this (and than the context): refuse rather than run crippled
WORKSPACE_FIXED = 1 << 30  # graphs, prefill activations


def kv_bytes_per_token(specs, dtype_bytes: int) -> int:
    """Key and value bytes one position of one slot takes in all models' caches."""
    return sum(2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes for s in specs)


def plan_max_len(
    specs, dtype_bytes: int, device: torch.device, slots: int, vocab_size: int, mem_fraction: float
) -> int:
    """max_len of slots + 1 caches (the scratch slot too) within `mem_fraction` of free memory,
    after the step's temporaries (about 24 float32 [slots + 1, V] tensors) and a fixed reserve."""
    context = min(s.context for s in specs)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        workspace = 24 * (slots + 1) * vocab_size * 4 + WORKSPACE_FIXED
        budget = free * mem_fraction - workspace
    else:
        budget = CPU_CACHE_BYTES
    max_len = min(context, int(budget // ((slots + 1) * kv_bytes_per_token(specs, dtype_bytes))))
    if max_len < min(context, MIN_CACHE_LEN):
        raise ValueError(
            f"not enough memory for a {slots}-slot KV cache: lower max_batch_size or raise mem_fraction_static"
        )
    return max_len
