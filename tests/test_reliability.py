"""Issue 18: no silent corruption, finite numbers only, working `.gguf` paths, one early line per error.

One test (or a few) per item of the issue, numbered as there. Data-safety tests hash every file
before and after; the concurrency, full-disk and closed-pipe tests run the real CLI in
subprocesses (their time is mostly imports). Tests that must fail before any model loads replace
the loader with one that fails the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optimal_sampling.cli import main
from optimal_sampling.config import EngineConfig, SamplingParams
from optimal_sampling.jobs import dp_launcher as launcher
from optimal_sampling.jobs import generate as generate_job
from optimal_sampling.jobs import store as io
from optimal_sampling.jobs.lock import OutputLock

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 40  # > 256 tokens, the tiny models' context


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama")


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_torch_thread):
    """Every test of this module runs with one intra-op thread (see conftest)."""


def argv_for(pair, *extra: str) -> list[str]:
    base, teacher = pair
    return ["generate", "--base", base, "--teacher", teacher, "--max-tokens", "4", "--chat-template", "none",
            "--device", "cpu", "--quiet", *extra]  # fmt: skip


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of one in-process run."""
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def keys(path: Path) -> list[tuple[int, int]]:
    return sorted((r["prompt_index"], r["sample_index"]) for r in io.read_records(path))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _fail_loading(*args, **kwargs):
    raise AssertionError("models were loaded (or a helper started) before the error")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load weights fails the test: the error must come before."""
    monkeypatch.setattr(generate_job, "build_sampler", _fail_loading)


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def start_cli(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "optimal_sampling", *argv], env=subprocess_env(), **kwargs)


# ---------------------------------------------------------------------------- 1. one run per output


def test_1_second_run_on_the_same_output_is_refused_naming_the_first(pair, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", [f"Prompt {i}: def f{i}(x):" for i in range(400)])
    out = tmp_path / "out.jsonl"
    argv = argv_for(
        pair, "--input", str(prompts), "--output", str(out), "--batch-size", "1", "--max-tokens", "16"
    )
    first = start_cli(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run wrote nothing in time"
            time.sleep(0.05)
        second = start_cli(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = second.communicate(timeout=120)
        first_still_running = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lines = err.decode().strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, lines
    assert first_still_running, "the first run finished before the second started: make it slower"
    assert f"(process {first.pid}," in lines[0] and str(out) in lines[0]
    records = [json.loads(line) for line in out.read_bytes().splitlines()[:-1]]  # all but a torn last line
    assert len({(r["prompt_index"], r["sample_index"]) for r in records}) == len(records)  # nothing spliced
    with OutputLock(out):  # the killed run's lock is stale: the next run takes it
        pass
    assert not (tmp_path / "out.jsonl.lock").exists()


def test_1_locked_output_refuses_single_process_and_data_parallel_runs(pair, tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.txt", ["one", "two"])
    out = tmp_path / "out.jsonl"
    assert main(argv_for(pair, "--input", str(prompts), "--output", str(out))) == 0
    before = hashes(tmp_path)
    with OutputLock(out):  # as another run would hold it
        for extra in ([], ["--data-parallel", "2"], ["--overwrite"]):
            code, err = cli(
                argv_for(pair, "--input", str(prompts), "--output", str(out), "--n", "2", *extra), capsys
            )
            assert code == 2 and len(err) == 1 and f"(process {os.getpid()}," in err[0], err
    assert hashes(tmp_path) == before  # no shard, log or lock left, the output untouched


# ---------------------------------------------------------------------------- 2. --overwrite deletes last


@pytest.mark.parametrize(
    "bad, message", [(LONG_PROMPT, "the models' context is 256"), ("fine \ud800 not", "bad.jsonl: line 2")]
)
def test_2_overwrite_keeps_the_old_output_when_a_check_fails(
    pair, tmp_path, capsys, monkeypatch, bad, message
):
    good = write_lines(tmp_path / "good.jsonl", ['{"prompt": "one"}'])
    out = tmp_path / "out.jsonl"
    assert main(argv_for(pair, "--input", str(good), "--output", str(out))) == 0
    bad_input = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "one"}', json.dumps({"prompt": bad})])
    before = hashes(tmp_path)
    monkeypatch.setattr(generate_job, "build_sampler", _fail_loading)  # the error must come before loading
    code, err = cli(argv_for(pair, "--input", str(bad_input), "--output", str(out), "--overwrite"), capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert hashes(tmp_path) == before


def test_2_overwrite_keeps_the_old_output_when_the_sampler_refuses(pair, tmp_path, capsys, monkeypatch):
    """The last line of defence: a check only the sampler makes still comes before any removal."""
    out = tmp_path / "out.jsonl"
    assert main(argv_for(pair, "--prompt", "one", "--output", str(out))) == 0
    before = hashes(tmp_path)
    monkeypatch.setattr(generate_job, "check_prompt_lengths", lambda *args: None)  # skip the early check
    code, err = cli(argv_for(pair, "--prompt", LONG_PROMPT, "--output", str(out), "--overwrite"), capsys)
    assert code == 2 and len(err) == 1 and "the models' context is 256" in err[0], err
    assert hashes(tmp_path) == before


# ---------------------------------------------------------------------------- 3. input is the output


def test_3_input_that_is_the_output_is_refused(pair, tmp_path, capsys, no_model_loads):
    prompts = write_lines(tmp_path / "prompts.jsonl", ['{"prompt": "one"}', '{"prompt": "two"}'])
    (tmp_path / "link.jsonl").symlink_to(prompts)
    before = hashes(tmp_path)
    for output in (prompts, tmp_path / "link.jsonl"):
        code, err = cli(
            argv_for(pair, "--input", str(prompts), "--output", str(output), "--overwrite"), capsys
        )
        assert code == 2 and len(err) == 1 and "is the output file" in err[0], err
    shard = tmp_path / "out.jsonl.rank0.jsonl"
    shard.write_bytes(prompts.read_bytes())
    before = hashes(tmp_path)
    code, err = cli(
        argv_for(pair, "--input", str(shard), "--output", str(tmp_path / "out.jsonl"), "--overwrite"), capsys
    )
    assert code == 2 and "is the output file" in err[0], err
    assert hashes(tmp_path) == before


# ---------------------------------------------------------------------------- 4. hand-edited outputs


@pytest.fixture
def two_samples(pair, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", ["one", "two"])
    out = tmp_path / "out.jsonl"
    assert main(argv_for(pair, "--input", str(prompts), "--output", str(out))) == 0
    return prompts, out


def test_4_blank_line_in_the_output_is_skipped_on_resume(pair, two_samples):
    prompts, out = two_samples
    first, second = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(first + b"\n" + second + b"  \n")
    assert main(argv_for(pair, "--input", str(prompts), "--output", str(out), "--n", "2")) == 0
    assert keys(out) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_4_duplicated_record_is_refused_with_both_line_numbers(pair, two_samples, capsys):
    prompts, out = two_samples
    first, second = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(first + second + first)
    before = hashes(out.parent)
    code, err = cli(argv_for(pair, "--input", str(prompts), "--output", str(out), "--n", "2"), capsys)
    assert code == 2 and len(err) == 1 and "lines 1 and 3 both hold prompt" in err[0], err
    assert hashes(out.parent) == before


def test_4_record_without_its_keys_is_named_by_line(pair, two_samples, capsys):
    prompts, out = two_samples
    with open(out, "ab") as handle:
        handle.write(b'{"prompt": "one", "text": "not a sample"}\n')
    before = hashes(out.parent)
    code, err = cli(argv_for(pair, "--input", str(prompts), "--output", str(out), "--n", "2"), capsys)
    assert code == 2 and len(err) == 1 and f"{out}: line 3 is not a sample record" in err[0], err
    assert hashes(out.parent) == before


# ---------------------------------------------------------------------------- 5. finite numbers


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_5_non_finite_options_are_refused_everywhere(pair, tmp_path, capsys, no_model_loads, value):
    out = tmp_path / "out.jsonl"
    for extra in ([f"--temperature={value}"], [f"--log-interval={value}"]):
        code, err = cli(argv_for(pair, "--prompt", "one", "--output", str(out), *extra), capsys)
        assert code == 2 and len(err) == 1 and "finite" in err[0], err
    records = write_lines(tmp_path / "in.jsonl", ['{"prompt": "a", "completion": "b"}'])
    base, teacher = pair
    score = ["score", "--base", base, "--teacher", teacher, "--input", str(records), "--output", str(out)]
    code, err = cli([*score, f"--temperature={value}"], capsys)
    assert code == 2 and len(err) == 1 and "finite" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(temperature=float(value))


def test_5_metadata_is_strict_json(tmp_path):
    plan = io.plan_output(tmp_path / "out.jsonl")
    with pytest.raises(ValueError):
        io.write_meta(plan, {"params": {"temperature": float("nan")}})
    assert not plan.meta.exists()


# ---------------------------------------------------------------------------- 6. token ids and lengths


@pytest.fixture(scope="module")
def sampler(pair):
    from optimal_sampling import OptimalSampler

    return OptimalSampler(*pair, device="cpu", engine="reference")


def score_argv(pair, records: Path, out: Path) -> list[str]:
    base, teacher = pair
    return ["score", "--base", base, "--teacher", teacher, "--device", "cpu", "--input", str(records),
            "--output", str(out)]  # fmt: skip


def test_6_boolean_token_ids_are_refused(pair, sampler, tmp_path, capsys, no_model_loads):
    records = write_lines(tmp_path / "in.jsonl", ['{"prompt": "a", "token_ids": [5, true]}'])
    code, err = cli(score_argv(pair, records, tmp_path / "out.jsonl"), capsys)
    assert code == 2 and len(err) == 1 and f"{records}:1: token_ids" in err[0] and "true" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    with pytest.raises(TypeError, match="not booleans"):
        sampler.score(["a"], [[5, True]])


def test_6_completions_that_do_not_fit_the_context_are_refused(
    pair, sampler, tmp_path, capsys, no_model_loads
):
    records = write_lines(tmp_path / "in.jsonl", ['{"prompt": "a", "completion": "b"}',
                                                  json.dumps({"prompt": "a", "token_ids": [5] * 300})])  # fmt: skip
    code, err = cli(score_argv(pair, records, tmp_path / "out.jsonl"), capsys)
    assert code == 2 and len(err) == 1 and f"{records}:2:" in err[0] and "context is 256" in err[0], err
    with pytest.raises(ValueError, match="context is 256"):
        sampler.score(["a"], [[5] * 300])


# ---------------------------------------------------------------------------- 7. .gguf model paths


def test_7_gguf_model_paths_load_through_the_cli(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    from test_demo import write_tiny_qwen2_gguf

    model = tmp_path / "tiny.gguf"
    write_tiny_qwen2_gguf(model)
    monkeypatch.setenv("OPTIMAL_SAMPLING_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--base", str(model), "--teacher", str(model), "--prompt", "the the", "--max-tokens", "3",
            "--device", "cpu", "--output", str(out), "--quiet"]  # fmt: skip
    code, err = cli(argv, capsys)
    assert code == 0, err
    assert keys(out) == [(0, 0)]
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1  # converted once, into the cache


@pytest.mark.slow
def test_7_real_demo_base_gguf_through_base_option(tmp_path, capsys):
    from optimal_sampling.models import demo

    model = demo.assemble_gguf(demo.DEMO_BASE_MODEL, tmp_path / f"{demo.DEMO_BASE_MODEL.slug}.gguf")
    argv = ["generate", "--base", str(model), "--teacher", str(model), "--prompt", "def fib(n):",
            "--max-tokens", "4", "--device", "cpu"]  # fmt: skip
    code, err = cli(argv, capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------- 8. report without matplotlib


def test_8_report_without_matplotlib_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch):
    records = write_lines(
        tmp_path / "s.jsonl", ['{"prompt_index": 0, "sample_index": 0, "log_weight_base": 0.0}']
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, err = cli(["report", str(records), "--out", str(tmp_path / "report")], capsys)
    assert code == 2 and len(err) == 1 and "optimal-sampling[report]" in err[0], err
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------------------- 9. --tp-size


def test_9_tp_size_that_does_not_divide_the_heads_fails_before_loading(pair, tmp_path, capsys, monkeypatch):
    from optimal_sampling import OptimalSampler
    from optimal_sampling.distributed import groups

    monkeypatch.setattr(generate_job, "build_sampler", _fail_loading)
    monkeypatch.setattr(groups, "start_tensor_parallel", _fail_loading)  # no helper may start
    code, err = cli(argv_for(pair, "--prompt", "one", "--tp-size", "3"), capsys)
    assert code == 2 and len(err) == 1, err
    assert "tp_size 3 must divide the base model's attention heads (4)" in err[0]
    with pytest.raises(ValueError, match="tp_size 3 must divide"):
        OptimalSampler(*pair, device="cpu", tp_size=3)


# ---------------------------------------------------------------------------- 10. enable_torch_compile


def test_10_enable_torch_compile_warns_that_it_has_no_effect():
    with pytest.warns(UserWarning, match="enable_torch_compile has no effect"):
        EngineConfig(enable_torch_compile=True)
    with pytest.raises(TypeError, match="enable_torch_compile"):
        EngineConfig(enable_torch_compile="yes")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert "`enable_torch_compile=True` is accepted" in readme


# ---------------------------------------------------------------------------- 11. lone surrogates


def test_11_lone_surrogate_is_named_by_file_and_line_before_any_tokenizer(
    pair, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(generate_job, "resolve_model_pair", _fail_loading)
    prompts = write_lines(tmp_path / "prompts.jsonl", ['{"prompt": "fine"}', '{"prompt": "bad \\udc80 one"}'])
    out = tmp_path / "out.jsonl"
    code, err = cli(argv_for(pair, "--input", str(prompts), "--output", str(out)), capsys)
    assert code == 2 and len(err) == 1 and f"{prompts}: line 2" in err[0] and "surrogate" in err[0], err
    code, err = cli(argv_for(pair, "--prompt", "bad \udcff"), capsys)  # undecodable bytes in argv
    assert code == 2 and len(err) == 1 and "--prompt number 1" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


# ---------------------------------------------------------------------------- 12. full disk


def _file_size_limit(limit: int):
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_12_full_disk_is_one_line_exit_1_and_the_rerun_completes(pair, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", [f"Prompt {i}" for i in range(6)])
    out = tmp_path / "out.jsonl"
    argv = argv_for(pair, "--input", str(prompts), "--output", str(out), "--n", "2", "--max-tokens", "8")
    child = start_cli(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_file_size_limit(3000))
    _, err = child.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert child.returncode == 1 and len(lines) == 1, lines
    assert f"cannot write {out}" in lines[0] and "File too large" in lines[0]
    assert "run the same command again to resume" in lines[0]
    kept = out.read_bytes()[: out.read_bytes().rfind(b"\n") + 1]
    assert kept.count(b"\n") >= 1
    assert main(argv) == 0
    assert out.read_bytes().startswith(kept) and keys(out) == [(p, s) for p in range(6) for s in range(2)]


# ---------------------------------------------------------------------------- 13. score checks first


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "token_ids": [5, 999]}, ":2: token id 999 is outside the shared vocabulary"),
        ({"prompt": "a", "token_ids": [-1]}, ":2: token_ids must be a list of non-negative integers"),
        ({"prompt": "a", "completion": "b \ud800"}, ":2: the text holds a lone surrogate"),
    ],
)
def test_13_score_checks_every_record_before_loading(pair, tmp_path, capsys, no_model_loads, record, message):
    records = write_lines(tmp_path / "in.jsonl", ['{"prompt": "a", "completion": "b"}', json.dumps(record)])
    code, err = cli(score_argv(pair, records, tmp_path / "out.jsonl"), capsys)
    assert code == 2 and len(err) == 1 and f"{records}{message}" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no stale .partial


def test_13_score_failure_after_loading_leaves_no_partial(pair, tmp_path, capsys, monkeypatch):
    from optimal_sampling.runtime.sampler import OptimalSampler

    def fail(*args, **kwargs):
        raise ValueError("scoring failed")

    monkeypatch.setattr(OptimalSampler, "score", fail)
    records = write_lines(tmp_path / "in.jsonl", ['{"prompt": "a", "completion": "b"}'])
    code, err = cli(score_argv(pair, records, tmp_path / "out.jsonl"), capsys)
    assert code == 2 and err == ["optimal-sampling: error: scoring failed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# ---------------------------------------------------------------------------- 14. command errors first


@pytest.mark.parametrize(
    "models, message",
    [
        (lambda base, teacher: ["--base", base], "give both --base and --teacher"),
        (
            lambda base, teacher: ["--base", "/nonexistent/model", "--teacher", teacher],
            "model path not found",
        ),
    ],
)
def test_14_command_errors_come_before_the_resume_check(pair, tmp_path, capsys, monkeypatch, models, message):
    out = tmp_path / "out.jsonl"
    base, teacher = pair
    assert main(argv_for(pair, "--prompt", "one", "--output", str(out))) == 0
    before = hashes(tmp_path)
    monkeypatch.setattr(generate_job, "build_sampler", _fail_loading)
    argv = ["generate", *models(base, teacher), "--prompt", "one", "--output", str(out), "--max-tokens", "4",
            "--chat-template", "none", "--device", "cpu"]  # fmt: skip
    code, err = cli(argv, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert hashes(tmp_path) == before


# ---------------------------------------------------------------------------- 15. closed pipe


def test_15_closed_stdout_ends_the_run_quietly(pair):
    child = start_cli(argv_for(pair, "--prompt", "one", "--prompt", "two", "--n", "3"),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    child.stdout.close()  # the reader is gone before the first sample is printed (`| head -0`)
    err = child.stderr.read().decode()
    child.wait(timeout=120)
    assert child.returncode in (0, 141), err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


# ---------------------------------------------------------------------------- 16. worker input errors


def test_16_worker_input_error_is_reported_without_resume_advice(pair, tmp_path, capsys, monkeypatch):
    said = "optimal-sampling: error: prompts.txt: line 2 is not what this worker expected"

    def failing_worker(options, rank, world):
        return [sys.executable, "-c", f"import sys; print({said!r}, file=sys.stderr); sys.exit(2)"]

    monkeypatch.setattr(launcher, "worker_command", failing_worker)
    prompts = write_lines(tmp_path / "prompts.txt", ["one", "two"])
    code, err = cli(argv_for(pair, "--input", str(prompts), "--output", str(tmp_path / "out.jsonl"),
                             "--data-parallel", "2"), capsys)  # fmt: skip
    assert code == 2 and len(err) == 1, err
    assert "stopped on an input error: prompts.txt: line 2 is not what this worker expected" in err[0]
    assert "resume" not in err[0]
