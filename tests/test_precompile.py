"""The warmup's parallel precompile (engines/fast/precompile.py): inside `compile_only`, a Triton
launch only compiles; the engine walks its warmup once that way, graphs off, then restores itself.
On CUDA the warmup test (tests/gpu) runs it for real; benchmarks/one_off.py times it."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import pytest
import torch

from optimal_sampling import OptimalSampler, SamplingParams
from optimal_sampling.config import MixConfig
from optimal_sampling.engines.fast import engine as engine_module
from optimal_sampling.engines.fast.precompile import compile_only, compile_workers

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_compile_only_turns_launches_into_compiles_and_restores_launches(monkeypatch):
    import triton
    from triton.runtime.jit import JITFunction

    launches = []

    def recording_run(
        self, *args, grid, warmup, **kwargs
    ):  # JITFunction.run: compile, then launch unless warmup
        launches.append(warmup)

    monkeypatch.setattr(JITFunction, "run", recording_run)

    @triton.jit
    def kernel(x_ptr):
        pass

    x = torch.zeros(1)
    with compile_only(2):
        kernel[(1,)](x)
    kernel[(1,)](x)
    with pytest.raises(RuntimeError, match="inside"), compile_only(2):
        raise RuntimeError("inside")
    kernel[(1,)](x)
    assert launches == [True, False, False]  # compile only inside; launches again after, even after an error
    assert 1 <= compile_workers() <= 16


def cpu_sampler(tiny_pair) -> OptimalSampler:
    """A fast-engine sampler on the CPU (no warmup): its engine's compile walk runs eagerly there."""
    base, teacher = tiny_pair("qwen2")
    return OptimalSampler(base, teacher, engine="fast", device="cpu", warmup=False, max_batch_size=4)


def test_compile_walk_is_the_warmup_walk_dry_with_graphs_off(tiny_pair, monkeypatch):
    sampler = cpu_sampler(tiny_pair)
    engine = sampler.engine
    modes = []

    @contextmanager
    def recording_compile_only(workers):
        modes.append(workers)
        yield

    walks = []
    real_warm = engine.warm

    def recording_warm(mix, params, dry=False):
        walks.append((dry, engine.graphs.enabled, engine.prefill_graphs.enabled, len(params)))
        real_warm(mix, params, dry)  # on the CPU: the walk itself, eagerly, reading no draw

    monkeypatch.setattr(engine_module, "compile_only", recording_compile_only)
    monkeypatch.setattr(engine, "warm", recording_warm)
    # as on CUDA, where a setting the torch step takes (here: any top-p) is left out of the walk
    monkeypatch.setattr(engine_module, "uses_fused", lambda mix, params, device: params.top_p == 1.0)
    engine.graphs.enabled = engine.prefill_graphs.enabled = True
    engine.compile_kernels(MixConfig(), [SamplingParams(top_p=0.9)])
    assert modes == [] and walks == []  # nothing fused: no dry walk
    engine.last_tokens.fill_(7)
    engine.compile_kernels(MixConfig(), [SamplingParams(), SamplingParams(top_p=0.9)])
    assert modes == [engine.compile_workers]
    assert walks == [(True, False, False, 1)]
    assert engine.graphs.enabled and engine.prefill_graphs.enabled  # restored
    assert not engine.last_tokens.any()  # the dry draws' tokens are not kept
    assert engine.base.lengths[engine.scratch] == engine.teacher.lengths[engine.scratch] == 0
    engine.graphs.enabled = engine.prefill_graphs.enabled = False
    out = sampler.generate(["hello"], max_tokens=3, temperature=0.0)  # the engine still works
    assert out.num_tokens == [3] or out.samples[0].finish_reason == "stop"
