"""Where the fused step's time goes, per configuration (issue 15): GPU ms per step of the fused
sampler alone (captured in a CUDA graph, as the engine runs it) and the share of each kernel.

Random bf16 logit rows of the real vocabulary width (151,936): base ~ 3 N(0, 1), teacher = base +
N(0, 1) (peaked rows that differ, like a real pair's), at batch 64 and 256, for the
configurations of bench_api. kl_symmetry is the baseline of the same run.

    PYTHONPATH=src python3 benchmarks/profile_fused.py [--batches 64,256] [--configs a,b] [--no-profile]
        [--scale 0.6] [--cut-variants 16x4,8x6]

--scale sets the base rows' spread (0.6: the near-uniform rows of random-weight models); each
--cut-variants entry (thresholds per refining pass x passes [x CAP [x SEARCH_BLOCK [x BIG]]], triton_cut's
knobs) reruns the configurations with cuts, and checks they draw the tokens of the first variant;
--sequence lists each kernel of one step in launch order (which pass costs what).
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


def kernel_sequence(fn) -> list[list]:
    """[name, GPU us] of each kernel of one eager call, in launch order (which pass costs what)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: e.time_range.start)
    return [[e.name[:24], round(e.time_range.elapsed_us(), 1)] for e in kernels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--configs", default=None)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--scale", type=float, default=3.0, help="base ~ scale N(0, 1), teacher base + scale/3 N(0, 1)"
    )
    parser.add_argument(
        "--cut-variants",
        default=None,
        help="K_REFINE x PASSES [x CAP [x SEARCH_BLOCK [x BIG]]] per variant, e.g. 16x4,8x6x2048x128x0",
    )
    parser.add_argument("--sequence", action="store_true", help="also list each kernel of a step in order")
    args = parser.parse_args()
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    out: dict = {"label": args.label, "device": torch.cuda.get_device_name(), "ms": {}, "kernels": {}}
    from optimal_sampling.engines.fast import triton_cut

    variants = (
        [tuple(map(int, v.split("x"))) for v in args.cut_variants.split(",")] if args.cut_variants else []
    )
    knobs = ("K_REFINE", "PASSES", "CAP", "SEARCH_BLOCK", "BIG")
    default = tuple(getattr(triton_cut, name) for name in knobs)
    variants = [v + default[len(v) :] for v in variants]
    for batch in map(int, args.batches.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(batch)
        base = args.scale * torch.randn(batch, VOCAB, device="cuda", generator=gen)
        teacher = (base + args.scale / 3 * torch.randn(batch, VOCAB, device="cuda", generator=gen)).bfloat16()
        base = base.bfloat16()
        seeds = torch.arange(batch, device="cuda", dtype=torch.long)
        steps = torch.zeros(batch, device="cuda", dtype=torch.long)
        for name in names:
            mix, sampling = CONFIGS[name]
            params = SamplingParams(**{"temperature": 1.0, **sampling})
            cuts = "top_" in name or "min_p" in name or "constraint" in name
            first_tokens = None
            for variant in variants if cuts and variants else [default]:
                for knob, value in zip(knobs, variant, strict=True):
                    setattr(triton_cut, knob, value)
                sampler = FusedStepSampler(MixConfig(**mix), params, VOCAB, torch.device("cuda"))
                step = partial(sampler, base, teacher, seeds, steps)
                tokens = step()[0].clone()
                first_tokens = tokens if first_tokens is None else first_tokens
                ms = graph_ms(step, repeat=30)
                tag = "x".join(map(str, variant))
                label = name if variant == default and not variants else f"{name} [{tag}]"
                out["ms"][f"{label}|{batch}"] = round(ms, 4)
                line = {"config": label, "batch": batch, "ms": round(ms, 4)}
                if cuts and variants:
                    line["same_tokens"] = bool(torch.equal(tokens, first_tokens))
                if not args.no_profile and batch == max(map(int, args.batches.split(","))):
                    out["kernels"][label] = line["kernels"] = kernel_shares(step)
                    if args.sequence:
                        line["sequence"] = kernel_sequence(step)
                print(json.dumps(line), flush=True)
            for knob, value in zip(knobs, default, strict=True):
                setattr(triton_cut, knob, value)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
