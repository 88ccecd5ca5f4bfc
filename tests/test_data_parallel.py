"""Data-parallel `generate`: N local workers, a killed worker and its rerun, torchrun-style ranks.

Every run is compared with a single-process run of the same command: the merged output must
hold the same samples (the fields that a sample's randomness determines), each exactly once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from optimal_sampling.cli import main
from optimal_sampling.distributed.environment import NO_MULTICAST
from optimal_sampling.jobs import dp_launcher as launcher
from optimal_sampling.jobs import dp_shard
from optimal_sampling.jobs import prompts as prompt_files
from optimal_sampling.jobs import store as io

SAMPLE_FIELDS = (
    "prompt_index",
    "sample_index",
    "token_ids",
    "logprobs_base",
    "logprobs_teacher",
    "logprobs_q",
)
PROMPTS = [f"Prompt number {i}: def f{i}(x):" for i in range(40)]


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama")


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """Workers inherit OMP_NUM_THREADS; tiny models lose a lot to intra-op threads on a busy box."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def argv_for(pair, prompts_file: Path, out: Path, *extra: str) -> list[str]:
    base, teacher = pair
    return [
        "generate", "--base", base, "--teacher", teacher, "--input", str(prompts_file), "--output", str(out),
        "--max-tokens", "6", "--n", "2", "--chat-template", "none", "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


def write_prompts(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:count]) + "\n", encoding="utf-8")
    return path


def samples(path: Path) -> list[tuple]:
    """Sample-determining fields of every record, sorted; duplicates stay visible."""
    rows = [tuple(_hashable(r[f]) for f in SAMPLE_FIELDS) for r in io.read_records(path)]
    return sorted(rows)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def assert_exactly_once(path: Path, n_prompts: int, n: int = 2) -> None:
    keys = sorted((r["prompt_index"], r["sample_index"]) for r in io.read_records(path))
    assert keys == [(p, s) for p in range(n_prompts) for s in range(n)]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".rank" in p.name)


def reference(pair, prompts: Path, tmp_path: Path, *extra: str) -> list[tuple]:
    out = tmp_path / "reference.jsonl"
    assert main(argv_for(pair, prompts, out, *extra)) == 0
    return samples(out)


# ---------------------------------------------------------------------------- pure parts


def test_shards_are_disjoint_and_cover_every_prompt():
    for world in (1, 2, 3, 7):
        shards = [dp_shard.shard_prompts(10, r, world) for r in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(10))


def test_worker_environment_pins_gpus_and_keeps_multicast_off(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("RANK", "3")
    env = launcher.worker_env("2,3", world=2)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and "RANK" not in env
    assert {k: env[k] for k in NO_MULTICAST} == NO_MULTICAST
    assert env["OMP_NUM_THREADS"] == "1"  # set by the fixture: a user's choice is kept
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(launcher.__file__).parent.parent.parent)


def test_gpu_plan_gives_each_rank_its_block(monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: ["4", "5", "6", "7"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launcher.gpu_plan("auto", 2, 2) == ["4,5", "6,7"]
    assert launcher.gpu_plan("cuda", 4, 1) == ["4", "5", "6", "7"]
    assert launcher.gpu_plan("cpu", 8, 1) is None
    with pytest.raises(ValueError, match="needs 6 GPUs; 4 visible"):
        launcher.gpu_plan("auto", 3, 2)
    with pytest.raises(ValueError, match="each worker gets its own GPU"):
        launcher.gpu_plan("cuda:1", 2, 1)


def record(prompt: int, sample: int) -> dict:
    return {
        "prompt_index": prompt,
        "sample_index": sample,
        "input_prompt": f"p{prompt}",
        "input_teacher_prompt": f"p{prompt}",
    }


def test_merge_is_deduplicated_and_repeatable(tmp_path):
    plan = io.plan_output(tmp_path / "out.jsonl")
    meta = {"format": io.META_FORMAT, "fingerprint": "f", "params": {}}
    io.write_meta(plan, meta)
    plan.journal.write_bytes(io.encode_record(record(0, 0)))
    plan.shard(0).write_bytes(io.encode_record(record(0, 0)) + io.encode_record(record(2, 0)))
    plan.shard(5).write_bytes(io.encode_record(record(1, 0)) + b'{"prompt_index": 3, "samp')  # torn
    state = plan.inspect(meta, prompt_files.PromptSet(["p0", "p1", "p2", "p3"]), overwrite=False)
    assert state.done == {(0, 0), (1, 0), (2, 0)}
    assert io.merge_shards(plan, meta) == 2 and plan.shards() == []
    assert io.merge_shards(plan, meta) == 0
    assert sorted((r["prompt_index"], r["sample_index"]) for r in io.read_records(plan.target)) == [
        (0, 0), (1, 0), (2, 0),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- checks before any worker


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tp-size", "0"], "--tp-size must be at least 1"),
        (["--data-parallel", "0"], "--data-parallel must be at least 1"),
        (["--base", "/nonexistent/model"], "model path not found"),
        (["--device", "cuda:1"], "cuda:1"),
    ],
)
def test_launcher_checks_before_starting_workers(pair, tmp_path, capsys, extra, message):
    prompts = write_prompts(tmp_path, 2)
    assert main(argv_for(pair, prompts, tmp_path / "out.jsonl", "--data-parallel", "2", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_data_parallel_needs_an_output(pair, tmp_path, capsys):
    prompts = write_prompts(tmp_path, 2)
    argv = [a for a in argv_for(pair, prompts, tmp_path / "x.jsonl", "--data-parallel", "2")]
    del argv[argv.index("--output") : argv.index("--output") + 2]
    assert main(argv) == 2
    assert "needs --output" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


def test_two_workers_give_the_single_process_samples_exactly_once(pair, tmp_path):
    prompts = write_prompts(tmp_path, 7)
    out = tmp_path / "out.jsonl"
    assert main(argv_for(pair, prompts, out, "--data-parallel", "2")) == 0
    assert_exactly_once(out, 7)
    assert samples(out) == reference(pair, prompts, tmp_path)
    assert leftovers(tmp_path) == []
    assert main(argv_for(pair, prompts, out, "--data-parallel", "2")) == 0  # nothing to do


def _worker_pids(out: Path) -> dict[int, int]:
    """rank -> pid of the live workers writing `out` (found through /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"--dp-rank" in args and str(out).encode() in args:
            found[int(args[args.index(b"--dp-rank") + 1])] = int(proc.name)
    return found


def _wait_for_lines(path: Path, lines: int, launcher: threading.Thread, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            return
        if not launcher.is_alive():
            pytest.fail("the launcher returned before the worker was killed")
        time.sleep(0.01)
    pytest.fail(f"{path.name} got no records in time")


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds worker pids through /proc")
def test_killed_worker_stops_the_run_with_one_line_and_the_rerun_completes(pair, tmp_path, capsys):
    prompts = write_prompts(tmp_path, 40)
    out = tmp_path / "out.jsonl"
    argv = argv_for(pair, prompts, out, "--data-parallel", "2", "--batch-size", "1", "--max-tokens", "12")
    codes = []
    launcher = threading.Thread(target=lambda: codes.append(main(argv)))  # the launcher, in this process
    launcher.start()
    try:
        _wait_for_lines(tmp_path / "out.jsonl.rank1.jsonl", 2, launcher)
        workers = _worker_pids(out)
        os.kill(workers[1], signal.SIGKILL)
    finally:
        launcher.join(timeout=120)
    assert codes == [1]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "optimal-sampling: error: data-parallel worker rank 1 died (signal 9, SIGKILL); "
        "finished samples are kept, run the same command again to resume"
    ]
    assert _worker_pids(out) == {}  # rank 0 was stopped too
    shard = (tmp_path / "out.jsonl.rank1.jsonl").read_bytes()
    kept = shard[: shard.rfind(b"\n") + 1]
    assert 2 <= kept.count(b"\n") < 40, "rank 1 finished before it was killed: make it slower"
    assert main(argv) == 0
    assert_exactly_once(out, 40)
    assert all(line in out.read_bytes() for line in kept.splitlines())  # finished samples were kept
    assert samples(out) == reference(pair, prompts, tmp_path, "--batch-size", "1", "--max-tokens", "12")
    assert leftovers(tmp_path) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_style_ranks_write_shards_and_rank_0_merges(pair, tmp_path):
    prompts = write_prompts(tmp_path, 5)
    out = tmp_path / "out.parquet"
    # batch size 1 on both sides: a rank batches its own share of the prompts, and a different
    # batch (padding) moves float32 log-probs by an ulp on some CPUs; the tokens never differ
    argv = argv_for(pair, prompts, out, "--batch-size", "1")
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "optimal_sampling", *argv],
            env=dict(os.environ, **rendezvous, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    results = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err.decode()[-2000:] for _, err in results]
    assert_exactly_once(out, 5)
    assert samples(out) == reference(pair, prompts, tmp_path, "--batch-size", "1")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.")) == [
        "out.parquet", "out.parquet.meta.json",
    ]  # fmt: skip
