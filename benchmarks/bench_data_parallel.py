"""Throughput of `optimal-sampling generate --data-parallel 2` against `--data-parallel 1` (issue 5).

Random-weight models with the real Qwen2.5-0.5B (base) and Qwen2.5-1.5B (teacher) shapes and a
synthetic byte-level BPE tokenizer of the real vocabulary width (151,936), saved once as Hugging Face
checkpoints in a temporary directory (no download). The same CLI command runs with 1 and with 2
data-parallel workers (one GPU each); each run reports:
- tok/s: generated tokens per second of sampling, summed over the workers (each worker's tokens /
  the time from its models being loaded to its last sample, as the CLI's closing summary line
  reports them; one process: its closing progress line). Start-up is left out: it is the same
  for any worker count, and a short run would be mostly start-up;
- clock tok/s: all tokens / the time from the FIRST worker being ready to the last sample (a
  lower bound: a worker that loads its models later counts as idle);
- wall_s: the whole command, start-up, model loading and the final merge included.
Also reported: the share of samples whose tokens are identical in the two runs (a sample's
randomness depends only on (seed, prompt, sample index); on a GPU, batched kernels may still
round differently when the batch composition differs).

    PYTHONPATH=src python3 benchmarks/bench_data_parallel.py [--prompts 2048] [--max-tokens 256] [--quick]

`--quick` runs tiny models on the CPU (a smoke test of the script). Prints a table, then one JSON
line last. Needs 2 GPUs for the data-parallel run; the package need not be installed (the
workers are started as `python -m optimal_sampling` with PYTHONPATH inherited).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import random
import re
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config

from optimal_sampling.jobs.store import read_records

VOCAB = 151936
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "tiny-base": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "tiny-teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
}
TARGET_SPEEDUP = 1.8
RATE_LINE = re.compile(r"optimal-sampling: (\d+) samples, (\d+) tokens in \S+ \(([\d.]+) tok/s\)")
SUM_LINE = re.compile(r"optimal-sampling: sampling rate ([\d.]+) tok/s summed over")


def build_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE of exactly `vocab` tokens: the 256 byte symbols, then every pair of them,
    then pairs followed by a byte (synthetic merges; transformers rebuilds it as a Qwen2 tokenizer
    from the model type, which a byte-level BPE survives). No EOS inside the logit width, so every
    sample runs to max_tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = ((a, b) for a in alphabet for b in alphabet)
    triples = ((a + b, c) for a in alphabet for b in alphabet for c in alphabet)
    tokens, merges = list(alphabet), []
    for left, right in itertools.chain(pairs, triples):
        if len(tokens) >= vocab:
            break
        merges.append((left, right))
        tokens.append(left + right)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_model(path: Path, shape: str, vocab: int, seed: int, device: str, dtype: torch.dtype) -> None:
    config = Qwen2Config(
        vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, **SHAPES[shape],
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig()
    model.save_pretrained(path)


def build_pair(root: Path, quick: bool, device: str) -> tuple[Path, Path]:
    vocab = 1024 if quick else VOCAB
    dtype = torch.float32 if quick else torch.bfloat16
    tokenizer = build_tokenizer(vocab)
    pair = (root / "base", root / "teacher")
    for path, shape, seed in zip(pair, ("tiny-base", "tiny-teacher") if quick else ("0.5b", "1.5b"), (0, 1)):
        save_model(path, shape, vocab, seed, device, dtype)
        tokenizer.save_pretrained(path)
    return pair


def write_prompts(path: Path, count: int, length: int) -> None:
    """Random lowercase words, about `length` tokens each (the BPE takes 1-3 bytes a token)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            words = (
                "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
                for _ in range(length // 2)
            )
            handle.write(json.dumps({"prompt": " ".join(words)}) + "\n")


def child_env() -> dict[str, str]:
    """This environment, with the directory that holds our package first on PYTHONPATH."""
    spec = importlib.util.find_spec("optimal_sampling")
    root = str(Path(spec.origin).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_generate(args, pair: tuple[Path, Path], prompts: Path, out: Path, workers: int) -> dict:
    command = [
        sys.executable, "-m", "optimal_sampling", "generate", "--base", str(pair[0]), "--teacher", str(pair[1]),
        "--input", str(prompts), "--output", str(out), "--overwrite", "--n", "1",
        "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size), "--engine", args.engine,
        "--device", args.device, "--chat-template", "none", "--seed", "0", "--log-interval", "1e9",
        "--data-parallel", str(workers),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=args.timeout_s)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"--data-parallel {workers} failed ({done.returncode}): {done.stderr[-3000:]}")
    rates = RATE_LINE.findall(done.stderr)
    if not rates:
        raise RuntimeError(f"no rate line in the output of --data-parallel {workers}: {done.stderr[-2000:]}")
    records = read_records(out)  # not str.splitlines: generated text may hold U+2028 and the like
    summed = SUM_LINE.findall(done.stderr)
    return {
        "tok_s": float(summed[-1]) if summed else float(rates[-1][2]), "clock_tok_s": float(rates[-1][2]),
        "wall_s": wall, "samples": len(records),
        "tokens": sum(r["num_tokens"] for r in records),
        "token_ids": {(r["prompt_index"], r["sample_index"]): r["token_ids"] for r in records},
    }  # fmt: skip


def identical_share(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    return sum(1 for k in keys if a.get(k) == b.get(k)) / max(1, len(keys))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=2048)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="slots per worker")
    p.add_argument("--engine", default="auto")
    p.add_argument("--timeout-s", type=float, default=200.0, help="per generate command")
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    args = p.parse_args()
    args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if args.quick:
        args.prompts, args.max_tokens, args.prompt_tokens = (
            min(args.prompts, 32),
            min(args.max_tokens, 16),
            16,
        )
    return args


def main() -> None:
    args = parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    result = {
        "bench": "data_parallel", "device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus,
        "torch": torch.__version__, "prompts": args.prompts, "n": 1, "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens, "batch_size_per_worker": args.batch_size, "engine": args.engine,
        "models": "tiny" if args.quick else "qwen2.5-0.5b/1.5b shapes, random weights, bf16",
        "target_speedup": TARGET_SPEEDUP,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        pair = build_pair(root, args.quick, args.device)
        if gpus:
            torch.cuda.empty_cache()
        result["build_s"] = round(time.perf_counter() - start, 1)
        prompts = root / "prompts.jsonl"
        write_prompts(prompts, args.prompts, args.prompt_tokens)
        runs = {1: run_generate(args, pair, prompts, root / "dp1.jsonl", 1)}
        if gpus >= 2 or args.device == "cpu":
            runs[2] = run_generate(args, pair, prompts, root / "dp2.jsonl", 2)
        else:
            result["note"] = f"--data-parallel 2 needs 2 GPUs; {gpus} visible"
    for workers, run in runs.items():
        result.update({f"dp{workers}_tok_s": round(run["tok_s"], 1), f"dp{workers}_wall_s": round(run["wall_s"], 1),
                       f"dp{workers}_clock_tok_s": round(run["clock_tok_s"], 1),
                       f"dp{workers}_tokens": run["tokens"], f"dp{workers}_samples": run["samples"]})  # fmt: skip
    if 2 in runs:
        result["speedup"] = round(runs[2]["tok_s"] / runs[1]["tok_s"], 3)
        result["clock_speedup"] = round(runs[2]["clock_tok_s"] / runs[1]["clock_tok_s"], 3)
        result["wall_speedup"] = round(runs[1]["wall_s"] / runs[2]["wall_s"], 3)
        result["meets_target"] = result["speedup"] >= TARGET_SPEEDUP
        result["identical_samples"] = round(identical_share(runs[1]["token_ids"], runs[2]["token_ids"]), 4)
    print_table(result)
    print(json.dumps(result), flush=True)


def print_table(result: dict) -> None:
    print(
        f"device {result['device']} x {result['gpus']}, {result['prompts']} prompts x {result['max_tokens']} tokens"
    )
    for workers in (1, 2):
        if f"dp{workers}_tok_s" in result:
            print(f"  --data-parallel {workers}: {result[f'dp{workers}_tok_s']:>10.1f} tok/s "
                  f"(wall {result[f'dp{workers}_wall_s']:.1f} s, {result[f'dp{workers}_tokens']} tokens)")  # fmt: skip
    if "speedup" in result:
        print(f"  speedup {result['speedup']:.2f}x (target {TARGET_SPEEDUP}x), clock {result['clock_speedup']:.2f}x, "
              f"wall {result['wall_speedup']:.2f}x, "
              f"identical samples {result['identical_samples']:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
