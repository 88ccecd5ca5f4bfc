"""`optimal-sampling score`: the importance data of given (prompt, completion) records.

Input is JSONL: our own `generate` records (their `prompt`, `teacher_prompt` and `token_ids`, as
the models saw them) or any records with a prompt and a completion field. Output is JSONL, one
record per input record, in input order: the input's identifying fields plus alpha, the three
per-token log-prob lists and the sequence log weights, exactly what `generate` reports for those
tokens under the given mixing and sampling settings. The output is written to `FILE.partial`
and renamed when complete, so a crash never leaves a file that looks finished.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import EngineConfig, MixConfig

KEEP_FIELDS = ("prompt_index", "sample_index", "id")


@dataclass(frozen=True)
class ScoreFields:
    """Which record fields hold the prompts and the completion."""

    prompt_field: str = "prompt"
    teacher_prompt_field: str | None = "teacher_prompt"
    completion_field: str = "completion"
    retokenize: bool = False  # tokenize the completion text even where token_ids exist


def read_score_records(path: str, args: ScoreFields) -> tuple[list[str], list[str], list, list[dict]]:
    """(prompts, teacher prompts, completions, records) of a JSONL file; errors name the line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"input file not found: {file}")
    prompts, teacher_prompts, completions, records = [], [], [], []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(args.prompt_field), str):
                raise ValueError(f"{file}:{number}: no string field {args.prompt_field!r}")
            completion = _completion_of(record, args, f"{file}:{number}")
            prompts.append(record[args.prompt_field])
            teacher = record.get(args.teacher_prompt_field) if args.teacher_prompt_field else None
            teacher_prompts.append(teacher if isinstance(teacher, str) else record[args.prompt_field])
            completions.append(completion)
            records.append(record)
    if not records:
        raise ValueError(f"{file}: no records")
    return prompts, teacher_prompts, completions, records


def _completion_of(record: dict, args: ScoreFields, where: str):
    ids = record.get("token_ids")
    if not args.retokenize and isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
        return ids
    text = record.get(args.completion_field)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{where}: no token_ids and no non-empty string field {args.completion_field!r}")
    return text


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


def run(
    input_path: str, output_path: str, fields: ScoreFields, mix: MixConfig, engine: EngineConfig,
    base: str | None, teacher: str | None, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
    min_p: float = 0.0,
) -> int:  # fmt: skip
    from ..models.pair import resolve_model_pair
    from .generate import build_sampler
    from .store import encode_record

    prompts, teacher_prompts, completions, records = read_score_records(input_path, fields)
    target = Path(output_path)
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("wb"):  # writable before any model is loaded
        pass
    pair = resolve_model_pair(base, teacher)
    sampler = build_sampler(pair, mix, engine, seed=0)
    scored = sampler.score(
        prompts, completions, teacher_prompts=teacher_prompts, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, collect_diagnostics=True,
    )  # fmt: skip
    with partial.open("wb") as handle:
        for index, (record, sample) in enumerate(zip(records, scored.samples)):
            handle.write(encode_record(scored_record(record, sample, index)))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    return 0
