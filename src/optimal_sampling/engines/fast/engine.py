"""The fast engine: both compact models in lockstep over static KV caches with per-slot lengths.

Slots: `max_slots` real slots plus one scratch slot (index `max_slots`) that padding rows of a
batch bucket read and write. The sampler decodes at most `max_batch` of them per step; the others
hold requests prefilled ahead (see `Engine.batch_limit`). The host keeps each slot's length per
model (base and teacher prompts may differ), so a decode step needs no device-to-host transfer:
positions are sent with the tokens in one packed int64 copy.

Invariants:
- slot s of model m holds keys/values for positions [0, lengths_m[s]); `decode` appends one.
- a step (both models, and with `decode_and_sample` the mixing and sampling too) is a pure
  function of its packed inputs and the caches: no host sync inside, so on CUDA it is captured as
  one CUDA graph per (batch bucket, attention width[, sampler key]). A fused sampler's key is the
  kernels it runs (`mixing_fast.fused_key`); the numbers they read (1 / T, the cuts' targets) sit
  in a device tensor set before each replay, so one graph serves every temperature other than 0
  and 1, every top-p, top-k and min-p value.
- one-off costs are paid in `warmup`, not in calls: it captures every decode-step and small-prefill
  graph the `GraphPlan` can select (graph_plan.py) and runs a first draw at every row count one
  can have, so afterwards only a sampling setting whose key warmup did not meet captures (its own
  steps).
- requests may be added while other slots decode (continuous batching); identical prompt pairs
  are prefilled once and their cache rows copied (prefill.py). On CUDA `add_async` prefills on a prefill
  stream while decode steps of other slots run. Prefills run eagerly at their exact shape, except
  small (launch-bound) chunks, which replay graphs of a fixed set; those have their own pool,
  capture stream and teacher side stream, because cuBLAS keeps a workspace per stream and two
  graphs captured on one stream would share it (and hang) when they run at the same time. Eager
  prefill work uses the prefill streams' own workspaces and the allocator's per-stream pools, so
  it never touches memory of the decode graphs' pool.
- each slot's last token lives on the device (`last_tokens`): a sampling step reads its input
  tokens there and writes the drawn ones back, and the first draw after a prefill writes there
  too, so a host loop may queue step n + 1 before it has read step n's tokens (`pipelines`).
- weights are updated in place (`load_weights`, through `CompactModel.weight_map`): the same
  tensors, so captured graphs stay valid; the caller syncs the device around it (a prefill on
  the prefill stream may still read them).
- on CUDA the two models run on two streams (the teacher on a side stream joined before the
  sampler), so inside a graph they are parallel branches: at small batches, where each kernel
  fills a fraction of the GPU and launch latency dominates, the step costs about the longer model
  rather than the sum. Tensor parallelism keeps one stream (its collectives must stay in order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ...config import MixConfig, SamplingParams
from ...mixing.step import StepResult
from ..base import Engine, Pending, Ready, SlotRequest, WarmupStats, unique_prompts
from ..weights import WeightMap
from .attention import decode_attention_sdpa
from .cached_model import CachedModel, new_cached_model
from .graph_plan import GraphPlan, one_split_rule
from .graphs import GraphCache, batch_bucket
from .mixing_fast import (
    StepSampler,
    make_step_sampler,
    result_from_tensors,
    sampler_key,
    uses_fused,
    values_tensor,
)
from .precompile import compile_only, compile_workers, parallel_compile_available
from .prefill import Prefill
from .transfer import to_device


class PendingAdd:
    """Requests being prefilled (and their first token drawn) on the prefill stream."""

    def __init__(self, result: StepResult, done: torch.cuda.Event | None, device: torch.device):
        self.result, self.done, self.device = result, done, device

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def to_host(self) -> dict[str, list]:
        """The first draw's results (waits for the prefill where it still runs); from then on the
        device's current stream is ordered after the prefill, so its decode steps may use the slots."""
        if self.done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done)
        return self.result.to_host()


def device_memory(device: torch.device) -> tuple[int, int, int]:
    """(torch allocated, torch reserved, device used) bytes."""
    free, total = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device), total - free


class FastEngine(Prefill, Engine):
    supports_refill = True
    concurrent_models = True  # base and teacher on two CUDA streams (see the module docstring)
    overlaps_prefill = True  # add_async prefills on its own CUDA stream beside decode steps
    pipelines = True  # decode_and_sample(tokens=None) takes each slot's last token on the device
    shares_model_weights = True  # CompactModel computes with the Hugging Face models' tensors

    def __init__(
        self, base, teacher, vocab_size: int, max_slots: int, max_len: int,
        use_graphs: bool = True, prefill_tokens: int = 8192, max_batch: int | None = None,
    ):  # fmt: skip
        """max_batch: most rows per decode step the sampler asks for (default max_slots); the
        slots beyond it hold requests prefilled ahead (see `Engine.batch_limit`)."""
        self.vocab_size = vocab_size
        self.max_slots = max_slots
        self.max_batch = max_slots if max_batch is None else max_batch
        if not 1 <= self.max_batch <= max_slots:
            raise ValueError(f"max_batch must be in [1, max_slots={max_slots}], got {max_batch}")
        self.max_len = max_len
        self.scratch = max_slots
        self.prefill_tokens = prefill_tokens
        self.base = new_cached_model(base, max_slots, max_len)
        self.teacher = new_cached_model(teacher, max_slots, max_len)
        self.device = self.base.net.device
        if self.teacher.net.device != self.device:
            raise ValueError("the fast engine needs both models on one device")
        on_cuda = self.device.type == "cuda"
        self.graphs = GraphCache(use_graphs and on_cuda, self.device)
        # Prefill graphs have their own pool: `add_async` replays them while decode graphs run.
        self.prefill_graphs = GraphCache(use_graphs and on_cuda, self.device)
        self.prefill_stream = torch.cuda.Stream(self.device) if on_cuda and self.overlaps_prefill else None
        # decode_attention: after rope_store, for unfused models (CPU; a test's plain path on CUDA)
        one_split = None
        if on_cuda:
            from .triton_attention import decode_attention_triton, rope_decode_attention

            self.decode_attention, self.rope_decode_attention = decode_attention_triton, rope_decode_attention
            one_split = one_split_rule([m.net.spec.kv_heads for m in (self.base, self.teacher)], max_len)
        else:
            self.decode_attention, self.rope_decode_attention = decode_attention_sdpa, None
        self.plan = GraphPlan(self.max_batch, max_slots, max_len, one_split)
        self.samplers: dict[tuple, StepSampler] = {}
        self.last_tokens = torch.zeros(max_slots + 1, dtype=torch.long, device=self.device)
        self.compile_workers = compile_workers()  # threads compiling warmup's kernels (1: in turn)
        two_streams = on_cuda and self.concurrent_models
        self.teacher_stream = torch.cuda.Stream(self.device) if two_streams else None
        self.prefill_teacher_stream = torch.cuda.Stream(self.device) if two_streams else None

    def batch_limit(self) -> int:
        return self.max_batch

    def max_context(self) -> int:
        return min(self.max_len, self.base.net.spec.context, self.teacher.net.spec.context)

    def weight_map(self, model: str) -> WeightMap:
        return (self.base if model == "base" else self.teacher).net.weight_map()

    @property
    def captures(self) -> int:
        """Graphs captured so far, decode and prefill (none during calls after `warmup`)."""
        return self.graphs.captures + self.prefill_graphs.captures

    # ------------------------------------------------------------------ device functions
    def decode_model(self, m: CachedModel, slots, tokens, positions, width: int) -> torch.Tensor:
        """One token per row through one model; logits [B, V]. Graph-capturable."""
        net = m.net
        if net.fused and self.rope_decode_attention is not None:  # RoPE, cache write, attention: one kernel

            def attend(i, qkv):
                lw, s = net.layers[i], net.spec
                return self.rope_decode_attention(
                    qkv, s.heads, net.cos, net.sin, lw.q_norm, lw.k_norm, s.rms_eps, m.k[i], m.v[i], slots,
                    positions, width, m.counters,
                )  # fmt: skip
        else:
            lengths = (positions + 1).to(torch.int32)

            def attend(i, qkv):
                q = net.rope_store(i, qkv, positions, slots, m.k[i], m.v[i])
                return self.decode_attention(q, m.k[i], m.v[i], slots, lengths, width, m.counters)

        normed = net.forward(tokens, attend)  # [B, hidden]
        return net.logits(normed)[:, : self.vocab_size]

    def both_models(self, run_base: Callable, run_teacher: Callable, side=None) -> tuple:
        """(run_base(), run_teacher()), the teacher on the side stream where there is one (`side`,
        else the decode steps' teacher stream; prefill has its own, see the module docstring).

        The side stream waits for the current stream before and is joined after, so in a graph
        the two models are parallel branches between the inputs and the sampler; anything it
        allocates is freed before later side-stream work, which is ordered after that join."""
        side = side or self.teacher_stream
        if side is None:
            return run_base(), run_teacher()
        main = torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out_t = run_teacher()
        out_b = run_base()
        main.wait_stream(side)
        return out_b, out_t

    def step_graph(self, rows: int, width: int, sampler: StepSampler | None) -> tuple:
        """(key, function, scratch inputs) of the decode step of `rows` rows at attention `width`."""
        key = ("decode", rows, width, None if sampler is None else sampler.key)
        return key, self.step_fn(width, sampler), lambda: [self.scratch_packed(rows)]

    def step_fn(self, width: int, sampler: StepSampler | None) -> Callable:
        """Both models attend over `width` cache positions (>= every row's length)."""

        def step(
            packed: torch.Tensor,
        ):  # [6, B]: slots, tokens (-1: the slot's last), pos_b, pos_t, seeds, steps
            slots, given, pos_b, pos_t, seeds, steps = packed.unbind(0)
            tokens = torch.where(given >= 0, given, self.last_tokens[slots])
            logits_b, logits_t = self.both_models(
                lambda: self.decode_model(self.base, slots, tokens, pos_b, width),
                lambda: self.decode_model(self.teacher, slots, tokens, pos_t, width),
            )
            if sampler is None:
                return logits_b, logits_t
            outputs = sampler(logits_b, logits_t, seeds, steps)
            self.last_tokens[slots] = outputs[0]  # padding rows all write the scratch slot's
            return outputs

        return step

    # ------------------------------------------------------------------ Engine interface
    def add(self, requests: list[SlotRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        firsts, owner = unique_prompts(requests)
        logits_b, logits_t = self.prefill(firsts)
        self.copy_duplicates(requests, firsts, owner)
        for req in requests:
            self.base.lengths[req.slot] = len(req.base_ids)
            self.teacher.lengths[req.slot] = len(req.teacher_ids)
        rows = to_device(owner, self.device)
        return logits_b[rows], logits_t[rows]

    def decode(self, slots: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot_list = slots.tolist()
        logits_b, logits_t = self.run_step(
            slot_list, tokens, [0] * len(slot_list), [0] * len(slot_list), None
        )
        return logits_b.clone(), logits_t.clone()

    def decode_and_sample(
        self,
        slots: Sequence[int],
        tokens: Sequence[int] | torch.Tensor | None,
        row_seeds: Sequence[int],
        steps: Sequence[int],
        mix: MixConfig,
        params: SamplingParams,
    ) -> StepResult:
        """decode + sample_step in one captured graph; tensors valid until the next engine call.

        tokens None: each slot's last token, as drawn by the previous step or the first draw of
        `add_async`, read on the device (so the previous step's results need not be read yet)."""
        sampler = self.sampler_for(mix, params).use(params)  # the numbers its graphs read
        outputs = self.run_step(list(slots), tokens, row_seeds, steps, sampler)
        return result_from_tensors(outputs, params)

    def sample_tensors(
        self, logits_b, logits_t, row_seeds, steps, mix: MixConfig, params: SamplingParams
    ) -> StepResult:
        """The step sampler this engine uses, on given logits [n, V] (e.g. after `add`); eager.

        It runs at `plan.draw_rows(n)` rows (padding rows repeat the last row; their draws are
        dropped): the row counts warmup ran it at, so its kernels never compile inside a call."""
        n = logits_b.shape[0]
        pad = self.plan.draw_rows(n) - n
        if pad:
            index = to_device(list(range(n)) + [n - 1] * pad, self.device)
            logits_b, logits_t = logits_b[index], logits_t[index]
        seeds = to_device(list(row_seeds) + [0] * pad, self.device)
        counts = to_device(list(steps) + [0] * pad, self.device)
        # its own numbers, not the graphs': steps of another setting of its key may be queued
        values = values_tensor(mix, params, self.vocab_size, self.device)
        outputs = self.sampler_for(mix, params)(logits_b, logits_t, seeds, counts, values)
        return result_from_tensors(tuple(out[:n] for out in outputs), params)

    def sample(self, logits_b, logits_t, row_seeds, steps, mix: MixConfig, params: SamplingParams) -> Pending:
        return Ready(self.sample_tensors(logits_b, logits_t, row_seeds, steps, mix, params).to_host())

    def admit(self, requests, row_seeds, steps, mix: MixConfig, params: SamplingParams) -> Pending:
        return self.add_async(requests, row_seeds, steps, mix, params)

    def step(self, slots, tokens, row_seeds, steps, mix: MixConfig, params: SamplingParams) -> Pending:
        return self.decode_and_sample(list(slots), tokens, row_seeds, steps, mix, params).copy_to_host()

    def add_async(
        self, requests: list[SlotRequest], row_seeds: Sequence[int], steps: Sequence[int],
        mix: MixConfig, params: SamplingParams,
    ) -> PendingAdd:  # fmt: skip
        """`add` and the first draw; on CUDA on the prefill stream, so that decode steps issued
        meanwhile (other slots) run beside the prefill instead of waiting for it.

        The new slots join decode steps once `ready()`; until then only the caller's other slots
        may be decoded. Padding rows of both write the scratch slot, which nothing reads back."""
        if self.prefill_stream is None:
            return PendingAdd(self.first_draw(requests, row_seeds, steps, mix, params), None, self.device)
        self.prefill_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.prefill_stream):
            result = self.first_draw(requests, row_seeds, steps, mix, params)
            done = torch.cuda.Event()
            done.record()
        return PendingAdd(result, done, self.device)

    def first_draw(
        self, requests: list[SlotRequest], row_seeds, steps, mix: MixConfig, params: SamplingParams
    ):
        """add + sample; the drawn tokens become the slots' last tokens on the device."""
        result = self.sample_tensors(*self.add(requests), row_seeds, steps, mix, params)
        self.last_tokens[to_device([r.slot for r in requests], self.device)] = result.tokens
        return result

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.base.lengths[slot] = self.teacher.lengths[slot] = 0

    def warmup(self, mix: MixConfig, params: Sequence[SamplingParams]) -> WarmupStats:
        """Capture every small-prefill graph and, per sampling setting, every decode-step graph the
        plan can select, a first draw at every row count one can have (one-token prompts) and a few
        eager prefills; on CUDA only.
        Between calls only: it runs on the scratch slot and the engine's streams."""
        if self.device.type != "cuda":
            return WarmupStats()
        torch.cuda.synchronize(self.device)
        before, start, captures = device_memory(self.device), time.perf_counter(), self.captures
        if self.compile_workers > 1 and parallel_compile_available():
            self.compile_kernels(mix, params)
        self.warm(mix, params)
        torch.cuda.synchronize(self.device)
        grown = [a - b for a, b in zip(device_memory(self.device), before, strict=True)]
        return WarmupStats(time.perf_counter() - start, self.captures - captures, *grown)

    def warm(self, mix: MixConfig, params: Sequence[SamplingParams], dry: bool = False) -> None:
        """The warmup's walk (dry: only compiling, see `compile_kernels`)."""
        for rows, width in self.plan.prefill_shapes():
            self.prefill_graphs.prepare(*self.prefill_graph(rows, width))
        settings = {sampler_key(mix, p, self.vocab_size, self.device): p for p in params}
        for setting in settings.values():
            sampler = self.sampler_for(mix, setting)
            for rows, width in self.plan.decode_shapes():
                self.graphs.prepare(*self.step_graph(rows, width, sampler))
            self.warm_prefills(mix, setting, [(rows, 1) for rows in self.plan.first_draw_rows()], dry)
        self.warm_prefills(mix, next(iter(settings.values())), self.eager_prefill_shapes(), dry)

    def compile_kernels(self, mix: MixConfig, params: Sequence[SamplingParams]) -> None:
        """Walk the warmup once with graphs off and Triton launches only compiling, in parallel
        on threads (precompile.py), so the warmup proper compiles nothing. Its garbage outputs
        stay in the scratch slot, except the last tokens it drew, which are reset. Only settings
        the fused sampler takes: the torch step indexes with what it computed from the
        (unwritten) logits, and has no kernel to compile."""
        params = [p for p in params if uses_fused(mix, p, self.device)]
        if not params:
            return
        enabled = self.graphs.enabled, self.prefill_graphs.enabled
        self.graphs.enabled = self.prefill_graphs.enabled = False
        try:
            with compile_only(self.compile_workers):
                self.warm(mix, params, dry=True)
        finally:
            self.graphs.enabled, self.prefill_graphs.enabled = enabled
            self.synchronize()
            self.last_tokens.zero_()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warm_prefills(
        self, mix: MixConfig, params: SamplingParams, shapes: list[tuple[int, int]], dry: bool = False
    ) -> None:
        """`add_async` of `rows` prompts of `width` tokens into the scratch slot, per shape that
        fits: the prefills (graphed or eager) and the eager sampler meet each kernel variant.
        dry: the draws are not read (no kernel wrote them)."""
        for rows, width in shapes:
            if rows <= self.max_slots and width < self.max_len:
                prompts = [tuple((i + j) % self.vocab_size for j in range(width)) for i in range(rows)]
                requests = [SlotRequest(self.scratch, p, p) for p in prompts]
                pending = self.add_async(requests, [0] * rows, [0] * rows, mix, params)
                if dry:
                    self.synchronize()
                else:
                    pending.to_host()
        self.release([self.scratch])

    def eager_prefill_shapes(self) -> list[tuple[int, int]]:
        """Eager prefill chunks (above the graphs' token budget) of a few row counts and widths,
        one and another residue mod 16 each (Triton specialises integer arguments on those), and
        a chunk of the largest size, so a first call meets no kernel compile, cuBLAS set-up or
        allocator growth of its own."""
        largest = (min(self.max_slots, max(1, self.prefill_tokens // 256)), 250)  # the allocator's blocks
        return [(1, 520), (1, 528), (3, 200), (3, 208), (16, 40), (16, 48), largest]

    # ------------------------------------------------------------------ internals
    def sampler_for(self, mix: MixConfig, params: SamplingParams) -> StepSampler:
        key = sampler_key(mix, params, self.vocab_size, self.device)
        if key not in self.samplers:
            self.samplers[key] = make_step_sampler(mix, params, self.vocab_size, self.device)
        return self.samplers[key]

    def run_step(self, slots: list[int], tokens, row_seeds, steps, sampler: StepSampler | None):
        """Pack inputs, pick the bucket, run the (captured) step, advance the host lengths."""
        batch = len(slots)
        padded = batch_bucket(batch, self.max_slots)
        pos_b = [self.base.lengths[s] for s in slots]
        pos_t = [self.teacher.lengths[s] for s in slots]
        if max(pos_b + pos_t) >= self.max_len:
            raise RuntimeError(f"a sequence reached the KV cache length {self.max_len}")
        on_device = isinstance(tokens, torch.Tensor) and tokens.device.type != "cpu"
        from_host = None if on_device or tokens is None else tokens
        packed = np.zeros((6, padded), dtype=np.int64)  # numpy: lists convert ~5x faster than to torch
        packed[0] = self.scratch
        packed[1] = -1  # -1: the slot's last token on the device
        for row, values in enumerate((slots, from_host, pos_b, pos_t, row_seeds, steps)):
            if values is not None:
                packed[row, :batch] = values
        packed = to_device(torch.from_numpy(packed), self.device)
        if on_device:
            packed[1, :batch] = tokens
        key, fn, scratch = self.step_graph(
            padded, self.plan.decode_width(padded, max(pos_b + pos_t) + 1), sampler
        )
        outputs = self.graphs.run(key, fn, [packed], scratch)
        for s in slots:
            self.base.lengths[s] += 1
            self.teacher.lengths[s] += 1
        return tuple(out[:batch] for out in outputs)

    def scratch_packed(self, padded: int) -> torch.Tensor:
        packed = torch.zeros(6, padded, dtype=torch.long, device=self.device)
        packed[0].fill_(self.scratch)
        return packed
