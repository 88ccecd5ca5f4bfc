"""Fused alpha solve (kl_symmetry or fixed), mixing, Gumbel-max draw and importance data in Triton.

Each row of the two logit matrices [B, V] is cut into `splits` contiguous chunks so that every
batch size fills the GPU; a pass over the rows is one "partials" kernel over (row, chunk) and one
small "combine" kernel per row. Nothing of size [B, V] is ever written. Passes:
1. per point s in K points (0, 1 and K-2 evenly spaced over [alpha_min, alpha_max]): the weight,
   mean and squared deviations of d = z_t - z_b under q_s ∝ exp(z_b + s d) on the joint support,
   plus both full log-normalisers; f(s) = E_{q_s}[r] = mean - shift with shift = lse_t - lse_b,
   taken as log E_base[exp(d)] through expm1 when the supports coincide and |d| <= 10, so that
   near-identical policies keep f's tiny values exact; f'(s) = Var_{q_s}[r];
2. REFINE passes of K points inside the current bracket: a Newton step from each end, the secant
   point, and evenly spaced points; the bracket shrinks to the sign change;
3. a last Newton/secant step gives alpha; one pass draws the token with the sampler's counter-based
   noise (sampling.uniform_noise, bit for bit) and accumulates log Z_q.
Means are merged in float64 (f is a tiny difference of O(|d|) terms near the root).
Invariant: logits are finite or -inf (model outputs); the joint support is where both are finite.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
STATS = 4  # per (row, split, point): max, weight, mean (float64), squared deviations
ROW_STATS = 6  # per (row, split) in pass 1: max_b, sum_b, max_t, sum_t, excess, far
STATE = 12  # per row: left, right, f_left, f_right, fp_left, fp_right, lse_b, lse_t, shift, outcome


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _safe(m):
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _chan(m, w, mean, m2, m_b, w_b, mean_b, m2_b):
    """Merge two groups of (max, weight relative to max, float64 mean, squared deviations)."""
    m_new = tl.maximum(m, m_b)
    sa = tl.exp(m - _safe(m_new))
    sb = tl.exp(m_b - _safe(m_new))
    wa, wb = w * sa, w_b * sb
    total = wa + wb
    frac = tl.where(total > 0, wb / tl.where(total > 0, total, 1.0), 0.0)
    delta = mean_b - mean
    mean = mean + delta * frac.to(tl.float64)
    m2 = m2 * sa + m2_b * sb + (delta * delta).to(tl.float32) * wa * frac
    return m_new, total, mean, m2


@triton.jit
def _expm1(d):
    """exp(d) - 1 to ~1e-6 relative for |d| <= 10 (Taylor near 0, where exp(d) - 1 cancels)."""
    taylor = d * (1.0 + d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0))))
    return tl.where(tl.abs(d) < 0.1, taylor, tl.exp(d) - 1.0)


@triton.jit
def _load_rows(zb_ptr, zt_ptr, idx, ok, inv_temp):
    zb = tl.load(zb_ptr + idx, mask=ok, other=NEG_INF).to(tl.float32) * inv_temp
    zt = tl.load(zt_ptr + idx, mask=ok, other=NEG_INF).to(tl.float32) * inv_temp
    return zb, zt


@triton.jit
def _block_stats(zb, zt, s_pts):
    """One block [BLOCK] at points s_pts [K] -> (max, weight, float64 mean, squared deviations) [K]."""
    zb2 = zb[None, :] + 0.0 * s_pts[:, None]  # [K, BLOCK]; 2-D from the start (Triton 3.6 layout bug)
    zt2 = zt[None, :] + 0.0 * s_pts[:, None]
    joint = (zb2 > NEG_INF) & (zt2 > NEG_INF)
    d = tl.where(joint, zt2 - zb2, 0.0)
    x = tl.where(joint, zb2 + s_pts[:, None] * d, NEG_INF)
    m = tl.max(x, axis=1)
    e = tl.exp(x - _safe(m)[:, None])
    w = tl.sum(e, axis=1)
    ed = e * d
    mean = tl.sum(ed.to(tl.float64), axis=1) / tl.where(w > 0, w, 1.0).to(tl.float64)
    m2 = tl.sum(ed * d, axis=1) - w * (mean * mean).to(tl.float32)  # a derivative only
    return m, w, mean, tl.maximum(m2, 0.0)


@triton.jit
def _lse_update(m, s, x):
    """Online log-sum-exp of a block x [BLOCK] into scalars (m, s)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    s = s * tl.exp(m - _safe(m_new)) + tl.sum(tl.exp(x - _safe(m_new)), axis=0)
    return m_new, s


@triton.jit
def _lse(m, s):
    return tl.where(s > 0, m + tl.log(s), NEG_INF)


@triton.jit
def stats_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp, pts_ptr, part_ptr, row_part_ptr,
    SPLITS: tl.constexpr, K: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Partial statistics of one (row, chunk) at the row's K points; in pass 1 also the row sums."""
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    j = tl.arange(0, K)
    s_pts = tl.load(pts_ptr + row * K + j)
    m = tl.full([K], NEG_INF, tl.float32)
    w = tl.zeros([K], tl.float32)
    mean = tl.zeros([K], tl.float64)
    m2 = tl.zeros([K], tl.float32)
    mb, sb = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    mt, st = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    excess = tl.zeros([], tl.float64)  # sum of exp(zb - mb) * expm1(d), rescaled with sb
    far = tl.zeros([], tl.int32)  # tokens outside the joint support, or with |d| > 10
    end = tl.minimum(split * chunk + chunk, V)
    for i in range(0, n_blocks):
        idx = split * chunk + i * BLOCK + tl.arange(0, BLOCK)
        ok = idx < end
        zb, zt = _load_rows(zb_ptr, zt_ptr, idx, ok, inv_temp)
        bm, bw, bmean, bm2 = _block_stats(zb, zt, s_pts)
        m, w, mean, m2 = _chan(m, w, mean, m2, bm, bw, bmean, bm2)
        if FIRST:
            joint = (zb > NEG_INF) & (zt > NEG_INF)
            d = tl.where(joint, zt - zb, 0.0)
            far += tl.sum(
                ((zb > NEG_INF) != (zt > NEG_INF)).to(tl.int32) + (tl.abs(d) > 10.0).to(tl.int32), axis=0
            )
            mb_new = tl.maximum(mb, tl.max(zb, axis=0))
            pb = tl.exp(zb - _safe(mb_new))
            terms = tl.where(joint, pb * _expm1(d), 0.0).to(tl.float64)
            excess = excess * tl.exp(mb - _safe(mb_new)).to(tl.float64) + tl.sum(terms, axis=0)
            sb = sb * tl.exp(mb - _safe(mb_new)) + tl.sum(pb, axis=0)
            mb = mb_new
            mt, st = _lse_update(mt, st, zt)
    out = ((row * SPLITS + split) * K + j) * 4
    tl.store(part_ptr + out, m.to(tl.float64))
    tl.store(part_ptr + out + 1, w.to(tl.float64))
    tl.store(part_ptr + out + 2, mean)
    tl.store(part_ptr + out + 3, m2.to(tl.float64))
    if FIRST:
        base = (row * SPLITS + split) * 6
        tl.store(row_part_ptr + base, mb.to(tl.float64))
        tl.store(row_part_ptr + base + 1, sb.to(tl.float64))
        tl.store(row_part_ptr + base + 2, mt.to(tl.float64))
        tl.store(row_part_ptr + base + 3, st.to(tl.float64))
        tl.store(row_part_ptr + base + 4, excess)
        tl.store(row_part_ptr + base + 5, far.to(tl.float64))


@triton.jit
def _merged(part_ptr, row, SPLITS: tl.constexpr, K: tl.constexpr):
    """Merge the SPLITS partials of a row: (weight, float64 mean, squared deviations) per point [K]."""
    j = tl.arange(0, K)
    m = tl.full([K], NEG_INF, tl.float32)
    w = tl.zeros([K], tl.float32)
    mean = tl.zeros([K], tl.float64)
    m2 = tl.zeros([K], tl.float32)
    for sp in range(0, SPLITS):  # a loop, not unrolled: unrolling 64 fp64 merges takes ptxas minutes
        at = ((row * SPLITS + sp) * K + j) * 4
        pm = tl.load(part_ptr + at).to(tl.float32)
        pw = tl.load(part_ptr + at + 1).to(tl.float32)
        pmean = tl.load(part_ptr + at + 2)
        pm2 = tl.load(part_ptr + at + 3).to(tl.float32)
        m, w, mean, m2 = _chan(m, w, mean, m2, pm, pw, pmean, pm2)
    return w, mean, m2


@triton.jit
def _narrow(s_pts, f, fp, left, right, f_left, f_right, fp_left, fp_right, valid):
    """Shrink [left, right] to the sign change among the evaluated points (f increasing)."""
    neg = valid & (f <= 0) & (s_pts >= left)
    pos = valid & (f >= 0) & (s_pts <= right)
    new_left = tl.max(tl.where(neg, s_pts, NEG_INF), axis=0)
    new_right = tl.min(tl.where(pos, s_pts, float("inf")), axis=0)
    take_l = new_left > NEG_INF
    take_r = new_right < float("inf")
    f_left = tl.where(take_l, tl.sum(tl.where(neg & (s_pts == new_left), f, 0.0), axis=0), f_left)
    fp_left = tl.where(take_l, tl.max(tl.where(neg & (s_pts == new_left), fp, 0.0), axis=0), fp_left)
    f_right = tl.where(take_r, tl.sum(tl.where(pos & (s_pts == new_right), f, 0.0), axis=0), f_right)
    fp_right = tl.where(take_r, tl.max(tl.where(pos & (s_pts == new_right), fp, 0.0), axis=0), fp_right)
    return (
        tl.where(take_l, new_left, left),
        tl.where(take_r, new_right, right),
        f_left,
        f_right,
        fp_left,
        fp_right,
    )


@triton.jit
def _inside(x, left, right):
    ok = (x > left) & (x < right) & (x == x)
    return tl.where(ok, x, 0.5 * (left + right))


@triton.jit
def _estimate(left, right, f_left, f_right, fp_left, fp_right):
    """Best root estimate inside [left, right]: Newton from the end nearer the root, else secant."""
    newton = tl.where(tl.abs(f_left) <= tl.abs(f_right), left - f_left / fp_left, right - f_right / fp_right)
    secant = left - f_left * (right - left) / (f_right - f_left)
    ok = (newton > left) & (newton < right) & (newton == newton)
    return tl.where(ok, newton, _inside(secant, left, right))


@triton.jit
def combine_kernel(
    part_ptr, row_part_ptr, pts_ptr, next_ptr, state_ptr, alpha_ptr, lo, hi,
    SPLITS: tl.constexpr, K: tl.constexpr, KN: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
):  # fmt: skip
    """Merge a pass's partials, narrow the bracket, and write the next points (or alpha)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K)
    st = state_ptr + row * 12
    s_pts = tl.load(pts_ptr + row * K + j)
    w, mean, m2 = _merged(part_ptr, row, SPLITS, K)
    if FIRST:
        mb, sb = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
        mt, stt = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
        excess = tl.zeros([], tl.float64)
        far = tl.zeros([], tl.float32)
        for sp in range(0, SPLITS):  # a loop, not unrolled: unrolling 64 fp64 merges takes ptxas minutes
            at = row_part_ptr + (row * SPLITS + sp) * 6
            pmb, psb = tl.load(at).to(tl.float32), tl.load(at + 1).to(tl.float32)
            pmt, pst = tl.load(at + 2).to(tl.float32), tl.load(at + 3).to(tl.float32)
            m_new = tl.maximum(mb, pmb)
            excess = excess * tl.exp(mb - _safe(m_new)).to(tl.float64) + tl.load(at + 4) * tl.exp(
                pmb - _safe(m_new)
            ).to(tl.float64)
            sb = sb * tl.exp(mb - _safe(m_new)) + psb * tl.exp(pmb - _safe(m_new))
            mb = m_new
            m_new = tl.maximum(mt, pmt)
            stt = stt * tl.exp(mt - _safe(m_new)) + pst * tl.exp(pmt - _safe(m_new))
            mt = m_new
            far += tl.load(at + 5).to(tl.float32)
        lse_b, lse_t = _lse(mb, sb), _lse(mt, stt)
        ratio = excess / tl.where(sb > 0, sb, 1.0).to(tl.float64)  # E_base[expm1(d)]
        precise = tl.where(
            tl.abs(ratio) < 1e-3, ratio * (1.0 - 0.5 * ratio), tl.log(1.0 + ratio.to(tl.float32))
        )
        shift = tl.where((far == 0) & (sb > 0), precise, (lse_t - lse_b).to(tl.float64))
        f = (mean - shift).to(tl.float32)
        fp = m2 / tl.where(w > 0, w, 1.0)
        jeffreys = tl.sum(tl.where(j == 1, f, 0.0), axis=0) - tl.sum(tl.where(j == 0, f, 0.0), axis=0)
        f_lo = tl.sum(tl.where(j == 2, f, 0.0), axis=0)
        f_hi = tl.sum(tl.where(j == K - 1, f, 0.0), axis=0)
        same = (jeffreys <= 1e-9) | (tl.max(w, axis=0) <= 0)
        outcome = tl.where(same, 3.0, tl.where(f_lo >= 0, 1.0, tl.where(f_hi <= 0, 2.0, 0.0)))
        left, right, f_left, f_right, fp_left, fp_right = _narrow(
            s_pts, f, fp, lo, hi, f_lo, f_hi, 1.0, 1.0, j >= 2
        )  # fmt: skip
        tl.store(st + 6, lse_b.to(tl.float64))
        tl.store(st + 7, lse_t.to(tl.float64))
        tl.store(st + 8, shift)
        tl.store(st + 9, outcome.to(tl.float64))
    else:
        shift = tl.load(st + 8)
        f = (mean - shift).to(tl.float32)
        fp = m2 / tl.where(w > 0, w, 1.0)
        left, right, f_left, f_right, fp_left, fp_right = _narrow(
            s_pts, f, fp, tl.load(st).to(tl.float32), tl.load(st + 1).to(tl.float32),
            tl.load(st + 2).to(tl.float32), tl.load(st + 3).to(tl.float32),
            tl.load(st + 4).to(tl.float32), tl.load(st + 5).to(tl.float32), w > 0,
        )  # fmt: skip
    if LAST:
        alpha = _estimate(left, right, f_left, f_right, fp_left, fp_right)
        outcome = tl.load(st + 9).to(tl.float32)
        alpha = tl.where(outcome == 1.0, lo, tl.where(outcome == 2.0, hi, alpha))
        tl.store(alpha_ptr + row, tl.where(outcome == 3.0, 0.5 * (lo + hi), alpha))
    else:
        jn = tl.arange(0, KN)  # next points: Newton from each end, secant, evenly spaced
        secant = left - f_left * (right - left) / (f_right - f_left)
        even = left + (right - left) * (jn - 2).to(tl.float32) / (KN - 2)
        cand = tl.where(jn == 0, left - f_left / fp_left, tl.where(jn == 1, right - f_right / fp_right, even))
        cand = _inside(tl.where(jn == 2, secant, cand), left, right)
        tl.store(next_ptr + row * KN + jn, cand)
        tl.store(st, left.to(tl.float64))
        tl.store(st + 1, right.to(tl.float64))
        tl.store(st + 2, f_left.to(tl.float64))
        tl.store(st + 3, f_right.to(tl.float64))
        tl.store(st + 4, fp_left.to(tl.float64))
        tl.store(st + 5, fp_right.to(tl.float64))


@triton.jit
def _mixed(zb, zt, lse_b, lse_t, alpha):
    """Unnormalised log q = (1-alpha) lp_b + alpha lp_t with 0 * (-inf) = 0."""
    wb = 1.0 - alpha
    return tl.where(wb == 0, 0.0, wb * (zb - lse_b)) + tl.where(alpha == 0, 0.0, alpha * (zt - lse_t))


@triton.jit
def sample_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp, seeds_ptr, steps_ptr,
    state_ptr, alpha_ptr, part_ptr,
    SPLITS: tl.constexpr, GREEDY: tl.constexpr, TEMPERED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, chunk): best Gumbel key and its index, log Z_q and (if tempered) raw log Z partials."""
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    alpha = tl.load(alpha_ptr + row)
    lse_b = tl.load(state_ptr + row * 12 + 6).to(tl.float32)
    lse_t = tl.load(state_ptr + row * 12 + 7).to(tl.float32)
    row_key = _mix32(_mix32(tl.load(seeds_ptr + row).to(tl.uint32)) ^ tl.load(steps_ptr + row).to(tl.uint32))
    best = tl.full([], NEG_INF, tl.float32)
    best_idx = tl.zeros([], tl.int32)
    mq, sq = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    rb, srb = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    rt, srt = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    end = tl.minimum(split * chunk + chunk, V)
    for i in range(0, n_blocks):
        idx = split * chunk + i * BLOCK + tl.arange(0, BLOCK)
        ok = idx < end
        raw_b = tl.load(zb_ptr + idx, mask=ok, other=NEG_INF).to(tl.float32)
        raw_t = tl.load(zt_ptr + idx, mask=ok, other=NEG_INF).to(tl.float32)
        u = tl.where(ok, _mixed(raw_b * inv_temp, raw_t * inv_temp, lse_b, lse_t, alpha), NEG_INF)
        mq, sq = _lse_update(mq, sq, u)
        if TEMPERED:
            rb, srb = _lse_update(rb, srb, raw_b)
            rt, srt = _lse_update(rt, srt, raw_t)
        if GREEDY:
            key = u
        else:
            bits = _mix32(_mix32(row_key ^ _mix32(idx.to(tl.uint32) * 0x9E37)) ^ row_key)
            unif = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            key = u - tl.log(-tl.log(unif))
        key = tl.where(key == key, key, NEG_INF)
        blk_best = tl.max(key, axis=0)
        blk_idx = tl.min(tl.where(key == blk_best, idx, 2147483647), axis=0)
        better = blk_best > best
        best_idx = tl.where(better, blk_idx, best_idx)
        best = tl.where(better, blk_best, best)
    at = part_ptr + (row * SPLITS + split) * 8
    tl.store(at, best)
    tl.store(at + 1, best_idx.to(tl.float32))  # exact: V < 2**24
    tl.store(at + 2, mq)
    tl.store(at + 3, sq)
    tl.store(at + 4, rb)
    tl.store(at + 5, srb)
    tl.store(at + 6, rt)
    tl.store(at + 7, srt)


@triton.jit
def finish_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, inv_temp, state_ptr, alpha_ptr, part_ptr,
    tok_ptr, lp_base_ptr, lp_teacher_ptr, lp_q_ptr,
    SPLITS: tl.constexpr, TEMPERED: tl.constexpr,
):  # fmt: skip
    """Merge the sampling partials of a row: the token (first index on ties) and its log-probs."""
    row = tl.program_id(0).to(tl.int64)
    best = tl.full([], NEG_INF, tl.float32)
    best_idx = tl.zeros([], tl.int32)
    mq, sq = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    rb, srb = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    rt, srt = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    for sp in range(0, SPLITS):  # a loop, not unrolled: unrolling 64 fp64 merges takes ptxas minutes
        at = part_ptr + (row * SPLITS + sp) * 8
        value = tl.load(at)
        better = value > best
        best_idx = tl.where(better, tl.load(at + 1).to(tl.int32), best_idx)
        best = tl.where(better, value, best)
        mq, sq = _merge_lse(mq, sq, tl.load(at + 2), tl.load(at + 3))
        rb, srb = _merge_lse(rb, srb, tl.load(at + 4), tl.load(at + 5))
        rt, srt = _merge_lse(rt, srt, tl.load(at + 6), tl.load(at + 7))
    alpha = tl.load(alpha_ptr + row)
    lse_b = tl.load(state_ptr + row * 12 + 6).to(tl.float32)
    lse_t = tl.load(state_ptr + row * 12 + 7).to(tl.float32)
    if TEMPERED:
        raw_lse_b, raw_lse_t = _lse(rb, srb), _lse(rt, srt)
    else:
        raw_lse_b, raw_lse_t = lse_b, lse_t
    tb = tl.load(zb_ptr + row * stride_b + best_idx).to(tl.float32)
    tt = tl.load(zt_ptr + row * stride_t + best_idx).to(tl.float32)
    u_tok = _mixed(tb * inv_temp, tt * inv_temp, lse_b, lse_t, alpha)
    tl.store(tok_ptr + row, best_idx.to(tl.int64))
    tl.store(lp_base_ptr + row, tb - raw_lse_b)
    tl.store(lp_teacher_ptr + row, tt - raw_lse_t)
    tl.store(lp_q_ptr + row, u_tok - _lse(mq, sq))


@triton.jit
def _merge_lse(m, s, m_b, s_b):
    m_new = tl.maximum(m, m_b)
    return m_new, s * tl.exp(m - _safe(m_new)) + s_b * tl.exp(m_b - _safe(m_new))


@triton.jit
def row_lse_kernel(zb_ptr, zt_ptr, stride_b, stride_t, V, inv_temp, state_ptr, BLOCK: tl.constexpr):
    """Fixed alpha: only the two log-normalisers are needed (one program per row)."""
    row = tl.program_id(0).to(tl.int64)
    mb, sb = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    mt, st = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        zb, zt = _load_rows(zb_ptr + row * stride_b, zt_ptr + row * stride_t, idx, idx < V, inv_temp)
        mb, sb = _lse_update(mb, sb, zb)
        mt, st = _lse_update(mt, st, zt)
    tl.store(state_ptr + row * 12 + 6, _lse(mb, sb).to(tl.float64))
    tl.store(state_ptr + row * 12 + 7, _lse(mt, st).to(tl.float64))
