"""Fused elementwise kernels of the compact model (CUDA): fewer launches per layer inside a graph.

- `rms_norm` / `add_rms_norm`: (residual add +) RMSNorm in one pass per row;
- `rope_store`: split the fused qkv row, optional per-head RMSNorm (Qwen3), RoPE, and write k and
  v straight into the KV cache at (slot, position); returns the rotated q (and k, for prefill);
  one program per row (`roped`, shared with the decode attention kernel, rotates a block of heads);
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
def roped(row_ptr, d, mask, c, sn, w_ptr, eps, D: tl.constexpr, QK_NORM: tl.constexpr, like):
    """Heads [R, D] (row_ptr: each head's start, [R, 1] or a scalar) rotated as transformers does:
    x * cos + rotate_half(x) * sin, after a per-head RMSNorm (Qwen3) where asked, each op rounded
    to the dtype of `like` (each product, then the sum); float32. c, sn: [D] cos and sin at the
    row's position. rotate_half(x)[d] is -x[d + D/2] below D/2 and x[d - D/2] above."""
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)[None, :]
    x = tl.load(row_ptr + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(row_ptr + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        x = _rnd(tl.load(w_ptr + d).to(tl.float32)[None, :] * _rnd(x * r, like), like)
        xp = _rnd(tl.load(w_ptr + partner).to(tl.float32)[None, :] * _rnd(xp * r, like), like)
    return _rnd(_rnd(x * c[None, :], like) + _rnd(sign * xp * sn[None, :], like), like)


@triton.jit
def _rope_store_kernel(
    qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, k_out_ptr, v_out_ptr, qn_ptr, kn_ptr,
    stride_cs, stride_ct, stride_ch, eps,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HPAD: tl.constexpr, KPAD: tl.constexpr, D: tl.constexpr,
    QK_NORM: tl.constexpr, KV_OUT: tl.constexpr,
):  # fmt: skip
    """One program per row, all its heads at once: q heads to q_ptr, k (and v) heads to the cache
    at (slot, position), and with KV_OUT the rotated k and the v heads to k_out_ptr / v_out_ptr too."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)
    pos = tl.load(pos_ptr + row)
    c = tl.load(cos_ptr + pos * D + d).to(tl.float32)
    sn = tl.load(sin_ptr + pos * D + d).to(tl.float32)
    src = qkv_ptr + row * (HEADS + 2 * KV_HEADS) * D
    hq = tl.arange(0, HPAD)[:, None]
    q = roped(src + hq * D, d, hq < HEADS, c, sn, qn_ptr, eps, D, QK_NORM, q_ptr)
    tl.store(q_ptr + (row * HEADS + hq) * D + d[None, :], q, mask=hq < HEADS)
    hk = tl.arange(0, KPAD)[:, None]
    k = roped(src + (HEADS + hk) * D, d, hk < KV_HEADS, c, sn, kn_ptr, eps, D, QK_NORM, k_ptr)
    v = tl.load(src + (HEADS + KV_HEADS + hk) * D + d[None, :], mask=hk < KV_HEADS)
    at = tl.load(slot_ptr + row) * stride_cs + pos * stride_ct + hk * stride_ch + d[None, :]
    tl.store(k_ptr + at, k, mask=hk < KV_HEADS)
    tl.store(v_ptr + at, v, mask=hk < KV_HEADS)
    if KV_OUT:
        out = (row * KV_HEADS + hk) * D + d[None, :]
        tl.store(k_out_ptr + out, k, mask=hk < KV_HEADS)
        tl.store(v_out_ptr + out, v, mask=hk < KV_HEADS)


def rope_store(
    qkv, positions, slots, cos, sin, cache_k, cache_v, q_norm, k_norm, eps, heads, kv_heads, keys=False
):  # fmt: skip
    """qkv [..., (heads + 2 kv) * D] -> rotated q [..., heads, D] (with keys=True, (q, k, v): the
    rotated k and v [..., kv_heads, D] too, contiguous); k, v written at (slot, position).

    positions: [...] int64; slots: broadcastable to positions; cache_k/v: [S, L, kv_heads, D].
    Contiguous positions and slots of positions' shape cost no copy (prefill makes them once).
    """
    dim = cos.shape[-1]
    rows = positions.numel()
    flat_pos = positions.reshape(-1).contiguous()
    flat_slots = slots.expand(positions.shape).reshape(-1).contiguous()  # a view may have stride 0
    q = torch.empty(*positions.shape, heads, dim, dtype=qkv.dtype, device=qkv.device)
    k, v = q, q  # unused pointers unless keys
    if keys:
        k, v = (
            torch.empty(*positions.shape, kv_heads, dim, dtype=qkv.dtype, device=qkv.device) for _ in range(2)
        )
    _rope_store_kernel[(rows,)](
        qkv.reshape(rows, -1).contiguous(), flat_pos, flat_slots, cos, sin, q, cache_k, cache_v, k, v,
        cos if q_norm is None else q_norm, cos if k_norm is None else k_norm,
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), eps,
        HEADS=heads, KV_HEADS=kv_heads, HPAD=triton.next_power_of_2(heads), KPAD=triton.next_power_of_2(kv_heads),
        D=dim, QK_NORM=q_norm is not None, KV_OUT=keys,
    )  # fmt: skip
    return (q, k, v) if keys else q


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
