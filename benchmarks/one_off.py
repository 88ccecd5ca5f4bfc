"""Where a fresh sampler's one-off costs go (issue 15): each Triton compile of its construction
and warmup (kernel, seconds; the warmup's last compiles to finish, with their start and end),
then the first batch-256 call with an unseen prompt length against its repeat under the torch
profiler (the ops whose time the first call adds).

Run with a fresh TRITON_CACHE_DIR for the cold cost a new machine pays:

    TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=src python3 benchmarks/one_off.py [--top 15] [--workers 1]
        [--no-calls] [--torch-graph]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import triton.compiler
from bench_api import prompts_of, timed, write_pair  # benchmarks/ is the script's directory

from optimal_sampling import OptimalSampler
from optimal_sampling.engines.fast.graphs import GraphCache

COMPILES: list[tuple[str, float, bool, float]] = []  # (kernel, seconds, in the main thread, end time)


def record_compiles() -> None:
    """Time every Triton compile (JITFunction binds triton.compiler.compile on first launch)."""
    original = triton.compiler.compile

    def timed_compile(src, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(src, *args, **kwargs)
        finally:
            name = getattr(getattr(src, "fn", None), "__name__", str(src)[:40])
            main = threading.current_thread() is threading.main_thread()
            end = time.perf_counter()
            COMPILES.append((name, end - start, main, end))

    triton.compiler.compile = timed_compile


def compile_summary(
    compiles: list[tuple[str, float, bool, float]], top: int, since: float | None = None
) -> dict:
    """Compiles per kernel (count, seconds), and with `since` (a perf_counter time) the last ones
    to finish as [kernel, start, end] seconds after it: the long pole of a parallel walk."""
    per_kernel: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name, seconds, _, _ in compiles:
        per_kernel[name][0] += 1
        per_kernel[name][1] += seconds
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    out = {
        "compiles": len(compiles),
        "compile_s": round(sum(c[1] for c in compiles), 2),
        "in_main_thread": sum(c[2] for c in compiles),  # not by the parallel precompile
        "by_kernel": {name: [n, round(s, 2)] for name, (n, s) in ranked},
    }
    if since is not None:
        last = sorted(compiles, key=lambda c: -c[3])[:8]
        out["last_to_finish"] = [[c[0], round(c[3] - c[1] - since, 2), round(c[3] - since, 2)] for c in last]
    return out


def time_phases(engine) -> dict[str, float]:
    """Seconds the warmup spends per phase: the parallel compile walk, then (outside it) the
    prefill-graph and decode-graph captures and the warm prefills (first draws, eager prefills)."""
    phases: dict[str, float] = defaultdict(float)
    inside = [False]

    def timing(name, fn, mark=False):
        def wrapper(*args, **kwargs):
            if inside[0] and not mark:
                return fn(*args, **kwargs)
            inside[0] = inside[0] or mark
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                phases[name] += time.perf_counter() - start
                inside[0] = inside[0] and not mark

        return wrapper

    engine.compile_kernels = timing("compile_walk", engine.compile_kernels, mark=True)
    engine.prefill_graphs.prepare = timing("prefill_graphs", engine.prefill_graphs.prepare)
    engine.graphs.prepare = timing("decode_graphs", engine.graphs.prepare)
    engine.warm_prefills = timing("warm_prefills", engine.warm_prefills)
    return phases


def torch_graph_capture(self, fn, static_inputs):
    """GraphCache.capture as before 2026-12-07 (the baseline of --torch-graph): through
    torch.cuda.graph, which synchronizes and empties the allocator's cache before each capture."""
    self.captures += 1
    self.stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(self.stream):
        fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(self.stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
        outputs = fn(*static_inputs)
    return static_inputs, graph, tuple(outputs)


def time_capture_parts(caches) -> dict[str, float]:
    """Where the graph captures' seconds go (`GraphCache.capture` of each cache): the step's eager
    run and its run under capture (host time), torch.cuda.graph's synchronize (which waits for the
    eager run's GPU work) and empty_cache, capture_end (the graph's instantiation), and in all."""
    parts: dict[str, float] = defaultdict(float)
    capturing = [False]

    def timed_part(name, fn):
        def wrapper(*args, **kwargs):
            if not capturing[0]:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name] += time.perf_counter() - start

        return wrapper

    torch.cuda.synchronize = timed_part("synchronize", torch.cuda.synchronize)
    torch.cuda.empty_cache = timed_part("empty_cache", torch.cuda.empty_cache)
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache = timed_part("empty_cache", torch._C._host_emptyCache)
    torch.cuda.CUDAGraph.capture_end = timed_part("capture_end", torch.cuda.CUDAGraph.capture_end)

    def timed_capture(original):
        def capture(fn, static_inputs):
            calls = [0]

            def step(*args):  # its first run is the eager one, then the one under capture
                calls[0] += 1
                return timed_part("eager_run" if calls[0] == 1 else "captured_run", fn)(*args)

            capturing[0] = True
            start = time.perf_counter()
            try:
                return original(step, static_inputs)
            finally:
                capturing[0] = False
                parts["total"] += time.perf_counter() - start
                parts["captures"] += 1

        return capture

    for cache in caches:
        cache.capture = timed_capture(cache.capture)
    return parts


def op_times(fn, top: int) -> tuple[float, dict]:
    """Wall seconds of fn under the profiler, and its top ops by self CPU time (ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds, _ = timed(fn)
    return seconds, host_ops(prof, top)


def host_ops(prof, top: int) -> dict:
    """A finished profile's top ops by self CPU time: name -> [calls, ms]."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {e.key[:50]: [e.count, round(e.self_cpu_time_total / 1e3, 1)] for e in events}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--workers", type=int, default=None, help="compile threads (1: compile in turn)")
    parser.add_argument("--no-calls", action="store_true", help="construction and warmup only")
    parser.add_argument("--torch-graph", action="store_true", help="capture as before (torch.cuda.graph)")
    args = parser.parse_args()
    if args.torch_graph:
        GraphCache.capture = torch_graph_capture
    record_compiles()
    out: dict = {
        "card": torch.cuda.get_device_name(),
        "capture": "torch.cuda.graph" if args.torch_graph else "own",
    }
    with tempfile.TemporaryDirectory() as root:
        base, teacher = write_pair(Path(root), "small")
        built, sampler = timed(
            lambda: OptimalSampler(base, teacher, max_batch_size=256, seed=0, warmup=False)
        )
        out["construct_s"], out["construct_compiles"] = round(built, 2), compile_summary(COMPILES, args.top)
        COMPILES.clear()
        if args.workers is not None:
            sampler.engine.compile_workers = args.workers
        phases = time_phases(sampler.engine)
        capture_parts = time_capture_parts((sampler.engine.graphs, sampler.engine.prefill_graphs))
        warmup_start = time.perf_counter()
        warmed, stats = timed(sampler.warmup)
        out["warmup_phases_s"] = {name: round(seconds, 2) for name, seconds in phases.items()}
        out["capture_parts_s"] = {name: round(seconds, 2) for name, seconds in capture_parts.items()}
        out["warmup_s"], out["graphs"] = round(warmed, 2), stats.graphs
        out["warmup_compiles"] = compile_summary(COMPILES, args.top, since=warmup_start)
        print(json.dumps(out), flush=True)
        for batch, tokens, length in () if args.no_calls else ((256, 1, 201), (256, 1, 150)):
            COMPILES.clear()
            prompts = prompts_of(sampler.base.tokenizer, batch, offset=length, length=length)
            call = partial(sampler.generate, prompts, max_tokens=tokens, temperature=1.0)
            first, first_ops = op_times(call, args.top)
            compiles = compile_summary(COMPILES, args.top)
            again, again_ops = op_times(call, args.top)
            row = {"batch": batch, "max_tokens": tokens, "prompt_tokens": length, "first_s": round(first, 3),
                   "repeat_s": round(again, 3), "compiles_in_first": compiles, "first_ops": first_ops,
                   "repeat_ops": again_ops}  # fmt: skip
            print(json.dumps(row), flush=True)
            out.setdefault("calls", []).append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
