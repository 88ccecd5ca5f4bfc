"""Where a warm `generate` call's time goes, per configuration (issue 15): the torch profiler over
one call through the public API after a first call and a timed repeat, so that a configuration's
extra time per decode step splits into GPU kernels (by name, ms per step) and GPU idle time (the
gaps between kernels: host work the device waits for).

Same pair, prompts and settings as bench_api (random-weight Qwen2.5-0.5B / 1.5B shapes, ~110-token
prompts); configurations that share a MixConfig share a sampler.

    PYTHONPATH=src python3 benchmarks/profile_api.py [--batch 256] [--max-tokens 128]
        [--configs "kl_symmetry,kl_symmetry+top_p 0.95"] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from bench_api import CONFIGS, prompts_of, timed, write_pair  # benchmarks/ is the script's directory
from one_off import host_ops

from optimal_sampling import OptimalSampler

GAP_US = 5.0  # idle stretches shorter than this are launch spacing inside a graph, not waiting


def busy_and_gaps(intervals: list[tuple[float, float]]) -> tuple[float, float, float, int]:
    """(span, busy, idle in gaps of at least GAP_US, those gaps) in us, over kernel intervals that
    may overlap (the two models' streams)."""
    intervals = sorted(intervals)
    busy = idle = 0.0
    gaps = 0
    start, end = intervals[0]
    for s, e in intervals[1:]:
        if s > end:
            busy += end - start
            if s - end >= GAP_US:
                idle, gaps = idle + s - end, gaps + 1
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return intervals[-1][1] - intervals[0][0], busy, idle, gaps


def profile_call(call, steps: int, top: int) -> dict:
    """The call's wall time under the profiler, its GPU span, busy and idle time per decode step,
    and the `top` kernels by time (ms per step, launches per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds, _ = timed(call)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    span, busy, idle, gaps = busy_and_gaps(intervals)
    per_name: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        per_name[e.name[:48]][0] += 1
        per_name[e.name[:48]][1] += e.time_range.elapsed_us()
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "profiled_s": round(seconds, 3),
        "gpu_span_ms": round(span / 1e3, 2),
        "busy_ms_per_step": round(busy / 1e3 / steps, 4),
        "idle_ms_per_step": round(idle / 1e3 / steps, 4),
        "idle_gaps_per_step": round(gaps / steps, 2),
        "kernel_ms_per_step": round(sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps, 4),
        "kernels": {name: [round(n / steps, 2), round(us / 1e3 / steps, 4)] for name, (n, us) in ranked},
        "host_ms": host_ops(prof, top),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--configs", default="kl_symmetry,kl_symmetry+top_p 0.95")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    out: dict = {"card": torch.cuda.get_device_name(), "batch": args.batch, "rows": {}}
    with tempfile.TemporaryDirectory() as root:
        base, teacher = write_pair(Path(root), "small")
        samplers: dict[str, OptimalSampler] = {}
        for name in args.configs.split(","):
            mix, sampling = CONFIGS[name]
            key = json.dumps(mix, sort_keys=True)
            if key not in samplers:
                samplers.clear()
                samplers[key] = OptimalSampler(base, teacher, max_batch_size=args.batch, seed=0, **mix)
            sampler = samplers[key]
            prompts = prompts_of(sampler.base.tokenizer, args.batch, offset=args.batch)
            call = partial(sampler.generate, prompts, max_tokens=args.max_tokens, temperature=1.0, **sampling)
            timed(call)  # a setting warmup did not meet captures here
            seconds, result = timed(call)
            row = {"config": name, "repeat_s": round(seconds, 3), "tokens": sum(result.num_tokens)}
            row.update(profile_call(call, args.max_tokens - 1, args.top))
            print(json.dumps(row), flush=True)
            out["rows"][name] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
