"""Resumable `generate`: kill -9 and resume, torn lines, refused parameter changes, growing a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optimal_sampling.cli import main
from optimal_sampling.jobs import store as io

KILL_PROMPTS = [f"Prompt number {i}: def f{i}(x):" for i in range(20)]


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama")


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_torch_thread):
    """Every test of this module runs with one intra-op thread (see conftest)."""


def argv_for(pair, prompts_file: Path, out: Path, *extra: str) -> list[str]:
    base, teacher = pair
    return [
        "generate", "--base", base, "--teacher", teacher, "--input", str(prompts_file), "--output", str(out),
        "--max-tokens", "8", "--n", "2", "--batch-size", "1", "--chat-template", "none", "--quiet", *extra,
    ]  # fmt: skip


def keys(path: Path) -> list[tuple[int, int]]:
    return [(r["prompt_index"], r["sample_index"]) for r in io.read_records(path)]


def complete_lines(data: bytes) -> bytes:
    return data[: data.rfind(b"\n") + 1]


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"generate exited early ({process.returncode}): {process.stderr.read().decode()}")
        time.sleep(0.02)
    pytest.fail("generate wrote no records in time")


def test_kill_9_then_resume_gives_every_sample_exactly_once(pair, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(KILL_PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = argv_for(pair, prompts, out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "optimal_sampling", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        wait_for_lines(out, 3, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = out.read_bytes()
    total = 2 * len(KILL_PROMPTS)
    assert 3 <= before.count(b"\n") < total, "the run finished before it was killed: make it slower"
    with open(out, "ab") as handle:  # what a kill in the middle of a write leaves behind
        handle.write(b'{"prompt_index": 19, "sample_index": 1, "text": "half a rec')
    # one thread here too, as in the killed process: a float32 matmul split over another number
    # of threads can round its last bit differently, and the records are compared byte for byte
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
        after = out.read_bytes()
        assert after.startswith(complete_lines(before))  # earlier records untouched, byte for byte
        assert sorted(keys(out)) == [(p, s) for p in range(len(KILL_PROMPTS)) for s in range(2)]
        # the resumed file holds exactly what an uninterrupted run writes
        reference = tmp_path / "reference.jsonl"
        assert main(argv_for(pair, prompts, reference)) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(after.splitlines()) == sorted(reference.read_bytes().splitlines())


def test_rerun_is_a_no_op_and_a_run_can_grow(pair, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(argv_for(pair, prompts, out)) == 0
    first = out.read_bytes()
    assert main(argv_for(pair, prompts, out)) == 0
    assert "nothing to do" in capsys.readouterr().err and out.read_bytes() == first
    prompts.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert main(argv_for(pair, prompts, out, "--n", "3")) == 0  # --n given twice: the last wins
    assert out.read_bytes().startswith(first)
    assert sorted(keys(out)) == [(p, s) for p in range(3) for s in range(3)]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--temperature", "0.7"], "temperature 1.0 -> 0.7"),
        (["--alpha-method", "entropy"], "alpha_method 'kl_symmetry' -> 'entropy'"),
        (["--seed", "3"], "seed 0 -> 3"),
        (["--diagnostics"], "collect_diagnostics False -> True"),
    ],
)
def test_changed_parameters_are_refused_and_nothing_is_touched(pair, tmp_path, capsys, change, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(argv_for(pair, prompts, out, "--n", "1")) == 0
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert main(argv_for(pair, prompts, out, "--n", "2", *change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other generation parameters" in err[0] and message in err[0], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert main(argv_for(pair, prompts, out, "--n", "2", *change, "--overwrite")) == 0
    assert sorted(keys(out)) == [(0, 0), (0, 1)]


def test_changed_prompt_is_refused(pair, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(argv_for(pair, prompts, out, "--n", "1", "--max-tokens", "3")) == 0
    prompts.write_text("one\nTWO\n", encoding="utf-8")
    assert main(argv_for(pair, prompts, out, "--n", "1", "--max-tokens", "3")) == 2
    assert "prompt 1 of the input differs" in capsys.readouterr().err


def test_parquet_resume_from_a_partial_journal(pair, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    argv = argv_for(pair, prompts, out, "--max-tokens", "4")
    assert main(argv) == 0
    full = io.read_records(out)
    # pretend the run died after two samples: the journal holds them, no parquet yet
    journal = tmp_path / "out.parquet.partial.jsonl"
    journal.write_bytes(b"".join(io.encode_record(dict(r, stop_reason=_int_or_str(r))) for r in full[:2]))
    out.unlink()
    assert main(argv) == 0
    assert not journal.exists()
    key = lambda r: (r["prompt_index"], r["sample_index"])  # noqa: E731
    assert sorted(io.read_records(out), key=key) == sorted(full, key=key)
    assert json.loads((tmp_path / "out.parquet.meta.json").read_text())["params"]["max_tokens"] == 4


def _int_or_str(record: dict):
    value = record["stop_reason"]
    return int(value) if value is not None and value.isdigit() else value


def test_interrupt_keeps_finished_samples(pair, tmp_path, monkeypatch, capsys):
    """Ctrl-C: exit 130, every sample written so far is on disk and the next run completes the file."""
    from optimal_sampling.jobs import generate as generate_job

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    real = generate_job.record_of
    calls = {"n": 0}

    def record_then_interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(generate_job, "record_of", record_then_interrupt)
    assert main(argv_for(pair, prompts, out)) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert len(keys(out)) == 2
    monkeypatch.setattr(generate_job, "record_of", real)
    assert main(argv_for(pair, prompts, out)) == 0
    assert sorted(keys(out)) == [(p, s) for p in range(3) for s in range(2)]
    assert os.path.getsize(out) == len(out.read_bytes())
