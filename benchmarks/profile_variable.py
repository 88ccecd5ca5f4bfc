"""Where the variable-length workload's time goes (issue 4): prefill cost and kernels, decode step
time by context length and by batch bucket, on the bench's random-weight Qwen2.5 0.5B/1.5B pair.

    PYTHONPATH=src python benchmarks/profile_variable.py [--profile] [--gemms]

Prints one JSON line last: prefill ms per chunk size, decode ms (models only and full step) per
context, full step ms per batch; with --profile also the top prefill kernels (eager, no graphs)
and, at decode batch 1 and 64, the kernels of one eager step (count, summed GPU time, top names);
with --gemms each weight matrix's F.linear time and read rate per batch (cuBLAS, graph replay
over every layer's matrix so that L2 holds none).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from bench_decode import VOCAB, FastLoop, fixed_steps, graph_ms, prompts, qwen_model, timed

from optimal_sampling.config import MixConfig, SamplingParams
from optimal_sampling.engines.base import SlotRequest
from optimal_sampling.engines.fast import FastEngine
from optimal_sampling.engines.fast.graphs import GraphCache


def prefill_ms(engine: FastEngine, count: int, length: int, repeat: int = 5) -> float:
    requests = [SlotRequest(s, p, p) for s, p in enumerate(prompts(count, count, length))]
    slots = [r.slot for r in requests]

    def once():
        engine.add(requests)
        engine.release(slots)

    once()
    return 1e3 * timed(once, repeat)


def decode_ms(loop: FastLoop, batch: int, context: int, steps: int = 10) -> dict:
    slots = list(range(batch))
    full, models, stepwise = fixed_steps(
        loop, slots, loop.start(slots, prompts(batch, context + batch, context))
    )
    for _ in range(2):
        full()
        models()
        stepwise()
    out = dict(
        full=1e3 * timed(full, steps),
        models=1e3 * timed(models, steps),
        stepwise=1e3 * timed(stepwise, steps),
    )
    loop.engine.release(slots)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="also list the top prefill kernels")
    parser.add_argument("--gemms", action="store_true", help="also time each weight matrix per batch")
    args = parser.parse_args()
    base, teacher = qwen_model("0.5b"), qwen_model("1.5b")
    engine = FastEngine(base, teacher, VOCAB, max_slots=256, max_len=1024)
    loop = FastLoop(engine, MixConfig(), SamplingParams(temperature=1.0))
    out: dict = dict(card=torch.cuda.get_device_name())
    out["prefill_ms"] = {f"{n}x128": prefill_ms(engine, n, 128) for n in (16, 32, 64)}
    print(out, flush=True)
    out["decode_b256_by_context"] = {c: decode_ms(loop, 256, c) for c in (128, 320, 640)}
    print(out, flush=True)
    out["decode_by_batch_ctx320"] = {b: decode_ms(loop, b, 320) for b in (1, 16, 32, 64, 96, 128, 192, 256)}
    print(out, flush=True)
    if args.gemms:
        out["gemms"] = {"0.5b": gemm_rates(engine.base.net), "1.5b": gemm_rates(engine.teacher.net)}
        print(json.dumps(out["gemms"]), flush=True)
    if args.profile:
        engine.prefill_graphs = GraphCache(False)  # eager, so the profiler sees each kernel
        requests = [SlotRequest(s, p, p) for s, p in enumerate(prompts(16, 1))]
        engine.add(requests)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.add(requests)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        out["decode_kernels"] = {b: decode_kernels(loop, b) for b in (1, 64)}
    print(json.dumps(out))


GEMM_BATCHES = (1, 8, 16, 32, 64, 96, 128, 192, 256)


def gemm_rates(net) -> dict:
    """Per weight kind (qkv, o, gate_up, down, lm_head) of a CompactModel and batch M: us per
    F.linear (cuBLAS) and GB/s of weight read; the layers' matrices in turn, so none stays in L2."""
    kinds = {
        "qkv": [(lw.qkv, lw.qkv_bias) for lw in net.layers],
        "o": [(lw.o_proj, None) for lw in net.layers],
        "gate_up": [(lw.gate_up, None) for lw in net.layers],
        "down": [(lw.down, None) for lw in net.layers],
        "lm_head": [(net.lm_head, None)],
    }
    out = {}
    for kind, weights in kinds.items():
        w0 = weights[0][0]
        row = {}
        for m in GEMM_BATCHES:
            x = torch.randn(m, w0.shape[1], device=w0.device, dtype=w0.dtype)
            us = 1e3 * graph_ms(lambda x=x, ws=weights: [F.linear(x, w, b) for w, b in ws], 10) / len(weights)
            row[m] = dict(us=round(us, 2), gb_s=round(w0.numel() * w0.element_size() / us / 1e3))
        out[kind] = dict(shape=list(w0.shape), layers=len(weights), by_batch=row)
    return out


def decode_kernels(loop: FastLoop, batch: int, context: int = 320) -> dict:
    """One eager decode step (no graph, so the profiler sees each kernel): kernels launched, their
    summed GPU time (both streams), and the top kernels; against the captured step's wall time."""
    engine = loop.engine
    slots = list(range(batch))
    full, _, _ = fixed_steps(loop, slots, loop.start(slots, prompts(batch, context + batch, context)))
    for _ in range(3):
        full()
    graph_ms = 1e3 * timed(full, 10)
    graphs, engine.graphs = engine.graphs, GraphCache(False)
    try:
        full()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            full()
            torch.cuda.synchronize()
    finally:
        engine.graphs = graphs
        engine.release(slots)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:40], [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.elapsed_us() / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    summary = dict(
        graph_step_ms=graph_ms, kernels=len(kernels), kernel_ms=sum(v[1] for v in by_name.values()),
        top=[(name, count, round(ms, 4)) for name, (count, ms) in top],
    )  # fmt: skip
    print(f"decode batch {batch}:", json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
