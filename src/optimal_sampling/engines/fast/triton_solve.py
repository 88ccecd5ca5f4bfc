"""The alpha passes of the fused sampler (steps 1-4 below; the draw is triton_draw.py). Fused alpha solve (kl_symmetry or fixed), mixing, Gumbel-max draw and importance data in Triton.

Rows of the two logit matrices [B, V] are cut into `splits` chunks so that any batch fills the
GPU; a pass is one kernel over (row, chunk) programs and one small per-row merge kernel.
Programs keep per-lane accumulators over their whole chunk and reduce them once at the end, so a
pass costs about one read of both rows and one exp per token and point. Nothing of size [B, V]
is ever written. With x_s = z_b + s d, d = z_t - z_b (tempered) and q_s ∝ exp(x_s) on the joint
support, the root of f(s) = E_{q_s}[d] - (lse_t - lse_b) is alpha and f'(s) = Var_{q_s}[d]:
1. row pass: per-lane online log-normalisers of both rows (and of the raw rows when tempered),
   the d of the base's top token (the centre c), and the maxima of x_s at the grid points (no exp);
2. grid pass: the weight, E[d - c] and E[(d - c)^2] under q_s at the grid points, each relative
   to its exact maximum, and the precise shift' = log E_base[exp(d - c)] summed with the weights
   of its own s = 0 point; f = E[d - c] - shift'; the bracket shrinks to the sign change;
3. refining passes of Newton-from-each-end, secant and evenly spaced points inside the bracket,
   relative to the chord of the grid maxima (an upper bound: the max over tokens of x_s is
   convex in s); a row whose bracket is narrower than DONE_WIDTH, or whose Newton step from an
   end is below 1e-7, skips the passes left;
4. a last Newton/secant step gives alpha, and log Z_q = K(alpha) - lse_b - alpha (lse_t - lse_b)
   with K(s) = log sum exp(z_b + s d) over the joint support taken by a second-order Taylor step
   from the nearer bracket end, where the passes summed K, K' = f + c + shift' and K'' = f'
   (used by the greedy path; only where alpha was not solved does its argmax pass sum log Z_q);
5. the draw (mixing.draw.sample_tokens' two-level Gumbel-max, with its noise bit for bit): a mass
   pass sums q per draw chunk (exp(u - log Z_q) with u = log q + log Z_q and the Taylor log Z_q
   as reference; one exp per token, no noise), then one program per row picks a chunk by
   log-mass plus chunk noise and a token of that chunk by u plus token noise, and takes log Z_q
   exactly from the chunk sums.
Precision: d is formed from the raw difference z_t - z_b (exact for near-equal logits); centring
at the top token and taking the shift from the same weights as f keep the tiny f of nearly
identical policies; expm1 is a Taylor series where d - c is small; the partial sums are merged in
float64, and the float32 rounding of shift' is taken off in the merge. Where one support lacks a
token (or a term could overflow) the shift is lse_t - lse_b - c instead.
Invariant: logits are finite or -inf (model outputs); the joint support is where both are finite.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import expm1, fetch, grid, log1p, lse, merge_lse, online, reduce_lanes, safe, tempered
from .triton_row_state import (
    CENTRE,
    D_MAX,
    D_MIN,
    DONE,
    DONE_WIDTH,
    F_LEFT,
    F_RIGHT,
    FAR,
    FP_LEFT,
    FP_RIGHT,
    IDENTICAL,
    K_LEFT,
    K_RIGHT,
    LEFT,
    LOG_Z,
    LSE_B,
    LSE_T,
    NEG_INF,
    OUTCOME,
    RAW_LSE_B,
    RAW_LSE_T,
    RIGHT,
    ROW_STATS_W,
    SHIFT,
    SHIFT_STATS_W,
    STATE_W,
    STATS_W,
)


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def row_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, lo, hi, part_ptr, max_ptr,
    SPLITS, K: tl.constexpr, FIRST_IN: tl.constexpr, ZERO_AT: tl.constexpr,
    ONE_AT: tl.constexpr, MAXIMA: tl.constexpr, TEMPERED: tl.constexpr, D_RANGE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, chunk): both log-normalisers, the d at the largest z_b, the grid maxima of x_s,
    and (D_RANGE) the largest and smallest d on the joint support."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    lanes = tl.arange(0, BLOCK)[None, :]  # 2-D from the load on: no layout conversion in the loop
    mb = tl.full([1, BLOCK], NEG_INF, tl.float32)
    sb = tl.zeros([1, BLOCK], tl.float32)
    mt = tl.full([1, BLOCK], NEG_INF, tl.float32)
    st = tl.zeros([1, BLOCK], tl.float32)
    d_top = tl.zeros([1, BLOCK], tl.float32)  # d where the lane's z_b is largest: the centre c
    far = tl.zeros([1, BLOCK], tl.int32)  # tokens in one support only
    rmb = tl.full([1, BLOCK], NEG_INF, tl.float32)
    rsb = tl.zeros([1, BLOCK], tl.float32)
    rmt = tl.full([1, BLOCK], NEG_INF, tl.float32)
    rst = tl.zeros([1, BLOCK], tl.float32)
    d_max = tl.full([1, BLOCK], NEG_INF, tl.float32)
    d_min = tl.full([1, BLOCK], float("inf"), tl.float32)
    j = tl.arange(0, K)
    s_pts = grid(j, lo, hi, K, FIRST_IN, ZERO_AT, ONE_AT)
    top = tl.full([K, BLOCK], NEG_INF, tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, n_blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        zb, zt, d, joint = tempered(raw_b, raw_t, inv_temp)
        far += ((raw_b > NEG_INF) != (raw_t > NEG_INF)).to(tl.int32)
        mb, sb, _, up = online(mb, sb, zb)
        d_top = tl.where(up, d, d_top)
        mt, st, _, _ = online(mt, st, zt)
        if TEMPERED:
            rmb, rsb, _, _ = online(rmb, rsb, raw_b)
            rmt, rst, _, _ = online(rmt, rst, raw_t)
        if MAXIMA:
            top = tl.maximum(top, tl.where(joint, zb, NEG_INF) + s_pts[:, None] * d)  # d = 0 off joint
        if D_RANGE:
            d_max = tl.maximum(d_max, tl.where(joint, d, NEG_INF))
            d_min = tl.minimum(d_min, tl.where(joint, d, float("inf")))
    out = (
        part_ptr + (row * SPLITS + split) * ROW_STATS_W
    )  # float64: the precise shift is a ratio of these sums
    m = tl.max(mb)
    scale = tl.exp(mb - safe(m)).to(tl.float64)
    tl.store(out, m.to(tl.float64))
    tl.store(out + 1, tl.sum(sb.to(tl.float64) * scale))
    tl.store(out + 4, tl.max(tl.where(mb == m, d_top, NEG_INF)))
    m, s, _ = reduce_lanes(mt, st)
    tl.store(out + 2, m)
    tl.store(out + 3, s)
    tl.store(out + 5, tl.sum(far).to(tl.float32))
    if TEMPERED:
        m, s, _ = reduce_lanes(rmb, rsb)
        tl.store(out + 6, m)
        tl.store(out + 7, s)
        m, s, _ = reduce_lanes(rmt, rst)
        tl.store(out + 8, m)
        tl.store(out + 9, s)
    if D_RANGE:
        tl.store(out + 10, tl.max(d_max).to(tl.float64))
        tl.store(out + 11, tl.min(d_min).to(tl.float64))
    if MAXIMA:
        tl.store(max_ptr + (row * SPLITS + split) * K + j, tl.max(top, axis=1))


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def row_combine_kernel(
    part_ptr, max_ptr, gmax_ptr, state_ptr,
    SPLITS, K: tl.constexpr, MAXIMA: tl.constexpr, TEMPERED: tl.constexpr,
    D_RANGE: tl.constexpr,
):  # fmt: skip
    """Merge a row's partials: log-normalisers, centre, rough shift, grid maxima, d range; reset the solve."""
    row = tl.program_id(0).to(tl.int64)
    mb, sb = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float64)
    mt, st = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    rmb, rsb = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    rmt, rst = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    centre = tl.zeros([], tl.float32)  # d at the row's largest z_b
    far = tl.zeros([], tl.float32)
    d_max, d_min = tl.full([], NEG_INF, tl.float64), tl.full([], float("inf"), tl.float64)
    j = tl.arange(0, K)
    top = tl.full([K], NEG_INF, tl.float32)
    for sp in range(0, SPLITS):  # a loop, not unrolled: unrolled float64 merges take ptxas minutes
        at = part_ptr + (row * SPLITS + sp) * ROW_STATS_W
        pm = tl.load(at).to(tl.float32)
        m_new = tl.maximum(mb, pm)
        old, new = tl.exp(mb - safe(m_new)).to(tl.float64), tl.exp(pm - safe(m_new)).to(tl.float64)
        sb = sb * old + tl.load(at + 1) * new
        centre = tl.where(pm > mb, tl.load(at + 4).to(tl.float32), centre)
        mb = m_new
        mt, st = merge_lse(mt, st, tl.load(at + 2).to(tl.float32), tl.load(at + 3).to(tl.float32))
        far += tl.load(at + 5).to(tl.float32)
        if TEMPERED:
            rmb, rsb = merge_lse(rmb, rsb, tl.load(at + 6).to(tl.float32), tl.load(at + 7).to(tl.float32))
            rmt, rst = merge_lse(rmt, rst, tl.load(at + 8).to(tl.float32), tl.load(at + 9).to(tl.float32))
        if MAXIMA:
            top = tl.maximum(top, tl.load(max_ptr + (row * SPLITS + sp) * K + j))
        if D_RANGE:
            d_max = tl.maximum(d_max, tl.load(at + 10))
            d_min = tl.minimum(d_min, tl.load(at + 11))
    lse_b, lse_t = lse(mb, sb.to(tl.float32)), lse(mt, st)
    rough = lse_t.to(tl.float64) - lse_b.to(tl.float64) - centre.to(tl.float64)  # the grid pass refines it
    st_ptr = state_ptr + row * STATE_W
    tl.store(st_ptr + LSE_B, lse_b.to(tl.float64))
    tl.store(st_ptr + LSE_T, lse_t.to(tl.float64))
    tl.store(st_ptr + CENTRE, centre.to(tl.float64))
    tl.store(st_ptr + SHIFT, rough)
    tl.store(st_ptr + FAR, far.to(tl.float64))
    tl.store(st_ptr + OUTCOME, 0.0)
    tl.store(st_ptr + DONE, 0.0)
    if TEMPERED:
        tl.store(st_ptr + RAW_LSE_B, lse(rmb, rsb).to(tl.float64))
        tl.store(st_ptr + RAW_LSE_T, lse(rmt, rst).to(tl.float64))
    else:
        tl.store(st_ptr + RAW_LSE_B, lse_b.to(tl.float64))
        tl.store(st_ptr + RAW_LSE_T, lse_t.to(tl.float64))
    if MAXIMA:
        tl.store(gmax_ptr + row * K + j, top)
    if D_RANGE:
        tl.store(st_ptr + D_MAX, d_max)
        tl.store(st_ptr + D_MIN, d_min)


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def stats_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, lo, hi, pts_ptr, refs_ptr,
    state_ptr, part_ptr, shift_ptr,
    SPLITS, K: tl.constexpr, GRID: tl.constexpr, FIRST_IN: tl.constexpr,
    ZERO_AT: tl.constexpr, ONE_AT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, chunk) and point s: sum of e, e g and e g^2 with e = exp(x_s - ref_s), g = d - c - shift'.

    The grid pass does not know shift' yet (g = d - c there); it sums the precise shift's terms with
    the weights of its s = 0 point, p_b = exp(z_b - ref_0), so that f and the shift agree. Both
    terms reuse the grid's exps: p_b is e at s = 0 and p_b exp(g) = e at s = 1 times the row's
    exp(ref_1 - ref_0 - c) (its log is max z_t - z_t at the base's top token; above 80 the row
    counts as risky and takes the rough shift). A row already done skips the pass, stores included
    (combine_kernel ignores its partials)."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    st_ptr = state_ptr + row * STATE_W
    j = tl.arange(0, K)
    if GRID:
        s_pts = grid(j, lo, hi, K, FIRST_IN, ZERO_AT, ONE_AT)
    else:
        s_pts = tl.load(pts_ptr + row * K + j)
    refs = tl.load(refs_ptr + row * K + j)
    centre = tl.load(st_ptr + CENTRE).to(tl.float32)
    if GRID:
        shift = 0.0
        log_kappa = tl.load(refs_ptr + row * K + ONE_AT) - tl.load(refs_ptr + row * K + ZERO_AT) - centre
        kappa = tl.exp(tl.minimum(log_kappa, 80.0))
    else:
        shift = tl.load(st_ptr + SHIFT).to(tl.float32)
    live = tl.load(st_ptr + DONE) == 0
    blocks = tl.where(live, n_blocks, 0)
    lanes = tl.arange(0, BLOCK)[None, :]  # 2-D from the load on: no layout conversion in the loop
    w = tl.zeros([K, BLOCK], tl.float32)
    s1 = tl.zeros([K, BLOCK], tl.float32)
    s2 = tl.zeros([K, BLOCK], tl.float32)
    p_sum = tl.zeros([1, BLOCK], tl.float32)
    p_em1 = tl.zeros([1, BLOCK], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        zb, _, d, joint = tempered(raw_b, raw_t, inv_temp)
        g = tl.where(joint, (d - centre) - shift, 0.0)
        zj = tl.where(joint, zb, NEG_INF)  # off the joint support: exp(-inf) = 0 and d = g = 0
        e = tl.exp((zj - safe(refs)[:, None]) + s_pts[:, None] * d)  # the exponent is near 0 where it matters
        eg = e * g
        w += e
        s1 += eg
        s2 += eg * g
        if GRID:  # p_b expm1(d - c): Taylor where d - c is small, else p_b exp(d - c) - p_b
            pb = tl.sum(tl.where(j[:, None] == ZERO_AT, e, 0.0), axis=0, keep_dims=True)  # 0 off joint
            pt = tl.sum(tl.where(j[:, None] == ONE_AT, e, 0.0), axis=0, keep_dims=True) * kappa
            p_sum += pb
            p_em1 += tl.where(tl.abs(g) < 0.1, pb * expm1(g), pt - pb)
    if live:
        if GRID:
            at = shift_ptr + (row * SPLITS + split) * SHIFT_STATS_W
            tl.store(at, tl.sum(p_sum.to(tl.float64)))
            tl.store(at + 1, tl.sum(p_em1.to(tl.float64)))
            tl.store(at + 2, (log_kappa > 80.0).to(tl.float64))
        out = (
            part_ptr + ((row * SPLITS + split) * K + j) * STATS_W
        )  # float64: f is a tiny sum of O(|g|) terms
        tl.store(out, tl.sum(w.to(tl.float64), axis=1))
        tl.store(out + 1, tl.sum(s1.to(tl.float64), axis=1))
        tl.store(out + 2, tl.sum(s2, axis=1).to(tl.float64))


@triton.jit
def narrow(s_pts, f, fp, k, left, right, f_left, f_right, fp_left, fp_right, k_left, k_right, valid):
    """Shrink [left, right] to the sign change among the evaluated points (f increasing); f, f'
    and K follow the ends."""
    neg = valid & (f <= 0) & (s_pts >= left)
    pos = valid & (f >= 0) & (s_pts <= right)
    new_left = tl.max(tl.where(neg, s_pts, NEG_INF), axis=0)
    new_right = tl.min(tl.where(pos, s_pts, float("inf")), axis=0)
    take_l = new_left > NEG_INF
    take_r = new_right < float("inf")
    at_l = neg & (s_pts == new_left)
    at_r = pos & (s_pts == new_right)
    f_left = tl.where(take_l, tl.max(tl.where(at_l, f, NEG_INF), axis=0), f_left)
    fp_left = tl.where(take_l, tl.max(tl.where(at_l, fp, 0.0), axis=0), fp_left)
    k_left = tl.where(take_l, tl.max(tl.where(at_l, k, NEG_INF), axis=0), k_left)
    f_right = tl.where(take_r, tl.min(tl.where(at_r, f, float("inf")), axis=0), f_right)
    fp_right = tl.where(take_r, tl.max(tl.where(at_r, fp, 0.0), axis=0), fp_right)
    k_right = tl.where(take_r, tl.max(tl.where(at_r, k, NEG_INF), axis=0), k_right)
    left = tl.where(take_l, new_left, left)
    right = tl.where(take_r, new_right, right)
    return left, right, f_left, f_right, fp_left, fp_right, k_left, k_right


@triton.jit
def inside(x, left, right):
    ok = (x > left) & (x < right) & (x == x)
    return tl.where(ok, x, 0.5 * (left + right))


@triton.jit
def estimate(left, right, f_left, f_right, fp_left, fp_right):
    """Best root estimate in [left, right]: Newton from the end with the shorter step, else secant.

    The ends count as inside: a root within float32 rounding of an end is that end."""
    step_l = tl.abs(f_left) / tl.where(fp_left > 0, fp_left, 1e-30)
    step_r = tl.abs(f_right) / tl.where(fp_right > 0, fp_right, 1e-30)
    newton = tl.where(step_l <= step_r, left - f_left / fp_left, right - f_right / fp_right)
    secant = left - f_left * (right - left) / (f_right - f_left)
    ok = (newton >= left) & (newton <= right) & (newton == newton)
    fine = (secant >= left) & (secant <= right) & (secant == secant)
    return tl.where(ok, newton, tl.where(fine, secant, 0.5 * (left + right)))


@triton.jit
def converged(left, right, f_left, f_right, fp_left, fp_right):
    """The bracket is narrower than DONE_WIDTH, or a Newton step from an end is below 1e-7."""
    step_l = tl.abs(f_left) / tl.where(fp_left > 0, fp_left, 1e-30)
    step_r = tl.abs(f_right) / tl.where(fp_right > 0, fp_right, 1e-30)
    return (right - left <= DONE_WIDTH) | (step_l <= 1e-7) | (step_r <= 1e-7)


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def combine_kernel(
    part_ptr, shift_ptr, gmax_ptr, state_ptr, pts_ptr, refs_ptr, next_ptr, next_refs_ptr, alpha_ptr, lo, hi,
    SPLITS, K: tl.constexpr, KG: tl.constexpr, KN: tl.constexpr, GRID: tl.constexpr,
    LAST: tl.constexpr, FIRST_IN: tl.constexpr, ZERO_AT: tl.constexpr, ONE_AT: tl.constexpr,
):  # fmt: skip
    """Merge a pass's partials, narrow the bracket, and write the next points and refs (or alpha)."""
    row = tl.program_id(0).to(tl.int64)
    st = state_ptr + row * STATE_W
    j = tl.arange(0, K)
    if GRID:
        s_pts = grid(j, lo, hi, K, FIRST_IN, ZERO_AT, ONE_AT)
    else:
        s_pts = tl.load(pts_ptr + row * K + j)
    w = tl.zeros([K], tl.float64)
    s1 = tl.zeros([K], tl.float64)
    s2 = tl.zeros([K], tl.float64)
    for sp in range(0, SPLITS):  # a loop, not unrolled: unrolled float64 merges take ptxas minutes
        at = part_ptr + ((row * SPLITS + sp) * K + j) * STATS_W
        w += tl.load(at)
        s1 += tl.load(at + 1)
        s2 += tl.load(at + 2)
    done = tl.load(st + DONE) != 0
    valid = tl.where(done, 0.0, w) > 0  # a row already done skipped the pass: its partials are unwritten
    mean = s1 / tl.where(valid, w, 1.0)
    k = tl.load(refs_ptr + row * K + j).to(tl.float64) + tl.log(tl.where(valid, w, 1.0))  # K(s) where valid
    fp = tl.maximum(s2 / tl.where(valid, w, 1.0) - mean * mean, 0.0).to(tl.float32)
    if GRID:  # the shift: precise from this pass's sums where the supports agree, else lse_t - lse_b - c
        p_sum = tl.zeros([], tl.float64)
        p_em1 = tl.zeros([], tl.float64)
        risky = tl.zeros([], tl.float64)
        for sp in range(0, SPLITS):
            at = shift_ptr + (row * SPLITS + sp) * SHIFT_STATS_W
            p_sum += tl.load(at)
            p_em1 += tl.load(at + 1)
            risky += tl.load(at + 2)
        precise = (tl.load(st + FAR) == 0) & (risky == 0) & (p_sum > 0)
        shift = tl.where(precise, log1p(p_em1 / tl.where(p_sum > 0, p_sum, 1.0)), tl.load(st + SHIFT))
        tl.store(st + SHIFT, shift)
        mean = mean - shift
    else:  # the stats pass took g = d - c - float32(shift'): take off what float32 rounded away
        shift = tl.load(st + SHIFT)
        mean = mean - (shift - shift.to(tl.float32).to(tl.float64))
    f = mean.to(tl.float32)
    if GRID:
        jeffreys = tl.sum(tl.where(j == ONE_AT, f, 0.0), axis=0) - tl.sum(
            tl.where(j == ZERO_AT, f, 0.0), axis=0
        )
        f_lo = tl.sum(tl.where(j == FIRST_IN, f, 0.0), axis=0)
        f_hi = tl.sum(tl.where(j == K - 1, f, 0.0), axis=0)
        fp_lo = tl.sum(tl.where(j == FIRST_IN, fp, 0.0), axis=0)
        fp_hi = tl.sum(tl.where(j == K - 1, fp, 0.0), axis=0)
        k_lo = tl.sum(tl.where(j == FIRST_IN, k, 0.0), axis=0)
        k_hi = tl.sum(tl.where(j == K - 1, k, 0.0), axis=0)
        same = (jeffreys <= IDENTICAL) | (tl.max(w, axis=0) <= 0)
        outcome = tl.where(same, 3.0, tl.where(f_lo >= 0, 1.0, tl.where(f_hi <= 0, 2.0, 0.0)))
        left, right, f_left, f_right, fp_left, fp_right, k_left, k_right = narrow(
            s_pts, f, fp, k, lo, hi, f_lo, f_hi, fp_lo, fp_hi, k_lo, k_hi, valid & (j >= FIRST_IN)
        )  # fmt: skip
        tl.store(st + OUTCOME, outcome.to(tl.float64))
        done = (outcome != 0) | converged(left, right, f_left, f_right, fp_left, fp_right)
    else:
        left, right = tl.load(st + LEFT).to(tl.float32), tl.load(st + RIGHT).to(tl.float32)
        f_left, f_right = tl.load(st + F_LEFT).to(tl.float32), tl.load(st + F_RIGHT).to(tl.float32)
        fp_left, fp_right = tl.load(st + FP_LEFT).to(tl.float32), tl.load(st + FP_RIGHT).to(tl.float32)
        k_left, k_right = tl.load(st + K_LEFT), tl.load(st + K_RIGHT)
        # a row already done skipped this pass: no point is valid
        left, right, f_left, f_right, fp_left, fp_right, k_left, k_right = narrow(
            s_pts, f, fp, k, left, right, f_left, f_right, fp_left, fp_right, k_left, k_right, valid
        )  # fmt: skip
        done = done | converged(left, right, f_left, f_right, fp_left, fp_right)
    tl.store(st + LEFT, left.to(tl.float64))
    tl.store(st + RIGHT, right.to(tl.float64))
    tl.store(st + F_LEFT, f_left.to(tl.float64))
    tl.store(st + F_RIGHT, f_right.to(tl.float64))
    tl.store(st + FP_LEFT, fp_left.to(tl.float64))
    tl.store(st + FP_RIGHT, fp_right.to(tl.float64))
    tl.store(st + K_LEFT, k_left)
    tl.store(st + K_RIGHT, k_right)
    tl.store(st + DONE, done.to(tl.float64))
    if LAST:
        alpha = estimate(left, right, f_left, f_right, fp_left, fp_right)
        outcome = tl.load(st + OUTCOME).to(tl.float32)
        alpha = tl.where(outcome == 1.0, lo, tl.where(outcome == 2.0, hi, alpha))
        alpha = tl.where(outcome == 3.0, 0.5 * (lo + hi), alpha)
        tl.store(alpha_ptr + row, alpha)
        # log Z_q = K(alpha) - lse_b - alpha (lse_t - lse_b), K by Taylor from the nearer end,
        # where K' = f + c + shift' and K'' = f'; at alpha 0 or 1, q is one of the policies.
        at_left = tl.abs(alpha - left) <= tl.abs(right - alpha)
        end = tl.where(at_left, left, right).to(tl.float64)
        h = alpha.to(tl.float64) - end
        slope = tl.where(at_left, f_left, f_right).to(tl.float64) + tl.load(st + CENTRE) + tl.load(st + SHIFT)
        curve = tl.where(at_left, fp_left, fp_right).to(tl.float64)
        k_alpha = tl.where(at_left, k_left, k_right) + h * (slope + 0.5 * h * curve)
        lse_b, lse_t = tl.load(st + LSE_B), tl.load(st + LSE_T)
        log_z = k_alpha - lse_b - alpha.to(tl.float64) * (lse_t - lse_b)
        tl.store(st + LOG_Z, tl.where((alpha == 0.0) | (alpha == 1.0), 0.0, log_z))
    else:
        jn = tl.arange(0, KN)  # next points: Newton from each end, secant, evenly spaced
        secant = left - f_left * (right - left) / (f_right - f_left)
        even = left + (right - left) * (jn - 2).to(tl.float32) / (KN - 2)
        cand = tl.where(jn == 0, left - f_left / fp_left, tl.where(jn == 1, right - f_right / fp_right, even))
        cand = inside(tl.where(jn == 2, secant, cand), left, right)
        # reference: the chord of the grid maxima over the bracket grid (evenly spaced on [lo, hi])
        h = (hi - lo) / (KG - 1 - FIRST_IN)
        pos = (cand - lo) / tl.where(h > 0, h, 1.0)
        seg = tl.minimum(tl.maximum(pos.to(tl.int32), 0), KG - 2 - FIRST_IN)
        g0 = tl.load(gmax_ptr + row * KG + FIRST_IN + seg)
        g1 = tl.load(gmax_ptr + row * KG + FIRST_IN + seg + 1)
        frac = tl.minimum(tl.maximum(pos - seg.to(tl.float32), 0.0), 1.0)
        ref = g0 + (g1 - g0) * frac
        tl.store(next_ptr + row * KN + jn, cand)
        tl.store(next_refs_ptr + row * KN + jn, ref)
