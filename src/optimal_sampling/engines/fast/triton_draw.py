"""The fused sampler's draw (step 5 of triton_solve.py's list): mass per draw chunk, two-level
Gumbel-max with mixing.draw.sample_tokens' noise bit for bit, the greedy argmax, and the outputs."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import fetch, lse, merge_lse, mix32, online, reduce_lanes, safe, tempered
from .triton_cut import kept, mixed_key
from .triton_row_state import LOG_Z, LSE_B, LSE_T, MASS_STATS_W, NEG_INF, RAW_LSE_B, RAW_LSE_T, STATE_W


@triton.jit
def key_of_row(seeds_ptr, steps_ptr, row):
    return mix32(mix32(tl.load(seeds_ptr + row).to(tl.uint32)) ^ tl.load(steps_ptr + row).to(tl.uint32))


@triton.jit
def gumbel(row_key, idx):
    """The Gumbel noise of noise index idx: -log(-log(u)) with u = sampling.noise_uniforms', bit for bit."""
    bits = mix32(mix32(row_key ^ mix32(idx.to(tl.uint32) * 0x9E37)) ^ row_key)
    unif = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -tl.log(-tl.log(unif))


@triton.jit
def first_max(key, idx, none):
    """(max of key, the smallest idx holding it); NaN keys count as -inf."""
    key = tl.where(key == key, key, NEG_INF)
    top = tl.max(key, axis=0)
    return top, tl.min(tl.where(key == top, idx, none), axis=0)


@triton.jit
def log_q_plus(raw_b, raw_t, inv_temp, lse_b, lse_t, wb, wt, ref, TEMPERED: tl.constexpr):
    """(1 - alpha) lp_b + alpha lp_t - ref = log q + log Z_q - ref, cheaply: each log-prob is
    clamped at -1e30, so a -inf one times a zero weight is 0 and times a positive weight ~-inf."""
    if TEMPERED:
        raw_b, raw_t = raw_b * inv_temp, raw_t * inv_temp
    lb = tl.maximum(raw_b - lse_b, -1e30)
    lt = tl.maximum(raw_t - lse_t, -1e30)
    return wb * lb + (wt * lt - ref)


@triton.jit
def row_mix(alpha_ptr, st, row):
    """A row's alpha and its tempered policies' log-normalisers (lse_b, lse_t) from the state row
    `st`: what every pass over log q (mass, draw, argmax) starts from."""
    return tl.load(alpha_ptr + row), tl.load(st + LSE_B).to(tl.float32), tl.load(st + LSE_T).to(tl.float32)


@triton.jit
def row_cuts(cut_ptr, row, CUT: tl.constexpr):
    """A row's cuts on u and on lp_t (triton_cut.py), -inf when the configuration has none."""
    if CUT:
        return tl.load(cut_ptr + row * 2), tl.load(cut_ptr + row * 2 + 1)
    return NEG_INF, NEG_INF


@triton.jit
def mass_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, state_ptr, alpha_ptr, cut_ptr, part_ptr,
    CHUNKS: tl.constexpr, ONLINE: tl.constexpr, TEMPERED: tl.constexpr, CUT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, draw chunk): the chunk's mass of q as a (max, sum) pair, one exp per token and no
    noise. A solved row sums exp(log q + log Z_q - LOG_Z), q up to the Taylor error of LOG_Z
    (every term <= ~1, so no overflow, and the mass is not lost to underflow); a row whose alpha
    was not solved (ONLINE) keeps a running max per lane instead. CUT: tokens outside the cuts
    carry no mass (the sums give the truncated q's log Z_q; LOG_Z stays a safe reference while
    the row's top key is kept, which q's own cuts do and the teacher's set need not)."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    st = state_ptr + row * STATE_W
    alpha, lse_b, lse_t = row_mix(alpha_ptr, st, row)
    cut_q, cut_t = row_cuts(cut_ptr, row, CUT)
    if ONLINE:
        ref = 0.0
    else:
        ref = tl.load(st + LOG_Z).to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    mq = tl.full([BLOCK], NEG_INF, tl.float32)
    sq = tl.zeros([BLOCK], tl.float32)
    start = c * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, n_blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        u = log_q_plus(raw_b, raw_t, inv_temp, lse_b, lse_t, 1.0 - alpha, alpha, ref, TEMPERED)
        if CUT:
            u = tl.where(kept(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha, cut_q, cut_t), u, NEG_INF)
        if ONLINE:
            mq, sq, _, _ = online(mq, sq, u)
        else:
            sq += tl.exp(u)
    if ONLINE:
        m, s, _ = reduce_lanes(mq, sq)
    else:
        m, s = ref, tl.sum(sq, axis=0)
    at = part_ptr + (row * CHUNKS + c) * MASS_STATS_W
    tl.store(at, m)
    tl.store(at + 1, s)


@triton.jit
def write_outputs(
    zb_ptr, zt_ptr, stride_b, stride_t, inv_temp, st, alpha, token, log_z, tok_ptr, lp_ptr, host_ptr, B, row
):  # fmt: skip
    """The token and its log-probs: lp [3, B] (base, teacher, q) and all five as host [B, 5] float64."""
    lse_b, lse_t = tl.load(st + LSE_B).to(tl.float32), tl.load(st + LSE_T).to(tl.float32)
    tb = tl.load(zb_ptr + row * stride_b + token).to(tl.float32)
    tt = tl.load(zt_ptr + row * stride_t + token).to(tl.float32)
    zb, zt, _, _ = tempered(tb, tt, inv_temp)
    lp_b = tb - tl.load(st + RAW_LSE_B).to(tl.float32)
    lp_t = tt - tl.load(st + RAW_LSE_T).to(tl.float32)
    lp_q = mixed_key(zb, zt, lse_b, lse_t, alpha).to(tl.float64) - log_z
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(lp_ptr + row, lp_b)
    tl.store(lp_ptr + B + row, lp_t)
    tl.store(lp_ptr + 2 * B + row, lp_q.to(tl.float32))
    host = host_ptr + row * 5
    tl.store(host, token.to(tl.float64))
    tl.store(host + 1, lp_b.to(tl.float64))
    tl.store(host + 2, lp_t.to(tl.float64))
    tl.store(host + 3, lp_q.to(tl.float32).to(tl.float64))
    tl.store(host + 4, alpha.to(tl.float64))


@triton.jit(do_not_specialize=["B"])  # B only offsets the outputs: one build for every batch size
def draw_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, inv_temp_ptr, seeds_ptr, steps_ptr, state_ptr, alpha_ptr,
    cut_ptr, part_ptr, tok_ptr, lp_ptr, host_ptr, B,
    CHUNKS: tl.constexpr, CHUNK_NOISE: tl.constexpr, SCAN: tl.constexpr, CUT: tl.constexpr,
):  # fmt: skip
    """Per row, the two-level Gumbel-max draw (mixing.draw.sample_tokens): a chunk by its log-mass
    plus chunk noise, then a token of that chunk by u plus token noise; log Z_q from the masses."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row = tl.program_id(0).to(tl.int64)
    st = state_ptr + row * STATE_W
    row_key = key_of_row(seeds_ptr, steps_ptr, row)
    c = tl.arange(0, CHUNKS)
    m = tl.load(part_ptr + (row * CHUNKS + c) * MASS_STATS_W)
    s = tl.load(part_ptr + (row * CHUNKS + c) * MASS_STATS_W + 1)
    top = tl.max(m, axis=0)
    log_z = top.to(tl.float64) + tl.log(
        tl.sum(s.to(tl.float64) * tl.exp(m - safe(top)).to(tl.float64), axis=0)
    )
    # (no `_` assigned before the loop: Triton would type it as a loop-carried variable)
    picked = first_max(lse(m, s) + gumbel(row_key, CHUNK_NOISE + c), c, CHUNKS)[1]
    alpha, lse_b, lse_t = row_mix(alpha_ptr, st, row)
    cut_q, cut_t = row_cuts(cut_ptr, row, CUT)
    start = picked * chunk
    end = tl.minimum(start + chunk, V)
    lanes = tl.arange(0, SCAN)
    best = tl.full([], NEG_INF, tl.float32)
    token = tl.zeros([], tl.int32)
    for i in range(0, tl.cdiv(chunk, SCAN)):
        idx = start + i * SCAN + lanes
        ok = idx < end
        raw_b = tl.load(zb_ptr + row * stride_b + idx, mask=ok, other=NEG_INF).to(tl.float32)
        raw_t = tl.load(zt_ptr + row * stride_t + idx, mask=ok, other=NEG_INF).to(tl.float32)
        zb, zt, _, _ = tempered(raw_b, raw_t, inv_temp)
        if CUT:
            ok = ok & kept(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha, cut_q, cut_t)
        key = tl.where(ok, mixed_key(zb, zt, lse_b, lse_t, alpha) + gumbel(row_key, idx), NEG_INF)
        top_i, at = first_max(key, idx, 2147483647)
        better = top_i > best  # later blocks hold larger indices: the first index wins ties
        token = tl.where(better, at, token)
        best = tl.where(better, top_i, best)
    write_outputs(
        zb_ptr, zt_ptr, stride_b, stride_t, inv_temp, st, alpha, token, log_z, tok_ptr, lp_ptr, host_ptr, B, row
    )  # fmt: skip


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def argmax_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, state_ptr, alpha_ptr, cut_ptr, part_ptr,
    SPLITS, ONLINE_LSE: tl.constexpr, CUT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Greedy, per (row, chunk): the largest u and its index, and (ONLINE_LSE: rows whose alpha was
    not solved, so no alpha pass summed log Z_q) log Z_q per lane, reduced once."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    alpha, lse_b, lse_t = row_mix(alpha_ptr, state_ptr + row * STATE_W, row)
    cut_q, cut_t = row_cuts(cut_ptr, row, CUT)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], NEG_INF, tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    mq = tl.full([BLOCK], NEG_INF, tl.float32)
    sq = tl.zeros([BLOCK], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, n_blocks):
        idx = start + i * BLOCK + lanes
        ok = idx < end
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, idx + BLOCK, end)
        zb, zt, _, _ = tempered(raw_b, raw_t, inv_temp)
        if CUT:
            ok = ok & kept(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha, cut_q, cut_t)
        u = tl.where(ok, mixed_key(zb, zt, lse_b, lse_t, alpha), NEG_INF)
        if ONLINE_LSE:
            mq, sq, _, _ = online(mq, sq, u)
        key = tl.where(u == u, u, NEG_INF)
        better = key > best  # indices rise along a lane: the first index wins ties
        best_idx = tl.where(better, idx, best_idx)
        best = tl.where(better, key, best)
    top = tl.max(best, axis=0)
    at = part_ptr + (row * SPLITS + split) * 4
    tl.store(at, top)
    tl.store(
        at + 1, tl.min(tl.where(best == top, best_idx, 2147483647), axis=0).to(tl.float32)
    )  # exact: V < 2**24
    if ONLINE_LSE:
        m, s, _ = reduce_lanes(mq, sq)
        tl.store(at + 2, m)
        tl.store(at + 3, s)


@triton.jit(do_not_specialize=["SPLITS", "B"])  # one build for every batch size
def argmax_finish_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, inv_temp_ptr, state_ptr, alpha_ptr, part_ptr,
    tok_ptr, lp_ptr, host_ptr, B,
    SPLITS, ONLINE_LSE: tl.constexpr,
):  # fmt: skip
    """Greedy: merge a row's partials into the token (first index on ties) and its outputs."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row = tl.program_id(0).to(tl.int64)
    best = tl.full([], NEG_INF, tl.float32)
    best_idx = tl.zeros([], tl.int32)
    mq, sq = tl.full([], NEG_INF, tl.float32), tl.zeros([], tl.float32)
    for sp in range(0, SPLITS):
        at = part_ptr + (row * SPLITS + sp) * 4
        value = tl.load(at)
        better = value > best
        best_idx = tl.where(better, tl.load(at + 1).to(tl.int32), best_idx)
        best = tl.where(better, value, best)
        if ONLINE_LSE:
            mq, sq = merge_lse(mq, sq, tl.load(at + 2), tl.load(at + 3))
    st = state_ptr + row * STATE_W
    if ONLINE_LSE:
        log_z = lse(mq, sq).to(tl.float64)
    else:
        log_z = tl.load(st + LOG_Z)
    write_outputs(
        zb_ptr, zt_ptr, stride_b, stride_t, inv_temp, st, tl.load(alpha_ptr + row), best_idx, log_z,
        tok_ptr, lp_ptr, host_ptr, B, row,
    )  # fmt: skip
