"""The ess_balance alpha passes of the fused sampler: the tilted family's log-normaliser at 2 - a
and -a for a few alphas a per row, in one read of both logit rows per pass, and a per-row merge
that narrows each row's bracket.

With d = (z_t - z_b) / T on the joint support S, centred at the row state's CENTRE (d' = d - c),
and pi_b's weights p relative to their lane maximum, L(s) = log sum_S p e^{s d'} / sum_S p; the
ESS balance (mixing.alpha._ess_balance) is g(a) = L(2 - a) - L(-a) - 2 L(1) = 0, g decreasing,
and g'(a) = E_{-a}[d'] - E_{2-a}[d'] (E_s: the mean under p e^{s d'}). Each point is summed two ways:
- precise: D = sum p expm1(s d') and Q = sum p e^{s d'} relative to the base weights' running
  maximum (one exp per token for p, one for e^{d'}, one per alpha for e^{-a d'}; e^{(2-a) d'} is
  e^{2 d'} e^{-a d'}, its expm1 the product rule of the two). L = log1p(D / sum p) keeps the tiny g of
  nearly identical policies (expm1 is a Taylor series where s d' is small). It may overflow or
  lose mass to underflow where |d'| is large;
- robust: an online log-sum-exp of lp_b + s d' with the sum of e d' (the moments E_s[d']).
The merge takes the precise L where it is finite and |d'| <= PRECISE_RANGE on the row, or where it
agrees with the robust one to its rounding, else the robust L. A row within PRECISE_RANGE (the row
pass measures its d range) sums the precise terms alone, with the moments from them and no running
maximum: about half the arithmetic of both kinds, and most rows of real models are such rows.

The grid pass evaluates J alphas evenly spaced over [lo, hi] and s = 1 (L(1), and the Jeffreys
divergence E_1[d'] - E_0[d'] that marks identical policies), and sets each row's outcome:
the midpoint where the policies coincide (or d is constant on S, or S is empty), lo where
g(lo) <= 0, hi where g(hi) >= 0, else the bracket of the sign change. Each refining pass evaluates
Newton from both ends, the secant and the root of the cubic Hermite interpolant of the ends, and
narrows the bracket; the last merge writes alpha as the Hermite root of the final bracket. Rows whose
bracket is narrower than DONE_WIDTH or whose Newton step from an end is below 1e-7 skip the passes
left. Partial sums are float32 per lane and merged in float64.
Invariant, as for the other passes: logits are finite or -inf; q lives on the joint support.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import expm1, fetch, log1p, safe, tempered
from .triton_row_state import CENTRE, D_MAX, D_MIN, IDENTICAL, LSE_B, NEG_INF, STATE_W
from .triton_solve import converged, inside, narrow

STATS = 5  # per (row, split, alpha, end of the pair): robust max, sum e, sum e d'; precise D, Q
EXTRAS = 9  # per (row, split): m, P, P1 of the base weights; grid pass: s = 1's five sums and R1
STATE = 9  # per row, float64: the bracket and its ends, L(1), the outcome, done
PRECISE_RANGE = 25.0  # |d'| up to this: e^{3 |d'|} < 1e33, so no precise term overflows
STATS_W = tl.constexpr(STATS)
EXTRAS_W = tl.constexpr(EXTRAS)
STATE_W_ESS = tl.constexpr(STATE)
RANGE = tl.constexpr(PRECISE_RANGE)
# state columns
LEFT = tl.constexpr(0)
RIGHT = tl.constexpr(1)
F_LEFT = tl.constexpr(2)  # f = -g, increasing; fp = -g' >= 0
F_RIGHT = tl.constexpr(3)
FP_LEFT = tl.constexpr(4)
FP_RIGHT = tl.constexpr(5)
L_ONE = tl.constexpr(6)
OUTCOME = tl.constexpr(7)  # 0 root inside, 1 at lo, 2 at hi, 3 identical policies or empty support
DONE = tl.constexpr(8)


@triton.jit
def d_range(st):
    """The row's largest and smallest d' = d - centre on the joint support (row pass, D_RANGE)
    and whether |d'| stays within PRECISE_RANGE (also for an empty support: -inf, +inf)."""
    centre = tl.load(st + CENTRE)
    d_hi, d_lo = tl.load(st + D_MAX) - centre, tl.load(st + D_MIN) - centre
    return d_hi, d_lo, tl.maximum(d_hi, -d_lo) <= RANGE


@triton.jit
def grid_alphas(j, lo, hi, J: tl.constexpr):
    return tl.where(j == J - 1, hi, lo + (hi - lo) * j.to(tl.float32) / (J - 1))


@triton.jit
def pass_alphas(alphas_ptr, done_ptr, row, j, lo, hi, J: tl.constexpr, GRID: tl.constexpr):
    """A pass's alphas (the grid pass's are evenly spaced, the others the merge wrote) and whether
    the row still needs them (a refining pass skips rows already done)."""
    if GRID:
        a = grid_alphas(j, lo, hi, J)
        live = tl.full([], 1, tl.int1)
    else:
        a = tl.load(alphas_ptr + row * J + j)
        live = tl.load(done_ptr) == 0
    return a, live


@triton.jit
def tilt_update(m, s, t, x, v):
    """Per lane: running max m of x, s = sum exp(x - m), t = sum exp(x - m) v."""
    m_new = tl.maximum(m, x)
    e = tl.exp(tl.minimum(m, x) - safe(m_new))
    up = x > m
    return m_new, tl.where(up, s * e + 1.0, s + e), tl.where(up, t * e + v, t + e * v)


@triton.jit
def store_robust(out, m, s, t):
    """Reduce [J, BLOCK] lanes of (max, sum e, sum e d') to J triples."""
    top = tl.max(m, axis=1)
    scale = tl.exp(m - safe(top)[:, None])
    tl.store(out, top.to(tl.float64))
    tl.store(out + 1, tl.sum((s * scale).to(tl.float64), axis=1))
    tl.store(out + 2, tl.sum((t * scale).to(tl.float64), axis=1))


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def ess_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, lo, hi, state_ptr, ess_ptr,
    alphas_ptr, part_ptr, extra_ptr,
    SPLITS, J: tl.constexpr, GRID: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, chunk): precise and robust sums at s = 2 - a and s = -a for J alphas a (and s = 1
    on the grid pass). A row already done skips the pass, stores included. A row whose |d'| stays
    within PRECISE_RANGE (the row pass's d range) takes the precise sums alone (narrow_sums), the
    others both kinds (wide_sums)."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    st = state_ptr + row * STATE_W
    j = tl.arange(0, J)
    a, live = pass_alphas(alphas_ptr, ess_ptr + row * STATE_W_ESS + DONE, row, j, lo, hi, J, GRID)
    ex = extra_ptr + (row * SPLITS + split) * EXTRAS_W + tl.arange(0, 1)
    out = part_ptr + ((row * SPLITS + split) * J + j) * (2 * STATS_W)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    d_hi, d_lo, narrow_row = d_range(st)
    if narrow_row:
        narrow_sums(zb_ptr, zt_ptr, V, chunk, n_blocks, inv_temp, st, a, live, split, ex, out, J, GRID, BLOCK)
    else:
        wide_sums(zb_ptr, zt_ptr, V, chunk, n_blocks, inv_temp, st, a, live, split, ex, out, J, GRID, BLOCK)


@triton.jit
def narrow_sums(
    zb_ptr, zt_ptr, V, chunk, n_blocks, inv_temp, st, a, live, split, ex, out,
    J: tl.constexpr, GRID: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The precise sums of a row with |d'| <= PRECISE_RANGE, with the moments from the same terms
    and the robust columns filled from them (Q = P + D, maximum 0). The base weights are p = pi_b
    on S as they are (no running maximum): every term stays below e^{2 PRECISE_RANGE}, and a weight
    that underflows (lp_b < -87) adds less than e^{-37} to sums of at least pi_b's top weight (>= 1 / V,
    whose d' is 0: the centre)."""
    lse_b = tl.load(st + LSE_B).to(tl.float32)
    centre = tl.load(st + CENTRE).to(tl.float32)
    lanes = tl.arange(0, BLOCK)[None, :]
    zero, zeros = tl.zeros([1, BLOCK], tl.float32), tl.zeros([J, BLOCK], tl.float32)
    p_sum, p_d, dm1, r1 = zero, zero, zero, zero  # sum p, sum p d', s = 1: D and sum p e^{d'} d'
    dm_lo, t_lo, dm_hi, t_hi = zeros, zeros, zeros, zeros  # per alpha: D and sum p e^{s d'} d'
    a_lo = -a[:, None]
    blocks = tl.where(live, n_blocks, 0)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        zb, _, d, joint = tempered(raw_b, raw_t, inv_temp)
        p = tl.exp(tl.where(joint, zb - lse_b, NEG_INF))  # pi_b on S, 0 off it
        dc = tl.where(joint, d - centre, 0.0)
        pd = p * dc
        p_sum += p
        p_d += pd
        ex1 = tl.exp(dc)
        em1 = tl.where(tl.abs(dc) < 0.1, expm1(dc), ex1 - 1.0)
        em2 = em1 * (2.0 + em1)
        pd2 = pd * (ex1 * ex1)
        sd = a_lo * dc
        ex_lo = tl.exp(sd)
        em_lo = tl.where(tl.abs(sd) < 0.1, expm1(sd), ex_lo - 1.0)
        dm_lo += p * em_lo
        t_lo += pd * ex_lo
        dm_hi += p * (em2 + em_lo + em2 * em_lo)
        t_hi += pd2 * ex_lo
        if GRID:
            dm1 += p * em1
            r1 += pd * ex1
    if live:
        total = tl.sum(p_sum.to(tl.float64), axis=1)  # [1]
        tl.store(ex, tl.zeros_like(total))  # the weights' scale: e^0 in every split of the row
        tl.store(ex + 1, total)
        tl.store(ex + 2, tl.sum(p_d.to(tl.float64), axis=1))
        store_narrow(out, total, tl.sum(dm_lo.to(tl.float64), axis=1), tl.sum(t_lo.to(tl.float64), axis=1))
        store_narrow(
            out + STATS_W, total, tl.sum(dm_hi.to(tl.float64), axis=1), tl.sum(t_hi.to(tl.float64), axis=1)
        )
        if GRID:
            r1_sum = tl.sum(r1.to(tl.float64), axis=1)  # the robust moment and R1 alike
            store_narrow(ex + 3, total, tl.sum(dm1.to(tl.float64), axis=1), r1_sum)
            tl.store(ex + 8, r1_sum)


@triton.jit
def store_narrow(out, p, dm, t):
    """One point's five sums from the precise ones: robust (0, Q, sum p e^{s d'} d'), precise (D, Q)."""
    tl.store(out, tl.zeros_like(dm))
    tl.store(out + 1, p + dm)
    tl.store(out + 2, t)
    tl.store(out + 3, dm)
    tl.store(out + 4, p + dm)


@triton.jit
def wide_sums(
    zb_ptr, zt_ptr, V, chunk, n_blocks, inv_temp, st, a, live, split, ex, out,
    J: tl.constexpr, GRID: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Both kinds of sums, the base weights relative to each lane's running maximum."""
    a_lo, a_hi = -a[:, None], 2.0 - a[:, None]
    lse_b = tl.load(st + LSE_B).to(tl.float32)
    centre = tl.load(st + CENTRE).to(tl.float32)
    lanes = tl.arange(0, BLOCK)[None, :]
    zero, none = tl.zeros([1, BLOCK], tl.float32), tl.full([1, BLOCK], NEG_INF, tl.float32)
    zeros, nones = tl.zeros([J, BLOCK], tl.float32), tl.full([J, BLOCK], NEG_INF, tl.float32)
    m0, p_sum, p_d = none, zero, zero  # the base weights: running max, sum p, sum p d'
    m1, s1, t1, dm1, q1, r1 = none, zero, zero, zero, zero, zero  # s = 1, with R1 = sum p e^{d'} d'
    m_lo, s_lo, t_lo, dm_lo, q_lo = nones, zeros, zeros, zeros, zeros  # s = -a: robust, then precise
    m_hi, s_hi, t_hi, dm_hi, q_hi = nones, zeros, zeros, zeros, zeros  # s = 2 - a
    blocks = tl.where(live, n_blocks, 0)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        zb, _, d, joint = tempered(raw_b, raw_t, inv_temp)
        y0 = tl.where(joint, zb - lse_b, NEG_INF)  # lp_b on S, -inf off it
        dc = tl.where(joint, d - centre, 0.0)
        # base weights p relative to the lane's running max (one exp): keep rescales the sums
        m_new = tl.maximum(m0, y0)
        e0 = tl.exp(tl.minimum(m0, y0) - safe(m_new))
        up = y0 > m0
        p, keep = tl.where(up, 1.0, e0), tl.where(up, e0, 1.0)
        m0 = m_new
        p_sum = p_sum * keep + p
        p_d = p_d * keep + p * dc
        # precise: expm1 at s = 1, 2 and -a; at 2 - a by (1 + x)(1 + y) - 1 = x + y + x y
        ex1 = tl.exp(dc)
        em1 = tl.where(tl.abs(dc) < 0.1, expm1(dc), ex1 - 1.0)
        em2 = em1 * (2.0 + em1)
        sd = a_lo * dc
        ex_lo = tl.exp(sd)
        em_lo = tl.where(tl.abs(sd) < 0.1, expm1(sd), ex_lo - 1.0)
        dm_lo = dm_lo * keep + p * em_lo
        q_lo = q_lo * keep + p * ex_lo
        dm_hi = dm_hi * keep + p * (em2 + em_lo + em2 * em_lo)
        q_hi = q_hi * keep + p * ((ex1 * ex1) * ex_lo)
        # robust: online log-sum-exp of lp_b + s d' with its first moment
        m_lo, s_lo, t_lo = tilt_update(m_lo, s_lo, t_lo, y0 + sd, dc)
        m_hi, s_hi, t_hi = tilt_update(m_hi, s_hi, t_hi, y0 + a_hi * dc, dc)
        if GRID:
            dm1 = dm1 * keep + p * em1
            q1 = q1 * keep + p * ex1
            r1 = r1 * keep + p * ex1 * dc
            m1, s1, t1 = tilt_update(m1, s1, t1, y0 + dc, dc)
    if live:
        top0 = tl.max(m0, axis=1)  # [1]
        c0 = tl.exp(m0 - safe(top0)[:, None])  # the precise sums, relative to the split's max weight
        tl.store(ex, top0.to(tl.float64))
        tl.store(ex + 1, tl.sum((p_sum * c0).to(tl.float64), axis=1))
        tl.store(ex + 2, tl.sum((p_d * c0).to(tl.float64), axis=1))
        store_robust(out, m_lo, s_lo, t_lo)
        tl.store(out + 3, tl.sum((dm_lo * c0).to(tl.float64), axis=1))
        tl.store(out + 4, tl.sum((q_lo * c0).to(tl.float64), axis=1))
        store_robust(out + STATS_W, m_hi, s_hi, t_hi)
        tl.store(out + STATS_W + 3, tl.sum((dm_hi * c0).to(tl.float64), axis=1))
        tl.store(out + STATS_W + 4, tl.sum((q_hi * c0).to(tl.float64), axis=1))
        if GRID:
            store_robust(ex + 3, m1, s1, t1)
            tl.store(ex + 6, tl.sum((dm1 * c0).to(tl.float64), axis=1))
            tl.store(ex + 7, tl.sum((q1 * c0).to(tl.float64), axis=1))
            tl.store(ex + 8, tl.sum((r1 * c0).to(tl.float64), axis=1))


@triton.jit
def tilt_log(m, s, dm, q, m0, p, narrow_ok):
    """L(s) = log(sum p e^{s d'} / sum p) from the merged sums: the precise value where it is
    finite and the row's |d'| is small, or where it agrees with the robust one; else the robust."""
    r = dm / p
    precise = tl.where(tl.abs(r) < 0.5, log1p(r), tl.log((q / p).to(tl.float32)).to(tl.float64))
    robust = (m - m0).to(tl.float64) + tl.log((s / p).to(tl.float32)).to(tl.float64)
    finite = tl.abs(precise) < float("inf")  # False for NaN too
    agree = tl.abs(precise - robust) <= 1e-6 * (1.0 + tl.abs(robust))
    return tl.where(finite & (agree | tl.where(narrow_ok, finite, agree)), precise, robust)


@triton.jit
def hermite_root(left, right, f_left, f_right, fp_left, fp_right):
    """The root in [left, right] of the cubic with the ends' values and slopes (f_left <= 0 <=
    f_right): Newton on t in [0, 1], safeguarded by bisection of the sign change."""
    h = right - left
    m_l, m_r = fp_left * h, fp_right * h
    t = -f_left / (f_right - f_left)
    t = tl.where((t >= 0.0) & (t <= 1.0), t, 0.5)  # NaN too
    t_lo, t_hi = tl.zeros_like(t), tl.zeros_like(t) + 1.0
    for _ in tl.static_range(12):
        t2 = t * t
        t3 = t2 * t
        p = (2.0 * t3 - 3.0 * t2 + 1.0) * f_left + (t3 - 2.0 * t2 + t) * m_l
        p += (3.0 * t2 - 2.0 * t3) * f_right + (t3 - t2) * m_r
        dp = (6.0 * t2 - 6.0 * t) * (f_left - f_right) + (3.0 * t2 - 4.0 * t + 1.0) * m_l
        dp += (3.0 * t2 - 2.0 * t) * m_r
        t_lo = tl.where(p <= 0, t, t_lo)
        t_hi = tl.where(p >= 0, t, t_hi)
        n = t - p / dp
        t = tl.where((n > t_lo) & (n < t_hi), n, 0.5 * (t_lo + t_hi))
    return left + h * t


@triton.jit
def add_split(out, c, top, s, t, dm, q):
    """Add one split's sums at J points (robust relative to their maxima top, precise with the
    split's base-weight scale c)."""
    c_r = tl.exp(tl.load(out).to(tl.float32) - safe(top)).to(tl.float64)
    s += c_r * tl.load(out + 1)
    t += c_r * tl.load(out + 2)
    dm += c * tl.load(out + 3)
    q += c * tl.load(out + 4)
    return s, t, dm, q


@triton.jit
def next_alphas(left, right, f_left, f_right, fp_left, fp_right, JN: tl.constexpr):
    """Newton from each end, the secant, the Hermite root, then evenly spaced, inside the bracket."""
    jn = tl.arange(0, JN)
    secant = left - f_left * (right - left) / (f_right - f_left)
    even = left + (right - left) * (jn - 3).to(tl.float32) / (JN - 2)
    cand = tl.where(jn == 0, left - f_left / fp_left, tl.where(jn == 1, right - f_right / fp_right, even))
    cubic = hermite_root(left, right, f_left, f_right, fp_left, fp_right)
    return inside(tl.where(jn == 2, secant, tl.where(jn == 3, cubic, cand)), left, right)


@triton.jit
def at(x, j, which):
    return tl.sum(tl.where(j == which, x, 0.0), axis=0)


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def ess_combine_kernel(
    part_ptr, extra_ptr, state_ptr, ess_ptr, alphas_ptr, next_ptr, alpha_ptr, lo, hi,
    SPLITS, J: tl.constexpr, JN: tl.constexpr, GRID: tl.constexpr, LAST: tl.constexpr,
):  # fmt: skip
    """Merge a pass's partials, narrow the bracket, and write the next alphas (or alpha)."""
    row = tl.program_id(0).to(tl.int64)
    es = ess_ptr + row * STATE_W_ESS
    j = tl.arange(0, J)
    a, live = pass_alphas(alphas_ptr, es + DONE, row, j, lo, hi, J, GRID)
    m0 = tl.full([], NEG_INF, tl.float32)  # the maxima over the splits first, then the sums
    top_lo = tl.full([J], NEG_INF, tl.float32)
    top_hi = tl.full([J], NEG_INF, tl.float32)
    top1 = tl.full([], NEG_INF, tl.float32)
    for sp in range(0, SPLITS):  # a loop, not unrolled: unrolled float64 merges take ptxas minutes
        ex = extra_ptr + (row * SPLITS + sp) * EXTRAS_W
        out = part_ptr + ((row * SPLITS + sp) * J + j) * (2 * STATS_W)
        m0 = tl.maximum(m0, tl.load(ex).to(tl.float32))
        top_lo = tl.maximum(top_lo, tl.load(out).to(tl.float32))
        top_hi = tl.maximum(top_hi, tl.load(out + STATS_W).to(tl.float32))
        if GRID:
            top1 = tl.maximum(top1, tl.load(ex + 3).to(tl.float32))
    p_sum, p_d = tl.zeros([], tl.float64), tl.zeros([], tl.float64)
    s_lo, t_lo = tl.zeros([J], tl.float64), tl.zeros([J], tl.float64)
    dm_lo, q_lo = tl.zeros([J], tl.float64), tl.zeros([J], tl.float64)
    s_hi, t_hi = tl.zeros([J], tl.float64), tl.zeros([J], tl.float64)
    dm_hi, q_hi = tl.zeros([J], tl.float64), tl.zeros([J], tl.float64)
    s1, t1, dm1 = tl.zeros([], tl.float64), tl.zeros([], tl.float64), tl.zeros([], tl.float64)
    q1, r1 = tl.zeros([], tl.float64), tl.zeros([], tl.float64)
    for sp in range(0, SPLITS):
        ex = extra_ptr + (row * SPLITS + sp) * EXTRAS_W
        out = part_ptr + ((row * SPLITS + sp) * J + j) * (2 * STATS_W)
        c = tl.exp(tl.load(ex).to(tl.float32) - safe(m0)).to(tl.float64)
        p_sum += c * tl.load(ex + 1)
        p_d += c * tl.load(ex + 2)
        s_lo, t_lo, dm_lo, q_lo = add_split(out, c, top_lo, s_lo, t_lo, dm_lo, q_lo)
        s_hi, t_hi, dm_hi, q_hi = add_split(out + STATS_W, c, top_hi, s_hi, t_hi, dm_hi, q_hi)
        if GRID:
            s1, t1, dm1, q1 = add_split(ex + 3, c, top1, s1, t1, dm1, q1)
            r1 += c * tl.load(ex + 8)
    norm = tl.where(p_sum > 0, p_sum, 1.0)
    d_max, d_min, narrow_ok = d_range(state_ptr + row * STATE_W)
    if GRID:
        l_one = tilt_log(top1, s1, dm1, q1, m0, norm, narrow_ok)
    else:
        l_one = tl.load(es + L_ONE)
    l_lo = tilt_log(top_lo, s_lo, dm_lo, q_lo, m0, norm, narrow_ok)
    l_hi = tilt_log(top_hi, s_hi, dm_hi, q_hi, m0, norm, narrow_ok)
    f = (2.0 * l_one - (l_hi - l_lo)).to(tl.float32)  # f = -g: increasing in alpha
    fp = (t_hi / tl.where(s_hi > 0, s_hi, 1.0) - t_lo / tl.where(s_lo > 0, s_lo, 1.0)).to(tl.float32)
    fp = tl.maximum(fp, 0.0)
    if GRID:
        # Jeffreys = E_1[d'] - E_0[d'] (precise weights where |d'| is small), or d constant on S
        e_one = tl.where(narrow_ok & (q1 > 0), r1 / tl.where(q1 > 0, q1, 1.0), t1 / tl.where(s1 > 0, s1, 1.0))
        same = (e_one - p_d / norm <= IDENTICAL) | (d_max == d_min) | ~(p_sum > 0)
        f_lo, f_hi = at(f, j, 0), at(f, j, J - 1)
        outcome = tl.where(same, 3.0, tl.where(f_lo >= 0, 1.0, tl.where(f_hi <= 0, 2.0, 0.0)))
        left, right, f_left, f_right, fp_left, fp_right, _, _ = narrow(
            a, f, fp, f, lo + 0.0 * f_lo, hi + 0.0 * f_lo, f_lo, f_hi, at(fp, j, 0), at(fp, j, J - 1),
            f_lo, f_hi, j >= 0,
        )  # fmt: skip
        tl.store(es + OUTCOME, outcome.to(tl.float64))
        tl.store(es + L_ONE, l_one)
        done = (outcome != 0) | converged(left, right, f_left, f_right, fp_left, fp_right)
    else:
        left, right = tl.load(es + LEFT).to(tl.float32), tl.load(es + RIGHT).to(tl.float32)
        f_left, f_right = tl.load(es + F_LEFT).to(tl.float32), tl.load(es + F_RIGHT).to(tl.float32)
        fp_left, fp_right = tl.load(es + FP_LEFT).to(tl.float32), tl.load(es + FP_RIGHT).to(tl.float32)
        valid = tl.load(es + DONE + 0 * j) == 0  # a row already done skipped the pass
        left, right, f_left, f_right, fp_left, fp_right, _, _ = narrow(
            a, f, fp, f, left, right, f_left, f_right, fp_left, fp_right, f_left, f_right, valid
        )  # fmt: skip
        done = ~live | converged(left, right, f_left, f_right, fp_left, fp_right)
    tl.store(es + LEFT, left.to(tl.float64))
    tl.store(es + RIGHT, right.to(tl.float64))
    tl.store(es + F_LEFT, f_left.to(tl.float64))
    tl.store(es + F_RIGHT, f_right.to(tl.float64))
    tl.store(es + FP_LEFT, fp_left.to(tl.float64))
    tl.store(es + FP_RIGHT, fp_right.to(tl.float64))
    tl.store(es + DONE, done.to(tl.float64))
    if LAST:
        alpha = hermite_root(left, right, f_left, f_right, fp_left, fp_right)
        outcome = tl.load(es + OUTCOME).to(tl.float32)
        alpha = tl.where(outcome == 1.0, lo, tl.where(outcome == 2.0, hi, alpha))
        tl.store(alpha_ptr + row, tl.where(outcome == 3.0, 0.5 * (lo + hi), alpha))
    else:
        jn = tl.arange(0, JN)
        tl.store(next_ptr + row * JN + jn, next_alphas(left, right, f_left, f_right, fp_left, fp_right, JN))
