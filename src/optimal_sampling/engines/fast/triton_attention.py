"""Split-K decode attention in Triton: one query token per row, keys read up to each row's length.

Grid (rows, kv_heads, splits): program (b, h, s) takes the GQA group of query heads of KV head h
(padded to 16 rows for the tensor cores), reads keys [s*chunk, min((s+1)*chunk, length_b)) of slot
slots[b] once (a software-pipelined loop over blocks of keys), and writes a partial (max, sum,
weighted values); the last split program of (b, h) to finish, as counted by an atomic counter,
merges the partials and writes the output (no second kernel: one launch fewer per layer), and
resets the counter for the next launch. With one split the program writes the output directly.
Splits give batch-1 decode enough programs to fill the GPU; rows shorter than a split's start
exit at once, so no key past a row's length is read. Shapes are fixed per CUDA-graph bucket;
lengths are read on the device (graph-safe).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_layers import roped

# Tuned by benchmarks/attention_sweep.py on an H200 (this kernel with RoPE and the in-kernel merge,
# 2026-11-27 device run 8): 64-key blocks, 128 programs, at most 16 splits. One layer at context
# 320, batch 16 / 64 / 128: 8.7 / 11.0 / 15.8 us (1.5B) and 7.2 / 8.2 / 9.7 us (0.5B), against
# 10.0 / 11.2 / 16.0 and 8.2 / 9.0 / 11.2 us aiming at 512 programs (more splits, more to merge);
# batch 1 and 256 alike. Batch 16 at context 2048 is slower (17.8 against 15.6 us, 1.5B).
BLOCK_N = 64  # keys per step of a split
GROUP_PAD = 16
PROGRAMS = 128  # split programs to aim for: one split from batch 64 x 2 KV heads on
MAX_SPLITS = 16  # a power of two: the last split merges them all, so long rows take longer splits
WARPS = 4
STAGES = 2  # software-pipelining depth of the key loop


@triton.jit(do_not_specialize=["splits"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, count_ptr,
    cos_ptr, sin_ptr, qn_ptr, kn_ptr, eps,
    stride_qb, stride_qh, stride_ks, stride_kt, stride_kh, stride_ob, chunk, scale, splits,
    GROUPS: tl.constexpr, GPAD: tl.constexpr, MPAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
    MERGE: tl.constexpr, MAX_PARTS: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
    ROPE: tl.constexpr, HEADS: tl.constexpr, QK_NORM: tl.constexpr,
):  # fmt: skip
    """splits: the grid's third size, a run-time value (one compiled variant for every split count
    above 1, MERGE, and one for a single split), at most MAX_PARTS.
    ROPE: q_ptr is the projection's qkv rows and lengths_ptr each row's position: the program
    rotates its q heads and the step's key itself, reads the cached keys before the position, adds
    the step's key and value from registers, and the split holding the position writes them to the
    cache (one kernel instead of RoPE + cache write, then attention). Else q is rotated already and
    the cache holds the step's key."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    g = tl.arange(0, GPAD)
    d = tl.arange(0, D)
    head = h * GROUPS + g
    start = s * chunk
    base = slot * stride_ks + h * stride_kh
    if ROPE:
        pos = tl.load(lengths_ptr + b)
        cached = pos  # the keys before this step's are in the cache
        c = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        sn = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        row = q_ptr + b * stride_qb
        q_rows = row + head[:, None] * D
        q = roped(q_rows, d, g[:, None] < GROUPS, c, sn, qn_ptr, eps, D, QK_NORM, k_ptr).to(
            k_ptr.dtype.element_ty
        )
        k_new = roped(row + (HEADS + h) * D, d, d[None, :] < D, c, sn, kn_ptr, eps, D, QK_NORM, k_ptr)
        v_new = tl.load(row + (HEADS + tl.num_programs(1) + h) * D + d[None, :])  # [1, D]
    else:
        cached = tl.load(lengths_ptr + b)
        q = tl.load(
            q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :],
            mask=g[:, None] < GROUPS,
            other=0.0,
        )
    m_i = tl.full([GPAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GPAD], tl.float32)
    acc = tl.zeros([GPAD, D], tl.float32)
    end = tl.minimum(start + chunk, cached)
    blocks = tl.cdiv(tl.maximum(end - start, 0), BN)  # read on the device: graph-stable
    for i in tl.range(0, blocks, num_stages=STAGES):  # software-pipelined: the next keys load meanwhile
        t = start + i * BN + tl.arange(0, BN)
        ok = t < end
        offs = base + t[:, None].to(tl.int64) * stride_kt + d[None, :]
        k = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GPAD, BN]
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        corr = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    if ROPE:
        if (pos >= start) & (pos < start + chunk):  # this split holds the step's own key
            at = base + pos.to(tl.int64) * stride_kt + d[None, :]
            tl.store(k_ptr + at, k_new.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + at, v_new)
            k_new = k_new.to(k_ptr.dtype.element_ty).to(tl.float32)  # as read back from the cache
            s_new = tl.sum(q.to(tl.float32) * k_new, axis=1) * scale  # [GPAD]
            m_new = tl.maximum(m_i, s_new)
            corr = tl.exp(m_i - m_new)
            p = tl.exp(s_new - m_new)
            l_i = l_i * corr + p
            p_v = p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)  # p rounded as for the dot
            acc = acc * corr[:, None] + p_v
            m_i = m_new
    if not MERGE:  # the whole row in one program: write the output, no merge
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        at = out_ptr + b * stride_ob + head[:, None] * D + d[None, :]
        tl.store(at, out.to(out_ptr.dtype.element_ty), mask=g[:, None] < GROUPS)
    else:
        first = (b * tl.num_programs(1) + h) * splits  # this (row, KV head)'s partials
        part = first + s
        tl.store(m_ptr + part * GPAD + g, m_i)
        tl.store(l_ptr + part * GPAD + g, l_i)
        tl.store(acc_ptr + (part * GPAD + g[:, None]) * D + d[None, :], acc, mask=g[:, None] < MPAD)
        tl.debug_barrier()  # every thread's partial is stored before the count releases it
        counter = count_ptr + b * tl.num_programs(1) + h
        if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:  # the last split to finish
            row_out = out_ptr + b * stride_ob
            _merge(m_ptr, l_ptr, acc_ptr, row_out, first, h, splits, GROUPS, GPAD, MPAD, D, MAX_PARTS)
            tl.atomic_xchg(counter, 0)  # ready for the next launch (the next layer or step)


@triton.jit
def _merge(
    m_ptr, l_ptr, acc_ptr, out_ptr, first, h, splits,
    GROUPS: tl.constexpr, GPAD: tl.constexpr, MPAD: tl.constexpr, D: tl.constexpr, MAX_PARTS: tl.constexpr,
):  # fmt: skip
    """The GROUPS heads of KV head h: the splits' partials merged (log-sum-exp weights), over MPAD
    (GROUPS rounded up to a power of two) rows, not the GPAD of the tensor-core tiles; reads bypass
    L1 (.cg), as other programs wrote them."""
    g = tl.arange(0, MPAD)
    d = tl.arange(0, D)
    sp = tl.arange(0, MAX_PARTS)[:, None]
    at = m_ptr + (first + sp) * GPAD + g[None, :]
    m_max = tl.max(tl.load(at, mask=sp < splits, other=float("-inf"), cache_modifier=".cg"), axis=0)
    total = tl.zeros([MPAD], tl.float32)
    out = tl.zeros([MPAD, D], tl.float32)
    for i in range(0, splits):  # a loop over [MPAD, D] tiles, not one [splits, MPAD, D] tensor
        m = tl.load(m_ptr + (first + i) * GPAD + g, cache_modifier=".cg")
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
        total += tl.load(l_ptr + (first + i) * GPAD + g, cache_modifier=".cg") * w
        part = tl.load(acc_ptr + ((first + i) * GPAD + g[:, None]) * D + d[None, :], cache_modifier=".cg")
        out += part * w[:, None]
    out = out / tl.where(total > 0, total, 1.0)[:, None]
    at = out_ptr + (h * GROUPS + g[:, None]) * D + d[None, :]
    tl.store(at, out.to(out_ptr.dtype.element_ty), mask=g[:, None] < GROUPS)


def split_plan(batch: int, kv_heads: int, width: int, programs: int | None = None) -> tuple[int, int]:
    """(splits, chunk): enough programs to fill the GPU, chunks a multiple of the block, splits a power of 2."""
    want = max(1, math.ceil((programs or PROGRAMS) / (batch * kv_heads)))
    most = max(1, min(MAX_SPLITS, math.ceil(width / BLOCK_N)))
    splits = 1 << (min(want, most) - 1).bit_length()
    chunk = math.ceil(math.ceil(width / splits) / BLOCK_N) * BLOCK_N
    return splits, chunk


def decode_attention_triton(
    q, cache_k_layer, cache_v_layer, slots, lengths, width: int, counters: torch.Tensor | None = None
) -> torch.Tensor:
    """Same contract as attention.decode_attention_sdpa: q [B, heads, D] -> [B, heads * D].

    counters: int32 zeros, at least B * kv_heads, left zero by every launch (the engine keeps one
    per model, so a captured graph needs no memset); None allocates them."""
    batch, heads, dim = q.shape
    assert q.stride(-1) == 1
    return _launch(
        q, q.stride(0), q.stride(1), heads, cache_k_layer, cache_v_layer, slots, lengths, width, counters
    )


def rope_decode_attention(
    qkv, heads: int, cos, sin, q_norm, k_norm, eps: float, cache_k_layer, cache_v_layer, slots, positions,
    width: int, counters: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """RoPE (after Qwen3's q/k norms where given), the cache write of the step's key and value, and
    decode attention in one kernel: qkv [B, (heads + 2 kv_heads) * D] (the projection's output),
    positions [B] (where the step's key goes) -> [B, heads * D]; what rope_store then
    decode_attention_triton compute."""
    dim = cos.shape[-1]
    qkv = qkv.contiguous()
    tables = dict(cos=cos, sin=sin, q_norm=q_norm, k_norm=k_norm, eps=eps)
    return _launch(
        qkv,
        qkv.stride(0),
        dim,
        heads,
        cache_k_layer,
        cache_v_layer,
        slots,
        positions,
        width,
        counters,
        tables,
    )


def _launch(q, stride_qb, stride_qh, heads, cache_k, cache_v, slots, lengths, width, counters, rope=None):
    batch, dim, kv_heads = q.shape[0], cache_k.shape[-1], cache_k.shape[2]
    groups = heads // kv_heads
    assert groups <= GROUP_PAD and cache_k.stride(-1) == 1
    splits, chunk = split_plan(batch, kv_heads, width)
    parts = batch * kv_heads * splits * GROUP_PAD if splits > 1 else 1
    if counters is None:
        counters = torch.zeros(batch * kv_heads, dtype=torch.int32, device=q.device)
    assert counters.numel() >= batch * kv_heads and counters.dtype == torch.int32
    m = torch.empty(parts, device=q.device, dtype=torch.float32)
    l = torch.empty(parts, device=q.device, dtype=torch.float32)  # noqa: E741
    acc = torch.empty(parts, dim, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, heads * dim, device=q.device, dtype=q.dtype)
    tables = rope or {}
    cos = tables.get("cos", m)  # unused pointers without RoPE
    q_norm = tables.get("q_norm")
    k_norm = tables.get("k_norm")
    _split_kernel[(batch, kv_heads, splits)](
        q, cache_k, cache_v, slots, lengths, m, l, acc, out, counters,
        cos, tables.get("sin", m), m if q_norm is None else q_norm, m if k_norm is None else k_norm,
        tables.get("eps", 0.0), stride_qb, stride_qh, cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        out.stride(0), chunk, 1.0 / math.sqrt(dim), splits, GROUPS=groups, GPAD=GROUP_PAD,
        MPAD=triton.next_power_of_2(groups), D=dim, BN=BLOCK_N, MERGE=splits > 1,
        MAX_PARTS=triton.next_power_of_2(MAX_SPLITS), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        STAGES=STAGES, ROPE=rope is not None, HEADS=heads, QK_NORM=q_norm is not None, num_warps=WARPS,
    )  # fmt: skip
    return out
