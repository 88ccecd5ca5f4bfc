"""Argument groups shared by the subcommands; names are the API's parameter names in kebab case."""

from __future__ import annotations

import argparse

from ..config import ALPHA_METHODS
from ..models.chat import CHAT_TEMPLATE_MODES


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
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


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", metavar="FILE",
                   help="FILE.jsonl or FILE.parquet, one record per sample; resumes an interrupted run. "
                        "Without it, texts and a summary line per sample are printed")  # fmt: skip
    g.add_argument("--overwrite", action="store_true", help="discard an existing output and start over")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    g.add_argument("--log-interval", type=float, default=10.0, metavar="S",
                   help="seconds between progress lines when stderr is not a terminal (default 10)")  # fmt: skip


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", help="base model: local HF directory, hub id or .gguf (default: the demo pair)")
    g.add_argument("--teacher", help="teacher model, same forms as --base")
    g.add_argument(
        "--dtype", default="auto", help="auto, float32, bfloat16, float16 or float64 (default auto)"
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    g.add_argument("--engine", default="auto", help="auto, fast or reference (default auto)")


def add_mix_arguments(p: argparse.ArgumentParser) -> None:
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


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
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


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
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


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (default: none)")  # fmt: skip
    g.add_argument("--served-model-name", default="optimal-sampling",
                   help="the model name clients send and /v1/models lists (default optimal-sampling)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=64, help="sequences decoded together (default 64)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of requests that give none (default: a fresh random seed per request)")  # fmt: skip
    g.add_argument("--tp-size", type=int, default=1, metavar="T",
                   help="GPUs per model replica (tensor parallelism; helpers started by the engine process) (default 1)")  # fmt: skip
    g.add_argument("--stream-interval-ms", type=float, default=None, metavar="MS",
                   help="least time between two chunks of a streamed response; 0: a chunk per engine step "
                        "(default: auto, the open streams x 0.25 ms: at most 4,000 chunks a second in all)")  # fmt: skip
    g.add_argument("--warmup-temperatures", default="", metavar="T[,T...]",
                   help="also capture at start the CUDA graphs of these temperatures (0: greedy; any "
                        "other than 0 and 1 covers all others), so no request without top-k/top-p/min-p "
                        "stalls the server for a capture (default: 1 only)")  # fmt: skip
    g.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="on Ctrl-C/SIGTERM, seconds running requests get to finish before they are aborted (default 10)")  # fmt: skip
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")  # fmt: skip
