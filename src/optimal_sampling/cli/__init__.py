"""The `optimal-sampling` command: argument parsing and the subcommand table.

Each subcommand is one `Command` in `COMMANDS`: a function that adds its arguments and the
"module:function" that runs it (imported only when that subcommand runs; the functions live in
`commands.py` and only turn arguments into the job layer's options). Option names are the
Python API's parameter names in kebab case.

Exit codes: 0 success, 1 a check failed (`validate`) or the disk is full (one line naming the file;
the same command resumes), 2 a user mistake (one line on stderr, no traceback; `--traceback` shows
it), 130 interrupted, 141 stdout closed early (`| head`: nothing is printed about it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import UsageError
from ..version import package_version
from .arguments import (
    add_mix_arguments,
    add_model_arguments,
    add_output_arguments,
    add_parallel_arguments,
    add_prompt_arguments,
    add_sampling_arguments,
    add_server_arguments,
)

PROG = "optimal-sampling"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(f"{message} (see {self.prog} --help)")


# ============================================================================ the table


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function" taking the parsed namespace, returning the exit code


def configure_generate(p: argparse.ArgumentParser) -> None:
    add_prompt_arguments(p)
    add_output_arguments(p)
    add_model_arguments(p)
    add_mix_arguments(p)
    add_sampling_arguments(p)
    add_parallel_arguments(p)


def configure_validate(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
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
    p.add_argument(
        "--output", "-o", required=True, metavar="FILE", help="JSONL, one scored record per input record"
    )
    p.add_argument(
        "--prompt-field", default="prompt", help="field of the prompt as the base saw it (default prompt)"
    )
    p.add_argument("--teacher-prompt-field", default="teacher_prompt",
                   help="field of the teacher's prompt; missing: the base prompt (default teacher_prompt)")  # fmt: skip
    p.add_argument("--completion-field", default="completion",
                   help="field of the completion text, used when a record has no token_ids (default completion)")  # fmt: skip
    p.add_argument(
        "--retokenize", action="store_true", help="tokenize the completion text even if token_ids exist"
    )
    add_model_arguments(p)
    add_mix_arguments(p)
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
    p.add_argument(
        "--out", required=True, metavar="DIR", help="model directory to write (then: vllm serve DIR)"
    )
    p.add_argument("--temperature", type=float, default=1.0,
                   help="mixing temperature, > 0 (default 1.0); requests must then use temperature 1")  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty directory that is not one of ours"
    )
    add_mix_arguments(p)


def configure_serve(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_mix_arguments(p)
    add_server_arguments(p)


COMMANDS: dict[str, Command] = {
    "generate": Command(
        "sample from the optimal mixture of a base and a teacher model",
        configure_generate,
        "optimal_sampling.cli.commands:generate",
    ),  # fmt: skip
    "validate": Command(
        "check a model pair before a long run (pass/fail table)",
        configure_validate,
        "optimal_sampling.cli.commands:validate",
    ),  # fmt: skip
    "report": Command(
        "plots and an HTML summary of generated samples",
        configure_report,
        "optimal_sampling.cli.commands:report",
    ),  # fmt: skip
    "score": Command(
        "recompute alpha and the importance data of given samples (teacher-forced)",
        configure_score,
        "optimal_sampling.cli.commands:score",
    ),  # fmt: skip
    "vllm-model": Command(
        "write a vLLM model directory that samples from q (vllm serve DIR)",
        configure_vllm_model,
        "optimal_sampling.cli.commands:vllm_model",
    ),  # fmt: skip
    "serve": Command(
        "serve the mixture over HTTP: the OpenAI API and SGLang's native /generate (needs the serve extra)",
        configure_serve,
        "optimal_sampling.cli.commands:serve",
    ),  # fmt: skip
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, description="Exact sampling from the geometric mixture of two language models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
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
    except BrokenPipeError:
        return _stdout_closed()
    except (ValueError, TypeError, OSError) as err:
        if getattr(args, "traceback", False):
            raise
        return _report_error(err)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _report_error(err: BaseException) -> int:
    """One line on stderr; the exit code: 1 for a full disk (not the user's mistake, and what was
    written is kept), 2 for everything else."""
    from ..jobs.store import DISK_FULL

    if isinstance(err, OSError) and err.errno in DISK_FULL:
        where = f"cannot write {err.filename}" if err.filename else "cannot write"
        print(f"{PROG}: error: {where}: {err.strerror or err}; free some space, then run the same command "
              "again to resume", file=sys.stderr)  # fmt: skip
        return 1
    print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
    return 2


def _stdout_closed() -> int:
    """The reader of stdout went away (`| head -1`): stop quietly, as a SIGPIPE'd tool would. stdout
    is pointed at /dev/null so that the interpreter's final flush does not complain again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (captured by a test): nothing to silence
        pass
    return 128 + int(signal.SIGPIPE)  # the shell's status for a pipeline member that lost its reader


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
