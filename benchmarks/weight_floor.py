"""The weight-bandwidth floor of a decode step for bench_api's pairs: both models' weight bytes
(bf16, the shapes bench_api writes) over a measured device-to-device copy rate.

    PYTHONPATH=src python3 benchmarks/weight_floor.py [--pair 7b]
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_api import PAIRS, SHAPES
from transformers import Qwen2Config


def weight_bytes(shape: str) -> int:
    """Parameters of one Qwen2 model of bench_api's SHAPES, in bf16 bytes (meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    config, tied, head = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=head, tie_word_embeddings=tied, **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return 2 * sum(p.numel() for p in model.parameters())


def copy_rate(gib: float = 2.0, rounds: int = 20) -> float:
    """Bytes per second read plus written by a device-to-device copy (median of rounds)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() / times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="small")
    args = parser.parse_args()
    total = sum(weight_bytes(shape) for shape in PAIRS[args.pair])
    rate = copy_rate()
    print(json.dumps({"card": torch.cuda.get_device_name(), "pair": args.pair, "weight_gb": round(total / 1e9, 2),
                      "copy_tb_s": round(rate / 1e12, 3), "floor_ms": round(1e3 * total / rate, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
