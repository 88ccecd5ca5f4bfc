"""CUDA graphs captured per shape bucket, replayed with new inputs copied into place.

`prepare` captures a graph ahead of use (the engine's `warmup` captures every shape its
`GraphPlan` can select, so that no capture happens inside a user's call); `run` captures a key
it has not seen on first use (e.g. a sampling setting warmup was not given).

Invariants: a captured function reads only its static input tensors and the engine's long-lived
buffers (weights, KV caches), and does no host synchronisation; it is warmed up (Triton and
cuBLAS initialisation) on inputs that point at the scratch slot, so capture has no side effect on
real sequences. The graphs of one cache share its memory pool and run one at a time, so the
outputs of a replay are valid until the next replay of any graph of that cache. Off CUDA (or with
graphs disabled) the function simply runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

Outputs = tuple[torch.Tensor, ...]


def bucket_of(n: int, largest: int) -> int:
    """Smallest power of two >= n, capped at `largest` (the last bucket)."""
    return min(1 << max(0, (n - 1).bit_length()), largest)


def batch_bucket(n: int, largest: int, step: int = 32) -> int:
    """Decode batch bucket: powers of four up to step / 2 (1, 4, 16), then step and 2 * step, then
    multiples of step, capped at `largest`. A draining continuous batch then pads fewer than
    `step` rows, not up to half; below step a step reads the same weights whatever its rows, so
    coarse buckets cost little there and save graph captures (each is a warmup's ~0.1 s)."""
    if n <= step // 2:
        return min(1 << 2 * (((n - 1).bit_length() + 1) // 2), largest)
    if n <= 2 * step:
        return bucket_of(n, largest)
    return min(-(-n // step) * step, largest)


class GraphCache:
    """Graphs of one pool, captured (and warmed up) on this cache's own stream.

    Two caches whose graphs may run at the same time need their own streams: cuBLAS keys its
    workspace by stream, and a graph keeps the workspace of the stream it was captured on, so two
    graphs captured on one stream and replayed concurrently share split-K scratch and can hang."""

    def __init__(self, enabled: bool, device: torch.device | None = None):
        self.enabled = enabled
        self.pool = torch.cuda.graph_pool_handle() if enabled else None
        self.stream = torch.cuda.Stream(device) if enabled else None
        self.entries: dict[Hashable, tuple[list[torch.Tensor], torch.cuda.CUDAGraph, Outputs]] = {}
        self.captures = 0  # graphs captured so far (a benchmark checks none happen while timed)

    def run(
        self,
        key: Hashable,
        fn: Callable[..., Outputs],
        inputs: Sequence[torch.Tensor],
        scratch: Callable[[], Sequence[torch.Tensor]],
    ) -> Outputs:
        """fn(*inputs), through the graph captured for `key` (scratch() gives warm-up inputs)."""
        if not self.enabled:
            return fn(*inputs)
        self.prepare(key, fn, scratch)
        static_inputs, graph, outputs = self.entries[key]
        for static, value in zip(static_inputs, inputs, strict=True):
            static.copy_(value)
        graph.replay()
        return outputs

    def prepare(
        self, key: Hashable, fn: Callable[..., Outputs], scratch: Callable[[], Sequence[torch.Tensor]]
    ) -> bool:
        """Capture `key`'s graph now unless held; whether it captured. Disabled, fn runs once
        eagerly on the scratch inputs instead (its kernels compile now, not in a later call)."""
        if not self.enabled:
            fn(*scratch())
            return False
        if key in self.entries:
            return False
        self.entries[key] = self.capture(fn, [x.clone() for x in scratch()])
        return True

    def capture(self, fn: Callable[..., Outputs], static_inputs: list[torch.Tensor]):
        """One eager run (lazy set-up: cuBLAS, module loads), then the capture. Not through
        torch.cuda.graph, which synchronizes and empties the allocator's cache before every
        capture: 45 captures took 4.07 s this way against 4.62 s through it on an H100
        (BENCHMARKS.md, 2026-12-07, tenth session). Their eager runs are still 3.28 s of that."""
        self.captures += 1
        self.stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):
            fn(*static_inputs)
            graph.capture_begin(pool=self.pool)
            try:
                outputs = fn(*static_inputs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return static_inputs, graph, tuple(outputs)
