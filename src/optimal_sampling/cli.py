"""The `optimal-sampling` command: argument parsing, the subcommand table, and `generate`.

Each subcommand is one `Command` in `COMMANDS`: a function that adds its arguments and the
"module:function" that runs it (imported only when that subcommand runs). Option names are the
Python API's parameter names in kebab case.

Exit codes: 0 success, 1 a check failed (`validate`), 2 a user mistake (one line on stderr, no
traceback; `--traceback` shows it), 130 interrupted. `generate` validates options, input and the
output path before it loads any model, and touches an existing output only once it has accepted
it for resumption. `generate --data-parallel N` and `generate` under torchrun run through
`parallel.py` with the same checks and the same output format.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from .config import ALPHA_METHODS, EngineConfig, MixConfig, SamplingParams

PROG = "optimal-sampling"
EXAMPLE_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
CHAT_TEMPLATE_MODES = ("auto", "none", "base", "teacher", "both")


class UsageError(ValueError):
    """A mistake in the command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see {self.prog} --help)")


# ============================================================================ the table


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function" taking the parsed namespace, returning the exit code


def configure_generate(p: argparse.ArgumentParser) -> None:
    _add_prompt_arguments(p)
    _add_output_arguments(p)
    _add_model_arguments(p)
    _add_mix_arguments(p)
    _add_sampling_arguments(p)
    _add_parallel_arguments(p)


def configure_validate(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="prompt to check on (repeatable; default: a few built-in prompts)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=16, help="tokens of the greedy checks (default 16)")
    p.add_argument("--steps", type=int, default=8, help="decode steps of the cache check (default 8)")


def configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="outputs of `generate` (.jsonl or .parquet)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs and index.html")
    p.add_argument("--label", action="append", default=None,
                   help="name of each file in plots (repeatable, in file order; default: alpha method or file name)")  # fmt: skip


def configure_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, metavar="FILE",
                   help="JSONL: generate records (prompt, teacher_prompt, token_ids) or any prompt/completion records")  # fmt: skip
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="JSONL, one scored record per input record")
    p.add_argument("--prompt-field", default="prompt", help="field of the prompt as the base saw it (default prompt)")
    p.add_argument("--teacher-prompt-field", default="teacher_prompt",
                   help="field of the teacher's prompt; missing: the base prompt (default teacher_prompt)")  # fmt: skip
    p.add_argument("--completion-field", default="completion",
                   help="field of the completion text, used when a record has no token_ids (default completion)")  # fmt: skip
    p.add_argument("--retokenize", action="store_true", help="tokenize the completion text even if token_ids exist")
    _add_model_arguments(p)
    _add_mix_arguments(p)
    g = p.add_argument_group("sampling settings the samples were drawn with")
    g.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    g.add_argument("--top-k", type=int, default=-1, help="-1 off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 off")
    g.add_argument("--min-p", type=float, default=0.0, help="0.0 off")
    g.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)


def configure_vllm_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", required=True, help="base model: local HF directory, hub id or .gguf")
    g.add_argument("--teacher", required=True, help="teacher model, same forms as --base")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write (then: vllm serve DIR)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="mixing temperature, > 0 (default 1.0); requests must then use temperature 1")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory that is not one of ours")
    _add_mix_arguments(p)


COMMANDS: dict[str, Command] = {
    "generate": Command(
        "sample from the optimal mixture of a base and a teacher model",
        configure_generate,
        "optimal_sampling.cli:run_generate",
    ),  # fmt: skip
    "validate": Command(
        "check a model pair before a long run (pass/fail table)",
        configure_validate,
        "optimal_sampling.validate:run",
    ),  # fmt: skip
    "report": Command(
        "plots and an HTML summary of generated samples", configure_report, "optimal_sampling.report:run"
    ),  # fmt: skip
    "score": Command(
        "recompute alpha and the importance data of given samples (teacher-forced)",
        configure_score,
        "optimal_sampling.score_cli:run",
    ),  # fmt: skip
    "vllm-model": Command(
        "write a vLLM model directory that samples from q (vllm serve DIR)",
        configure_vllm_model,
        "optimal_sampling.integrations.vllm.model_dir:run_cli",
    ),  # fmt: skip
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Exact sampling from the geometric mixture of two language models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help, parents=[common])
        command.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of `python -m optimal_sampling`; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m optimal_sampling -- generate ...` may pass the separator on
        argv = argv[1:]
    args = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help, --version
            return int(done.code or 0)
        args.raw_argv = argv  # data-parallel workers are started with the same arguments
        if args.command is None:
            raise UsageError(f"choose a command: {', '.join(COMMANDS)} (see {PROG} --help)")
        module, function = COMMANDS[args.command].run.split(":")
        return getattr(importlib.import_module(module), function)(args)
    except (ValueError, TypeError, OSError) as err:
        if getattr(args, "traceback", False):
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("optimal-sampling")
    except Exception:
        return "unknown"


# ============================================================================ argument groups


def _add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--input", metavar="FILE",
                   help="prompts file: .jsonl, .json (list of strings or records), .parquet, or text (one per line)")  # fmt: skip
    g.add_argument(
        "--prompt-field", default="prompt", help="record field holding the prompt (default: prompt)"
    )
    g.add_argument("--teacher-prompt-field", default=None,
                   help="record field holding the teacher's prompt (default: the teacher sees the prompt)")  # fmt: skip
    g.add_argument("--chat-template", choices=CHAT_TEMPLATE_MODES, default="auto",
                   help="wrap prompts in the models' own chat templates (add_generation_prompt): none, base, "
                        "teacher, both, or auto = each model whose tokenizer has a template (default)")  # fmt: skip


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", metavar="FILE",
                   help="FILE.jsonl or FILE.parquet, one record per sample; resumes an interrupted run. "
                        "Without it, texts and a summary line per sample are printed")  # fmt: skip
    g.add_argument("--overwrite", action="store_true", help="discard an existing output and start over")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    g.add_argument("--log-interval", type=float, default=10.0, metavar="S",
                   help="seconds between progress lines when stderr is not a terminal (default 10)")  # fmt: skip


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", help="base model: local HF directory, hub id or .gguf (default: the demo pair)")
    g.add_argument("--teacher", help="teacher model, same forms as --base")
    g.add_argument(
        "--dtype", default="auto", help="auto, float32, bfloat16, float16 or float64 (default auto)"
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    g.add_argument("--engine", default="auto", help="auto, fast or reference (default auto)")


def _add_mix_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixing (q = base^(1-alpha) * teacher^alpha)")
    g.add_argument("--alpha-method", choices=ALPHA_METHODS, default="kl_symmetry", help="default kl_symmetry")
    g.add_argument(
        "--fixed-alpha", type=float, default=0.5, help="alpha of --alpha-method fixed (default 0.5)"
    )
    g.add_argument("--alpha-min", type=float, default=0.5, help="lower clamp of alpha (default 0.5)")
    g.add_argument("--alpha-max", type=float, default=1.0, help="upper clamp of alpha (default 1.0)")
    g.add_argument(
        "--constraint-to-target", action="store_true", help="restrict q to the teacher's top-k/top-p set"
    )
    g.add_argument("--target-top-k", type=int, default=-1, help="teacher top-k of the constraint (-1 off)")
    g.add_argument(
        "--target-top-p", type=float, default=1.0, help="teacher top-p of the constraint (1.0 off)"
    )


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    g.add_argument("--max-tokens", type=int, default=100, help="new tokens per sample at most (default 100)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 means greedy (default 1.0)")
    g.add_argument("--top-k", type=int, default=-1, help="-1 off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 off")
    g.add_argument("--min-p", type=float, default=0.0, help="0.0 off")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed; each sample's randomness depends only on (seed, prompt index, sample index) (default 0)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=64, help="sequences decoded together (default 64)")
    g.add_argument("--collect-diagnostics", "--diagnostics", dest="collect_diagnostics", action="store_true",
                   help="store per-token alpha, ESS ratio, KL(q||base), KL(q||teacher)")  # fmt: skip


def _add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="N worker processes on this host, each on its own GPU (or on the CPU with --device cpu), "
                        "each sampling a disjoint share of the prompts; needs --output (default 1). Under torchrun "
                        "every rank takes a share by itself")  # fmt: skip
    g.add_argument("--tp-size", type=int, default=1, metavar="T",
                   help="GPUs per model replica: both models sharded over T GPUs (tensor parallelism). "
                        "Without torchrun the sampler starts T-1 helper processes itself; under torchrun "
                        "WORLD_SIZE = replicas x T (default 1)")  # fmt: skip
    g.add_argument("--dp-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    g.add_argument("--dp-world", type=int, default=None, help=argparse.SUPPRESS)


# ============================================================================ generate


def mix_config_of(args: argparse.Namespace) -> MixConfig:
    return MixConfig(
        alpha_method=args.alpha_method, fixed_alpha=args.fixed_alpha, alpha_min=args.alpha_min,
        alpha_max=args.alpha_max, constraint_to_target=args.constraint_to_target,
        target_top_k=args.target_top_k, target_top_p=args.target_top_p,
    )  # fmt: skip


def sampling_params_of(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, n=args.n, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, stop=tuple(args.stop or ()), seed=args.seed,
        collect_diagnostics=args.collect_diagnostics or args.output is None,
    )  # fmt: skip


def engine_config_of(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        engine=args.engine, dtype=args.dtype, device=args.device, max_batch_size=args.batch_size
    )


def gather_prompts(args: argparse.Namespace):
    from .io import PromptSet, read_prompts

    if args.prompt and args.input:
        raise UsageError("give --prompt or --input, not both")
    if args.input:
        return read_prompts(args.input, args.prompt_field, args.teacher_prompt_field)
    if args.teacher_prompt_field:
        raise UsageError("--teacher-prompt-field needs --input with records")
    if args.prompt:
        if any(not p for p in args.prompt):
            raise UsageError("--prompt must not be empty")
        return PromptSet(list(args.prompt))
    print(f"{PROG}: no --prompt or --input; using an example prompt: {EXAMPLE_PROMPT!r}", file=sys.stderr)
    return PromptSet([EXAMPLE_PROMPT])


def model_identity(reference: str | None) -> str:
    """What the fingerprint records of a model: the demo pair, an absolute local path, or a hub id."""
    if reference is None:
        return "demo"
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else reference


def run_parameters(
    args: argparse.Namespace, mix: MixConfig, params: SamplingParams, engine: EngineConfig
) -> dict:
    """Everything that shapes the sampled distribution; resuming requires all of it unchanged.

    Left out on purpose: n and the prompt list (a resumed run may add prompts or samples; the
    prompts already in the file are checked one by one), and device, engine and batch size (where
    it runs, not what it samples), and the solver's iteration budget (an implementation detail
    within the solver's tolerance, which a library upgrade may change).
    """
    from .loading import resolve_device, resolve_dtype

    sampling = {k: v for k, v in asdict(params).items() if k != "n"}
    sampling["stop"] = list(params.stop)
    mixing = {k: v for k, v in asdict(mix).items() if k != "solver_iterations"}
    dtype = str(resolve_dtype(engine.dtype, resolve_device(engine.device))).removeprefix("torch.")
    return {
        "base": model_identity(args.base), "teacher": model_identity(args.teacher), "dtype": dtype,
        "chat_template": args.chat_template, **mixing, **sampling,
    }  # fmt: skip


def run_meta(params: dict, argv_used: Sequence[str] | None = None) -> dict:
    from .io import META_FORMAT, fingerprint_of

    return {
        "format": META_FORMAT,
        "fingerprint": fingerprint_of(params),
        "params": params,
        "version": _version(),
        "command": list(argv_used if argv_used is not None else sys.argv),
    }


@dataclass
class ModelPair:
    base_path: str
    teacher_path: str
    base_tokenizer: object
    teacher_tokenizer: object


def preflight_models(base: str | None, teacher: str | None) -> ModelPair:
    """Resolve both models and check their tokenizers agree, before any weights are loaded."""
    from .loading import check_tokenizers_compatible, load_tokenizer, resolve_model_path

    if (base is None) != (teacher is None):
        raise UsageError("give both --base and --teacher, or neither for the demo pair")
    if base is None:
        from .demo import resolve_demo_pair

        base, teacher = (str(p) for p in resolve_demo_pair())
    base_path, teacher_path = resolve_model_path(base), resolve_model_path(teacher)
    base_tok, teacher_tok = load_tokenizer(base_path), load_tokenizer(teacher_path)
    check_tokenizers_compatible(base_tok, teacher_tok)
    return ModelPair(base_path, teacher_path, base_tok, teacher_tok)


def templated_prompts(mode: str, prompts, pair: ModelPair) -> tuple[list[str], list[str]]:
    """(base prompts, teacher prompts) as the models see them."""
    teacher_inputs = prompts.teacher_prompts or prompts.prompts
    use_base, use_teacher = _template_choice(mode, pair)
    base = (
        [apply_chat_template(pair.base_tokenizer, p) for p in prompts.prompts]
        if use_base
        else prompts.prompts
    )
    teacher = (
        [apply_chat_template(pair.teacher_tokenizer, p) for p in teacher_inputs]
        if use_teacher
        else teacher_inputs
    )
    return list(base), list(teacher)


def _template_choice(mode: str, pair: ModelPair) -> tuple[bool, bool]:
    has_base = bool(getattr(pair.base_tokenizer, "chat_template", None))
    has_teacher = bool(getattr(pair.teacher_tokenizer, "chat_template", None))
    if mode == "auto":
        return has_base, has_teacher
    use_base, use_teacher = mode in ("base", "both"), mode in ("teacher", "both")
    for used, has, who in ((use_base, has_base, "base"), (use_teacher, has_teacher, "teacher")):
        if used and not has:
            raise ValueError(f"--chat-template {mode}: the {who} tokenizer has no chat template")
    return use_base, use_teacher


def apply_chat_template(tokenizer, prompt: str) -> str:
    """One user turn plus the generation prompt; a BOS the tokenizer adds itself is not doubled."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def build_sampler(pair: ModelPair, mix: MixConfig, engine: EngineConfig, seed: int, tp_size: int = 1):
    from .sampler import OptimalSampler

    return OptimalSampler(
        model_base=pair.base_path, model_teacher=pair.teacher_path, alpha_method=mix.alpha_method,
        fixed_alpha=mix.fixed_alpha, alpha_min=mix.alpha_min, alpha_max=mix.alpha_max,
        constraint_to_target=mix.constraint_to_target, target_top_k=mix.target_top_k,
        target_top_p=mix.target_top_p, dtype=engine.dtype, device=engine.device, seed=seed,
        engine=engine.engine, max_batch_size=engine.max_batch_size, tp_size=tp_size,
    )  # fmt: skip


@dataclass
class GenerateSetup:
    """What `generate` has checked before it loads any model."""

    mix: MixConfig
    params: SamplingParams
    engine: EngineConfig
    prompts: object  # io.PromptSet
    job: OutputJob | None  # None: samples go to the terminal


def prepare_generate(args: argparse.Namespace) -> GenerateSetup:
    """Every check that needs no model: options, input, output path, resumability."""
    mix, params, engine = mix_config_of(args), sampling_params_of(args), engine_config_of(args)
    prompts = gather_prompts(args)
    job = _prepare_output(args, mix, params, engine, prompts) if args.output else None
    return GenerateSetup(mix, params, engine, prompts, job)


def load_sampler(args: argparse.Namespace, setup: GenerateSetup):
    """(sampler, base prompts, teacher prompts): the models, and the prompts as they see them."""
    _quiet_transformers()
    pair = preflight_models(args.base, args.teacher)
    base_prompts, teacher_prompts = templated_prompts(args.chat_template, setup.prompts, pair)
    sampler = build_sampler(pair, setup.mix, setup.engine, args.seed, getattr(args, "tp_size", 1))
    return sampler, base_prompts, teacher_prompts


def run_generate(args: argparse.Namespace) -> int:
    from . import parallel

    if parallel.is_parallel(args):
        return parallel.run(args)
    # 1. every check that needs no model
    setup = prepare_generate(args)
    job = setup.job
    if job is not None and job.remaining == 0:
        return _nothing_to_do(job)
    # 2. models, then the prompts as the models see them
    sampler, base_prompts, teacher_prompts = load_sampler(args, setup)
    # 3. sample, streaming each finished sample to the output or the terminal
    progress = _progress_of(args, job)
    stream = sampler.generate_iter(
        base_prompts, teacher_prompts=teacher_prompts, **generate_kwargs(setup.params),
        skip=job.skip if job else None, on_tokens=progress.add_tokens if progress else None,
    )  # fmt: skip
    try:
        if job is None:
            return _print_samples(stream, sys.stdout)
        return _write_samples(job, stream, setup.prompts, progress)
    finally:
        sampler.close()  # stops the tensor-parallel helpers it started, if any


def generate_kwargs(params: SamplingParams) -> dict:
    kwargs = asdict(params)
    kwargs["stop"] = list(params.stop)
    return kwargs


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------- output side


@dataclass
class OutputJob:
    plan: object  # io.OutputPlan
    state: object  # io.ResumeState
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


def _prepare_output(args, mix, params, engine, prompts) -> OutputJob:
    from .io import plan_output

    plan = plan_output(args.output)
    meta = run_meta(run_parameters(args, mix, params, engine))
    state = plan.inspect(meta, prompts, overwrite=args.overwrite)
    return OutputJob(plan, state, meta, len(prompts.prompts), params.n, args.overwrite)


def _progress_of(args: argparse.Namespace, job: OutputJob | None):
    from .progress import Progress

    if job is None or args.quiet:
        return None
    return Progress(job.total, job.total - job.remaining, interval_s=args.log_interval)


def _nothing_to_do(job: OutputJob) -> int:
    finish_output(job)
    print(f"{PROG}: all {job.total} samples are already in {job.plan.target}; nothing to do", file=sys.stderr)
    return 0


def _write_samples(job: OutputJob, stream, prompts, progress) -> int:
    from .io import JournalWriter, start_fresh

    if job.overwrite:
        start_fresh(job.plan)
    writer = JournalWriter(job.plan, job.state, job.meta)
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


def write_records(writer, stream, prompts, meta: dict, on_sample: Callable[[], None] | None = None) -> None:
    """Append one record per sample of `stream` to `writer` (an io.JournalWriter)."""
    inputs = _input_prompts(prompts)
    for sample in stream:
        writer.write(_record_of(sample, inputs, meta["fingerprint"]))
        if on_sample:
            on_sample()


def finish_output(job: OutputJob) -> int:
    """Fold data-parallel shards of earlier runs into the output, then write the Parquet file;
    returns the number of shard records added."""
    from .io import finish_parquet, merge_shards

    added = merge_shards(job.plan, job.meta)
    if job.plan.parquet:
        finish_parquet(job.plan)
    return added


def _input_prompts(prompts) -> tuple[list[str], list[str]]:
    return prompts.prompts, prompts.teacher_prompts or prompts.prompts


def _record_of(sample, inputs: tuple[list[str], list[str]], fingerprint: str) -> dict:
    record = sample.to_record()
    record["input_prompt"] = inputs[0][sample.prompt_index]
    record["input_teacher_prompt"] = inputs[1][sample.prompt_index]
    record["params_fingerprint"] = fingerprint
    return record


def _print_samples(stream, out: TextIO) -> int:
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
