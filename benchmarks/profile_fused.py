"""Where the fused step's time goes, per configuration (issue 15): GPU ms per step of the fused
sampler alone (captured in a CUDA graph, as the engine runs it) and the share of each kernel.

Random bf16 logit rows of the real vocabulary width (151,936): base ~ 3 N(0, 1), teacher = base +
N(0, 1) (peaked rows that differ, like a real pair's), at batch 64 and 256, for the
configurations of bench_api. kl_symmetry is the baseline of the same run.

    PYTHONPATH=src python3 benchmarks/profile_fused.py [--batches 64,256] [--configs a,b] [--no-profile]
        [--scale 0.6] [--cut-variants 16x4,8x6]

--scale sets the base rows' spread (0.6: the near-uniform rows of random-weight models); each
--cut-variants entry (thresholds per refining pass x passes, triton_cut.K_REFINE x PASSES) reruns
the configurations with cuts, and checks they draw the tokens of the first variant.
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
    parser.add_argument(
        "--scale", type=float, default=3.0, help="base ~ scale N(0, 1), teacher base + scale/3 N(0, 1)"
    )
    parser.add_argument("--cut-variants", default=None, help="K_REFINE x PASSES per variant, e.g. 16x4,8x6")
    args = parser.parse_args()
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    out: dict = {"label": args.label, "device": torch.cuda.get_device_name(), "ms": {}, "kernels": {}}
    from optimal_sampling.engines.fast import triton_cut

    variants = (
        [tuple(map(int, v.split("x"))) for v in args.cut_variants.split(",")] if args.cut_variants else []
    )
    default = (triton_cut.K_REFINE, triton_cut.PASSES)
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
                triton_cut.K_REFINE, triton_cut.PASSES = variant
                sampler = FusedStepSampler(MixConfig(**mix), params, VOCAB, torch.device("cuda"))
                step = partial(sampler, base, teacher, seeds, steps)
                tokens = step()[0].clone()
                first_tokens = tokens if first_tokens is None else first_tokens
                ms = graph_ms(step, repeat=30)
                label = name if variant == default and not variants else f"{name} [{variant[0]}x{variant[1]}]"
                out["ms"][f"{label}|{batch}"] = round(ms, 4)
                line = {"config": label, "batch": batch, "ms": round(ms, 4)}
                if cuts and variants:
                    line["same_tokens"] = bool(torch.equal(tokens, first_tokens))
                if not args.no_profile and batch == max(map(int, args.batches.split(","))):
                    out["kernels"][label] = line["kernels"] = kernel_shares(step)
                print(json.dumps(line), flush=True)
            triton_cut.K_REFINE, triton_cut.PASSES = default
    print(json.dumps(out))


if __name__ == "__main__":
    main()
