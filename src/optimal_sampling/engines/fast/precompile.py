"""Compile a warmup's Triton kernels in parallel before it runs them (issue 15's one-off cost).

A cold warmup compiles each kernel variant the first time a capture launches it, one after the
other (~1 s each, most of a cold start). `compile_only()` runs code with every Triton launch
turned into a compile submitted to a thread pool (Triton's AsyncCompileMode; ptxas runs as a
subprocess) and no kernel run: the engine walks its warmup once that way, without graphs,
so the real warmup finds every kernel built. Nothing a kernel would write is written, so the dry
walk must not feed its outputs into indexing (the engine resets its last tokens after it). The
switch is process-wide while it lasts: nothing else may launch Triton kernels meanwhile (warmup
runs between calls, as the engine's contract says).

Measured (H100, cold Triton cache, the benchmark pair): the walk on 16 threads took 9.7 s. Fresh
interpreters compiling the walk's variants instead (no GIL shared; removed) took 18.0 s in the
same run: their start-up and imports cost more than the GIL does.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


def parallel_compile_available() -> bool:
    try:
        import triton
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return hasattr(triton, "AsyncCompileMode") and hasattr(JITFunction, "run")


def compile_workers() -> int:
    """Threads for compiles: the cores this process may use, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


@contextmanager
def launches_only_compile():
    """Inside: a Triton launch does what its first launch would before running (Triton's warmup:
    build the variant, or whatever builds it now) and runs nothing."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def compile_launch(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = compile_launch
    try:
        yield
    finally:
        JITFunction.run = original


@contextmanager
def compile_only(workers: int | None = None):
    """Inside: Triton launches compile (in `workers` threads) and do not run; on exit every
    compile has finished and its kernel is in its function's cache."""
    import triton

    with launches_only_compile(), ThreadPoolExecutor(workers or compile_workers()) as pool:
        with triton.AsyncCompileMode(pool):
            yield
