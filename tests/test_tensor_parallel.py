"""Tensor parallelism on the CPU (gloo, 2 processes): TP=2 equals TP=1.

- logits: prefill of batched prompts of different lengths, then many decode steps, TP=2 against
  the single-process fast engine on the same weights (float32 tolerance), Llama/Qwen2/Qwen3;
- tokens: greedy samples through the sampler (self-started helper) equal TP=1's;
- the CLI: `--tp-size 2` self-started, and 2 torchrun-style data-parallel replicas x TP 2
  (4 processes, RANK/WORLD_SIZE set by the test) write exactly TP=1's samples.
Subprocesses run with one torch thread; most of this file's time is their imports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optimal_sampling.config import EngineConfig
from optimal_sampling.distributed.groups import new_tp_groups
from optimal_sampling.engines.base import SlotRequest
from optimal_sampling.engines.fast import FastEngine
from optimal_sampling.engines.fast.tensor_parallel import build_tensor_parallel_engine

ARCHS = ("llama", "qwen2", "qwen3")
PROMPTS = [(5, 17, 42, 7, 99), tuple(range(20, 33)), (3, 250, 11, 64, 8, 9, 120, 77, 31)]
DECODE_STEPS = 24
SRC = str(Path(__file__).resolve().parent.parent / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p))
    env.update(extra)
    return env


# ============================================================================ logits, engine level


def compare_logits(rank: int, port: int, pairs: dict[str, tuple[str, str]]) -> None:
    """One rank: TP=2 engine vs the single-process engine, prefill + DECODE_STEPS greedy steps."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tp = new_tp_groups(2, torch.device("cpu"))
    try:
        for arch, paths in pairs.items():
            base, teacher = (
                AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths
            )
            single = FastEngine(base, teacher, 300, max_slots=4, max_len=128, use_graphs=False)
            sharded = build_tensor_parallel_engine(base, teacher, 300, EngineConfig(max_batch_size=4), tp,
                                                   torch.device("cpu"), max_len=128)  # fmt: skip
            assert sharded.base.net.spec.heads == single.base.net.spec.heads // 2
            check_engines(arch, single, sharded)
    finally:
        dist.destroy_process_group()


def check_engines(arch: str, single, sharded) -> None:
    requests = [SlotRequest(i, p, p[::-1] + (1,)) for i, p in enumerate(PROMPTS)]  # teacher prompts differ
    with torch.no_grad():
        expected, got = single.add(requests), sharded.add(requests)
        slots = torch.arange(len(PROMPTS))
        for step in range(DECODE_STEPS):
            where = f"{arch} step {step}"
            for e, g in zip(expected, got, strict=True):
                torch.testing.assert_close(
                    g, e, atol=1e-4, rtol=1e-4, msg=lambda m, where=where: f"{where}: {m}"
                )
            tokens = (expected[0] + expected[1]).argmax(-1)
            expected, got = single.decode(slots, tokens), sharded.decode(slots, tokens)


def test_logits_match_single_process(tiny_pair):
    pairs = {arch: tiny_pair(arch) for arch in ARCHS}
    mp.spawn(compare_logits, args=(free_port(), pairs), nprocs=2, join=True)


def test_indivisible_heads_are_refused(tiny_pair):
    from transformers import AutoModelForCausalLM

    from optimal_sampling.config import TensorParallel

    base = AutoModelForCausalLM.from_pretrained(tiny_pair("llama")[0], dtype=torch.float32)
    with pytest.raises(ValueError, match="tp_size 3 must divide the model's attention heads"):
        build_tensor_parallel_engine(base, base, 300, EngineConfig(max_batch_size=2), TensorParallel(3, 0),
                                     torch.device("cpu"), max_len=64)  # fmt: skip


# ============================================================================ tokens, sampler and CLI

SAMPLER_PROMPTS = ["def add(a, b):", "The quick brown fox", "What is AI? Artificial intelligence is"]


def greedy_and_sampled(sampler) -> tuple[list, int]:
    greedy = sampler.generate(SAMPLER_PROMPTS, max_tokens=16, temperature=0.0, seed=3)
    sampled = sampler.generate(
        SAMPLER_PROMPTS, max_tokens=16, temperature=1.0, n=2
    )  # seed drawn by the leader
    return [s.token_ids for s in greedy.samples], len(sampled.samples)


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_sampler_greedy_tokens_identical(tiny_pair, one_thread):
    """In this process: TP=1, then TP=2 with one self-started helper (closed, group destroyed)."""
    from optimal_sampling import OptimalSampler

    pair = tiny_pair("qwen2")
    single = greedy_and_sampled(OptimalSampler(*pair, engine="fast", device="cpu", max_batch_size=4))
    sampler = OptimalSampler(*pair, engine="fast", device="cpu", max_batch_size=4, tp_size=2)
    try:
        assert sampler.engine.base.net.spec.heads == 2  # the leader's shard, through the proxy
        sharded = greedy_and_sampled(sampler)
    finally:
        sampler.close()
    assert not dist.is_initialized()
    assert sharded == single


def cli_argv(pair, prompts: Path, out: Path, *extra: str) -> list[str]:
    base, teacher = pair
    return [
        "generate", "--base", base, "--teacher", teacher, "--input", str(prompts), "--output", str(out),
        "--max-tokens", "8", "--n", "2", "--engine", "fast", "--chat-template", "none", "--device", "cpu",
        "--quiet", "--batch-size", "4", *extra,
    ]  # fmt: skip


def records(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((r["prompt_index"], r["sample_index"], tuple(r["token_ids"])) for r in rows)


def run_torchrun_style(argv: list[str], world: int) -> None:
    """`world` CLI processes with the variables torchrun sets, on one local rendezvous."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "optimal_sampling", *argv],
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )  # fmt: skip
        for r in range(world)
    ]
    errors = [p.communicate(timeout=150)[1] for p in procs]
    for rank, (proc, err) in enumerate(zip(procs, errors, strict=True)):
        assert proc.returncode == 0, f"rank {rank}: {err[-3000:]}"


@pytest.fixture(scope="module")
def cli_case(tiny_pair, tmp_path_factory):
    """(pair, prompts file, TP=1 records from an in-process run, tmp dir)."""
    from optimal_sampling.cli import main

    pair = tiny_pair("llama")
    tmp = tmp_path_factory.mktemp("tp_cli")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt {i}: def f{i}(x):" for i in range(6)) + "\n", encoding="utf-8")
    out = tmp / "tp1.jsonl"
    assert main(cli_argv(pair, prompts, out)) == 0
    return pair, prompts, records(out), tmp


def test_cli_tp2_self_started(cli_case, one_thread):
    """`generate --tp-size 2` in this process: the sampler starts its helper itself, and stops it."""
    from optimal_sampling.cli import main

    pair, prompts, expected, tmp = cli_case
    out = tmp / "tp2.jsonl"
    assert main(cli_argv(pair, prompts, out, "--tp-size", "2")) == 0
    assert not dist.is_initialized()
    assert records(out) == expected


def test_cli_data_parallel_times_tp_under_torchrun(cli_case):
    """4 torchrun-style ranks = 2 data-parallel replicas x TP 2; only TP leaders write."""
    pair, prompts, expected, tmp = cli_case
    out = tmp / "dp2-tp2.jsonl"
    run_torchrun_style(cli_argv(pair, prompts, out, "--tp-size", "2"), world=4)
    assert records(out) == expected
