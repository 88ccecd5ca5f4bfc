"""The `generate` job: prompts in, samples out (to a resumable file or the terminal).

The order of a run is its safety:
1. `lock_output`: the output's exclusive lock (`lock.py`), held until the job ends;
2. `prepare`: every check that needs no model (options, model paths, input, output path,
   resumability), in that order, so that a mistake in the command is not masked by the resume
   check;
3. `check_models`: every check that needs the tokenizers and config.json but no weights (prompt
   encodability and lengths, --tp-size against the heads);
4. load the weights and sample, streaming each finished sample to the output as it finishes.
Nothing existing is removed or modified before the first sample is ready (`LazyJournal`): with
--overwrite the old files go only once every check, the sampler's own included, has passed.
The data-parallel launcher and ranks (`data_parallel.py`) reuse these steps with the same checks
and output format.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from ..config import EngineConfig, MixConfig, ParallelConfig, SamplingParams
from ..errors import UsageError
from ..models.chat import chat_prompts
from ..models.loading import check_model_reference, check_tensor_parallel_fits, read_model_shape
from ..models.pair import ModelPair, resolve_model_pair
from ..version import package_version
from .prompts import PromptSet

PROG = "optimal-sampling"
EXAMPLE_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


@dataclass(frozen=True)
class GenerateOptions:
    """Everything a `generate` run was asked for (the CLI builds it from its arguments)."""

    mix: MixConfig
    params: SamplingParams
    engine: EngineConfig
    parallel: ParallelConfig = ParallelConfig()
    base: str | None = None
    teacher: str | None = None
    prompts: tuple[str, ...] = ()
    input: str | None = None
    prompt_field: str = "prompt"
    teacher_prompt_field: str | None = None
    chat_template: str = "auto"
    output: str | None = None
    overwrite: bool = False
    quiet: bool = False
    log_interval: float = 10.0
    data_parallel: int = 1
    dp_rank: int | None = None  # set by the data-parallel launcher for its workers
    dp_world: int | None = None
    argv: tuple[str, ...] = ()  # the command line, for workers and the output's metadata

    def __post_init__(self) -> None:
        interval = self.log_interval
        number = isinstance(interval, (int, float)) and not isinstance(interval, bool)
        if not number or not math.isfinite(interval) or interval < 0:
            raise UsageError(f"--log-interval must be a finite number of seconds >= 0, got {interval}")


def gather_prompts(options: GenerateOptions) -> PromptSet:
    from .prompts import read_prompts

    if options.prompts and options.input:
        raise UsageError("give --prompt or --input, not both")
    if options.input:
        return read_prompts(options.input, options.prompt_field, options.teacher_prompt_field)
    if options.teacher_prompt_field:
        raise UsageError("--teacher-prompt-field needs --input with records")
    if options.prompts:
        from .prompts import check_unicode

        for number, prompt in enumerate(options.prompts, start=1):
            if not prompt:
                raise UsageError("--prompt must not be empty")
            check_unicode(prompt, f"--prompt number {number}")
        return PromptSet(list(options.prompts))
    print(f"{PROG}: no --prompt or --input; using an example prompt: {EXAMPLE_PROMPT!r}", file=sys.stderr)
    return PromptSet([EXAMPLE_PROMPT])


def model_identity(reference: str | None) -> str:
    """What the fingerprint records of a model: the demo pair, an absolute local path, or a hub id."""
    if reference is None:
        return "demo"
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else reference


def run_parameters(options: GenerateOptions) -> dict:
    """Everything that shapes the sampled distribution; resuming requires all of it unchanged.

    Left out on purpose: n and the prompt list (a resumed run may add prompts or samples; the
    prompts already in the file are checked one by one), and device, engine and batch size (where
    it runs, not what it samples), and the solver's iteration budget (an implementation detail
    within the solver's tolerance, which a library upgrade may change).
    """
    from ..models.loading import resolve_device, resolve_dtype

    params, mix, engine = options.params, options.mix, options.engine
    sampling = {k: v for k, v in asdict(params).items() if k != "n"}
    sampling["stop"] = list(params.stop)
    mixing = {k: v for k, v in asdict(mix).items() if k != "solver_iterations"}
    dtype = str(resolve_dtype(engine.dtype, resolve_device(engine.device))).removeprefix("torch.")
    return {
        "base": model_identity(options.base), "teacher": model_identity(options.teacher), "dtype": dtype,
        "chat_template": options.chat_template, **mixing, **sampling,
    }  # fmt: skip


def run_meta(params: dict, argv_used: Sequence[str] | None = None) -> dict:
    from .store import META_FORMAT, fingerprint_of

    return {
        "format": META_FORMAT,
        "fingerprint": fingerprint_of(params),
        "params": params,
        "version": package_version(),
        "command": list(argv_used if argv_used is not None else sys.argv),
    }


def templated_prompts(mode: str, prompts: PromptSet, pair: ModelPair) -> tuple[list[str], list[str]]:
    """(base prompts, teacher prompts) as the models see them."""
    teacher_inputs = prompts.teacher_prompts or prompts.prompts
    return chat_prompts(mode, prompts.prompts, teacher_inputs, pair.base_tokenizer, pair.teacher_tokenizer)


def build_sampler(
    pair: ModelPair,
    mix: MixConfig,
    engine: EngineConfig,
    seed: int | None,
    parallel: ParallelConfig | None = None,
    params: SamplingParams | None = None,
):
    """params: the sampling setting the job runs. The construction's warmup is then done for it
    instead of the default setting, so that a job with e.g. --top-p captures no graph and
    compiles no kernel in its first batches (and warms no setting it never uses)."""
    from ..runtime.sampler import OptimalSampler

    return OptimalSampler.from_configs(
        pair.base_path, pair.teacher_path, mix, engine, parallel, seed, warmup_params=params
    )


@dataclass
class OutputJob:
    plan: object  # store.OutputPlan
    state: object  # store.ResumeState
    meta: dict
    n_prompts: int
    n: int
    overwrite: bool

    @property
    def total(self) -> int:
        return self.n_prompts * self.n

    @property
    def remaining(self) -> int:
        done = sum(1 for p, s in self.state.done if p < self.n_prompts and s < self.n)
        return self.total - done

    def skip(self, prompt_index: int, sample_index: int) -> bool:
        return (prompt_index, sample_index) in self.state.done


@dataclass
class GenerateSetup:
    """What `generate` has checked before it loads any model."""

    options: GenerateOptions
    prompts: PromptSet
    job: OutputJob | None  # None: samples go to the terminal


def lock_output(output: str | None):
    """The output's exclusive lock for the job (a no-op context without an output), taken once the
    path is known to be usable, so that a bad path is reported as such."""
    from .lock import OutputLock
    from .store import plan_output

    if output is None:
        return contextlib.nullcontext()
    return OutputLock(plan_output(output).target)


def prepare(options: GenerateOptions) -> GenerateSetup:
    """Every check that needs no model: options, model paths, input, output path, resumability."""
    check_model_options(options.base, options.teacher)
    prompts = gather_prompts(options)
    job = prepare_output(options, prompts) if options.output else None
    return GenerateSetup(options, prompts, job)


def check_model_options(base: str | None, teacher: str | None) -> None:
    """The model references, checked without loading anything (a GGUF is not converted yet)."""
    if (base is None) != (teacher is None):
        raise UsageError("give both --base and --teacher, or neither for the demo pair")
    for reference in (base, teacher):
        if reference is not None:
            check_model_reference(reference)


def prepare_output(options: GenerateOptions, prompts: PromptSet) -> OutputJob:
    from .store import check_not_input, plan_output

    plan = plan_output(options.output)
    check_not_input(plan, options.input)
    meta = run_meta(run_parameters(options))
    state = plan.inspect(meta, prompts, overwrite=options.overwrite)
    return OutputJob(plan, state, meta, len(prompts.prompts), options.params.n, options.overwrite)


@dataclass
class CheckedModels:
    """The pair's tokenizers and the prompts as the models see them, every prompt checked."""

    pair: ModelPair
    base_prompts: list[str]
    teacher_prompts: list[str]


def check_models(setup: GenerateSetup) -> CheckedModels:
    """Every check that needs the tokenizers and config.json but no weights: the vocabularies
    agree, every prompt tokenizes to a length that fits both contexts, --tp-size divides both."""
    from ..models.loading import quiet_transformers

    options = setup.options
    quiet_transformers()
    pair = resolve_model_pair(options.base, options.teacher)
    base_prompts, teacher_prompts = templated_prompts(options.chat_template, setup.prompts, pair)
    shapes = {"base": read_model_shape(pair.base_path), "teacher": read_model_shape(pair.teacher_path)}
    context = min(shape.context for shape in shapes.values())
    check_prompt_lengths(pair.base_tokenizer, base_prompts, context, "prompt")
    check_prompt_lengths(pair.teacher_tokenizer, teacher_prompts, context, "teacher prompt")
    if options.parallel.tp_size > 1:
        for name, shape in shapes.items():
            check_tensor_parallel_fits(shape, options.parallel.tp_size, f"{name} model")
    return CheckedModels(pair, base_prompts, teacher_prompts)


def check_prompt_lengths(tokenizer, prompts: list[str], context: int, what: str) -> None:
    """As the sampler checks them (the same tokenization), but before any weights load."""
    for index, ids in enumerate(tokenizer(prompts)["input_ids"]):
        if not ids:
            raise UsageError(f"{what} {index} is empty after tokenization")
        if len(ids) >= context:
            raise UsageError(f"{what} {index} has {len(ids)} tokens; the models' context is {context}")


def load_sampler(setup: GenerateSetup, checked: CheckedModels | None = None):
    """(sampler, base prompts, teacher prompts): the models, and the prompts as they see them."""
    checked = checked or check_models(setup)
    options = setup.options
    sampler = build_sampler(
        checked.pair, options.mix, options.engine, options.params.seed, options.parallel, options.params
    )
    return sampler, checked.base_prompts, checked.teacher_prompts


def generate_kwargs(params: SamplingParams) -> dict:
    kwargs = asdict(params)
    kwargs["stop"] = list(params.stop)
    return kwargs


def run(options: GenerateOptions) -> int:
    """A single-process run; returns the exit code."""
    with lock_output(options.output):
        return run_locked(options)


def run_locked(options: GenerateOptions) -> int:
    # 1. every check that needs no model
    setup = prepare(options)
    job = setup.job
    if job is not None and job.remaining == 0:
        return nothing_to_do(job)
    # 2. the checks that need the tokenizers, then the models
    sampler, base_prompts, teacher_prompts = load_sampler(setup, check_models(setup))
    # 3. sample, streaming each finished sample to the output or the terminal
    progress = progress_of(options, job)
    stream = sampler.generate_iter(
        base_prompts, teacher_prompts=teacher_prompts, **generate_kwargs(options.params),
        skip=job.skip if job else None, on_tokens=progress.add_tokens if progress else None,
    )  # fmt: skip
    try:
        if job is None:
            return print_samples(stream, sys.stdout)
        return write_samples(job, stream, setup.prompts, progress)
    finally:
        sampler.close()  # stops the tensor-parallel helpers it started, if any


def progress_of(options: GenerateOptions, job: OutputJob | None):
    from .progress import Progress

    if job is None or options.quiet:
        return None
    return Progress(job.total, job.total - job.remaining, interval_s=options.log_interval)


def nothing_to_do(job: OutputJob) -> int:
    finish_output(job)
    print(f"{PROG}: all {job.total} samples are already in {job.plan.target}; nothing to do", file=sys.stderr)
    return 0


class LazyJournal:
    """The job's `store.JournalWriter`, opened at the first record.

    A sampler yields its first sample only after it has accepted every request (its own prompt
    checks included), so the old files of --overwrite are removed, and the sidecar is written,
    only once nothing is left to refuse the run: a run that fails earlier leaves the output as it was.
    """

    def __init__(self, job: OutputJob):
        self.job = job
        self.writer = None

    @property
    def written(self) -> int:
        return self.writer.written if self.writer is not None else 0

    def write(self, record: dict) -> None:
        if self.writer is None:
            self.writer = self._open()
        self.writer.write(record)

    def _open(self):
        from .store import JournalWriter, start_fresh

        if self.job.overwrite:
            start_fresh(self.job.plan)
        return JournalWriter(self.job.plan, self.job.state, self.job.meta)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_samples(job: OutputJob, stream, prompts: PromptSet, progress) -> int:
    writer = LazyJournal(job)
    try:
        write_records(writer, stream, prompts, job.meta, progress.add_sample if progress else None)
    finally:
        writer.close()
        if progress:
            progress.close()
    finish_output(job)
    if progress:
        print(f"{PROG}: wrote {writer.written} samples to {job.plan.target}", file=sys.stderr)
    return 0


def write_records(
    writer, stream, prompts: PromptSet, meta: dict, on_sample: Callable[[], None] | None = None
) -> None:
    """Append one record per sample of `stream` to `writer` (a store.JournalWriter or LazyJournal)."""
    inputs = (prompts.prompts, prompts.teacher_prompts or prompts.prompts)
    for sample in stream:
        writer.write(record_of(sample, inputs, meta["fingerprint"]))
        if on_sample:
            on_sample()


def finish_output(job: OutputJob) -> int:
    """Fold data-parallel shards of earlier runs into the output, then write the Parquet file;
    returns the number of shard records added."""
    from .store import finish_parquet, merge_shards

    added = merge_shards(job.plan, job.meta)
    if job.plan.parquet:
        finish_parquet(job.plan)
    return added


def record_of(sample, inputs: tuple[list[str], list[str]], fingerprint: str) -> dict:
    record = sample.to_record()
    record["input_prompt"] = inputs[0][sample.prompt_index]
    record["input_teacher_prompt"] = inputs[1][sample.prompt_index]
    record["params_fingerprint"] = fingerprint
    return record


def print_samples(stream, out: TextIO) -> int:
    for sample in stream:
        out.write(f"--- prompt {sample.prompt_index}, sample {sample.sample_index} "
                  f"({len(sample.token_ids)} tokens, {sample.finish_reason}) ---\n")  # fmt: skip
        out.write(sample.text + "\n")
        out.write(summary_line(sample) + "\n")
        out.flush()
    return 0


def summary_line(sample) -> str:
    """alpha and ESS-ratio statistics and the sequence log importance weights of one sample."""
    parts = []
    if sample.alphas:
        a = sample.alphas
        parts.append(f"alpha mean {sum(a) / len(a):.3f} [min {min(a):.3f}, max {max(a):.3f}]")
    if sample.ess_ratios:
        parts.append(f"ESS ratio mean {sum(sample.ess_ratios) / len(sample.ess_ratios):.3f}")
    parts.append(f"log w_base {sample.log_weight_base:.3f}")
    parts.append(f"log w_teacher {sample.log_weight_teacher:.3f}")
    return "[" + " | ".join(parts) + "]"
