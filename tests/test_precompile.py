"""The warmup's parallel precompile (engines/fast/precompile.py): inside `compile_only`, a Triton
launch only compiles; the engine walks its warmup once that way, graphs off, then restores itself.
On CUDA the warmup test (tests/gpu) runs it for real; benchmarks/one_off.py times it."""

from __future__ import annotations

import importlib.util
import time
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


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_record_compiles_records_each_variant_instead_of_building_it(monkeypatch):
    import types

    import triton
    from triton.runtime.jit import JITFunction

    from optimal_sampling.engines.fast.precompile import CompileJob, record_compiles

    launches = []
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, grid, warmup, **k: launches.append(warmup))
    original = JITFunction._do_compile

    @triton.jit
    def kernel(x_ptr):
        pass

    kernel.device_caches[0] = ({}, {}, "the target", None, None)
    options = types.SimpleNamespace(num_warps=4)
    with record_compiles() as jobs:
        kernel[(1,)](torch.zeros(1))
        for key in ("a", "a", "b"):  # what run() calls for a variant not built yet
            assert JITFunction._do_compile(kernel, key, {"x_ptr": "*fp32"}, 0, {}, options, {}, True) is None
    assert launches == [True]  # a launch inside only compiles (here: records)
    job = CompileJob(
        kernel.fn.__module__, "kernel", {"x_ptr": "*fp32"}, {}, {}, "the target", {"num_warps": 4}
    )
    assert list(jobs.values()) == [job, job]  # one job per variant key
    assert JITFunction._do_compile is original


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_compile_in_processes_fills_the_disk_cache_a_launch_then_reads(tmp_path, monkeypatch):
    """Fresh interpreters compile a real kernel for an H100 (sm_90: Triton compiles it without a
    GPU) into TRITON_CACHE_DIR; compiling it here is then a cache hit. A job whose kernel does not
    import is skipped, not fatal."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from optimal_sampling.engines.fast import triton_attention
    from optimal_sampling.engines.fast.precompile import CompileJob, ProcessCompiler

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton_attention._split_kernel
    signature = {name: "i32" for name in kernel.arg_names}  # strides, chunk, splits
    signature.update(
        {name: "*fp32" for name in kernel.arg_names if name.endswith("_ptr")}
    )  # partials, tables
    signature.update(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", slots_ptr="*i64")
    signature.update(lengths_ptr="*i64", count_ptr="*i32", eps="fp32", scale="fp32")
    constexprs = dict(GROUPS=7, GPAD=16, MPAD=8, D=64, BN=64, MERGE=False, MAX_PARTS=16, PRECISION="tf32",
                      STAGES=2, ROPE=False, HEADS=14, QK_NORM=False)  # fmt: skip
    signature.update({name: "constexpr" for name in constexprs})
    target, options = GPUTarget("cuda", 90, 32), {"num_warps": 4}
    job = CompileJob(kernel.fn.__module__, "_split_kernel", signature, constexprs, {}, target, options)
    missing = CompileJob("no_such_module", "kernel", signature, constexprs, {}, target, options)
    unpicklable = CompileJob("m", "k", {}, {}, {}, target, {"hook": lambda: 0})
    with ProcessCompiler(2) as workers:
        time.sleep(0.5)  # jobs may come after the workers have started waiting for them
        assert workers.submit(missing) and workers.submit(job)
        assert not workers.submit(unpicklable)  # left to its first launch, no error
    assert workers.built == 1 and workers.submitted == 2
    assert not workers.folder.exists()
    hits = []
    monkeypatch.setattr(knobs.compilation, "listener", lambda **kw: hits.append(kw.get("cache_hit")))
    triton.compile(ASTSource(kernel, signature, constexprs, {}), target=target, options=options)
    assert hits == [True]
    with ProcessCompiler(4) as idle:
        pass
    assert idle.built == 0  # no job: the workers stop at `done`


def test_process_workers_are_killed_after_an_error_in_the_walk():
    from optimal_sampling.engines.fast.precompile import ProcessCompiler

    with pytest.raises(RuntimeError, match="walk"), ProcessCompiler(2) as workers:
        raise RuntimeError("walk failed")
    assert all(proc.returncode is not None for proc in workers.procs)
    assert workers.built == 0 and not workers.folder.exists()


def test_a_job_that_cannot_be_queued_is_left_to_its_first_launch():
    """The job folder gone (a cleaned temp directory): submit says no, exit kills the workers,
    and neither raises into the warmup."""
    import shutil

    from optimal_sampling.engines.fast.precompile import CompileJob, ProcessCompiler

    with ProcessCompiler(1) as workers:
        shutil.rmtree(workers.folder)
        assert not workers.submit(CompileJob("m", "k", {}, {}, {}, None, {}))
    assert workers.submitted == 0 and workers.built == 0
    assert all(proc.returncode is not None for proc in workers.procs)


def test_a_worker_reports_its_count_on_its_last_line():
    from optimal_sampling.engines.fast.precompile import built_count

    assert built_count("3\n", 0) == 3
    assert built_count("a library's notice\n12\n", 0) == 12
    assert built_count("12\n", 1) == 0 and built_count("", 0) == 0 and built_count("oops\n", 0) == 0


def test_each_job_is_claimed_by_one_worker(tmp_path):
    """Workers take jobs as they free up; a job's claim is exclusive, so none compiles twice."""
    from optimal_sampling.engines.fast.precompile import claim

    assert claim(tmp_path, 0) and claim(tmp_path, 1)
    assert not claim(tmp_path, 0) and not claim(tmp_path, 1)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_a_worker_whose_parent_is_gone_stops_waiting(tmp_path, capsys):
    """A parent that died writes no `done`: its workers must not wait for it forever."""
    import os

    from optimal_sampling.engines.fast.precompile import compile_worker

    assert compile_worker(str(tmp_path), parent=os.getppid() + 1) == 0
    assert capsys.readouterr().out == "0\n"


def test_compile_processes_mode_walks_recording_into_process_workers(tiny_pair, monkeypatch):
    engine = cpu_sampler(tiny_pair).engine
    calls = []

    class RecordingCompiler:
        def __init__(self, workers):
            calls.append(("workers", workers))

        def __enter__(self):
            return self

        def submit(self, job):
            calls.append(("job", job))

        def __exit__(self, *exc):
            calls.append("exit")

    @contextmanager
    def recording_record_compiles(on_job):
        calls.append("record")
        on_job("a variant")
        yield {}
        calls.append("recorded")

    monkeypatch.setattr(engine_module, "ProcessCompiler", RecordingCompiler)
    monkeypatch.setattr(engine_module, "record_compiles", recording_record_compiles)
    monkeypatch.setattr(engine_module, "compile_only", lambda workers: pytest.fail("threads used"))
    monkeypatch.setattr(engine_module, "uses_fused", lambda mix, params, device: True)
    engine.compile_processes = True
    engine.compile_kernels(MixConfig(), [SamplingParams()])
    # workers first, each variant to them as recorded, the recording ends before they are waited for
    assert calls == [("workers", engine.compile_workers), "record", ("job", "a variant"), "recorded", "exit"]
