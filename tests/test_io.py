"""Prompt files and the resumable JSONL journal, without models."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optimal_sampling.jobs import prompts as prompt_files
from optimal_sampling.jobs import store as io

# ---------------------------------------------------------------------------- reading prompts


def test_text_one_prompt_per_line_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\n  \nsecond line\n", encoding="utf-8")
    assert prompt_files.read_prompts(path).prompts == ["first", "second line"]


def test_jsonl_records_strings_and_teacher_field(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"q": "a", "t": "A"}, {"q": "b", "t": "B", "other": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    got = prompt_files.read_prompts(path, "q", "t")
    assert got.prompts == ["a", "b"] and got.teacher_prompts == ["A", "B"]
    plain = tmp_path / "s.jsonl"
    plain.write_text('"x"\n"y"\n', encoding="utf-8")
    assert prompt_files.read_prompts(plain).prompts == ["x", "y"]


def test_jsonl_text_with_unicode_line_separators_stays_one_record(tmp_path):
    """Generated text may hold U+2028, U+0085, form feeds; JSON writes them raw, on one line."""
    path = tmp_path / "samples.jsonl"
    texts = ["a\u2028b", "c\x85d\x0ce", "f\u2029g\x1ch"]
    path.write_bytes(b"".join(io.encode_record({"prompt": t, "n": i}) for i, t in enumerate(texts)))
    assert prompt_files.read_prompts(path).prompts == texts
    assert [r["prompt"] for r in io.read_records(path)] == texts
    windows = tmp_path / "p.txt"
    windows.write_bytes("one\u2028still one\r\ntwo\r\n".encode())
    assert prompt_files.read_prompts(windows).prompts == ["one\u2028still one", "two"]


def test_json_list_of_strings_or_records(tmp_path):
    strings, records = tmp_path / "s.json", tmp_path / "r.json"
    strings.write_text(json.dumps(["a", "b"]), encoding="utf-8")
    records.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]), encoding="utf-8")
    assert prompt_files.read_prompts(strings).prompts == ["a", "b"]
    assert prompt_files.read_prompts(records).prompts == ["a", "b"]


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "teacher": ["A", "B"]}), path)
    got = prompt_files.read_prompts(path, teacher_field="teacher")
    assert got.prompts == ["a", "b"] and got.teacher_prompts == ["A", "B"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": \n', "line 3 is not valid JSON"),
        ("field.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', "line 2: record has no 'prompt' field"),
        ("type.jsonl", '{"prompt": 3}\n', "field 'prompt' must be a string"),
        ("empty.txt", "\n\n", "contains no prompts"),
        ("dict.json", '{"prompt": "a"}', "must hold a JSON list"),
        ("bad.json", "[1,", "is not valid JSON"),
        ("num.json", "[1]", "item 0: expected a record"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        prompt_files.read_prompts(path)


def test_missing_file_and_text_with_teacher_field(tmp_path):
    with pytest.raises(ValueError, match="input file not found"):
        prompt_files.read_prompts(tmp_path / "nope.jsonl")
    text = tmp_path / "p.txt"
    text.write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs records"):
        prompt_files.read_prompts(text, teacher_field="t")


# ---------------------------------------------------------------------------- records and journal


def test_encode_record_is_strict_json_on_one_line():
    line = io.encode_record({"a": float("-inf"), "b": [1.5, float("nan")], "text": "x\ny"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"a": None, "b": [1.5, None], "text": "x\ny"}


def _record(p: int, s: int) -> dict:
    return {"prompt_index": p, "sample_index": s, "input_prompt": f"p{p}", "input_teacher_prompt": f"p{p}"}


def _meta(params: dict) -> dict:
    return {"format": io.META_FORMAT, "fingerprint": io.fingerprint_of(params), "params": params}


def test_torn_last_line_is_detected_and_cut(tmp_path):
    plan = io.plan_output(tmp_path / "out.jsonl")
    meta = _meta({"temperature": 1.0})
    prompts = prompt_files.PromptSet(["p0", "p1"])
    writer = io.JournalWriter(plan, io.ResumeState(), meta)
    writer.write(_record(0, 0))
    writer.close()
    complete = plan.target.read_bytes()
    with open(plan.target, "ab") as handle:
        handle.write(b'{"prompt_index": 1, "sam')
    state = plan.inspect(meta, prompts, overwrite=False)
    assert state.done == {(0, 0)} and state.valid_bytes == len(complete) and state.torn_bytes == 24
    assert plan.target.read_bytes().endswith(b"sam")  # inspect touches nothing
    writer = io.JournalWriter(plan, state, meta)
    writer.write(_record(1, 0))
    writer.close()
    assert plan.target.read_bytes() == complete + io.encode_record(_record(1, 0))


def test_changed_parameters_and_prompts_are_refused(tmp_path):
    plan = io.plan_output(tmp_path / "out.jsonl")
    meta = _meta({"temperature": 1.0})
    writer = io.JournalWriter(plan, io.ResumeState(), meta)
    writer.write(_record(0, 0))
    writer.close()
    with pytest.raises(ValueError, match="temperature 1.0 -> 0.5"):
        plan.inspect(_meta({"temperature": 0.5}), prompt_files.PromptSet(["p0"]), overwrite=False)
    with pytest.raises(ValueError, match="prompt 0 of the input differs"):
        plan.inspect(meta, prompt_files.PromptSet(["other"]), overwrite=False)
    assert plan.inspect(meta, prompt_files.PromptSet(["p0", "p1"]), overwrite=False).done == {(0, 0)}
    plan.meta.unlink()
    with pytest.raises(ValueError, match="is missing"):
        plan.inspect(meta, prompt_files.PromptSet(["p0"]), overwrite=False)


def test_plan_output_checks_without_creating(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        io.plan_output(blocker / "out.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        io.plan_output(tmp_path / "missing" / "out.jsonl")
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        io.plan_output(tmp_path / "out.csv")
    plan = io.plan_output(tmp_path / "out.parquet")
    assert plan.journal.name == "out.parquet.partial.jsonl" and plan.meta.name == "out.parquet.meta.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_parquet_round_trip_and_reseed(tmp_path):
    plan = io.plan_output(tmp_path / "out.parquet")
    meta = _meta({"seed": 0})
    writer = io.JournalWriter(plan, io.ResumeState(), meta)
    for p in range(2):
        writer.write(dict(_record(p, 0), stop_reason=7 if p else "END", values=[0.5, -1.0]))
    writer.close()
    assert io.finish_parquet(plan) == 2 and not plan.journal.exists()
    rows = io.read_records(plan.target)
    assert [r["stop_reason"] for r in rows] == ["END", "7"] and rows[0]["values"] == [0.5, -1.0]
    state = plan.inspect(meta, prompt_files.PromptSet(["p0", "p1", "p2"]), overwrite=False)
    assert state.done == {(0, 0), (1, 0)} and state.from_parquet is not None
    writer = io.JournalWriter(plan, state, meta)
    writer.write(_record(2, 0))
    writer.close()
    assert io.finish_parquet(plan) == 3
