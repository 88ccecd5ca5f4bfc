"""Split-K decode attention in Triton: one query token per row, keys read up to each row's length.

Grid (rows, kv_heads, splits): program (b, h, s) takes the GQA group of query heads of KV head h
(padded to 16 rows for the tensor cores), reads keys [s*chunk, min((s+1)*chunk, length_b)) of slot
slots[b] once (a software-pipelined loop over blocks of keys), and writes a partial (max, sum,
weighted values); a second kernel combines the splits, or with one split the program writes the
output itself. Splits give batch-1 decode enough programs to fill the GPU; rows shorter than a
split's start exit at once, so no key past a row's length is read. Shapes are fixed per
CUDA-graph bucket; lengths are read on the device (graph-safe).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Tuned by benchmarks/attention_sweep.py (an H200: with 64-key blocks, 512 programs and 2 stages
# one layer at batch 256 and context 640 takes 49 us (1.5B) / 29 us (0.5B), against 56 / 34 us
# with 32-key blocks at this size and 528 programs, whose two splits need the merge kernel; at
# batch 1, 6.1 / 5.3 us against 5.6 / 5.4 us).
BLOCK_N = 64  # keys per step of a split
GROUP_PAD = 16
PROGRAMS = 512  # split programs to aim for: one split (no merge) from batch 256 x 2 KV heads on
WARPS = 4
STAGES = 2  # software-pipelining depth of the key loop


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    stride_qb, stride_qh, stride_ks, stride_kt, stride_kh, stride_ob, chunk, scale,
    GROUPS: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    length = tl.load(lengths_ptr + b)
    g = tl.arange(0, GPAD)
    d = tl.arange(0, D)
    head = h * GROUPS + g
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUPS, other=0.0
    )
    m_i = tl.full([GPAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GPAD], tl.float32)
    acc = tl.zeros([GPAD, D], tl.float32)
    start = s * chunk
    end = tl.minimum(start + chunk, length)
    base = slot * stride_ks + h * stride_kh
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
    if SPLITS == 1:  # the whole row in one program: write the output, no merge kernel
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        at = out_ptr + b * stride_ob + head[:, None] * D + d[None, :]
        tl.store(at, out.to(out_ptr.dtype.element_ty), mask=g[:, None] < GROUPS)
    else:
        part = (b * tl.num_programs(1) + h) * SPLITS + s
        tl.store(m_ptr + part * GPAD + g, m_i)
        tl.store(l_ptr + part * GPAD + g, l_i)
        tl.store(acc_ptr + (part * GPAD + g[:, None]) * D + d[None, :], acc)


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob,
    KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    b, head = tl.program_id(0), tl.program_id(1)
    h, g = head // GROUPS, head % GROUPS
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    rows = ((b * KV_HEADS + h) * SPLITS + sp) * GPAD + g  # [SPLITS]
    m = tl.load(m_ptr + rows)
    l = tl.load(l_ptr + rows)  # noqa: E741
    acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :])  # [SPLITS, D]
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    total = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out_ptr + b * stride_ob + head * D + d, out.to(out_ptr.dtype.element_ty))


def split_plan(batch: int, kv_heads: int, width: int, programs: int | None = None) -> tuple[int, int]:
    """(splits, chunk): enough programs to fill the GPU, chunks a multiple of the block, splits a power of 2."""
    want = max(1, math.ceil((programs or PROGRAMS) / (batch * kv_heads)))
    most = max(1, math.ceil(width / BLOCK_N))
    splits = 1 << (min(want, most) - 1).bit_length()
    chunk = math.ceil(math.ceil(width / splits) / BLOCK_N) * BLOCK_N
    return splits, chunk


def decode_attention_triton(q, cache_k_layer, cache_v_layer, slots, lengths, width: int) -> torch.Tensor:
    """Same contract as attention.decode_attention_sdpa: q [B, heads, D] -> [B, heads * D]."""
    batch, heads, dim = q.shape
    kv_heads = cache_k_layer.shape[2]
    groups = heads // kv_heads
    assert groups <= GROUP_PAD and cache_k_layer.stride(-1) == 1 and q.stride(-1) == 1
    splits, chunk = split_plan(batch, kv_heads, width)
    parts = batch * kv_heads * splits * GROUP_PAD if splits > 1 else 1
    m = torch.empty(parts, device=q.device, dtype=torch.float32)
    l = torch.empty(parts, device=q.device, dtype=torch.float32)  # noqa: E741
    acc = torch.empty(parts, dim, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, heads * dim, device=q.device, dtype=q.dtype)
    _split_kernel[(batch, kv_heads, splits)](
        q, cache_k_layer, cache_v_layer, slots, lengths, m, l, acc, out,
        q.stride(0), q.stride(1), cache_k_layer.stride(0), cache_k_layer.stride(1), cache_k_layer.stride(2),
        out.stride(0), chunk, 1.0 / math.sqrt(dim), GROUPS=groups, GPAD=GROUP_PAD, D=dim,
        BN=BLOCK_N, SPLITS=splits, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        STAGES=STAGES, num_warps=WARPS,
    )  # fmt: skip
    if splits == 1:
        return out
    _combine_kernel[(batch, heads)](
        m, l, acc, out, out.stride(0), KV_HEADS=kv_heads, GROUPS=groups, GPAD=GROUP_PAD, D=dim, SPLITS=splits
    )
    return out
