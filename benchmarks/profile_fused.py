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
from bench_api import CONFIGS  # benchmarks/ is the script's directory
from bench_decode import graph_ms

from optimal_sampling.config import MixConfig, SamplingParams
from optimal_sampling.engines.fast.mixing_fast import FusedStepSampler

VOCAB = 151936


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
            params = SamplingParams(**{"temperature": 1.0, **sampling})
            sampler = FusedStepSampler(MixConfig(**mix), params, VOCAB, torch.device("cuda"))
            step = partial(sampler, base, teacher, seeds, steps)
            ms = graph_ms(step, repeat=30)
            out["ms"][f"{name}|{batch}"] = round(ms, 4)
            line = {"config": name, "batch": batch, "ms": round(ms, 4)}
            if not args.no_profile and batch == max(map(int, args.batches.split(","))):
                out["kernels"][name] = line["kernels"] = kernel_shares(step)
            print(json.dumps(line), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
