"""Where the fused step's time goes, per configuration (issue 15): GPU ms per step of the fused
sampler alone (captured in a CUDA graph, as the engine runs it) and the share of each kernel.

Random bf16 logit rows of the real vocabulary width (151,936): base ~ 3 N(0, 1), teacher = base +
N(0, 1) (peaked rows that differ, like a real pair's), at batch 64 and 256, for the
configurations of bench_api. kl_symmetry is the baseline of the same run.

    PYTHONPATH=src python3 benchmarks/profile_fused.py [--batches 64,256] [--configs a,b] [--no-profile]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from functools import partial

import torch

from optimal_sampling.config import MixConfig, SamplingParams
from optimal_sampling.engines.fast.mixing_fast import FusedStepSampler

VOCAB = 151936
CONFIGS = {
    "kl_symmetry": ({}, {}),
    "kl_symmetry+diagnostics": ({}, {"collect_diagnostics": True}),
    "ess_balance": ({"alpha_method": "ess_balance"}, {}),
    "ess_balance+diagnostics": ({"alpha_method": "ess_balance"}, {"collect_diagnostics": True}),
    "entropy": ({"alpha_method": "entropy"}, {}),
    "entropy+diagnostics": ({"alpha_method": "entropy"}, {"collect_diagnostics": True}),
    "reverse_kl_symmetry": ({"alpha_method": "reverse_kl_symmetry"}, {}),
    "fixed 0.7": ({"alpha_method": "fixed", "fixed_alpha": 0.7}, {}),
    "kl_symmetry+top_p 0.95": ({}, {"top_p": 0.95}),
    "kl_symmetry+top_k 50+top_p 0.9": ({}, {"top_k": 50, "top_p": 0.9}),
    "kl_symmetry+min_p 0.05": ({}, {"min_p": 0.05}),
    "kl_symmetry+constraint top_p 0.9": ({"constraint_to_target": True, "target_top_p": 0.9}, {}),
    "kl_symmetry greedy": ({}, {"temperature": 0.0}),
}


def graph_ms(fn, repeat: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.synchronize()
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeat


def kernel_shares(fn, repeat: int = 5) -> dict[str, float]:
    """GPU us per call of each kernel (eager calls under the torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" or getattr(event, "self_device_time_total", 0) > 0:
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            if us > 0:
                times[event.key[:60]] += us / repeat
    return dict(sorted(((k, round(v, 1)) for k, v in times.items()), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--configs", default=None)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    out: dict = {"label": args.label, "device": torch.cuda.get_device_name(), "ms": {}, "kernels": {}}
    for batch in map(int, args.batches.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(batch)
        base = 3.0 * torch.randn(batch, VOCAB, device="cuda", generator=gen)
        teacher = (base + torch.randn(batch, VOCAB, device="cuda", generator=gen)).bfloat16()
        base = base.bfloat16()
        seeds = torch.arange(batch, device="cuda", dtype=torch.long)
        steps = torch.zeros(batch, device="cuda", dtype=torch.long)
        for name in names:
            mix, sampling = CONFIGS[name]
            sampler = FusedStepSampler(MixConfig(**mix), SamplingParams(**{"temperature": 1.0, **sampling}))
            step = partial(sampler, base, teacher, seeds, steps)
            ms = graph_ms(step)
            out["ms"][f"{name}|{batch}"] = round(ms, 4)
            line = {"config": name, "batch": batch, "ms": round(ms, 4)}
            if not args.no_profile and batch == max(map(int, args.batches.split(","))):
                out["kernels"][name] = line["kernels"] = kernel_shares(step)
            print(json.dumps(line), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
