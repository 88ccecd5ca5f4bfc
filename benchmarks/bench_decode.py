"""Decode throughput of the fast engine against its baselines, in one run (DESIGN §5, issue 4).

Random-weight models with the real Qwen2.5-0.5B (base) and Qwen2.5-1.5B (teacher) shapes (no
download), prompts of 128 tokens. Measured in the same process:
- the weight-bandwidth floor: both models' weight bytes / a measured device-to-device copy rate;
- the fast engine at batch 1, 64 and 256 (decode_and_sample: both models + alpha + q + draw +
  importance data in one CUDA graph, results copied to the host every step and read one step
  later, as the sampler's pipelined loop does), the same steps without the sampler (models only,
  queued back to back) for the share of the step outside the models, and for comparison the
  steps read before the next is queued (median of ROUNDS alternating rounds of each), and the
  fused sampler kernel alone;
- the fast engine on a variable-length workload: 1,024 requests, output lengths uniform in
  32..512, continuous batching of at most 256 rows per step as the sampler runs it (refill once
  the sampler's group of slots is free, prefill beside the decode steps, 16 spare slots whose
  requests are prefilled ahead and take a row as soon as one frees, pipelined steps), and for
  comparison without spare slots, refilling as soon as any slot frees, refilling with the decode
  steps waiting for the prefill, reading each step before queuing the next, and the same loop on
  a fixed-length workload (1,024 requests of 272 tokens, the variable workload's mean);
- the fixed batches again with both models on one CUDA stream (the engine runs the teacher on a
  second stream);
- the reference engine (transformers models + DynamicCache + sample_step), a few steps per batch;
- transformers generate() of the base alone and of the teacher alone (greedy, 32 new tokens).
Prints a table, then one JSON line last.

    PYTHONPATH=src python benchmarks/bench_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import traceback

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from optimal_sampling.config import MixConfig, SamplingParams
from optimal_sampling.engines.base import Ready, SlotRequest, admit_group, spare_slots
from optimal_sampling.engines.fast import FastEngine
from optimal_sampling.engines.fast.graphs import GraphCache
from optimal_sampling.engines.fast.mixing_fast import fused_outputs, values_tensor
from optimal_sampling.engines.reference import ReferenceEngine
from optimal_sampling.mixing.step import sample_step

VOCAB = 151936
PROMPT = 128
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
}
ROUNDS = 5  # alternating rounds of the full step and the models-only step, per fixed batch
TARGETS = {"b1_tok_s": 400, "b1_vs_reference": 15, "b64_tok_s": 10_000, "b256_tok_s": 25_000}


def qwen_model(size: str) -> torch.nn.Module:
    config = Qwen2Config(
        vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, **SHAPES[size],
    )  # fmt: skip
    torch.manual_seed(0 if size == "0.5b" else 1)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graph_ms(fn, repeat: int = 20) -> float:
    """GPU ms per call of fn, captured in a CUDA graph and replayed as the engine's step runs it,
    so that Python's per-launch overhead does not count."""
    fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # allocations of a first call stay out of the pool the graph records into
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.synchronize()
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeat


def timed(fn, repeat: int) -> float:
    """Seconds per call, host clock around synchronised calls (includes host overhead)."""
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * src.element_size() / seconds


def prompts(count: int, seed: int, length: int = PROMPT) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(VOCAB) for _ in range(length)) for _ in range(count)]


class FastLoop:
    """The sampler's loop on the fast engine: add, decode_and_sample, copy results to the host."""

    def __init__(self, engine: FastEngine, mix: MixConfig, params: SamplingParams):
        self.engine, self.mix, self.params = engine, mix, params

    def start(self, slots: list[int], batch_prompts: list[tuple[int, ...]]) -> list[int]:
        requests = [SlotRequest(s, p, p) for s, p in zip(slots, batch_prompts, strict=True)]
        first = self.engine.first_draw(requests, slots, [0] * len(slots), self.mix, self.params)
        return first.to_host()["tokens"]

    def start_async(self, slots: list[int], batch_prompts: list[tuple[int, ...]]):
        """start() on the engine's prefill stream: a handle with ready() and to_host()."""
        requests = [SlotRequest(s, p, p) for s, p in zip(slots, batch_prompts, strict=True)]
        return self.engine.add_async(requests, slots, [0] * len(slots), self.mix, self.params)

    def step(self, slots: list[int], tokens: list[int], steps: list[int]) -> list[int]:
        """One step, read at once (the loop of an engine that does not pipeline)."""
        result = self.engine.decode_and_sample(slots, tokens, slots, steps, self.mix, self.params)
        return result.to_host()["tokens"]

    def launch(self, slots: list[int], steps: list[int]):
        """One step on the slots' last tokens on the device, not read yet (the sampler's
        pipelined loop): a handle whose to_host() waits for this step's results."""
        result = self.engine.decode_and_sample(slots, None, slots, steps, self.mix, self.params)
        return result.copy_to_host()


def fixed_steps(loop: FastLoop, slots: list[int], tokens: list[int]):
    """(full, models_only, stepwise) over `slots`, each advancing the step count:
    - full: the sampler's pipelined step: queue step n + 1, then read step n's results;
    - models_only: the same captured step without the sampler, queued back to back;
    - stepwise: queue a step and read it before the next (host work between steps)."""
    count = [1]
    in_flight = [None]

    def full():
        queued = loop.launch(slots, [count[0]] * len(slots))
        count[0] += 1
        if in_flight[0] is not None:
            tokens[:] = in_flight[0].to_host()["tokens"]
        in_flight[0] = queued

    def models_only():
        loop.engine.run_step(slots, None, slots, [0] * len(slots), None)

    def stepwise():
        if in_flight[0] is not None:
            tokens[:] = in_flight[0].to_host()["tokens"]
            in_flight[0] = None
        tokens[:] = loop.step(slots, tokens, [count[0]] * len(slots))
        count[0] += 1

    return full, models_only, stepwise


def bench_fast_fixed(engine: FastEngine, loop: FastLoop, batch: int, steps: int) -> dict:
    slots = list(range(batch))
    full, models_only, stepwise = fixed_steps(loop, slots, loop.start(slots, prompts(batch, batch)))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        full()  # capture
    models_only()
    stepwise()
    # Rounds of each, alternating, and the median round of each: clock drift hits all alike.
    per_round = max(1, steps // ROUNDS)  # as many steps in all as one round of `steps` (context grows)
    rounds = [[timed(fn, per_round) for fn in (full, models_only, stepwise)] for _ in range(ROUNDS)]
    step_s, models_s, stepwise_s = (statistics.median(r[i] for r in rounds) for i in range(3))
    engine.release(slots)
    return dict(
        tok_s=batch / step_s, ms_step=1e3 * step_s, ms_models=1e3 * models_s,
        share_outside_models=max(0.0, 1 - models_s / step_s), peak_gib=peak_gib(),
        tok_s_stepwise=batch / stepwise_s, ms_step_stepwise=1e3 * stepwise_s,
    )  # fmt: skip


def bench_sampler_kernel(batch: int, mix: MixConfig, params: SamplingParams) -> float:
    """ms of the fused sampler alone on random bf16 logits [batch, V], replayed from a CUDA graph."""
    logits_b = torch.randn(batch, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
    logits_t = logits_b + torch.randn_like(logits_b)
    seeds = torch.arange(batch, device="cuda")
    values = values_tensor(mix, params, VOCAB, "cuda")  # made outside the graph: a copy from the host
    return graph_ms(lambda: fused_outputs(logits_b, logits_t, seeds, seeds, mix, params, values=values))


def bench_variable(
    loop: FastLoop, requests: int, batch: int, spare: int, shortest: int = 32, longest: int = 512,
    refill_at: int = 1, overlap: bool = True, pipelined: bool = True,
) -> dict:  # fmt: skip
    """Continuous batching as the sampler runs it: at most `batch` rows per step, over batch +
    `spare` slots (requests in spare slots are prefilled ahead and take the first row that
    frees; rows go to the longest-running requests first). Free slots are refilled once
    `refill_at` of them (or all the waiting requests) are free, in one prefill; refill_at=1
    refills as soon as any slot frees. overlap: the prefill and first draw run on the engine's
    prefill stream while the other slots keep decoding (add_async, what the sampler does), else
    the decode steps wait for them. pipelined: step n + 1 is queued before step n's results are
    read (what the sampler does), else each step is read before the next is queued."""
    assert batch + spare <= loop.engine.max_slots
    rng = random.Random(0)
    lengths = [rng.randint(shortest, longest) for _ in range(requests)]
    waiting = list(zip(prompts(requests, 7), lengths, strict=True))[::-1]
    free = list(range(batch + spare - 1, -1, -1))
    active: dict[int, list] = {}  # slot -> [tokens read, target length, last token, tokens asked for]
    pending = None  # (slots, target lengths, handle) of an admission in flight
    in_flight = None  # (slots, handle) of a step not read yet
    produced, steps, refills = 0, 0, 0
    refill_s, tail_s, tail_tokens = 0.0, 0.0, 0  # time the loop waits on refills; after the queue empties
    captures = loop.engine.graphs.captures + loop.engine.prefill_graphs.captures
    sync()
    start = time.perf_counter()
    while waiting or active or pending or in_flight:
        began = time.perf_counter()
        busy = bool(active or in_flight)
        if pending is None and waiting and free and (len(free) >= min(refill_at, len(waiting)) or not busy):
            admitted = [free.pop() for _ in range(min(len(free), len(waiting)))]
            jobs = [waiting.pop() for _ in admitted]
            batch_prompts = [p for p, _ in jobs]
            if overlap:
                handle = loop.start_async(admitted, batch_prompts)
            else:
                handle = Ready({"tokens": loop.start(admitted, batch_prompts)})
            pending = admitted, [target for _, target in jobs], handle
            refills += 1
        if pending is not None and (not busy or pending[2].ready()):
            admitted, targets, handle = pending
            pending = None
            firsts = handle.to_host()["tokens"]
            for slot, target, token in zip(admitted, targets, firsts, strict=True):
                active[slot] = [1, target, token, 1]
            produced += len(admitted)
        refill_s += time.perf_counter() - began
        began = time.perf_counter()
        rows = [s for s, state in active.items() if state[3] < state[1]][:batch]
        queued = None
        if rows:
            asked = [active[s][3] for s in rows]
            for s in rows:
                active[s][3] += 1
            if pipelined:
                queued = rows, loop.launch(rows, asked)
            else:
                tokens = loop.step(rows, [active[s][2] for s in rows], asked)
                queued = rows, Ready({"tokens": tokens})
            steps += 1
        if pipelined:
            queued, in_flight = in_flight, queued
        if queued is not None:
            read, handle = queued
            for slot, token in zip(read, handle.to_host()["tokens"], strict=True):
                state = active[slot]
                state[0], state[2] = state[0] + 1, token
                if state[0] >= state[1]:
                    del active[slot]
                    free.append(slot)
            produced += len(read)
            loop.engine.release([s for s in read if s not in active])
            if not waiting and pending is None:
                tail_s += time.perf_counter() - began
                tail_tokens += len(read)
    seconds = time.perf_counter() - start
    return dict(
        tok_s=produced / seconds, seconds=seconds, tokens=produced, steps=steps, refill_at=refill_at,
        spare=spare, lengths=f"{shortest}..{longest}", overlap=overlap, pipelined=pipelined,
        refills=refills, refill_s=refill_s, tail_s=tail_s,
        tail_tokens=tail_tokens,
        graph_captures=loop.engine.graphs.captures + loop.engine.prefill_graphs.captures - captures,
    )  # fmt: skip


def bench_reference(base, teacher, batch: int, steps: int, mix: MixConfig, params: SamplingParams) -> dict:
    engine = ReferenceEngine(base, teacher, VOCAB, batch)
    logits_b, logits_t = engine.add([SlotRequest(i, p, p) for i, p in enumerate(prompts(batch, 3))])
    seeds = torch.arange(batch, device="cuda")
    tokens = sample_step(logits_b, logits_t, seeds, seeds * 0, mix, params).tokens
    slots = torch.arange(batch, device="cuda")

    def step():
        nonlocal tokens
        lb, lt = engine.decode(slots, tokens)
        result = sample_step(lb, lt, seeds, seeds * 0 + 1, mix, params)
        tokens = torch.tensor(result.to_host()["tokens"], device="cuda")

    step()
    seconds = timed(step, steps)
    return dict(tok_s=batch / seconds, ms_step=1e3 * seconds)


def bench_generate(model, batch: int, new_tokens: int = 32) -> dict:
    ids = torch.tensor(prompts(batch, 5), device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
    seconds = timed(
        lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs), 1
    )
    return dict(tok_s=batch * new_tokens / seconds, ms_step=1e3 * seconds / new_tokens)


def section(out: dict, name: str, fn, partial: str | None) -> None:
    """out[name] = fn(), or None with the traceback printed; partial results saved as they come."""
    started = time.perf_counter()
    try:
        out[name] = fn()
    except Exception:  # a failing section must not cost the others their numbers
        traceback.print_exc()
        out[name] = None
    print(f"[{name}] {time.perf_counter() - started:.1f} s: {out[name]}", flush=True)
    if partial:
        with open(partial, "w") as f:
            json.dump(out, f)


def fast_sections(
    out: dict, base, teacher, mix, params, steps: int, requests: int, partial: str | None
) -> None:
    spare = spare_slots(256)  # the fast engine's slots beyond the batch, as build_fast_engine plans them
    engine = FastEngine(base, teacher, VOCAB, max_slots=256 + spare, max_len=1024, max_batch=256)
    loop = FastLoop(engine, mix, params)
    section(out, "fast", lambda: {b: bench_fast_fixed(engine, loop, b, steps) for b in (1, 64, 256)}, partial)
    section(
        out,
        "sampler_kernel_ms",
        lambda: {b: bench_sampler_kernel(b, mix, params) for b in (1, 64, 256)},
        None,
    )
    group = admit_group(256)  # the sampler's refill rule

    def variable(**kwargs):
        return bench_variable(loop, requests, 256, **{"spare": spare, "refill_at": group, **kwargs})

    # Warm-up, untimed: the same workload with both refill rules, so every decode and prefill
    # graph the timed runs meet (batch bucket x attention widths) is captured and the sampler is
    # compiled for every split count, as an engine would at start-up; graph_captures of the timed
    # runs says whether any capture was left.
    for rule, overlap in ((1, True), (group, False), (group, True)):
        section(
            out,
            f"variable_warmup_{rule}{'' if overlap else '_no_overlap'}",
            lambda rule=rule, overlap=overlap: variable(refill_at=rule, overlap=overlap),
            None,
        )
    section(out, "variable", variable, partial)
    section(out, "variable_no_spare", lambda: variable(spare=0), partial)
    section(out, "variable_refill_each_step", lambda: variable(refill_at=1), partial)
    section(out, "variable_no_overlap", lambda: variable(overlap=False), partial)
    section(out, "variable_stepwise", lambda: variable(pipelined=False), partial)
    mean = (32 + 512) // 2  # the variable workload's mean length: about as many tokens
    section(out, "fixed_length_loop", lambda: variable(shortest=mean, longest=mean), partial)
    section(out, "fast_one_stream", lambda: bench_one_stream(engine, loop, steps), partial)


def bench_one_stream(engine: FastEngine, loop: FastLoop, steps: int) -> dict:
    """The fixed-batch steps with both models on one stream (what the two-stream step saves)."""
    stream, graphs = engine.teacher_stream, engine.graphs
    engine.teacher_stream, engine.graphs = None, GraphCache(True)  # a fresh pool: graphs of one stream
    try:
        return {b: bench_fast_fixed(engine, loop, b, steps) for b in (1, 64, 256)}
    finally:
        engine.teacher_stream, engine.graphs = stream, graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and requests (a smoke run)")
    parser.add_argument("--partial", default=None, help="write the results so far to this JSON file")
    args = parser.parse_args()
    steps = 8 if args.quick else 40
    requests = 64 if args.quick else 1024
    mix, params = MixConfig(), SamplingParams(temperature=1.0)
    base, teacher = qwen_model("0.5b"), qwen_model("1.5b")
    bandwidth = copy_bandwidth()
    total_bytes = weight_bytes(base) + weight_bytes(teacher)
    out: dict = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, weight_gb=total_bytes / 1e9)
    out["copy_tb_s"] = bandwidth / 1e12
    out["floor_ms"] = 1e3 * total_bytes / bandwidth
    fast_sections(out, base, teacher, mix, params, steps, requests, args.partial)
    torch.cuda.empty_cache()
    reference = {
        b: (lambda b=b: bench_reference(base, teacher, b, 3 if b > 1 else 6, mix, params)) for b in (1, 64)
    }
    section(out, "reference", lambda: {b: fn() for b, fn in reference.items()}, args.partial)
    section(out, "generate_base", lambda: {b: bench_generate(base, b) for b in (1, 64, 256)}, args.partial)
    section(
        out, "generate_teacher", lambda: {b: bench_generate(teacher, b) for b in (1, 64, 256)}, args.partial
    )
    section(out, "checks", lambda: targets(out), None)
    try:
        report(out)
    except Exception:
        traceback.print_exc()
    print(json.dumps(out))


def targets(out: dict) -> dict:
    fast = out["fast"]
    return dict(
        b1_tok_s=fast[1]["tok_s"] >= TARGETS["b1_tok_s"],
        b1_vs_reference=fast[1]["tok_s"] / out["reference"][1]["tok_s"] >= TARGETS["b1_vs_reference"],
        b64_tok_s=fast[64]["tok_s"] >= TARGETS["b64_tok_s"],
        b256_tok_s=fast[256]["tok_s"] >= TARGETS["b256_tok_s"],
        b256_outside_share=fast[256]["share_outside_models"] <= 0.10,
        variable_vs_b256=out["variable"]["tok_s"] >= 0.8 * fast[256]["tok_s"],
    )


def report(out: dict) -> None:
    print(f"card {out['card']}  copy {out['copy_tb_s']:.2f} TB/s  weight floor {out['floor_ms']:.3f} ms/step")
    print(
        f"{'what':<28}{'batch':>6}{'tok/s':>12}{'ms/step':>10}{'models ms':>10}{'outside':>9}{'peak GiB':>9}"
    )
    for b, r in out["fast"].items():
        print(
            f"{'fast engine':<28}{b:>6}{r['tok_s']:>12.0f}{r['ms_step']:>10.3f}{r['ms_models']:>10.3f}"
            f"{r['share_outside_models']:>9.1%}{r['peak_gib']:>9.1f}"
        )
    for b, r in out["fast"].items():
        print(
            f"{'fast, each step read first':<28}{b:>6}{r['tok_s_stepwise']:>12.0f}{r['ms_step_stepwise']:>10.3f}"
        )
    for b, r in (out.get("fast_one_stream") or {}).items():
        print(
            f"{'fast, models on one stream':<28}{b:>6}{r['tok_s']:>12.0f}{r['ms_step']:>10.3f}{r['ms_models']:>10.3f}"
            f"{r['share_outside_models']:>9.1%}{r['peak_gib']:>9.1f}"
        )
    names = ("variable", "variable_no_spare", "variable_refill_each_step", "variable_no_overlap")
    for name in (*names, "variable_stepwise", "fixed_length_loop"):
        v = out.get(name)
        if v:
            label = f"fast, {v['lengths']}, refill>={v['refill_at']}, spare {v['spare']}"
            label += ("" if v["overlap"] else ", no overlap") + ("" if v["pipelined"] else ", stepwise")
            print(f"{label:<28}{256:>6}{v['tok_s']:>12.0f}{1e3 * v['seconds'] / v['steps']:>10.3f}")
    for name in ("reference", "generate_base", "generate_teacher"):
        for b, r in out[name].items():
            print(f"{name:<28}{b:>6}{r['tok_s']:>12.0f}{r['ms_step']:>10.3f}")
    print("sampler kernel ms:", {b: round(ms, 3) for b, ms in out["sampler_kernel_ms"].items()})
    print("targets met:", out["checks"])


if __name__ == "__main__":
    main()
