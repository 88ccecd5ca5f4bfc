"""Tune the split-K decode attention (triton_attention.py): keys per step, programs, pipelining.

On bf16 KV caches with the bench's shapes (Qwen2.5-1.5B: 12 query / 2 KV heads of 128; 0.5B: 14 / 2
of 64), every row at the same context length, the attention of one layer is timed from a CUDA
graph for each configuration and (batch, context), and checked against the SDPA path. Reports
microseconds per call and the KV read rate (bytes of keys and values actually read / time).

    PYTHONPATH=src python3 benchmarks/attention_sweep.py   (CUDA; JSON last)
"""

from __future__ import annotations

import itertools
import json

import torch
from bench_decode import graph_ms  # benchmarks/ is the script's directory

import optimal_sampling.engines.fast.triton_attention as ta
from optimal_sampling.engines.fast.attention import decode_attention_sdpa
from optimal_sampling.engines.fast.graphs import bucket_of

SHAPES = {"1.5b": (12, 2, 128), "0.5b": (14, 2, 64)}  # heads, kv_heads, head_dim
CASES = [(1, 320), (64, 320), (256, 320), (256, 640)]  # (batch, context)
# BLOCK_N, PROGRAMS (512: one split at batch 256), STAGES; the first is the default
CONFIGS = list(itertools.product((64, 32), (512, 528, 1056), (2, 1, 3)))


def main() -> None:
    torch.manual_seed(0)
    out: dict = {"card": torch.cuda.get_device_name(), "results": []}
    inputs = {}
    for name, (heads, kv, dim) in SHAPES.items():
        for batch, ctx in CASES:
            k = torch.randn(batch + 1, 1024, kv, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
            slots = torch.arange(batch, device="cuda")
            lengths = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            inputs[name, batch, ctx] = (q, k, v, slots, lengths, bucket_of(ctx, 1024))
    for block, programs, stages in CONFIGS:
        ta.BLOCK_N, ta.PROGRAMS, ta.STAGES = block, programs, stages
        row = {"block_n": block, "programs": programs, "stages": stages, "us": {}, "tb_s": {}, "max_err": 0.0}
        for (name, batch, ctx), (q, k, v, slots, lengths, width) in inputs.items():
            got = ta.decode_attention_triton(q, k, v, slots, lengths, width)
            want = decode_attention_sdpa(q.float(), k.float(), v.float(), slots, lengths, width)
            row["max_err"] = max(row["max_err"], (got.float() - want).abs().max().item())
            call = lambda q=q, k=k, v=v, s=slots, n=lengths, w=width: ta.decode_attention_triton(q, k, v, s, n, w)  # noqa: E731
            us = 1e3 * graph_ms(call, repeat=50)
            key = f"{name}_b{batch}_ctx{ctx}"
            row["us"][key] = round(us, 2)
            row["tb_s"][key] = round(2 * k[0, :ctx].numel() * 2 * batch / (us * 1e-6) / 1e12, 2)
        print(json.dumps(row), flush=True)
        out["results"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
