"""Prompt files in: JSONL, a JSON list (of strings or of records), Parquet, or plain text (one
prompt per line). Every mistake is a `ValueError` naming the file and, where there is one, the
line or row; a prompt that is not valid Unicode (a lone surrogate) is named before any model loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .parquet import first_line, import_parquet


@dataclass
class PromptSet:
    prompts: list[str]
    teacher_prompts: list[str] | None = None  # None: the teacher sees the base prompt


def read_prompts(
    path: str | os.PathLike, prompt_field: str = "prompt", teacher_field: str | None = None
) -> PromptSet:
    """Prompts of a file, by extension: .jsonl/.ndjson, .json, .parquet, anything else is plain text."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"input file not found: {file}")
    if not file.is_file():
        raise ValueError(f"input is not a file: {file}")
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        items = _jsonl_items(file)
    elif suffix == ".json":
        items = _json_items(file)
    elif suffix == ".parquet":
        items = _parquet_items(file)
    else:
        if teacher_field is not None:
            raise ValueError(
                f"{file}: --teacher-prompt-field needs records (JSONL, JSON or Parquet), not plain text"
            )
        items = _text_items(file)
    prompts = _collect(items, prompt_field, teacher_field)
    if not prompts.prompts:
        raise ValueError(f"{file} contains no prompts")
    return prompts


def check_unicode(text: str, where: str) -> None:
    """A lone surrogate (from a JSON escape such as "\\ud800", or undecodable bytes in argv) is not
    text: no tokenizer takes it and no UTF-8 file can hold it, so it is refused where it was read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}: the text holds a lone surrogate (U+{ord(text[err.start]):04X} at character "
            f"{err.start}), which is not valid Unicode"
        ) from None


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def _lines(text: str) -> list[str]:
    """Lines split at "\n" only (a trailing "\r" dropped): str.splitlines would also split at
    U+2028, U+0085 and other characters that generated text (written raw in JSON) may hold."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _text_items(file: Path) -> Iterator[tuple[str, object]]:
    """One prompt per non-blank line; a literal backslash-n stays as typed."""
    for number, line in enumerate(_lines(_read_text(file)), start=1):
        if line.strip():
            yield f"{file}: line {number}", line


def _jsonl_items(file: Path) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(_lines(_read_text(file)), start=1):
        if not line.strip():
            continue
        try:
            yield f"{file}: line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{file}: line {number} is not valid JSON ({err.msg}, column {err.colno})"
            ) from err


def _json_items(file: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno})"
        ) from err
    if not isinstance(data, list):
        raise ValueError(
            f"{file} must hold a JSON list of strings or of records, not a {type(data).__name__}"
        )
    for position, item in enumerate(data):
        yield f"{file}: item {position}", item


def _parquet_items(file: Path) -> Iterator[tuple[str, object]]:
    pq = import_parquet()
    try:
        table = pq.read_table(file)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise ValueError(f"{file} is not a readable Parquet file ({first_line(err)})") from err
    for row, record in enumerate(table.to_pylist()):
        yield f"{file}: row {row}", record


def _collect(items: Iterable[tuple[str, object]], prompt_field: str, teacher_field: str | None) -> PromptSet:
    prompts: list[str] = []
    teacher: list[str] = []
    for where, item in items:
        if isinstance(item, str) and teacher_field is None:
            check_unicode(item, where)
            prompts.append(item)
            continue
        if not isinstance(item, dict):
            kind = "a string" if isinstance(item, str) else f"a {type(item).__name__}"
            raise ValueError(f"{where}: expected a record with a {prompt_field!r} field, got {kind}")
        prompts.append(_field(item, prompt_field, where))
        if teacher_field is not None:
            teacher.append(_field(item, teacher_field, where))
    return PromptSet(prompts, teacher if teacher_field is not None else None)


def _field(record: dict, name: str, where: str) -> str:
    if name not in record:
        fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise ValueError(f"{where}: record has no {name!r} field (its fields: {fields})")
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{where}: field {name!r} is empty")
    check_unicode(value, f"{where}: field {name!r}")
    return value
