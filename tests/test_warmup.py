"""One-off costs are paid at construction (`OptimalSampler.warmup`), never inside `generate`.

On the CPU graphs are disabled, so these tests check the planning that warmup relies on: every
graph shape a decode step, a prefill chunk or a first draw can select, for any batch size up to
the limit and any length up to the cache, is among the shapes `GraphPlan` enumerates (what warmup
captures); and, through recording graph caches, that the engine selects its shapes through that
plan. tests/gpu/test_fast_gpu.py checks on CUDA that generate then captures nothing.
"""

from __future__ import annotations

import importlib.util
import random
import time

import pytest
import torch

from optimal_sampling import EngineConfig, OptimalSampler, SamplingParams
from optimal_sampling.config import MixConfig
from optimal_sampling.engines.base import WarmupStats
from optimal_sampling.engines.fast.graph_plan import (
    DECODE_MIN_WIDTH,
    PREFILL_GRAPH_TOKENS,
    GraphPlan,
    width_buckets,
    width_of,
)
from optimal_sampling.engines.fast.graphs import batch_bucket

HAS_TRITON = importlib.util.find_spec("triton") is not None
# (max_batch, max_slots, max_len): a batch-1 user, the tests' tiny caches, the default batch,
# batch 256 with a cache capped by memory (not a power of two)
PLANS = [(1, 2, 300), (4, 5, 128), (64, 68, 1000), (256, 272, 700)]


def split_rules() -> list:
    """GraphPlan.one_split variants: none, a stub, and the Triton kernel's own (2 and 4 KV heads)."""
    rules = [None, lambda rows: rows >= 64]
    if HAS_TRITON:
        from optimal_sampling.engines.fast.graph_plan import one_split_rule

        rules += [one_split_rule([2, 4], 700)]
    return rules


@pytest.mark.parametrize("max_len", [1, 37, 64, 100, 128, 300, 4096, 5461])
def test_width_buckets_are_every_width_of(max_len):
    got = {width_of(n, max_len) for n in range(1, max_len + 1)}
    assert got == set(width_buckets(max_len))
    assert all(width_of(n, max_len) >= min(n, max_len) for n in range(1, max_len + 1))


@pytest.mark.parametrize("max_batch, max_slots, max_len", PLANS)
@pytest.mark.parametrize("rule", range(3 if HAS_TRITON else 2))
def test_decode_shapes_are_every_shape_a_step_can_select(max_batch, max_slots, max_len, rule):
    """Every batch 1..max_batch and longest sequence 1..max_len: the step's (rows, width) is one
    warmup captures, and warmup captures nothing no step selects."""
    plan = GraphPlan(max_batch, max_slots, max_len, split_rules()[rule])
    selected = set()
    for n in range(1, max_batch + 1):
        rows = batch_bucket(n, max_slots)
        for longest in range(1, max_len + 1):
            width = plan.decode_width(rows, longest)
            assert rows >= n and width >= longest and width >= min(DECODE_MIN_WIDTH, max_len)
            selected.add((rows, width))
    assert selected == set(plan.decode_shapes())


@pytest.mark.parametrize("max_batch, max_slots, max_len", PLANS)
def test_prefill_shapes_are_every_small_chunk(max_batch, max_slots, max_len):
    """A chunk of n prompts (longest `longest`) replays a graph warmup captured, or runs eagerly."""
    plan = GraphPlan(max_batch, max_slots, max_len)
    selected = set()
    for n in range(1, max_slots + 1):
        for longest in range(1, max_len + 1):
            shape = plan.prefill_shape(n, longest)
            if shape is not None:
                assert shape[0] >= n and shape[1] >= longest
                assert shape[0] * shape[1] <= PREFILL_GRAPH_TOKENS
                selected.add(shape)
    assert selected == set(plan.prefill_shapes())
    assert plan.prefill_shape(1, 1) is not None  # a short prompt alone replays a graph


@pytest.mark.parametrize("max_batch, max_slots, max_len", PLANS)
def test_first_draws_run_at_the_rows_warmup_ran(max_batch, max_slots, max_len):
    plan = GraphPlan(max_batch, max_slots, max_len)
    rows = plan.first_draw_rows()
    for n in range(1, max_slots + 1):
        assert n <= plan.draw_rows(n) in rows
    assert set(plan.decode_rows()) <= set(rows)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_one_split_rows_attend_alike_at_every_width():
    """Where the rule says one split, the kernel runs one split at every width bucket with a chunk
    covering each row's keys (it stops at the row's length): the width changes nothing."""
    from optimal_sampling.engines.fast.graph_plan import one_split_rule
    from optimal_sampling.engines.fast.triton_attention import split_plan

    for max_len in (100, 700, 5461, 32768):
        for heads in (1, 2, 4, 8):
            rule = one_split_rule([heads], max_len)
            for rows in range(1, 300):
                if rule(rows):
                    plans = [split_plan(rows, heads, w) for w in width_buckets(max_len)]
                    assert all(
                        splits == 1 and chunk >= w
                        for (splits, chunk), w in zip(plans, width_buckets(max_len))
                    )
                    assert split_plan(rows, heads, max_len)[1] >= max_len


def test_graph_counts_for_the_benchmark_pair():
    """Warmup's graphs for Qwen2.5-0.5B/1.5B shapes (2 KV heads each) stay few: with today's
    attention split plan, (decode per setting, prefill, first draws) = (9, 7, 2) at batch 1,
    (37, 10, 6) at batch 64 and (35, 10, 12) at batch 256 (caches as long as an H100 allows;
    65 graphs in all at batch 256 before decode buckets were coarsened, measured 2026-12-06)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from optimal_sampling.engines.fast.graph_plan import one_split_rule

    for max_batch, slots, max_len in [(1, 2, 32768), (64, 68, 21000), (256, 272, 5400)]:
        plan = GraphPlan(max_batch, slots, max_len, one_split_rule([2, 2], max_len))
        rows = len(plan.decode_rows())
        assert (
            len(plan.decode_shapes()) <= rows * len(width_buckets(max_len))
            and len(plan.decode_shapes()) <= 40
        )
        assert len(plan.prefill_shapes()) <= 10 and len(plan.first_draw_rows()) <= 12


# ---------------------------------------------------------------------- the engine uses the plan


class RecordingGraphs:
    """A graph cache that records the keys it is asked for and runs the function eagerly."""

    enabled = True
    captures = 0

    def __init__(self):
        self.keys = set()

    def run(self, key, fn, inputs, scratch):
        self.keys.add(key)
        return fn(*inputs)


def fast_cpu_sampler(tiny_pair, **kwargs) -> OptimalSampler:
    base, teacher = tiny_pair("qwen2")
    return OptimalSampler(base, teacher, engine="fast", device="cpu", dtype="float32", seed=7, **kwargs)


def random_prompts(rng: random.Random, batch: int, longest: int) -> list[list[int]]:
    return [[rng.randrange(3, 290) for _ in range(rng.randint(1, longest))] for _ in range(batch)]


def test_fused_graphs_are_keyed_by_the_kernels_a_setting_runs():
    """Settings that differ only in numbers the kernels read on the device share a fused step (and
    its graphs); a setting that runs other kernels does not. The torch step keys every number."""
    from optimal_sampling.engines.fast.mixing_fast import fused_key, step_key, step_values

    vocab, mix = 10_000, MixConfig()
    key = lambda **kw: fused_key(mix, SamplingParams(**kw), vocab)  # noqa: E731
    assert key(temperature=0.7) == key(temperature=1.3) != key(temperature=1.0) != key(temperature=0.0)
    assert key(top_p=0.9, top_k=40, min_p=0.1) == key(top_p=0.5, top_k=7, min_p=0.01)
    assert key(top_k=40) != key(top_k=3000) != key() == key(top_k=vocab)  # above CAP, off
    assert key(top_p=0.9) != key() != key(min_p=0.1) != key(collect_diagnostics=True)
    assert fused_key(MixConfig(alpha_min=0.1), SamplingParams(), vocab) != key()
    assert step_key(mix, SamplingParams(temperature=0.7)) != step_key(mix, SamplingParams(temperature=1.3))
    values = step_values(
        MixConfig(constraint_to_target=True, target_top_k=20), SamplingParams(temperature=0.5, top_k=9), vocab
    )
    assert values[:3] == [2.0, 9.0, 1.0] and values[4:6] == [20.0, 1.0]


def test_engine_selects_only_planned_shapes(tiny_pair, one_torch_thread):
    """Generate over many batch sizes and prompt lengths on the CPU with recording graph caches:
    every decode and prefill key the engine asks for is one warmup would have captured, and the
    padded (graph-shaped) prefills give the tokens of exact-shape eager ones."""
    sampler = fast_cpu_sampler(tiny_pair, max_batch_size=5)
    engine, plan = sampler.engine, sampler.engine.plan
    rng = random.Random(0)
    calls = [(random_prompts(rng, batch, longest), max_tokens) for batch, longest, max_tokens in
             [(1, 3, 4), (3, 60, 6), (5, 130, 3), (7, 20, 2), (2, 200, 50)]]  # fmt: skip
    eager = [sampler.generate(prompt_ids=p, max_tokens=m, n=2).samples for p, m in calls]
    engine.graphs, engine.prefill_graphs = RecordingGraphs(), RecordingGraphs()
    graphed = [sampler.generate(prompt_ids=p, max_tokens=m, n=2).samples for p, m in calls]
    key = engine.sampler_for(sampler.mix, SamplingParams()).key
    assert engine.graphs.keys <= {("decode", rows, width, key) for rows, width in plan.decode_shapes()}
    assert engine.prefill_graphs.keys <= {("prefill", *shape) for shape in plan.prefill_shapes()}
    assert len(engine.graphs.keys) > 3 and engine.prefill_graphs.keys
    assert [[s.token_ids for s in c] for c in graphed] == [[s.token_ids for s in c] for c in eager]


def test_padded_first_draw_equals_the_draw_of_its_rows(tiny_pair):
    """The eager first draw runs at a decode bucket's rows; the padding rows change no real row."""
    from optimal_sampling.mixing.step import sample_step

    engine = fast_cpu_sampler(tiny_pair, max_batch_size=8).engine
    torch.manual_seed(0)
    logits_b, logits_t = torch.randn(3, 300) * 3, torch.randn(3, 300) * 3
    mix, params = MixConfig(), SamplingParams(temperature=0.8, collect_diagnostics=True)
    assert engine.plan.draw_rows(3) == 4
    got = engine.sample_tensors(logits_b, logits_t, [5, 6, 7], [0, 1, 2], mix, params).to_host()
    want = sample_step(logits_b, logits_t, torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2]), mix, params)
    assert got == want.to_host()


# ---------------------------------------------------------------------- the public method


def test_warmup_on_the_cpu_is_a_quick_no_op(tiny_pair):
    sampler = fast_cpu_sampler(tiny_pair)
    assert sampler.warmup_stats == WarmupStats() and sampler.construct_seconds > 0
    start = time.perf_counter()
    assert sampler.warmup([SamplingParams(temperature=0.5), SamplingParams(top_p=0.9)]) == WarmupStats()
    assert sampler.warmup(SamplingParams()) == WarmupStats()
    assert time.perf_counter() - start < 1.0
    with pytest.raises(TypeError, match="sampling_params"):
        sampler.warmup([{"temperature": 0.5}])


def test_reference_engine_and_option(tiny_pair):
    base, teacher = tiny_pair("qwen2")
    sampler = OptimalSampler(base, teacher, engine="reference", device="cpu", warmup=False)
    assert sampler.engine_config.warmup is False and sampler.warmup_stats == WarmupStats()
    assert sampler.warmup().graphs == 0
    assert EngineConfig().warmup is True
    with pytest.raises(TypeError, match="warmup"):
        EngineConfig(warmup="yes")


def test_a_job_warms_its_own_sampling_setting(tiny_pair, monkeypatch):
    """The CLI's sampler (jobs.generate.build_sampler) warms the job's setting at construction,
    instead of the default one, so a --top-p job captures nothing in its first batches."""
    from dataclasses import replace
    from types import SimpleNamespace

    from optimal_sampling.jobs.generate import build_sampler

    warmed = []
    monkeypatch.setattr(OptimalSampler, "warmup", lambda self, params=None: warmed.append(params))
    base, teacher = tiny_pair("qwen2")
    pair = SimpleNamespace(base_path=base, teacher_path=teacher)
    engine = EngineConfig(engine="fast", device="cpu", dtype="float32")
    job = SamplingParams(temperature=0.7, top_p=0.9)
    sampler = build_sampler(pair, MixConfig(), engine, seed=0, params=job)
    assert warmed == [job] and sampler.engine_config.warmup is True  # (what it did)
    build_sampler(pair, MixConfig(), engine, seed=0)  # no setting given: the default warmup
    assert warmed == [job, None]
    build_sampler(pair, MixConfig(), replace(engine, warmup=False), seed=0, params=job)
    assert warmed == [job, None]  # warmup off: none
