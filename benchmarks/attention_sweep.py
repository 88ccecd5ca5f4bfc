"""Tune the split-K decode attention (triton_attention.py): keys per step, programs, pipelining.

On bf16 KV caches with the bench's shapes (Qwen2.5-1.5B: 12 query / 2 KV heads of 128; 0.5B: 14 / 2
of 64), every row at the same context length, the decode step's kernel of one layer (RoPE, cache
write and attention, `rope_decode_attention`, with the engine's persistent split counters) is
timed from a CUDA graph for each configuration and (batch, context), and checked against
rope_store then the SDPA path. Reports microseconds per call and the KV read rate (bytes of keys
and values actually read / time).

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
from optimal_sampling.engines.fast.triton_layers import rope_store

SHAPES = {"1.5b": (12, 2, 128), "0.5b": (14, 2, 64)}  # heads, kv_heads, head_dim
CASES = [(1, 320), (1, 640), (1, 2048), (16, 320), (16, 2048), (64, 320), (128, 320), (256, 320), (256, 640)]
# BLOCK_N, PROGRAMS (512: one split at batch 256), STAGES, MAX_SPLITS; the first is the default
CONFIGS = [(64, 512, 2, 16), *itertools.product((64,), (128, 256), (2,), (4, 8, 16)), (32, 128, 2, 8)]


def main() -> None:
    torch.manual_seed(0)
    out: dict = {"card": torch.cuda.get_device_name(), "results": []}
    inputs = {}
    for name, (heads, kv, dim) in SHAPES.items():
        freqs = torch.arange(4096, device="cuda")[:, None] / (
            1e6 ** (torch.arange(0, dim, 2, device="cuda") / dim)
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        tables = emb.cos().bfloat16(), emb.sin().bfloat16()
        for batch, ctx in CASES:
            k = torch.randn(batch + 1, max(1024, ctx), kv, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            qkv = torch.randn(batch, (heads + 2 * kv) * dim, device="cuda", dtype=torch.bfloat16)
            slots = torch.arange(batch, device="cuda")
            positions = torch.full((batch,), ctx - 1, device="cuda")
            counters = torch.zeros(batch * kv, device="cuda", dtype=torch.int32)
            width = bucket_of(ctx, k.shape[1])
            inputs[name, batch, ctx] = (heads, qkv, tables, k, v, slots, positions, width, counters)
    for block, programs, stages, most in CONFIGS:
        ta.BLOCK_N, ta.PROGRAMS, ta.STAGES, ta.MAX_SPLITS = block, programs, stages, most
        row = {
            "block_n": block,
            "programs": programs,
            "stages": stages,
            "max_splits": most,
            "us": {},
            "tb_s": {},
        }
        row["max_err"] = 0.0
        for (name, batch, ctx), (heads, qkv, (cos, sin), k, v, slots, pos, width, counters) in inputs.items():

            def call(
                heads=heads,
                qkv=qkv,
                cos=cos,
                sin=sin,
                k=k,
                v=v,
                slots=slots,
                pos=pos,
                width=width,
                c=counters,
            ):
                return ta.rope_decode_attention(
                    qkv, heads, cos, sin, None, None, 1e-6, k, v, slots, pos, width, c
                )

            got = call()
            kv_heads = k.shape[2]
            q = rope_store(qkv, pos, slots, cos, sin, k, v, None, None, 1e-6, heads, kv_heads)
            want = decode_attention_sdpa(q.float(), k.float(), v.float(), slots, pos + 1, width)
            row["max_err"] = max(row["max_err"], (got.float() - want).abs().max().item())
            us = 1e3 * graph_ms(call, repeat=50)
            key = f"{name}_b{batch}_ctx{ctx}"
            row["us"][key] = round(us, 2)
            row["tb_s"][key] = round(2 * k[0, :ctx].numel() * 2 * batch / (us * 1e-6) / 1e12, 2)
        print(json.dumps(row), flush=True)
        out["results"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
