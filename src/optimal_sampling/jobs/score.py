"""`optimal-sampling score`: the importance data of given (prompt, completion) records.

Input is JSONL: our own `generate` records (their `prompt`, `teacher_prompt` and `token_ids`, as
the models saw them) or any records with a prompt and a completion field. Output is JSONL, one
record per input record, in input order: the input's identifying fields plus alpha, the three
per-token log-prob lists and the sequence log weights, exactly what `generate` reports for those
tokens under the given mixing and sampling settings.

Order, as for `generate`: options and model paths; the input (every record, named `file:line`);
the output path (writable, not the input) and its lock; then, with the tokenizers and
config.json only, every token id (an integer, not a boolean, inside the shared vocabulary) and
every prompt + completion length (within both contexts); only then the weights. The output is
written atomically when complete (a hidden temporary beside it, renamed), so a crash or a full
disk never leaves a file that looks finished, nor a stale partial one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import EngineConfig, MixConfig, SamplingParams
from ..errors import UsageError

KEEP_FIELDS = ("prompt_index", "sample_index", "id")


@dataclass(frozen=True)
class ScoreFields:
    """Which record fields hold the prompts and the completion."""

    prompt_field: str = "prompt"
    teacher_prompt_field: str | None = "teacher_prompt"
    completion_field: str = "completion"
    retokenize: bool = False  # tokenize the completion text even where token_ids exist


@dataclass
class ScoreInput:
    """The records of the input file, one entry per record in every list."""

    where: list[str] = field(default_factory=list)  # "file:line"
    prompts: list[str] = field(default_factory=list)
    teacher_prompts: list[str] = field(default_factory=list)
    completions: list = field(default_factory=list)  # text, or token ids
    records: list[dict] = field(default_factory=list)


def read_score_records(path: str, args: ScoreFields) -> ScoreInput:
    """Every record of a JSONL file, checked; errors name the record as `file:line`."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"input file not found: {file}")
    inputs = ScoreInput()
    try:
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    add_record(inputs, line, f"{file}:{number}", args)
    except UnicodeDecodeError as err:
        raise UsageError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not inputs.records:
        raise UsageError(f"{file}: no records")
    return inputs


def add_record(inputs: ScoreInput, line: str, where: str, args: ScoreFields) -> None:
    from .prompts import check_unicode

    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(args.prompt_field), str):
        raise UsageError(f"{where}: no string field {args.prompt_field!r}")
    prompt = record[args.prompt_field]
    teacher = record.get(args.teacher_prompt_field) if args.teacher_prompt_field else None
    teacher = teacher if isinstance(teacher, str) else prompt
    completion = _completion_of(record, args, where)
    for text in (prompt, teacher, completion if isinstance(completion, str) else ""):
        check_unicode(text, where)
    inputs.where.append(where)
    inputs.prompts.append(prompt)
    inputs.teacher_prompts.append(teacher)
    inputs.completions.append(completion)
    inputs.records.append(record)


def _completion_of(record: dict, args: ScoreFields, where: str):
    """The record's token ids (refused unless every one is a non-negative integer: JSON `true` is
    not an id), or, without them or with --retokenize, its completion text."""
    ids = record.get("token_ids")
    if not args.retokenize and ids not in (None, []):
        if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
            bad = ids if not isinstance(ids, list) else next(t for t in ids if type(t) is not int or t < 0)
            raise UsageError(
                f"{where}: token_ids must be a list of non-negative integers, found {json.dumps(bad)}"
            )
        return ids
    text = record.get(args.completion_field)
    if not isinstance(text, str) or not text:
        raise UsageError(f"{where}: no token_ids and no non-empty string field {args.completion_field!r}")
    return text


def check_against_models(inputs: ScoreInput, pair) -> list[list[int]]:
    """The completions as token ids (text through the base tokenizer, as `OptimalSampler.score`
    would), each checked against the shared vocabulary and both contexts; no weights needed."""
    from ..models.loading import read_model_shape, real_vocab_size

    shapes = (read_model_shape(pair.base_path), read_model_shape(pair.teacher_path))
    tokenizers = (pair.base_tokenizer, pair.teacher_tokenizer)
    vocab = min(*(real_vocab_size(t) for t in tokenizers), *(s.logit_width for s in shapes))
    context = min(s.context for s in shapes)
    base_lengths = [len(ids) for ids in pair.base_tokenizer(inputs.prompts)["input_ids"]]
    teacher_lengths = [len(ids) for ids in pair.teacher_tokenizer(inputs.teacher_prompts)["input_ids"]]
    completions = []
    for where, completion, prompt_lengths in zip(inputs.where, inputs.completions,
                                                 zip(base_lengths, teacher_lengths)):  # fmt: skip
        ids = completion if isinstance(completion, list) else pair.base_tokenizer(
            completion, add_special_tokens=False
        )["input_ids"]  # fmt: skip
        check_completion(where, ids, prompt_lengths, vocab, context)
        completions.append(ids)
    return completions


def check_completion(
    where: str, ids: list[int], prompt_lengths: tuple[int, int], vocab: int, context: int
) -> None:
    if not ids:
        raise UsageError(f"{where}: the completion is empty after tokenization")
    if min(prompt_lengths) == 0:
        raise UsageError(f"{where}: the prompt is empty after tokenization")
    if max(ids) >= vocab:
        raise UsageError(
            f"{where}: token id {max(ids)} is outside the shared vocabulary (ids 0..{vocab - 1})"
        )
    longest = max(prompt_lengths) + len(ids)
    if longest > context:
        raise UsageError(
            f"{where}: prompt and completion have {longest} tokens; the models' context is {context}"
        )


def scored_record(record: dict, sample, index: int) -> dict:
    out = {k: record[k] for k in KEEP_FIELDS if k in record}
    out.setdefault("record_index", index)
    scored = sample.to_record()
    for name in ("prompt", "teacher_prompt", "text", "token_ids", "num_tokens", "logprobs_base",
                 "logprobs_teacher", "logprobs_q", "alphas", "ess_ratios", "kl_q_base", "kl_q_teacher",
                 "sum_logprob_base", "sum_logprob_teacher", "sum_logprob_q", "log_weight_base",
                 "log_weight_teacher"):  # fmt: skip
        out[name] = scored[name]
    return out


def check_output(output_path: str, input_path: str) -> Path:
    """A writable output path that is not the input; touches nothing."""
    from .store import check_writable

    target = Path(output_path).expanduser()
    check_writable(target)
    if target.exists() and os.path.samefile(target, input_path):
        raise UsageError(f"--output {output_path} is the input file; write the scores elsewhere")
    return target


def run(
    input_path: str, output_path: str, fields: ScoreFields, mix: MixConfig, engine: EngineConfig,
    base: str | None, teacher: str | None, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
    min_p: float = 0.0,
) -> int:  # fmt: skip
    from .generate import check_model_options
    from .lock import OutputLock

    # a bad setting is refused now, not after the models have loaded
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    check_model_options(base, teacher)
    inputs = read_score_records(input_path, fields)
    target = check_output(output_path, input_path)
    with OutputLock(target):
        return score_locked(inputs, target, mix, engine, base, teacher, temperature, top_k, top_p, min_p)


def score_locked(
    inputs: ScoreInput, target: Path, mix: MixConfig, engine: EngineConfig, base: str | None, teacher: str | None,
    temperature: float, top_k: int, top_p: float, min_p: float,
) -> int:  # fmt: skip
    from ..models.loading import quiet_transformers
    from ..models.pair import resolve_model_pair
    from .generate import build_sampler
    from .store import encode_record, write_atomic

    quiet_transformers()
    pair = resolve_model_pair(base, teacher)
    completions = check_against_models(inputs, pair)
    sampler = build_sampler(pair, mix, engine, seed=0)
    scored = sampler.score(
        inputs.prompts, completions, teacher_prompts=inputs.teacher_prompts, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, collect_diagnostics=True,
    )  # fmt: skip
    pairs = enumerate(zip(inputs.records, scored.samples))
    write_atomic(target, b"".join(encode_record(scored_record(r, s, i)) for i, (r, s) in pairs))
    return 0
