"""Resumable sample files out (prompt files in: `prompts.py`).

Samples are appended to a JSONL *journal*, one line per finished sample, flushed as it is
written, so a `kill -9` loses nothing that was written and a re-run continues where the last one
stopped. Invariants:
- Every line of the journal except possibly the last is a complete JSON record ending in `\\n`
  (records never contain a raw newline). A last line without `\\n` is a torn write; it is cut off
  before anything is appended. A blank line (a hand edit) is skipped; a (prompt, sample) that
  appears twice in one file is refused with both line numbers, since one of them is not ours.
- A sidecar `<output>.meta.json` (written atomically, before the first record) holds the
  generation parameters and their fingerprint. A journal with records is only ever appended to by
  a run with the same fingerprint: resuming with other parameters would mix two distributions.
- For `.parquet` output the journal is `<output>.partial.jsonl`; the Parquet file is written
  atomically from it when the run ends and the journal is then removed. A later run that has more
  work (more prompts, a larger `--n`) re-seeds the journal from the Parquet file first.
- Nothing existing is modified until `OutputPlan.inspect` has accepted the file for resumption,
  and the input is never one of the output's files (`check_not_input`).
- A failed write (a full disk, a file size limit) raises an `OSError` naming the file; what was
  written before it stays, and the torn line it may leave is cut off by the next run.

Data parallelism (see `data_parallel.py`): each worker appends to its own *shard* journal
`<output>.rank<r>.jsonl` beside the output, under the output's one sidecar. Shards follow the
journal invariants above; a (prompt, sample) lives in at most one of the output and its shards
(workers own disjoint prompts and skip what any file already holds). `inspect` treats the union
of the output and every shard as what is done, whatever the number of workers that wrote them;
`merge_shards` appends shard records the output lacks (at most once each, deduplicating by key)
and only then removes the shards, so a crash at any point loses nothing and a rerun finishes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .parquet import first_line, import_parquet
from .prompts import PromptSet

META_SUFFIX = ".meta.json"
PARTIAL_SUFFIX = ".partial.jsonl"
META_FORMAT = "optimal-sampling/1"
FSYNC_INTERVAL_S = 1.0
SHARD_NAME = re.compile(r"\.rank(\d+)\.jsonl")  # after the target's name
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # what a rerun with more space resumes from

# ============================================================================ run parameters


def fingerprint_of(params: dict) -> str:
    """16 hex digits identifying a parameter set (canonical JSON, SHA-256)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe_changes(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(changed) or "unknown change"


# ============================================================================ records


def encode_record(record: dict) -> bytes:
    """One JSONL line: strict JSON (non-finite floats become null), no raw newline, trailing \\n."""
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(record), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8") + b"\n"


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_records(path: str | os.PathLike) -> list[dict]:
    """All records of a finished output file (.jsonl or .parquet); a torn last line is ignored."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"file not found: {file}")
    if file.suffix.lower() == ".parquet":
        pq = import_parquet()
        try:
            return pq.read_table(file).to_pylist()
        except Exception as err:
            raise ValueError(f"{file} is not a readable Parquet file ({first_line(err)})") from err
    return [record for _, record in _journal_records(file)]


def _journal_records(file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every complete non-blank line; raises on a complete line that is
    not a record."""
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                return  # torn last line
            if not raw.strip():
                continue  # a blank line (an editor's, or a concatenation's) holds nothing
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{file}: line {number} is not a valid record ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{file}: line {number} is not a record")
            yield number, record


def records_to_parquet(records: list[dict], path: Path) -> None:
    """Write records to Parquet atomically; `stop_reason` (EOS id or stop string) becomes a string."""
    import pyarrow as pa

    pq = import_parquet()
    rows = [
        dict(r, stop_reason=None if r.get("stop_reason") is None else str(r["stop_reason"])) for r in records
    ]
    table = pa.Table.from_pylist(rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ============================================================================ output planning


def _first_line_with(source: Path, key: tuple[int, int]) -> int:
    """The line (or Parquet row) of the first record of `source` with `key` (an error path only)."""
    if source.suffix.lower() == ".parquet":
        numbered = enumerate(read_records(source))
    else:
        numbered = _journal_records(source)
    return next(n for n, r in numbered if (r.get("prompt_index"), r.get("sample_index")) == key)


def record_key(record: dict, where: str) -> tuple[int, int]:
    """(prompt_index, sample_index) of an output record; a ValueError naming `where` otherwise."""
    key = record.get("prompt_index"), record.get("sample_index")
    if not all(type(k) is int and k >= 0 for k in key):  # bool is an int, and no index
        raise ValueError(
            f"{where} is not a sample record (no integer prompt_index/sample_index): the file is not an "
            "optimal-sampling output. Use another --output, or --overwrite to replace it"
        )
    return key


@dataclass
class ResumeState:
    """What an existing output already holds."""

    done: set[tuple[int, int]] = field(default_factory=set)  # (prompt_index, sample_index)
    valid_bytes: int = 0  # length of the journal's complete lines
    torn_bytes: int = 0  # bytes of a half-written last line, to cut off
    prompts: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> input (base, teacher) prompt
    from_parquet: list[dict] | None = None  # records to re-seed the journal with
    meta_ok: bool = False  # the sidecar exists and matches
    # keys of the file being added (the first file's are `done` itself: no second set for a big journal)
    _source: Path | None = field(default=None, repr=False)
    _source_keys: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def add(self, record: dict, source: Path, line: int) -> None:
        """Count one record of `source` (its line number, or row for Parquet) as done.

        The same key in two files is expected (a crash between a shard's merge and its removal);
        twice in one file it is not, and is refused rather than guessed at."""
        key = record_key(record, f"{source}: line {line}")
        if source != self._source:
            self._source, self._source_keys = source, self.done if not self.done else set()
        if key in self._source_keys:
            first = _first_line_with(source, key)
            raise ValueError(
                f"{source}: lines {first} and {line} both hold prompt {key[0]} sample {key[1]}; the file was "
                "edited or written by two runs. Remove one of them, or use --overwrite to start over"
            )
        self._source_keys.add(key)
        self.done.add(key)
        self.prompts.setdefault(key[0], (record.get("input_prompt"), record.get("input_teacher_prompt")))


@dataclass
class OutputPlan:
    target: Path  # what the user asked for (.jsonl or .parquet)
    journal: Path  # the JSONL appended to while running
    meta: Path

    @property
    def parquet(self) -> bool:
        return self.target.suffix.lower() == ".parquet"

    def shard(self, rank: int) -> Path:
        """The journal data-parallel worker `rank` appends to."""
        return self.target.with_name(f"{self.target.name}.rank{rank}.jsonl")

    def shards(self) -> list[Path]:
        """Every shard journal beside the target, whatever the worker count that wrote it."""
        prefix = self.target.name
        candidates = self.target.parent.glob(f"{glob.escape(prefix)}.rank*.jsonl")
        found = [p for p in candidates if SHARD_NAME.fullmatch(p.name[len(prefix) :])]
        return sorted(found, key=lambda p: int(SHARD_NAME.fullmatch(p.name[len(prefix) :]).group(1)))

    def shard_plan(self, rank: int) -> OutputPlan:
        """A plan whose journal is worker `rank`'s shard, under this output's sidecar."""
        shard = self.shard(rank)
        return OutputPlan(target=shard, journal=shard, meta=self.meta)

    def inspect(self, meta: dict, prompts: PromptSet, overwrite: bool) -> ResumeState:
        """Check an existing output (and its shards) can be resumed with these parameters and
        prompts; touches nothing. `done` is the union of the output's and the shards' samples."""
        if overwrite:
            return ResumeState()
        records = self._existing_records()
        for shard in self.shards():
            for line, record in _journal_records(shard):
                records.add(record, shard, line)
        if not records.done and records.from_parquet is None:
            return records
        stored = _read_meta(self.meta, self.target)
        if stored.get("fingerprint") != meta["fingerprint"]:
            raise ValueError(
                f"{self.target} was written with other generation parameters "
                f"({describe_changes(stored.get('params', {}), meta['params'])}); resuming would mix two "
                "distributions in one file. Use another --output, or --overwrite to start over"
            )
        records.meta_ok = True
        check_prompts_match(records, prompts)
        return records

    def _existing_records(self) -> ResumeState:
        if self.journal.exists():
            return _scan_journal(self.journal)
        if self.parquet and self.target.exists():
            state = ResumeState(from_parquet=read_records(self.target))
            for row, record in enumerate(state.from_parquet):
                state.add(record, self.target, row)
            return state
        return ResumeState()


def plan_output(path: str | os.PathLike) -> OutputPlan:
    """Check the output path is usable (suffix, directory, writable) without modifying anything."""
    target = Path(path).expanduser()
    suffix = target.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--output must end in .jsonl or .parquet, got {str(path)!r}")
    if suffix == ".parquet":
        import_parquet()
    journal = target.with_name(target.name + PARTIAL_SUFFIX) if suffix == ".parquet" else target
    plan = OutputPlan(target=target, journal=journal, meta=target.with_name(target.name + META_SUFFIX))
    for file in (plan.target, plan.journal, plan.meta):
        check_writable(file)
    return plan


def check_not_input(plan: OutputPlan, input_path: str | os.PathLike | None) -> None:
    """Refuse an input that is one of the output's files: --overwrite would replace it with samples
    (and resuming would read samples as prompts)."""
    if input_path is None:
        return
    for file in (plan.target, plan.journal, plan.meta, *plan.shards()):
        if file.exists() and Path(input_path).exists() and os.path.samefile(input_path, file):
            raise ValueError(f"--input {input_path} is the output file {file}; write the samples elsewhere")


def check_writable(file: Path) -> None:
    """The directory exists and takes new files, and `file` is writable if it exists; touches nothing."""
    directory = file.parent if str(file.parent) else Path(".")
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ValueError(f"cannot write {file}: {directory} {what}")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".optimal-sampling-probe-"):
            pass
    except OSError as err:
        raise ValueError(
            f"cannot write {file}: directory {directory} is not writable ({err.strerror})"
        ) from err
    if file.exists():
        if not file.is_file():
            raise ValueError(f"cannot write {file}: it exists and is not a file")
        if not os.access(file, os.W_OK):
            raise ValueError(f"cannot write {file}: permission denied")


def scan_journal(file: Path) -> ResumeState:
    """What one journal holds (empty if it does not exist); `meta_ok` is left False."""
    return _scan_journal(file) if file.exists() else ResumeState()


def _scan_journal(file: Path) -> ResumeState:
    state = ResumeState()
    for line, record in _journal_records(file):
        state.add(record, file, line)
    state.valid_bytes = _complete_prefix_length(file)
    state.torn_bytes = file.stat().st_size - state.valid_bytes
    return state


def _complete_prefix_length(file: Path) -> int:
    """Bytes up to and including the last newline."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        position = size
        while position > 0:
            start = max(0, position - (1 << 16))
            handle.seek(start)
            chunk = handle.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            position = start
    return 0


def _read_meta(meta: Path, target: Path) -> dict:
    if not meta.is_file():
        raise ValueError(
            f"{target} already holds samples but {meta.name} (its generation parameters) is missing, so it "
            "cannot be resumed safely. Use another --output, or --overwrite to start over"
        )
    try:
        stored = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta} is not valid JSON; use --overwrite to start over") from err
    if not isinstance(stored, dict) or stored.get("format") != META_FORMAT:
        raise ValueError(f"{meta} is not an optimal-sampling metadata file; use --overwrite to start over")
    return stored


def check_prompts_match(state: ResumeState, prompts: PromptSet) -> None:
    """Records' input prompts must be the current input's prompts at the same indices."""
    teacher = prompts.teacher_prompts or prompts.prompts
    for index, (prompt, teacher_prompt) in sorted(state.prompts.items()):
        if index >= len(prompts.prompts):
            raise ValueError(
                f"the output holds samples of prompt {index} but the input has only {len(prompts.prompts)} prompts"
            )
        if prompt != prompts.prompts[index] or teacher_prompt != teacher[index]:
            raise ValueError(
                f"prompt {index} of the input differs from the one in the output file; the input changed since "
                "the output was started. Use another --output, or --overwrite to start over"
            )


# ============================================================================ writing


@contextlib.contextmanager
def naming_the_file(path: Path):
    """An OSError of a write (which names no file: ENOSPC, EFBIG, ...) re-raised with `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


class JournalWriter:
    """Appends encoded records to the journal; each is flushed at once, fsync'd at most once a second.

    A write that fails raises an OSError naming the journal; the writer is then only closed (the
    records before it are whole, a torn tail is cut by the next run)."""

    def __init__(self, plan: OutputPlan, state: ResumeState, meta: dict):
        self.plan = plan
        self.written = 0
        self.failed = False
        if not state.meta_ok:
            write_meta(plan, meta)
        keep = state.valid_bytes
        if state.from_parquet is not None and not plan.journal.exists():
            seed = b"".join(encode_record(r) for r in state.from_parquet)
            write_atomic(plan.journal, seed)
            keep = len(seed)
        self.handle = open(plan.journal, "r+b" if plan.journal.exists() else "wb")
        self.handle.truncate(keep)  # cut a torn last line (or a stale file on a fresh start)
        self.handle.seek(keep)
        self._last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        with self._guard():
            self.handle.write(encode_record(record))
            self.handle.flush()
            self.written += 1
            if time.monotonic() - self._last_sync >= FSYNC_INTERVAL_S:
                self.sync()

    def sync(self) -> None:
        os.fsync(self.handle.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self.handle.closed:
            return
        try:
            if not self.failed:
                with self._guard():
                    self.handle.flush()
                    self.sync()
        finally:
            with contextlib.suppress(OSError):  # after a failed write: its error is the one to report
                self.handle.close()

    @contextlib.contextmanager
    def _guard(self):
        try:
            with naming_the_file(self.plan.journal):
                yield
        except OSError:
            self.failed = True
            raise


def start_fresh(plan: OutputPlan) -> None:
    """--overwrite: remove a previous run's files, shards included (called only once the run's
    checks have passed: models loaded, or tokenizers checked by a data-parallel launcher)."""
    for file in (plan.journal, plan.meta, plan.target, *plan.shards()):
        file.unlink(missing_ok=True)


def write_meta(plan: OutputPlan, meta: dict) -> None:
    """The sidecar, atomically (what `JournalWriter` does before a first record)."""
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)  # strict JSON: NaN is refused
    write_atomic(plan.meta, text.encode() + b"\n")


def merge_shards(plan: OutputPlan, meta: dict) -> int:
    """Append every shard record the output lacks to its journal, then remove the shards.

    Returns the number of records appended. Safe to repeat after a crash at any point: records
    are deduplicated by (prompt_index, sample_index) against what the journal already holds, and
    a shard is removed only after the journal is flushed and fsync'd.
    """
    shards = plan.shards()
    if not shards:
        return 0
    state = plan._existing_records()
    state.meta_ok = plan.meta.is_file()
    seen = set(state.done)
    writer = JournalWriter(plan, state, meta)
    try:
        for shard in shards:
            for _, record in _journal_records(shard):
                key = (int(record["prompt_index"]), int(record["sample_index"]))
                if key not in seen:
                    seen.add(key)
                    writer.write(record)
    finally:
        writer.close()
    for shard in shards:
        shard.unlink(missing_ok=True)
    return writer.written


def finish_parquet(plan: OutputPlan) -> int:
    """Convert the journal to the Parquet target and remove the journal; returns the record count."""
    if not plan.journal.exists():
        return len(read_records(plan.target)) if plan.target.exists() else 0
    records = read_records(plan.journal)
    records_to_parquet(records, plan.target)
    plan.journal.unlink()
    return len(records)


def write_atomic(path: Path, data: bytes) -> None:
    """`data` as the whole of `path`, or (on any failure, a full disk included) `path` untouched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with naming_the_file(path), open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
