"""Triton helpers the fused sampler's passes share: online log-sum-exp, tempering, series."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_row_state import NEG_INF


@triton.jit
def mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def safe(m):
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def expm1(d):
    """exp(d) - 1 for |d| < 0.1 to ~1e-9 relative (Taylor: exp(d) - 1 cancels there)."""
    return d * (1.0 + d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0)))))


@triton.jit
def tempered(raw_b, raw_t, inv_temp):
    """z_b / T, z_t / T, d = (z_t - z_b) / T and the joint support; on it z_t / T is z_b / T + d."""
    joint = (raw_b > NEG_INF) & (raw_t > NEG_INF)
    d = tl.where(joint, (raw_t - raw_b) * inv_temp, 0.0)
    zb = raw_b * inv_temp
    zt = tl.where(joint, zb + d, raw_t * inv_temp)
    return zb, zt, d, joint


@triton.jit
def fetch(zb_ptr, zt_ptr, idx, end):
    """Issue the loads of the block at idx, unconverted: the loop uses them one step later, so
    the next block's memory latency hides behind this block's arithmetic."""
    ok = idx < end
    return tl.load(zb_ptr + idx, mask=ok, other=NEG_INF), tl.load(zt_ptr + idx, mask=ok, other=NEG_INF)


@triton.jit
def online(m, s, x):
    """Per-lane running max m and sum s of exp(. - m) after x; also exp(-|x - m|) and x > m."""
    m_new = tl.maximum(m, x)
    t = tl.exp(tl.minimum(m, x) - safe(m_new))
    up = x > m
    return m_new, tl.where(up, s * t + 1.0, s + t), t, up


@triton.jit
def reduce_lanes(m, s):
    """Reduce per-lane (max, sum) [BLOCK] to one (max, sum), and the lanes' rescale factors."""
    top = tl.max(m)
    scale = tl.exp(m - safe(top))
    return top, tl.sum(s * scale), scale


@triton.jit
def merge_lse(m, s, m_b, s_b):
    m_new = tl.maximum(m, m_b)
    return m_new, s * tl.exp(m - safe(m_new)) + s_b * tl.exp(m_b - safe(m_new))


@triton.jit
def lse(m, s):
    return tl.where(s > 0, m + tl.log(s), NEG_INF)


@triton.jit
def grid(j, lo, hi, K: tl.constexpr, FIRST_IN: tl.constexpr, ZERO_AT: tl.constexpr, ONE_AT: tl.constexpr):
    """Grid points: K - FIRST_IN evenly spaced over [lo, hi] at FIRST_IN.., and 0 and 1 before them
    where the bracket lacks them."""
    steps = K - 1 - FIRST_IN
    even = lo + (hi - lo) * (j - FIRST_IN).to(tl.float32) / steps
    pts = tl.where(j == FIRST_IN, lo, tl.where(j == K - 1, hi, even))
    pts = tl.where((j == ZERO_AT) & (j < FIRST_IN), 0.0, pts)
    return tl.where((j == ONE_AT) & (j < FIRST_IN), 1.0, pts)


@triton.jit
def log1p(r):
    """log(1 + r) in float64 for |r| < 0.5 (atanh series, ~1e-13), else float32 log."""
    y = r / (2.0 + r)
    y2 = y * y
    series = (
        2.0
        * y
        * (
            1.0
            + y2
            * (
                1.0 / 3
                + y2
                * (
                    1.0 / 5
                    + y2
                    * (
                        1.0 / 7
                        + y2
                        * (
                            1.0 / 9
                            + y2 * (1.0 / 11 + y2 * (1.0 / 13 + y2 * (1.0 / 15 + y2 * (1.0 / 17 + y2 / 19))))
                        )
                    )
                )
            )
        )
    )
    return tl.where(tl.abs(r) < 0.5, series, tl.log(1.0 + r.to(tl.float32)).to(tl.float64))  # fmt: skip


@triton.jit
def log64(x):
    """log(x) in float64 for normal x >= 0 (Triton's log is float32 only): x = m 2^e with m in
    [sqrt(1/2), sqrt(2)), log m by log1p's series (~1e-13); 0 gives -inf, +inf +inf, NaN or x < 0 NaN."""
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)  # [1, 2)
    big = m > 1.4142135623730951
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    ln2 = tl.full([], 0.6931471805599453, tl.float64)  # a float literal would be rounded to float32
    out = e.to(tl.float64) * ln2 + log1p(m - 1.0)
    return tl.where(x > 0, tl.where(x == float("inf"), x, out), tl.where(x == 0, float("-inf"), float("nan")))
