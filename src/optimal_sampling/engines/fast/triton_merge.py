"""Per-row merges of triton_policy's (row, split) partials into alpha or the diagnostics: one
program per row, in float64, instead of some forty small torch kernels per step (each a few us
inside the step's graph: 5 % of a batch-1 step).

- `entropy_merge_kernel`: both entropies H = log S - T / S and alpha = H_b / (H_b + H_t) clamped
  to [lo, hi], the midpoint where the policies coincide (Jeffreys <= IDENTICAL) or both are one-hot;
- `tilt_merge_kernel`: reverse_kl_symmetry's alpha = KL(t || b) / (KL(t || b) + KL(b || t)),
  clamped, the midpoint where the policies coincide or share no token;
- `diagnostics_merge_kernel`: the ESS ratio and KL(q || base), KL(q || teacher) at the row's
  alpha, written as [3, B] float32 and beside the step's five outputs in the packed [B, 8] rows.
Exponentials of differences of float32 partials are taken in float32 (as the partials carry),
logarithms in float64 (triton_common.log64)."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import log1p, log64, safe
from .triton_row_state import IDENTICAL, NEG_INF

ENTROPY_W = tl.constexpr(7)  # triton_policy.ENTROPY_STATS
TILT_W = tl.constexpr(4)  # triton_policy.TILT_STATS
DIAG_W = tl.constexpr(14)  # triton_policy.DIAG_STATS


@triton.jit
def merged_entropy(at, SPLITS):
    """H from a row's per-split (max, s, t) at `at` (see triton_policy.entropy_update)."""
    top = tl.full([], NEG_INF, tl.float32)
    for sp in range(0, SPLITS):
        top = tl.maximum(top, tl.load(at + sp * ENTROPY_W).to(tl.float32))
    s_sum, t_sum = tl.zeros([], tl.float64), tl.zeros([], tl.float64)
    for sp in range(0, SPLITS):
        m = tl.load(at + sp * ENTROPY_W)
        s, t = tl.load(at + sp * ENTROPY_W + 1), tl.load(at + sp * ENTROPY_W + 2)
        c = tl.exp(m.to(tl.float32) - safe(top)).to(tl.float64)
        shift = tl.where(s > 0, s * (m - safe(top).to(tl.float64)), 0.0)
        s_sum += c * s
        t_sum += c * (t + shift)
    return log64(s_sum) - t_sum / s_sum


@triton.jit
def clamp_or_mid(ratio, lo, hi, same):
    """ratio clamped to [lo, hi]; the midpoint where it is NaN or the row is `same`."""
    mid = 0.5 * (lo + hi)
    alpha = tl.minimum(tl.maximum(tl.where(ratio == ratio, ratio, mid), lo), hi)
    return tl.where(same, mid, alpha).to(tl.float32)


@triton.jit(do_not_specialize=["SPLITS"])
def entropy_merge_kernel(part_ptr, alpha_ptr, lo, hi, SPLITS):
    row = tl.program_id(0).to(tl.int64)
    at = part_ptr + row * SPLITS * ENTROPY_W
    h_b, h_t = merged_entropy(at, SPLITS), merged_entropy(at + 3, SPLITS)
    jeffreys = tl.zeros([], tl.float64)
    for sp in range(0, SPLITS):
        jeffreys += tl.load(at + sp * ENTROPY_W + 6)
    total = h_b + h_t
    same = (jeffreys <= IDENTICAL) | ~(total > 0)
    tl.store(alpha_ptr + row, clamp_or_mid(h_b / tl.where(total > 0, total, 1.0), lo, hi, same))


@triton.jit(do_not_specialize=["SPLITS"])
def tilt_merge_kernel(part_ptr, alpha_ptr, lo, hi, SPLITS):
    """From W, D, A, B (triton_policy.tilt_kernel): log_ratio = log1p(D / W) = M(1) - M(0),
    KL(t || b) = A / (W + D) - log_ratio, KL(b || t) = log_ratio - B / W."""
    row = tl.program_id(0).to(tl.int64)
    at = part_ptr + row * SPLITS * TILT_W
    w, d = tl.zeros([], tl.float64), tl.zeros([], tl.float64)
    a, b = tl.zeros([], tl.float64), tl.zeros([], tl.float64)
    for sp in range(0, SPLITS):
        w += tl.load(at + sp * TILT_W)
        d += tl.load(at + sp * TILT_W + 1)
        a += tl.load(at + sp * TILT_W + 2)
        b += tl.load(at + sp * TILT_W + 3)
    r = d / w
    log_ratio = tl.where(tl.abs(r) < 0.5, log1p(r), log64(1.0 + r))
    kl_tb = a / (w + d) - log_ratio
    kl_bt = log_ratio - b / w
    jeffreys = kl_tb + kl_bt
    same = (jeffreys <= IDENTICAL) | ~(w > 0)
    tl.store(alpha_ptr + row, clamp_or_mid(kl_tb / jeffreys, lo, hi, same))


@triton.jit
def merged_lse(at, SPLITS):
    """log sum_k s_k e^{m_k} over a row's splits ((max, sum) float32 pairs at `at`), float64."""
    top = tl.full([], NEG_INF, tl.float32)
    for sp in range(0, SPLITS):
        top = tl.maximum(top, tl.load(at + sp * DIAG_W))
    total = tl.zeros([], tl.float64)
    for sp in range(0, SPLITS):
        scale = tl.exp(tl.load(at + sp * DIAG_W) - safe(top))
        total += (tl.load(at + sp * DIAG_W + 1) * scale).to(tl.float64)
    return safe(top).to(tl.float64) + log64(total)


@triton.jit(do_not_specialize=["SPLITS", "B"])
def diagnostics_merge_kernel(part_ptr, alpha_ptr, host_ptr, diag_ptr, packed_ptr, B, SPLITS):
    """KL(q || .) from E_q[r - c] and the top token's log-probs (see triton_policy's docstring);
    log ESS ratio = 2 (lse(lp_b) - lse(lp_t)) - (lse(2 lp_b - u) - lse(2 lp_t - u)) on q's support
    (NaN taken as 0: ratio 1)."""
    row = tl.program_id(0).to(tl.int64)
    at = part_ptr + row * SPLITS * DIAG_W
    top = tl.full([], NEG_INF, tl.float32)
    c, lb_top, lt_top = tl.zeros([], tl.float32), tl.zeros([], tl.float32), tl.zeros([], tl.float32)
    for sp in range(0, SPLITS):  # the top token's split (the first on ties): its r, lp_b, lp_t
        m = tl.load(at + sp * DIAG_W)
        better = m > top
        c = tl.where(better, tl.load(at + sp * DIAG_W + 11), c)
        lb_top = tl.where(better, tl.load(at + sp * DIAG_W + 12), lb_top)
        lt_top = tl.where(better, tl.load(at + sp * DIAG_W + 13), lt_top)
        top = tl.maximum(top, m)
    s0, s_r = tl.zeros([], tl.float64), tl.zeros([], tl.float64)
    for sp in range(0, SPLITS):  # sum e^{u - u*} and sum e^{u - u*} (r - c), c the top token's r
        w = tl.exp(tl.load(at + sp * DIAG_W) - safe(top))
        s_sp = tl.load(at + sp * DIAG_W + 1)
        s0 += (s_sp * w).to(tl.float64)
        s_r += (w * (tl.load(at + sp * DIAG_W + 2) + s_sp * (tl.load(at + sp * DIAG_W + 11) - c))).to(
            tl.float64
        )
    log_s0 = log64(s0)
    expected = s_r / s0  # E_q[r - c]
    a = tl.load(alpha_ptr + row).to(tl.float64)
    kl_base = (a * expected - lb_top.to(tl.float64) - log_s0).to(tl.float32)
    kl_teacher = (-(1.0 - a) * expected - lt_top.to(tl.float64) - log_s0).to(tl.float32)
    lse_b2, lse_t2 = merged_lse(at + 3, SPLITS), merged_lse(at + 5, SPLITS)  # of 2 lp - u
    lse_b, lse_t = merged_lse(at + 7, SPLITS), merged_lse(at + 9, SPLITS)  # of lp
    log_ratio = 2.0 * (lse_b - lse_t) - (lse_b2 - lse_t2)
    ess_ratio = tl.exp(tl.where(log_ratio == log_ratio, log_ratio, 0.0).to(tl.float32))
    tl.store(diag_ptr + row, ess_ratio)
    tl.store(diag_ptr + B + row, kl_base)
    tl.store(diag_ptr + 2 * B + row, kl_teacher)
    cols = tl.arange(0, 8)
    host = tl.load(host_ptr + row * 5 + cols, mask=cols < 5, other=0.0)
    diag = tl.where(cols == 5, ess_ratio, tl.where(cols == 6, kl_base, kl_teacher)).to(tl.float64)
    tl.store(packed_ptr + row * 8 + cols, tl.where(cols < 5, host, diag))
