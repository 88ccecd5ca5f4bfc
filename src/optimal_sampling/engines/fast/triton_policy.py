"""Per-row sums over the two (tempered) policies in one read of both logit rows, for the fused
sampler's configurations beyond the kl_symmetry solve:

- `entropy_kernel`: both entropies (for alpha_method "entropy"; H = log s - t / s with
  s = sum exp(z - max), t = sum exp(z - max) (z - max), in float64), and
  the Jeffreys divergence sum_S p_b expm1(r) r on the joint support S, r = lp_t - lp_b (the test
  for identical policies; each term is >= 0, so it has no cancellation);
- `tilt_kernel`: the tilted family's M(0), M(1), M'(0), M'(1) on the joint support, for
  reverse_kl_symmetry's alpha = KL(t || b) / (KL(t || b) + KL(b || t)), in float64 per token;
- `diagnostics_kernel`: at a row's alpha, with u = lp_b + alpha r on S (log q up to log Z_q),
  the online log-sum-exp of u with sum e^u (r - c), c the r of the top token (u*), and lp_b, lp_t
  there: KL(q || base) = alpha E_q[r - c] - lp_b* - log S0 and KL(q || teacher) = -(1 - alpha)
  E_q[r - c] - lp_t* - log S0 (S0 = sum e^{u - u*}), which keep a tiny KL tiny where r is large
  (no difference of two large terms); and the log-sum-exps of 2 lp_b - u, 2 lp_t - u, lp_b and
  lp_t on S (the two ESS of q).

Both take log-normalisers from the row state (`triton_row_state.LSE_B`, `LSE_T`) and write one
partial per (row, split) that triton_merge.py merges per row (one program per row).
Invariant, as for the other passes: logits are finite or -inf; q lives on the joint support.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import expm1, fetch, online, safe, tempered
from .triton_cut import kept
from .triton_row_state import LSE_B, LSE_T, NEG_INF, STATE_W

ENTROPY_STATS = 7  # per (row, split), float64: (max, s, t) of z_b and of z_t (see entropy_update), Jeffreys
TILT_STATS = 4  # per (row, split), float64: W, D, A, B (see tilt_kernel)
DIAG_STATS = 14  # per (row, split): m_u, S0, S_r, (max, sum) of 2lp_b-u, 2lp_t-u, lp_b, lp_t, c, lp_b*, lp_t*
ENTROPY_STATS_W = tl.constexpr(ENTROPY_STATS)
DIAG_STATS_W = tl.constexpr(DIAG_STATS)
TILT_STATS_W = tl.constexpr(TILT_STATS)


@triton.jit
def log_probs(raw_b, raw_t, inv_temp, st):
    """lp_b, lp_t, r = lp_t - lp_b (0 off the joint support) and the joint support of a block."""
    zb, zt, d, joint = tempered(raw_b, raw_t, inv_temp)
    lse_b = tl.load(st + LSE_B).to(tl.float32)
    lse_t = tl.load(st + LSE_T).to(tl.float32)
    r = tl.where(joint, d - (lse_t - lse_b), 0.0)  # from the raw difference: exact for equal logits
    return zb - lse_b, zt - lse_t, r, joint


@triton.jit
def accumulate(m, s, x):
    """Per-lane running (max, sum of exp(. - max)) after x, with one exp (triton_common.online)."""
    m_new, s_new, _, _ = online(m, s, x)
    return m_new, s_new


@triton.jit
def store_lse(out, m, s):
    top = tl.max(m)
    tl.store(out, top)
    tl.store(out + 1, tl.sum(s * tl.exp(m - safe(top))))


@triton.jit
def entropy_update(m, s, t, z):
    """Per lane, relative to the running max m: s = sum exp(z - m), t = sum exp(z - m) (z - m), in
    float64 (a one-hot row has s = 1 + 1e-10, and H = log s - t / s needs that 1e-10). One exp:
    the old sums' factor c or the new term's weight w is 1."""
    m_new = tl.maximum(m, z)
    e = tl.exp(tl.minimum(m, z) - safe(m_new))
    up = z > m
    c = tl.where(up, e, 1.0).to(tl.float64)
    w = tl.where(up, 1.0, e).to(tl.float64)
    t = c * (t + tl.where(s > 0, s * (m - m_new).to(tl.float64), 0.0))
    t += tl.where(w > 0, w * (z - m_new).to(tl.float64), 0.0)
    return m_new, c * s + w, t


@triton.jit
def store_entropy(out, m, s, t):
    """One (max, s, t) from the lanes' (see entropy_update)."""
    top = tl.max(m)
    c = tl.exp(m - safe(top)).to(tl.float64)
    tl.store(out, top.to(tl.float64))
    tl.store(out + 1, tl.sum(c * s))
    tl.store(out + 2, tl.sum(c * (t + tl.where(s > 0, s * (m - top).to(tl.float64), 0.0))))


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def entropy_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, state_ptr, part_ptr,
    SPLITS, BLOCK: tl.constexpr,
):  # fmt: skip
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    st = state_ptr + row * STATE_W
    lanes = tl.arange(0, BLOCK)
    mb, sb, tb = (
        tl.full([BLOCK], NEG_INF, tl.float32),
        tl.zeros([BLOCK], tl.float64),
        tl.zeros([BLOCK], tl.float64),
    )
    mt, s_t, tt = (
        tl.full([BLOCK], NEG_INF, tl.float32),
        tl.zeros([BLOCK], tl.float64),
        tl.zeros([BLOCK], tl.float64),
    )
    jeffreys = tl.zeros([BLOCK], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, n_blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        zb, zt, _, _ = tempered(raw_b, raw_t, inv_temp)
        mb, sb, tb = entropy_update(mb, sb, tb, zb)
        mt, s_t, tt = entropy_update(mt, s_t, tt, zt)
        lp_b, _, r, joint = log_probs(raw_b, raw_t, inv_temp, st)
        em1 = tl.where(tl.abs(r) < 0.1, expm1(r), tl.exp(r) - 1.0)
        jeffreys += tl.where(joint, tl.exp(lp_b) * em1 * r, 0.0)
    out = part_ptr + (row * SPLITS + split) * ENTROPY_STATS_W
    store_entropy(out, mb, sb, tb)
    store_entropy(out + 3, mt, s_t, tt)
    tl.store(out + 6, tl.sum(jeffreys).to(tl.float64))


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def tilt_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, state_ptr, part_ptr,
    SPLITS, BLOCK: tl.constexpr,
):  # fmt: skip
    """On the joint support, in float64 per token: W = sum p_b, D = sum p_b expm1(r),
    A = sum p_b e^r r, B = sum p_b r; hence M(0), M(1), M'(0), M'(1) of the tilted family with no
    cancellation between O(1) terms (reverse_kl_symmetry's two KLs are O(Jeffreys))."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    st = state_ptr + row * STATE_W
    shift = tl.load(st + LSE_T) - tl.load(st + LSE_B)  # float64
    lse_b = tl.load(st + LSE_B)
    lanes = tl.arange(0, BLOCK)
    w = tl.zeros([BLOCK], tl.float64)
    dm = tl.zeros([BLOCK], tl.float64)
    a = tl.zeros([BLOCK], tl.float64)
    b = tl.zeros([BLOCK], tl.float64)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, n_blocks):
        raw_b, raw_t = next_b, next_t
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        zb, _, d, joint = tempered(raw_b.to(tl.float32), raw_t.to(tl.float32), inv_temp)
        p_b = tl.where(joint, tl.exp(zb.to(tl.float64) - lse_b), 0.0)
        r = tl.where(joint, d.to(tl.float64) - shift, 0.0)
        em1 = tl.where(tl.abs(r) < 0.1, expm1(r), tl.exp(r) - 1.0)
        w += p_b
        dm += p_b * em1
        a += p_b * (em1 + 1.0) * r
        b += p_b * r
    out = part_ptr + (row * SPLITS + split) * TILT_STATS_W
    tl.store(out, tl.sum(w))
    tl.store(out + 1, tl.sum(dm))
    tl.store(out + 2, tl.sum(a))
    tl.store(out + 3, tl.sum(b))


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def diagnostics_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, state_ptr, alpha_ptr, cut_ptr, part_ptr,
    SPLITS, CUT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, split): the sums of the module docstring, over q's support: the joint support,
    and with CUT only the tokens both cuts keep (triton_cut.py: the truncated q's support)."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    st = state_ptr + row * STATE_W
    a = tl.load(alpha_ptr + row).to(tl.float32)
    if CUT:
        cut_q, cut_t = tl.load(cut_ptr + row * 2), tl.load(cut_ptr + row * 2 + 1)
        lse_b, lse_t = tl.load(st + LSE_B).to(tl.float32), tl.load(st + LSE_T).to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    m_u = tl.full([BLOCK], NEG_INF, tl.float32)
    s_u = tl.zeros([BLOCK], tl.float32)
    s_r = tl.zeros([BLOCK], tl.float32)  # sum e^{u - m_u} (r - c): centred at the lane's top token
    c = tl.zeros([BLOCK], tl.float32)  # and r, lp_b, lp_t at the lane's top token
    lb_top, lt_top = tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32)
    m3, s3 = tl.full([BLOCK], NEG_INF, tl.float32), tl.zeros([BLOCK], tl.float32)
    m4, s4 = tl.full([BLOCK], NEG_INF, tl.float32), tl.zeros([BLOCK], tl.float32)
    m5, s5 = tl.full([BLOCK], NEG_INF, tl.float32), tl.zeros([BLOCK], tl.float32)
    m6, s6 = tl.full([BLOCK], NEG_INF, tl.float32), tl.zeros([BLOCK], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, n_blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        lp_b, lp_t, r, joint = log_probs(raw_b, raw_t, inv_temp, st)
        if CUT:
            joint = joint & kept(raw_b, raw_t, inv_temp, lse_b, lse_t, a, cut_q, cut_t)
        u = tl.where(joint, lp_b + a * r, NEG_INF)
        old_s = s_u
        m_u, s_u, e, up = online(m_u, s_u, u)  # e: the old sums' factor where u is the new max
        s_r = tl.where(up, e * (s_r + old_s * (c - r)), s_r + e * (r - c))
        c = tl.where(up, r, c)
        lb_top = tl.where(up, lp_b, lb_top)
        lt_top = tl.where(up, lp_t, lt_top)
        m3, s3 = accumulate(m3, s3, tl.where(joint, lp_b - a * r, NEG_INF))  # 2 lp_b - u
        m4, s4 = accumulate(m4, s4, tl.where(joint, lp_t + (1.0 - a) * r, NEG_INF))  # 2 lp_t - u
        m5, s5 = accumulate(m5, s5, tl.where(joint, lp_b, NEG_INF))
        m6, s6 = accumulate(m6, s6, tl.where(joint, lp_t, NEG_INF))
    out = part_ptr + (row * SPLITS + split) * DIAG_STATS_W
    top = tl.max(m_u)
    scale = tl.exp(m_u - safe(top))
    first = tl.min(tl.where(m_u == top, lanes, BLOCK))  # a lane holding the split's top token
    at_top = lanes == first
    c_top = tl.sum(tl.where(at_top, c, 0.0))
    tl.store(out, top)
    tl.store(out + 1, tl.sum(s_u * scale))
    tl.store(out + 2, tl.sum(scale * (s_r + s_u * (c - c_top))))
    store_lse(out + 3, m3, s3)
    store_lse(out + 5, m4, s4)
    store_lse(out + 7, m5, s5)
    store_lse(out + 9, m6, s6)
    tl.store(out + 11, c_top)
    tl.store(out + 12, tl.sum(tl.where(at_top, lb_top, 0.0)))
    tl.store(out + 13, tl.sum(tl.where(at_top, lt_top, 0.0)))
