"""Live weight updates of the base on the fast engine (issue 17): how long an update takes, and
that it neither re-captures graphs nor slows decoding.

A random-weight Qwen2.5-1.5B-shaped base and 0.5B-shaped teacher (bench_data_parallel's synthetic
byte-level tokenizer of the real vocabulary width), saved once; a second 1.5B-shaped base saved
beside them (the "trained" weights). Measured in one run, on one sampler:
- decode rate before any update (batch 64, 64 new tokens, second call, graphs captured);
- 10 updates from tensors already on the GPU (the other base's state dict), median and max seconds,
  alternating between the two bases so each update changes every tensor;
- updates from disk (the saved directory, safetensors), median of 3;
- the decode rate after the updates, and the graph captures during the updates and the second
  measurement (0 expected);
- that after an update the sampler draws what a fresh sampler on those weights draws (tokens).
Prints a table, then one JSON line last.

    PYTHONPATH=src python3 benchmarks/bench_weights.py [--quick]      (--quick: tiny models, CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_data_parallel import VOCAB, build_tokenizer, save_model
from transformers import AutoModelForCausalLM

from optimal_sampling import OptimalSampler

PROMPTS = [f"prompt {i}: " + "abc def ghi " * 10 for i in range(64)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_rate(sampler: OptimalSampler, batch: int, tokens: int) -> float:
    run = lambda: sampler.generate(PROMPTS[:batch], max_tokens=tokens, seed=3)  # noqa: E731
    run()
    sync()
    start = time.perf_counter()
    out = run()
    sync()
    return sum(out.num_tokens) / (time.perf_counter() - start)


def captures(sampler: OptimalSampler) -> int:
    engine = sampler.engine
    return engine.graphs.captures + engine.prefill_graphs.captures if hasattr(engine, "graphs") else 0


def timed_update(update) -> float:
    sync()
    start = time.perf_counter()
    update()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU (a smoke run)")
    args = parser.parse_args()
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    vocab, dtype = (1024, torch.float32) if args.quick else (VOCAB, torch.bfloat16)
    base_shape, teacher_shape = ("tiny-base", "tiny-teacher") if args.quick else ("1.5b", "0.5b")
    batch, tokens = (4, 8) if args.quick else (64, 64)
    with tempfile.TemporaryDirectory() as root:
        tokenizer = build_tokenizer(vocab)
        paths = {name: Path(root) / name for name in ("base", "teacher", "trained")}
        for path, shape, seed in zip(paths.values(), (base_shape, teacher_shape, base_shape), (0, 1, 2)):
            save_model(path, shape, vocab, seed, device, dtype)
            tokenizer.save_pretrained(path)
        sampler = OptimalSampler(str(paths["base"]), str(paths["teacher"]), engine="fast", device=device,
                                 max_batch_size=batch, seed=0)  # fmt: skip
        states = [
            AutoModelForCausalLM.from_pretrained(paths[n], dtype=dtype).to(device).state_dict()
            for n in ("trained", "base")
        ]
        before = decode_rate(sampler, batch, tokens)
        captured = captures(sampler)
        from_tensors = [timed_update(lambda i=i: sampler.update_weights(states[i % 2])) for i in range(10)]
        from_disk = [
            timed_update(lambda: sampler.update_weights_from_disk(str(paths["trained"]))) for _ in range(3)
        ]
        after = decode_rate(sampler, batch, tokens)
        recaptured = captures(sampler) - captured
        updated = [s.token_ids for s in sampler.generate(PROMPTS[:4], max_tokens=8, seed=5).samples]
        version = sampler.weight_version
        states = None
        sampler.close()  # a second sampler needs the first one's KV cache memory back
        sampler = None
        torch.cuda.empty_cache() if device == "cuda" else None
        fresh = OptimalSampler(str(paths["trained"]), str(paths["teacher"]), engine="fast", device=device,
                               max_batch_size=batch, seed=0)  # fmt: skip
        same = updated == [s.token_ids for s in fresh.generate(PROMPTS[:4], max_tokens=8, seed=5).samples]
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "base": base_shape,
        "decode_tok_s_before": round(before, 1), "decode_tok_s_after": round(after, 1),
        "update_from_tensors_s": {"median": round(statistics.median(from_tensors), 4), "max": round(max(from_tensors), 4)},
        "update_from_disk_s": {"median": round(statistics.median(from_disk), 3)},
        "graph_captures_during_updates_and_after": recaptured, "weight_version": version,
        "same_tokens_as_a_fresh_sampler": same,
    }  # fmt: skip
    print(f"decode tok/s before {before:.0f}, after 13 updates {after:.0f}; update from tensors median "
          f"{statistics.median(from_tensors):.3f} s, from disk {statistics.median(from_disk):.2f} s; "
          f"graph captures since {recaptured}; same tokens as a fresh sampler: {same}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
