"""Tensor parallelism on 2 GPUs: TP=2 vs TP=1 correctness and speed, and a pair too big for one card.

Run (no network needed; random weights with real architecture shapes):

    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/tp_check.py
    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/tp_check.py --device cpu --tiny   # smoke test

(a) Qwen2.5-0.5B base / 1.5B teacher shapes, bf16: the same weights on both ranks; TP=2 logits vs
    the single-GPU fast engine over prefill + decode (max |diff| of log-softmax), and greedy tokens
    of the mixture (alpha 0.5) fed back by each engine: the share of identical tokens.
(b) decode tokens/s at batch 1 and 64, TP=1 (each rank alone) vs TP=2, eager and CUDA graphs.
(c) Qwen2.5-14B base / 32B teacher shapes (~95 GB bf16, more than one 80 GB card): each rank builds
    only its shard, randomly, on its GPU (meta-device HF models), then decodes a few steps at TP=2.
Rank 0 prints a JSON line after each part (partial results survive a timeout); the last is final.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from optimal_sampling.config import EngineConfig
from optimal_sampling.distributed.groups import init_world, new_tp_groups
from optimal_sampling.engines.base import SlotRequest
from optimal_sampling.engines.fast import FastEngine
from optimal_sampling.engines.fast.tensor_parallel import build_tensor_parallel_engine
from optimal_sampling.engines.reference import ReferenceEngine

QWEN = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=True)  # fmt: skip
SHAPES = {
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960),
    "14B": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}  # fmt: skip
RESULTS: dict = {}


def config_of(name: str):
    fields = {**QWEN, **SHAPES[name]}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def emit(final: bool = False) -> None:
    if dist.get_rank() == 0:
        print(json.dumps({**RESULTS, "final": final}), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(name: str, device: torch.device, dtype: torch.dtype, tp) -> torch.nn.Module:
    """Peaked random weights (so greedy is meaningful), identical on every rank (broadcast)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config_of(name), dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.04)
        model.get_output_embeddings().weight.normal_(0.0, 0.3)
        for p in model.parameters():
            dist.broadcast(p.data, src=tp.leader, group=tp.group)
    return model


def requests(batch: int, length: int, vocab: int, seed: int = 1) -> list[SlotRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        ids = tuple(torch.randint(0, vocab, (length + i % 7,), generator=g).tolist())
        out.append(SlotRequest(i, ids, ids[::-1]))
    return out


def mixture_greedy(logits_b: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    return (logits_b.float().log_softmax(-1) + logits_t.float().log_softmax(-1)).argmax(-1)


# ============================================================================ (a) correctness


def check_correctness(args, tp, device, dtype) -> None:
    """TP=2 against TP=1 (and, for scale, the transformers reference against TP=1), teacher-forced.

    Random deep networks amplify rounding differences from layer to layer, so in bfloat16 the
    TP=2 differences are judged against those of the reference engine on the same weights; in
    float32 they must be small outright."""
    base, teacher = (random_model(n, device, dtype, tp) for n in args.pair)
    vocab = config_of(args.pair[0]).vocab_size
    single = FastEngine(base, teacher, vocab, max_slots=8, max_len=256, use_graphs=False)
    sharded = build_tensor_parallel_engine(base, teacher, vocab, EngineConfig(max_batch_size=8, use_cuda_graphs=False),
                                           tp, device, max_len=256)  # fmt: skip
    reference = ReferenceEngine(base, teacher, vocab, 8)
    reqs = requests(8, 24, vocab)
    slots = torch.arange(8, device=device)
    worst = {"tp2": 0.0, "reference": 0.0}
    same = {"tp2": 0, "reference": 0}
    total = 0
    with torch.no_grad():
        outs = {"tp1": single.add(reqs), "tp2": sharded.add(reqs), "reference": reference.add(reqs)}
        for _ in range(args.steps):
            tokens = mixture_greedy(*outs["tp1"])
            total += tokens.numel()
            for name in ("tp2", "reference"):
                for a, b in zip(outs["tp1"], outs[name], strict=True):
                    diff = (a.float().log_softmax(-1) - b.float().log_softmax(-1)).abs().max().item()
                    worst[name] = max(worst[name], diff)
                same[name] += int((mixture_greedy(*outs[name]) == tokens).sum())
            # every engine is fed TP=1's tokens: compare like with like
            outs = {name: engine.decode(slots, tokens) for name, engine in
                    (("tp1", single), ("tp2", sharded), ("reference", reference))}  # fmt: skip
    agree = {name: round(same[name] / total, 5) for name in same}
    if dtype == torch.float32:
        ok = worst["tp2"] < 1e-2 and agree["tp2"] >= 0.99
    else:
        ok = worst["tp2"] <= 2 * worst["reference"] + 1e-3 and agree["tp2"] >= agree["reference"] - 0.05
    RESULTS.setdefault("correctness", {})[str(dtype).removeprefix("torch.")] = {
        "pair": list(args.pair), "steps": args.steps, "batch": 8,
        "max_abs_logprob_diff_tp2_vs_tp1": round(worst["tp2"], 6),
        "max_abs_logprob_diff_reference_vs_tp1": round(worst["reference"], 6),
        "greedy_agreement_tp2_vs_tp1": agree["tp2"], "greedy_agreement_reference_vs_tp1": agree["reference"],
        "ok": ok,
    }  # fmt: skip
    del single, sharded, reference, base, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ============================================================================ (b) speed


def decode_rate(engine, batch: int, steps: int, vocab: int, device) -> float:
    """tokens/s of engine.decode at `batch` rows, after a warm-up (graph capture included)."""
    engine.add(
        requests(batch, 70, vocab, seed=batch)
    )  # 70..76 + 35 steps: one width bucket, no capture while timed
    slots = torch.arange(batch, device=device)
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(3):
        engine.decode(slots, tokens)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode(slots, tokens)
    sync(device)
    rate = batch * steps / (time.perf_counter() - start)
    engine.release(list(range(batch)))
    return round(rate, 1)


def check_speed(args, tp, device, dtype) -> None:
    base, teacher = (random_model(n, device, dtype, tp) for n in args.pair)
    vocab = config_of(args.pair[0]).vocab_size
    speed = RESULTS.setdefault("speed", {"pair": list(args.pair), "tokens_per_s": {}})
    single = FastEngine(base, teacher, vocab, max_slots=64, max_len=512, use_graphs=True)
    for batch in args.batches:
        speed["tokens_per_s"][f"tp1_graphs_b{batch}"] = decode_rate(single, batch, args.steps, vocab, device)
    del single
    for graphs in (False, True):  # eager first: if capturing NCCL collectives fails, eager numbers are out
        config = EngineConfig(max_batch_size=64, use_cuda_graphs=graphs)
        sharded = build_tensor_parallel_engine(base, teacher, vocab, config, tp, device, max_len=512)
        try:
            for batch in args.batches:
                key = f"tp2_{'graphs' if graphs else 'eager'}_b{batch}"
                speed["tokens_per_s"][key] = decode_rate(sharded, batch, args.steps, vocab, device)
                log(f"{key}: {speed['tokens_per_s'][key]} tok/s")
        except RuntimeError as err:  # capture failed on every rank alike: record it, go on eager
            speed["graphs_error"] = str(err)[:300]
            args.big_graphs = False
        emit()
        del sharded
    del base, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ============================================================================ (c) too big for one card


def meta_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config_of(name), dtype=dtype)


def check_big_pair(args, tp, device, dtype) -> None:
    start = time.perf_counter()
    base, teacher = meta_model(args.big[0], dtype), meta_model(args.big[1], dtype)
    full_bytes = (
        sum(p.numel() for m in (base, teacher) for p in m.parameters()) * torch.finfo(dtype).bits // 8
    )
    vocab = config_of(args.big[0]).vocab_size
    config = EngineConfig(max_batch_size=max(args.big_batches), use_cuda_graphs=args.big_graphs)
    engine = build_tensor_parallel_engine(base, teacher, vocab, config, tp, device, max_len=1024)
    sync(device)
    built_s = time.perf_counter() - start
    rates = {f"b{b}": decode_rate(engine, b, args.big_steps, vocab, device) for b in args.big_batches}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    RESULTS["big_pair"] = {
        "pair": list(args.big), "full_weights_gib": round(full_bytes / 2**30, 1), "tp": tp.size,
        "graphs": args.big_graphs, "build_s": round(built_s, 1), "tokens_per_s": rates,
        "peak_gib_rank0": round(peak / 2**30, 1),
    }  # fmt: skip


# ============================================================================ main


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (a CPU smoke test)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--big-eager", dest="big_graphs", action="store_false", help="(c) without CUDA graphs")
    p.add_argument("--big-steps", type=int, default=16)
    args = p.parse_args()
    args.pair = ("tiny", "tiny") if args.tiny else ("0.5B", "1.5B")
    args.big = ("tiny", "tiny") if args.tiny else ("14B", "32B")
    args.batches = (1, 4) if args.tiny else (1, 64)
    args.big_batches = (1, 4) if args.tiny else (1, 16)
    return args


def main() -> None:
    args = parse()
    device = (
        torch.device("cpu") if args.device == "cpu" else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        args.big_graphs = False
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    init_world(device)  # NVLink multicast off first
    tp = new_tp_groups(dist.get_world_size(), device)
    RESULTS.update(bench="tp_check", world=tp.size, device=torch.cuda.get_device_name(device)
                   if device.type == "cuda" else "cpu", torch=torch.__version__)  # fmt: skip
    started = time.perf_counter()
    for check_dtype in (torch.float32, dtype) if dtype != torch.float32 else (dtype,):
        check_correctness(args, tp, device, check_dtype)
        emit()
    check_speed(args, tp, device, dtype)
    if not args.skip_big:
        check_big_pair(args, tp, device, dtype)
    RESULTS["wall_s"] = round(time.perf_counter() - started, 1)
    emit(final=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
