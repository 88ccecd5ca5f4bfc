"""End-to-end `optimal-sampling generate` on tiny random models, called in-process via `main(argv)`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optimal_sampling.cli import COMMANDS, main
from optimal_sampling.jobs import store as io

PROMPTS = ["def add(a, b):", "The quick brown fox", "Hello world!"]
FIELD_TYPES = {
    "prompt_index": int, "sample_index": int, "prompt": str, "teacher_prompt": str, "text": str,
    "token_ids": list, "finish_reason": str, "logprobs_base": list, "logprobs_teacher": list,
    "logprobs_q": list, "num_tokens": int, "sum_logprob_base": float, "sum_logprob_teacher": float,
    "sum_logprob_q": float, "log_weight_base": float, "log_weight_teacher": float,
    "input_prompt": str, "input_teacher_prompt": str, "params_fingerprint": str,
}  # fmt: skip
DIAGNOSTICS = ("alphas", "ess_ratios", "kl_q_base", "kl_q_teacher")


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama")


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_torch_thread):
    """Every test of this module runs with one intra-op thread (see conftest)."""


def generate(pair, *extra: str) -> list[str]:
    base, teacher = pair
    return ["generate", "--base", base, "--teacher", teacher, "--max-tokens", "5", "--quiet", *extra]


def run_ok(argv: list[str]) -> None:
    assert main(argv) == 0


def check_records(records: list[dict], n_prompts: int, n: int, diagnostics: bool = False) -> None:
    assert sorted((r["prompt_index"], r["sample_index"]) for r in records) == [
        (p, s) for p in range(n_prompts) for s in range(n)
    ]
    for r in records:
        for name, kind in FIELD_TYPES.items():
            assert isinstance(r[name], kind), (name, r[name])
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= r["num_tokens"] == len(r["token_ids"]) == len(r["logprobs_q"]) <= 5
        assert all(isinstance(t, int) for t in r["token_ids"])
        assert r["log_weight_base"] == pytest.approx(r["sum_logprob_base"] - r["sum_logprob_q"])
        for name in DIAGNOSTICS:
            if diagnostics:
                assert len(r[name]) == r["num_tokens"] and all(isinstance(v, float) for v in r[name])
            else:
                assert r[name] is None


# ---------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_everywhere(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: optimal-sampling" in out
    if command == "generate":
        for option in ("--alpha-method", "--target-top-k", "--batch-size", "--chat-template", "--stop"):
            assert option in out


# ---------------------------------------------------------------------------- input formats


def _write_input(tmp_path: Path, kind: str) -> Path:
    records = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    if kind == "txt":
        path = tmp_path / "prompts.txt"
        path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        path = tmp_path / "prompts.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif kind == "json-strings":
        path = tmp_path / "prompts.json"
        path.write_text(json.dumps(PROMPTS), encoding="utf-8")
    elif kind == "json-records":
        path = tmp_path / "prompts.json"
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        path = tmp_path / "prompts.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json-strings", "json-records", "parquet"])
def test_every_input_format_to_jsonl(pair, tmp_path, kind):
    out = tmp_path / "out.jsonl"
    run_ok(
        generate(
            pair,
            "--input",
            str(_write_input(tmp_path, kind)),
            "--output",
            str(out),
            "--chat-template",
            "none",
        )
    )
    records = io.read_records(out)
    check_records(records, len(PROMPTS), 1)
    assert [r["input_prompt"] for r in sorted(records, key=lambda r: r["prompt_index"])] == PROMPTS
    assert all(r["prompt"] == r["input_prompt"] for r in records)
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["fingerprint"] == records[0]["params_fingerprint"]


def test_parquet_output_with_n_and_diagnostics(pair, tmp_path):
    out = tmp_path / "out.parquet"
    argv = generate(
        pair,
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--n",
        "3",
        "--diagnostics",
        "--output",
        str(out),
    )
    run_ok(argv)
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()
    records = pq.read_table(out).to_pylist()
    check_records(records, 2, 3, diagnostics=True)
    assert all(r["stop_reason"] is None or isinstance(r["stop_reason"], str) for r in records)
    texts = {r["text"] for r in records if r["prompt_index"] == 0}
    assert len(texts) > 1  # n samples of one prompt differ


def test_teacher_prompt_field_and_chat_templates(pair, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(json.dumps({"q": p, "hint": p + " (hint)"}) + "\n" for p in PROMPTS), encoding="utf-8"
    )
    common = ["--input", str(path), "--prompt-field", "q", "--teacher-prompt-field", "hint"]
    for mode in ("none", "base", "teacher", "both", "auto"):
        out = tmp_path / f"{mode}.jsonl"
        run_ok(generate(pair, *common, "--chat-template", mode, "--output", str(out)))
        for r in io.read_records(out):
            raw, hint = PROMPTS[r["prompt_index"]], PROMPTS[r["prompt_index"]] + " (hint)"
            assert (r["input_prompt"], r["input_teacher_prompt"]) == (raw, hint)
            templated_base = f"<|user|>{raw}<|im_end|><|assistant|>"
            templated_teacher = f"<|user|>{hint}<|im_end|><|assistant|>"
            assert r["prompt"] == (templated_base if mode in ("base", "both", "auto") else raw)
            assert r["teacher_prompt"] == (templated_teacher if mode in ("teacher", "both", "auto") else hint)


def test_terminal_output_without_output_file(pair, capsys):
    run_ok(generate(pair, "--prompt", PROMPTS[0], "--n", "2", "--stop", "zzz"))
    out = capsys.readouterr().out
    assert out.count("--- prompt 0, sample") == 2
    assert out.count("[alpha mean") == 2 and "ESS ratio mean" in out and "log w_base" in out


def test_same_seed_same_samples_and_stop_string(pair, tmp_path):
    first, second, third = (tmp_path / f"{i}.jsonl" for i in range(3))
    run_ok(generate(pair, "--prompt", PROMPTS[0], "--n", "2", "--output", str(first)))
    run_ok(generate(pair, "--prompt", PROMPTS[0], "--n", "2", "--output", str(second), "--batch-size", "1"))
    run_ok(generate(pair, "--prompt", PROMPTS[0], "--n", "2", "--output", str(third), "--seed", "1"))
    key = lambda r: (r["prompt_index"], r["sample_index"])  # noqa: E731
    a, b, c = (sorted(io.read_records(p), key=key) for p in (first, second, third))
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in c]


# ---------------------------------------------------------------------------- user mistakes: exit 2


@pytest.fixture(scope="module")
def incompatible_teacher(pair, tmp_path_factory) -> str:
    """The teacher with two token ids swapped in its tokenizer."""
    target = tmp_path_factory.mktemp("incompatible") / "teacher"
    shutil.copytree(pair[1], target)
    spec = json.loads((target / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (target / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return str(target)


SENTINEL = b'{"sentinel": true}\n'


def _bad_case(name: str, tmp: Path, pair, incompatible: str) -> tuple[list[str], str]:
    base, teacher = pair
    good = tmp / "good.txt"
    good.write_text("a prompt\n", encoding="utf-8")
    blocker = tmp / "blocker"
    blocker.write_text("x")
    (tmp / "malformed.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"\n', encoding="utf-8")
    (tmp / "nofield.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n', encoding="utf-8")
    out = str(tmp / "out.jsonl")
    fresh = str(tmp / "fresh.jsonl")
    cases = {
        "missing input": (["--input", str(tmp / "nope.jsonl"), "-o", out], "input file not found"),
        "malformed jsonl": (["--input", str(tmp / "malformed.jsonl"), "-o", out], "line 3 is not valid JSON"),
        "no prompt field": (
            ["--input", str(tmp / "nofield.jsonl"), "-o", out],
            "line 2: record has no 'prompt'",
        ),
        "incompatible tokenizers": (
            ["--input", str(good), "--teacher", incompatible, "-o", fresh],
            "not compatible",
        ),
        "unwritable output": (["--input", str(good), "-o", str(blocker / "out.jsonl")], "is not a directory"),
        "output suffix": (["--input", str(good), "-o", str(tmp / "out.csv")], ".jsonl or .parquet"),
        "foreign output": (["--input", str(good), "-o", out], "not an optimal-sampling output"),
        "temperature": (["--input", str(good), "--temperature", "-1", "-o", out], "temperature must be >= 0"),
        "top-p": (["--input", str(good), "--top-p", "2", "-o", out], "top_p must be in [0, 1]"),
        "alpha range": (
            ["--input", str(good), "--alpha-min", "0.9", "--alpha-max", "0.2", "-o", out],
            "alpha_min",
        ),
        "alpha method": (["--input", str(good), "--alpha-method", "magic", "-o", out], "invalid choice"),
        "not a number": (["--input", str(good), "--n", "two", "-o", out], "invalid int value"),
        "prompt and input": (["--input", str(good), "--prompt", "x", "-o", out], "not both"),
        "missing model": (
            ["--input", str(good), "--teacher", str(tmp / "nomodel"), "-o", fresh],
            "not found",
        ),
    }
    argv, message = cases[name]
    if name not in ("incompatible tokenizers", "missing model"):
        argv = ["--teacher", teacher, *argv]
    return ["generate", "--base", base, *argv], message


BAD_CASES = [
    "missing input", "malformed jsonl", "no prompt field", "incompatible tokenizers", "unwritable output",
    "output suffix", "foreign output", "temperature", "top-p", "alpha range", "alpha method", "not a number",
    "prompt and input", "missing model",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_user_mistakes_exit_2_with_one_line(case, pair, incompatible_teacher, tmp_path, capsys):
    argv, message = _bad_case(case, tmp_path, pair, incompatible_teacher)
    (tmp_path / "out.jsonl").write_bytes(SENTINEL)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("optimal-sampling: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert (tmp_path / "out.jsonl").read_bytes() == SENTINEL
    assert not (tmp_path / "out.jsonl.meta.json").exists()
    assert not (tmp_path / "fresh.jsonl").exists() and not (tmp_path / "fresh.jsonl.meta.json").exists()


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.strip().startswith("optimal-sampling: error: choose a command")
