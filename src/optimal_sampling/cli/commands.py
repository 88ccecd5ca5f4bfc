"""The subcommands: each turns parsed arguments into the job layer's options and runs the job.

No logic beyond that mapping lives here; `generate` decides single-process or data-parallel.
"""

from __future__ import annotations

import argparse

from ..config import EngineConfig, MixConfig, ParallelConfig, SamplingParams


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


def generate_options_of(args: argparse.Namespace):
    from ..jobs.generate import GenerateOptions

    return GenerateOptions(
        mix=mix_config_of(args), params=sampling_params_of(args), engine=engine_config_of(args),
        parallel=ParallelConfig(args.tp_size),
        base=args.base, teacher=args.teacher, prompts=tuple(args.prompt or ()), input=args.input,
        prompt_field=args.prompt_field, teacher_prompt_field=args.teacher_prompt_field,
        chat_template=args.chat_template, output=args.output, overwrite=args.overwrite, quiet=args.quiet,
        log_interval=args.log_interval, data_parallel=args.data_parallel, dp_rank=args.dp_rank,
        dp_world=args.dp_world, argv=tuple(args.raw_argv),
    )  # fmt: skip


def generate(args: argparse.Namespace) -> int:
    from ..jobs import data_parallel
    from ..jobs import generate as generate_job

    data_parallel.check_options(args.data_parallel, args.tp_size, args.dp_rank, args.dp_world)
    options = generate_options_of(args)
    if data_parallel.is_parallel(options):
        return data_parallel.run(options)
    return generate_job.run(options)


def validate(args: argparse.Namespace) -> int:
    from ..jobs import validate as validate_job

    return validate_job.run(
        args.base, args.teacher, args.dtype, args.device, args.engine, tuple(args.prompt or ()),
        args.max_tokens, args.steps,
    )  # fmt: skip


def report(args: argparse.Namespace) -> int:
    from ..jobs import report as report_job

    return report_job.run(args.files, args.out, args.label)


def score(args: argparse.Namespace) -> int:
    from ..jobs import score as score_job

    mix, engine = mix_config_of(args), engine_config_of(args)
    fields = score_job.ScoreFields(
        args.prompt_field, args.teacher_prompt_field, args.completion_field, args.retokenize
    )
    return score_job.run(
        args.input, args.output, fields, mix, engine, args.base, args.teacher, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
    )  # fmt: skip


def vllm_model(args: argparse.Namespace) -> int:
    """Write the directory and print how to serve it."""
    from ..integrations.vllm.model_dir import write_vllm_model_dir

    out = write_vllm_model_dir(
        args.base, args.teacher, args.out, mix_config_of(args), args.temperature, overwrite=args.overwrite
    )
    print(out)
    print(f"serve it with:  vllm serve {out}   (send requests with temperature 1)")
    return 0


def temperatures_of(text: str) -> tuple[float, ...]:
    """--warmup-temperatures: comma-separated temperatures, each finite and >= 0."""
    values = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not 0 <= value < float("inf"):
            raise ValueError(
                f"--warmup-temperatures takes temperatures >= 0 separated by commas, got {item!r}"
            )
        values.append(value)
    return tuple(values)


def serve(args: argparse.Namespace) -> int:
    """Load the pair once (in the engine process), then serve it until Ctrl-C / SIGTERM."""
    from ..server import require_serve_extra

    require_serve_extra()
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.stream_interval_ms is not None and not args.stream_interval_ms >= 0:
        raise ValueError(f"--stream-interval-ms must be >= 0, got {args.stream_interval_ms}")
    temperatures = temperatures_of(args.warmup_temperatures)
    from ..runtime.spec import SamplerSpec
    from ..server.app import run_server
    from ..server.state import ServerSettings

    spec = SamplerSpec(
        args.base,
        args.teacher,
        mix_config_of(args),
        engine_config_of(args),
        ParallelConfig(args.tp_size),
        args.seed,
        temperatures,
    )
    settings = ServerSettings(
        args.served_model_name, args.api_key, args.base, args.teacher, args.stream_interval_ms
    )
    run_server(spec, settings, args.host, args.port, args.shutdown_timeout, args.log_level)
    return 0
