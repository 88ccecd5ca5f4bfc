"""Which CUDA-graph shapes the fast engine can select, so that `FastEngine.warmup` captures them all.

The engine picks every graph shape through a `GraphPlan`, and warmup captures what the plan
enumerates, so "after warmup a run captures nothing" is a property of this module (tested on the
CPU by brute force over batch sizes and lengths) rather than of the engine's control flow.

- Decode steps: one graph per (batch bucket, attention width[, sampler]). The width is the power
  of two (at least DECODE_MIN_WIDTH, at most max_len) above the longest sequence of either model,
  one width for both, so the set is buckets x widths rather than buckets x widths^2. Where the
  attention kernel runs one split per row even at max_len (`one_split(rows)`: enough rows to fill
  the GPU), the width changes nothing it computes (keys are read up to each row's length, on
  the device), so those buckets run at max_len and need one graph.
- Prefills: compute-bound beyond a few hundred tokens, where a graph saves nothing and only costs
  a capture per shape; so a chunk runs eagerly at its exact shape, unless its padded shape
  (rows bucket x width) holds at most PREFILL_GRAPH_TOKENS tokens, where launch latency dominates
  and a graph from the small fixed set `prefill_shapes` replays it.
- First draws (the eager sampler after a prefill) run at decode batch buckets (`draw_rows`), so
  warmup meets every compiled kernel variant they can use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .graphs import batch_bucket, bucket_of

MIN_WIDTH = 64  # smallest attention-width bucket
DECODE_MIN_WIDTH = 128  # a decode step's smallest: a graph fewer per row bucket, one empty split more
PREFILL_GRAPH_TOKENS = 512  # padded prefill tokens up to which a chunk replays a graph


def width_of(longest: int, max_len: int) -> int:
    """The width bucket of a sequence of `longest` positions: a power of two, capped at max_len."""
    return min(max(MIN_WIDTH, bucket_of(longest, max_len)), max_len)


def width_buckets(max_len: int) -> list[int]:
    """Every value `width_of(n, max_len)` takes for n in [1, max_len]."""
    return sorted({width_of(1 << k, max_len) for k in range(max_len.bit_length() + 1)})


def one_split_rule(kv_heads: Sequence[int], max_len: int) -> Callable[[int], bool]:
    """`GraphPlan.one_split` for the Triton decode attention (triton_attention.py) of models with
    these KV head counts: whether at `rows` rows it runs one split per row at max_len, hence at
    every width (splits never shrink as the width grows), with a chunk covering every row."""
    from .triton_attention import split_plan

    @functools.cache  # asked at every decode step
    def one_split(rows: int) -> bool:
        return all(split_plan(rows, heads, max_len)[0] == 1 for heads in kv_heads)

    return one_split


@dataclass(frozen=True)
class GraphPlan:
    """Graph shapes of one engine: `max_batch` rows per decode step, `max_slots` slots (a prefill
    or first draw may hold them all), caches `max_len` long. one_split(rows): whether decode
    attention at `rows` rows runs one split per row at every width (None: never assumed)."""

    max_batch: int
    max_slots: int
    max_len: int
    one_split: Callable[[int], bool] | None = None

    def decode_width(self, rows: int, longest: int) -> int:
        """Attention width of a decode step of `rows` (padded) rows, longest sequence `longest`."""
        if self.one_split is not None and self.one_split(rows):
            return self.max_len
        return min(max(DECODE_MIN_WIDTH, width_of(longest, self.max_len)), self.max_len)

    def decode_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, width) a decode step of 1..max_batch rows can select."""
        return [(rows, width) for rows in self.decode_rows() for width in self.widths(rows)]

    def decode_rows(self) -> list[int]:
        return sorted({batch_bucket(n, self.max_slots) for n in range(1, self.max_batch + 1)})

    def widths(self, rows: int) -> list[int]:
        if self.one_split is not None and self.one_split(rows):
            return [self.max_len]
        return sorted({min(max(DECODE_MIN_WIDTH, w), self.max_len) for w in width_buckets(self.max_len)})

    def draw_rows(self, n: int) -> int:
        """Rows a first draw of n requests runs at (padded, as a decode step's)."""
        return max(n, batch_bucket(n, self.max_slots))

    def first_draw_rows(self) -> list[int]:
        """Every value `draw_rows(n)` takes for n in [1, max_slots]."""
        return sorted({self.draw_rows(n) for n in range(1, self.max_slots + 1)})

    def prefill_shape(self, n: int, longest: int) -> tuple[int, int] | None:
        """(rows, width) of the graph a prefill chunk of n prompts (the longest `longest` tokens,
        either model) replays; None: it runs eagerly at its exact shape."""
        rows, width = bucket_of(n, self.max_slots), width_of(longest, self.max_len)
        return (rows, width) if rows * width <= PREFILL_GRAPH_TOKENS else None

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, width) `prefill_shape` can return."""
        rows = sorted({bucket_of(n, self.max_slots) for n in range(1, self.max_slots + 1)})
        widths = width_buckets(self.max_len)
        return [(r, w) for r in rows for w in widths if r * w <= PREFILL_GRAPH_TOKENS]
