"""Fused elementwise kernels of the compact model (CUDA): fewer launches per layer inside a graph.

- `rms_norm` / `add_rms_norm`: (residual add +) RMSNorm in one pass per row;
- `rope_store`: split the fused qkv row, optional per-head RMSNorm (Qwen3), RoPE, and write k and
  v straight into the KV cache at (slot, position); returns the rotated q;
- `silu_mul`: silu(gate) * up of the fused gate/up projection.
Invariant: each kernel rounds to the model dtype exactly where transformers' eager code does
(the product of two bf16 values is rounded once, as a PyTorch bf16 op). Triton's fast exp and
rsqrt can still flip a last bit, which later layers carry on: in float32 the fused model equals
the torch one to 1e-4, in bfloat16 to bf16 tolerance (measured on an H200: up to 2 ulps of a logit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rnd(x, like):
    """Round a float32 value to the dtype of the tensor `like` and back (an op's output rounding)."""
    return x.to(like.dtype.element_ty).to(tl.float32)


@triton.jit
def _norm_kernel(
    x_ptr, delta_ptr, w_ptr, x_out_ptr, out_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x = _rnd(x + tl.load(delta_ptr + row * n + cols, mask=ok, other=0.0).to(tl.float32), x_out_ptr)
        tl.store(x_out_ptr + row * n + cols, x, mask=ok)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, w * _rnd(x * r, out_ptr), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., n] -> [..., n], as transformers' RMSNorm."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    block = triton.next_power_of_2(x2.shape[1])
    _norm_kernel[(x2.shape[0],)](x2, x2, weight, x2, out, x2.shape[1], eps, HAS_DELTA=False, BLOCK=block)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, RMSNorm(x + delta)), the residual add rounded as transformers rounds it."""
    x2, d2 = x.reshape(-1, x.shape[-1]).contiguous(), delta.reshape(-1, x.shape[-1]).contiguous()
    x_out, out = torch.empty_like(x2), torch.empty_like(x2)
    block = triton.next_power_of_2(x2.shape[1])
    _norm_kernel[(x2.shape[0],)](x2, d2, weight, x_out, out, x2.shape[1], eps, HAS_DELTA=True, BLOCK=block)
    return x_out.view(x.shape), out.view(x.shape)


@triton.jit
def _head_norm(x1, x2, w_ptr, eps, HALF: tl.constexpr, out_like):
    """Per-head RMSNorm of a head given as its two halves (Qwen3 q/k norm)."""
    r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
    d = tl.arange(0, HALF)
    w1 = tl.load(w_ptr + d).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
    return _rnd(w1 * _rnd(x1 * r, out_like), out_like), _rnd(w2 * _rnd(x2 * r, out_like), out_like)


@triton.jit
def _rope(x1, x2, c, s, out_like):
    """x * cos + rotate_half(x) * sin with transformers' bf16 roundings (each product, then the sum)."""
    o1 = _rnd(_rnd(x1 * c, out_like) + _rnd(-x2 * s, out_like), out_like)
    o2 = _rnd(_rnd(x2 * c, out_like) + _rnd(x1 * s, out_like), out_like)
    return o1, o2


@triton.jit
def _rope_store_kernel(
    qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr,
    stride_cs, stride_ct, stride_ch, eps,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HALF)
    width = (HEADS + 2 * KV_HEADS) * 2 * HALF
    pos = tl.load(pos_ptr + row)
    c = tl.load(cos_ptr + pos * 2 * HALF + d).to(tl.float32)
    s = tl.load(sin_ptr + pos * 2 * HALF + d).to(tl.float32)
    src = qkv_ptr + row * width + head * 2 * HALF
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    if head < HEADS:
        if QK_NORM:
            x1, x2 = _head_norm(x1, x2, qn_ptr, eps, HALF, q_ptr)
        o1, o2 = _rope(x1, x2, c, s, q_ptr)
        dst = q_ptr + (row * HEADS + head) * 2 * HALF
        tl.store(dst + d, o1)
        tl.store(dst + HALF + d, o2)
    else:
        j = head - HEADS
        if QK_NORM:
            x1, x2 = _head_norm(x1, x2, kn_ptr, eps, HALF, k_ptr)
        o1, o2 = _rope(x1, x2, c, s, k_ptr)
        slot = tl.load(slot_ptr + row)
        at = slot * stride_cs + pos * stride_ct + j * stride_ch
        tl.store(k_ptr + at + d, o1)
        tl.store(k_ptr + at + HALF + d, o2)
        v_src = qkv_ptr + row * width + (HEADS + KV_HEADS + j) * 2 * HALF
        tl.store(v_ptr + at + d, tl.load(v_src + d))
        tl.store(v_ptr + at + HALF + d, tl.load(v_src + HALF + d))


def rope_store(qkv, positions, slots, cos, sin, cache_k, cache_v, q_norm, k_norm, eps, heads, kv_heads):
    """qkv [..., (heads + 2 kv) * D] -> rotated q [..., heads, D]; k, v written at (slot, position).

    positions: [...] int64; slots: broadcastable to positions; cache_k/v: [S, L, kv_heads, D].
    """
    dim = cos.shape[-1]
    rows = positions.numel()
    flat_pos = positions.reshape(-1).contiguous()
    flat_slots = slots.expand(positions.shape).reshape(-1).contiguous()  # a view may have stride 0
    q = torch.empty(*positions.shape, heads, dim, dtype=qkv.dtype, device=qkv.device)
    norm_q = q_norm if q_norm is not None else cos
    norm_k = k_norm if k_norm is not None else cos
    _rope_store_kernel[(rows, heads + kv_heads)](
        qkv.reshape(rows, -1).contiguous(), flat_pos, flat_slots, cos, sin, q, cache_k, cache_v, norm_q, norm_k,
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), eps,
        HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2, QK_NORM=q_norm is not None,
    )  # fmt: skip
    return q


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.load(gu_ptr + row * 2 * inter + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=ok, other=0.0).to(tl.float32)
    act = _rnd(g / (1.0 + tl.exp(-g)), out_ptr)
    tl.store(out_ptr + row * inter + cols, act * u, mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 I] (gate, up) -> silu(gate) * up [..., I]."""
    inter = gate_up.shape[-1] // 2
    flat = gate_up.reshape(-1, 2 * inter).contiguous()
    out = torch.empty(flat.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(flat.shape[0], triton.cdiv(inter, block))](flat, out, inter, BLOCK=block)
    return out.view(*gate_up.shape[:-1], inter)
