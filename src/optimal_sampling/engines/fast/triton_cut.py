"""The fused sampler's cuts: the teacher support constraint and top-k / top-p / min-p on q, found
as one threshold per row on a key, without sorting the vocabulary.

Every truncation of mixing.support keeps the tokens whose key is at least a threshold: the
teacher's set is lp_t >= cut_t, and the survivors of top-k, then top-p, then min-p on q (inside the
teacher's set) are u >= cut_q, with u = (1 - alpha) lp_b + alpha lp_t = log q + log Z_q (ties at a
cut are kept, as mixing.support does). A search finds the threshold of one key per row:

1. `search_kernel` (pass 1, FIRST): per (row, split), the count and the mass (sum of e^key) of the
   keys at or above K fixed thresholds 0 > -G_1 > ... > -inf (keys are log-probabilities, <= 0),
   and the largest key M (the bracket's lo is a threshold here, a key after a refining pass);
   `search_combine_kernel` (triton_cut_plan.py) merges them per row (float64), finds the bracket
   [lo, hi) where the count (top-k) or the mass (top-p) crosses its target, and plans the next pass:
2. passes 2..PASSES: a row whose bracket holds at most CAP keys has them copied out by
   `collect_kernel` (one atomic per block that holds any); the others are refined by
   `search_kernel` at K_REFINE thresholds evenly spaced over [lo, min(hi, M)]. A row whose
   bracket holds at most BIG keys has them gathered (the collect kernel again) into its stretch
   of a [B, BIG + BIG2] buffer; its later passes read those keys, adding the count and mass above
   them, instead of the whole vocabulary; and once more into the BIG2 part when its bracket holds
   at most BIG2 (a bracket of a near-uniform row holds most of the vocabulary);
3. `finish_kernel` (triton_cut_plan.py): per row, sorts the collected keys (at most CAP) and
   reads the exact k-th key, the exact top-p cut (the last key whose mass before it is below the
   target), and min-p's M + log(min_p); the cut is the largest of those that apply.

With top-k on (k <= CAP) a row collects every key >= lo (so top-p on the top-k survivors, which
needs their sorted masses, is exact too); otherwise it collects the bracket [lo, hi) and knows the
count and mass above hi. A row still refining after the last pass, which needs more than CAP
keys within 1 / (K_REFINE - 2)**(PASSES - 1) of the first bracket's width, keeps its whole bracket
(a superset of the exact set) and its EXACT column is 0; keys tied at one value end the search
exactly. Invariant: logits are finite or -inf; the teacher's set always holds a token q can draw.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import fetch, safe
from .triton_row_state import LOG_Z, LSE_B, LSE_T, NEG_INF, STATE_W

CAP = 2048  # keys a row may collect for the exact finish
K = 16  # thresholds of pass 1 (fixed; each costs a compare and two adds per token)
K_REFINE = 8  # thresholds of each later pass (8 x 6: a top-p step 7 % faster than 16 x 4, H100, flat rows)
PASSES = 6  # search passes (the first at fixed thresholds)
SEARCH_BLOCK = 256  # vocabulary entries per step of a search program ([K, SEARCH_BLOCK] accumulators;
# 256: a top-p step 1.9 % faster than 128, H100, batch 256; 4 warps beat 8)
COLLECT_BLOCK = 512  # entries per collect step (one prefix sum and atomic each; a top-p step 15 us faster
# than 1024, H100, batch 256; 1024 beat 2048, 4096; 256 is slower, and 2 or 8 warps no better than 4)
BIG = 65536  # keys a row may gather, so that its later passes read its bracket, not the vocabulary
BIG2 = 16384  # keys a gathered row may gather again from those, for its passes after that
# a pass writes per (row, split) 1 + 3 K floats: the max key, then per threshold the count, mass, smallest key
SEARCH_STATE = 15  # per row, float64: the columns below
SEARCH_STATE_W = tl.constexpr(SEARCH_STATE)
PHASE = tl.constexpr(0)  # REFINE, COLLECT, COLLECTED, TIED, NO_CUT, GATHER
LO = tl.constexpr(1)  # the bracket [lo, hi) where the target is crossed
HI = tl.constexpr(2)
N_HI = tl.constexpr(3)  # count and mass (relative to e^TOP) of the keys >= hi
S_HI = tl.constexpr(4)
TOP = tl.constexpr(5)  # M, the largest key
TOTAL_N = tl.constexpr(6)
TOTAL_S = tl.constexpr(7)
BASE_N = tl.constexpr(8)  # count and mass above the collected keys (0 when all keys >= lo are collected)
BASE_S = tl.constexpr(9)
COLLECT_HI = tl.constexpr(10)  # the collected keys are those in [lo, COLLECT_HI)
EXACT = tl.constexpr(11)  # 1 where the cut is exact (collected, tied, or none)
GATHERED = tl.constexpr(12)  # 1 or 2 once the bracket is gathered (twice): the passes read those
G_BASE_N = tl.constexpr(13)  # count and mass above the last gathered keys (0 when all keys >= lo are)
G_BASE_S = tl.constexpr(14)
REFINE, COLLECT, COLLECTED, TIED, NO_CUT, GATHER = (tl.constexpr(float(v)) for v in range(6))
POS_INF = tl.constexpr(float("inf"))
LOWEST = tl.constexpr(-3.4028234663852886e38)  # the smallest finite float32
MAX_SPLITS = tl.constexpr(64)  # mixing_fast.split_count's largest


@triton.jit
def mixed_key(zb, zt, lse_b, lse_t, alpha):
    """u = (1 - alpha) lp_b + alpha lp_t with 0 * (-inf) = 0: log q + log Z_q, the key of q's cuts."""
    wb = 1.0 - alpha
    return tl.where(wb == 0, 0.0, wb * (zb - lse_b)) + tl.where(alpha == 0, 0.0, alpha * (zt - lse_t))


@triton.jit
def cut_keys(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha):
    """(u, lp_t) as the cuts compare them, bit for bit the same in every kernel: a token at a cut
    IS the cut, so a compiler free to contract a multiply-add differently in two kernels could
    drop it from one. Explicit FMAs leave it no choice (0 * (-inf) taken as 0)."""
    lb = tl.fma(raw_b, inv_temp, -lse_b)
    lt = tl.fma(raw_t, inv_temp, -lse_t)
    wb = 1.0 - alpha
    base_part = wb * tl.where(wb == 0, 0.0, lb)
    return tl.fma(alpha, tl.where(alpha == 0, 0.0, lt), base_part), lt


@triton.jit
def kept(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha, cut_q, cut_t):
    """Whether a token survives both cuts (what every pass after the search masks with)."""
    u, lt = cut_keys(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha)
    return (u >= cut_q) & (lt >= cut_t)


@triton.jit
def search_key(
    raw_b, raw_t, inv_temp, lse_b, lse_t, alpha, cut_t, Q: tl.constexpr, CONSTRAINED: tl.constexpr
):
    """The searched key: u inside the teacher's set (Q), or the teacher's lp_t; -inf outside."""
    u, lt = cut_keys(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha)
    if Q:
        key = u
        if CONSTRAINED:
            key = tl.where(lt >= cut_t, key, NEG_INF)
    else:
        key = lt
    return key


@triton.jit
def row_inputs(state_ptr, alpha_ptr, cut_ptr, row):
    st = state_ptr + row * STATE_W
    lse_b, lse_t = tl.load(st + LSE_B).to(tl.float32), tl.load(st + LSE_T).to(tl.float32)
    return lse_b, lse_t, tl.load(alpha_ptr + row), tl.load(cut_ptr + row * 2 + 1)


@triton.jit
def first_thresholds(j, K: tl.constexpr):
    """Pass 1's thresholds -G_j: 0, -1/4, -1, ... -(j/2)**2, then -1e4 and -inf."""
    g = 0.25 * (j * j).to(tl.float32)
    return tl.where(j == K - 1, NEG_INF, tl.where(j == K - 2, -1e4, -g))


@triton.jit
def tally(key, above, ref, acc_n, acc_s, acc_min, SMALLEST: tl.constexpr):
    """Add a block's keys to the per-threshold count, mass (relative to e^ref) and (SMALLEST)
    smallest key."""
    hit = above.to(tl.float32)
    acc_s += hit * tl.exp(key - safe(ref))
    acc_n += hit
    if SMALLEST:
        acc_min = tl.minimum(acc_min, tl.where(above, key, POS_INF))
    return acc_n, acc_s, acc_min


@triton.jit
def fetch_keys(keys_ptr, idx, end):
    """Issue the loads of a block of gathered keys two blocks before the loop uses them: a
    gathered pass has little arithmetic per key to hide one block's memory latency behind."""
    return tl.load(keys_ptr + idx, mask=idx < end, other=NEG_INF)


@triton.jit
def gathered_keys(big_count_ptr, row, level, cap1):
    """How many keys a row gathered at `level` (1 or 2; 0: none) and where they start in its
    stretch of the big buffer (level 1's cap1 keys, then level 2's)."""
    n = tl.load(big_count_ptr + row * 2 + tl.maximum(level - 1, 0))
    return tl.where(level > 0, n, 0), tl.where(level == 2, cap1, 0)


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def search_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, state_ptr, alpha_ptr, cut_ptr,
    search_ptr, thr_ptr, part_ptr, big_ptr, big_count_ptr, cap1, cap2,
    SPLITS, K: tl.constexpr, FIRST: tl.constexpr, FIXED_REF: tl.constexpr, Q: tl.constexpr,
    CONSTRAINED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, split): the largest key, and per threshold of the row's K the count, the mass
    (relative to that max) and the smallest of the keys at or above it. Rows not refining read
    nothing; a row whose bracket is gathered reads its share of those keys, not the vocabulary.
    Later passes take the masses relative to e^M, the row's max from pass 1 (every key is <= M),
    and store M as their max. Pass 1 with FIXED_REF sums them relative to a reference known
    before it reads a key: 0 for the teacher's lp_t, log Z_q (LOG_Z) for u of a row whose alpha
    was solved (so key - ref is a log-probability, <= ~0, and the row's top >= ref - log V: no
    overflow, and nothing that matters underflows). Otherwise pass 1 takes them relative to each
    lane's running max, rescaling a lane's sums as its max rises (a multiply per threshold and key:
    pass 1 of a top-p search took 194 us that way, 141 us with FIXED_REF, H100, batch 256): a max
    over the block would need a cross-warp reduction and barrier for every 128 keys."""
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    lse_b, lse_t, alpha, cut_t = row_inputs(state_ptr, alpha_ptr, cut_ptr, row)
    j = tl.arange(0, K)[:, None]
    m = tl.full([1, BLOCK], NEG_INF, tl.float32)  # pass 1: each lane's largest key
    if FIRST:
        thr = first_thresholds(j, K)
        blocks, big_blocks, share, n_big, offset = n_blocks, 0, 0, 0, 0
        ref = tl.full([], 0.0, tl.float32)  # the teacher's lp_t (pass 1 reads no gathered keys)
        if FIXED_REF and Q:
            ref = tl.load(state_ptr + row * STATE_W + LOG_Z).to(tl.float32)
    else:
        srch = search_ptr + row * SEARCH_STATE_W
        thr = tl.load(thr_ptr + row * K + j)
        phase = tl.load(srch + PHASE)
        refining = (phase == REFINE) | (phase == GATHER)
        if not refining:  # settled: the combine reads nothing of this row's pass
            return
        level = tl.load(srch + GATHERED).to(tl.int32) + (phase == GATHER).to(tl.int32)  # what it reads
        n_big, offset = gathered_keys(big_count_ptr, row, level, cap1)
        share = tl.cdiv(tl.cdiv(n_big, SPLITS), BLOCK) * BLOCK
        blocks = tl.where(level > 0, 0, n_blocks)
        big_blocks = tl.where(level > 0, share // BLOCK, 0)
        ref = tl.load(srch + TOP).to(tl.float32)
    thr = tl.maximum(thr, LOWEST)  # a -inf threshold: every finite key, and a -inf key is never above
    lanes = tl.arange(0, BLOCK)[None, :]
    acc_n = tl.zeros([K, BLOCK], tl.float32)
    acc_s = tl.zeros([K, BLOCK], tl.float32)
    acc_min = tl.full([K, BLOCK], POS_INF, tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        key = search_key(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha, cut_t, Q, CONSTRAINED)
        above = key >= thr  # [K, BLOCK]
        if FIRST:
            lane_top = tl.maximum(m, key)
            if FIXED_REF:
                acc_n, acc_s, acc_min = tally(key, above, ref, acc_n, acc_s, acc_min, False)
            else:  # a lane's sums so far were relative to e^m: rescale them to its new max
                acc_s = acc_s * tl.where(m == NEG_INF, 1.0, tl.exp(m - safe(lane_top)))
                acc_n, acc_s, acc_min = tally(key, above, lane_top, acc_n, acc_s, acc_min, False)
            m = lane_top
        else:
            acc_n, acc_s, acc_min = tally(key, above, ref, acc_n, acc_s, acc_min, True)
    big_start = split * share
    big_end = tl.minimum(big_start + share, n_big)
    keys = big_ptr + row * (cap1 + cap2) + offset
    next_key = fetch_keys(keys, big_start + lanes, big_end)
    after_key = fetch_keys(keys, big_start + BLOCK + lanes, big_end)
    for i in range(0, big_blocks):
        key = next_key
        next_key = after_key
        after_key = fetch_keys(keys, big_start + (i + 2) * BLOCK + lanes, big_end)
        acc_n, acc_s, acc_min = tally(key, key >= thr, ref, acc_n, acc_s, acc_min, True)
    if FIRST:
        top = tl.max(m)
        if FIXED_REF:  # (a split whose keys all lie 80 below ref matters to no cut: its masses
            # underflowed, so the clamp keeps them finite)
            scale = tl.where(top == NEG_INF, 0.0, tl.exp(tl.minimum(ref - safe(top), 80.0)))
        else:  # each lane's sums relative to e^top
            scale = tl.where(m == NEG_INF, 0.0, tl.exp(m - safe(top)))
    else:
        top, scale = ref, 1.0
    out = part_ptr + (row * SPLITS + split) * (1 + 3 * K)
    tl.store(out, top)
    jj = tl.arange(0, K)
    tl.store(out + 1 + jj, tl.sum(acc_n, axis=1))
    tl.store(out + 1 + K + jj, tl.sum(acc_s * scale, axis=1))
    if FIRST:  # the thresholds stand for the smallest keys (bracket ends; the refining passes find keys)
        tl.store(out + 1 + 2 * K + jj, tl.max(tl.maximum(first_thresholds(j, K), LOWEST), axis=1))
    else:
        tl.store(out + 1 + 2 * K + jj, tl.min(acc_min, axis=1))


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def collect_kernel(
    zb_ptr, zt_ptr, stride_b, stride_t, V, chunk, n_blocks, inv_temp_ptr, state_ptr, alpha_ptr, cut_ptr,
    search_ptr, cand_ptr, count_ptr, big_ptr, big_count_ptr, cap1, cap2, SPLITS,
    CAP: tl.constexpr, Q: tl.constexpr, CONSTRAINED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, split) of a row whose bracket is small: copy its keys in [lo, COLLECT_HI) out,
    from the vocabulary or from its gathered keys; of a row to GATHER: those keys into the next
    level of its stretch of the big buffer."""
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    srch = search_ptr + row * SEARCH_STATE_W
    phase = tl.load(srch + PHASE)
    gather = phase == GATHER
    copying = (phase == COLLECT) | gather
    if not copying:  # nothing to copy: most rows after the first passes
        return
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    zb_ptr += row * stride_b
    zt_ptr += row * stride_t
    lse_b, lse_t, alpha, cut_t = row_inputs(state_ptr, alpha_ptr, cut_ptr, row)
    level = tl.load(srch + GATHERED).to(tl.int32)  # the keys it reads (0: the vocabulary's)
    n_big, offset = gathered_keys(big_count_ptr, row, level, cap1)
    row_big = big_ptr + row * (cap1 + cap2)
    into, into_cap = row_big + tl.where(level == 0, 0, cap1), tl.where(level == 0, cap1, cap2)  # a gather's
    share = tl.cdiv(tl.cdiv(n_big, SPLITS), BLOCK) * BLOCK
    all_blocks = tl.cdiv(chunk, BLOCK)  # (its own block: no per-threshold accumulators)
    blocks = tl.where(level > 0, 0, all_blocks)
    big_blocks = tl.where(level > 0, share // BLOCK, 0)
    lo = tl.load(srch + LO).to(tl.float32)
    hi = tl.load(srch + COLLECT_HI).to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    next_b, next_t = fetch(zb_ptr, zt_ptr, start + lanes, end)
    for i in range(0, blocks):
        raw_b, raw_t = next_b.to(tl.float32), next_t.to(tl.float32)
        next_b, next_t = fetch(zb_ptr, zt_ptr, start + (i + 1) * BLOCK + lanes, end)
        key = search_key(raw_b, raw_t, inv_temp, lse_b, lse_t, alpha, cut_t, Q, CONSTRAINED)
        inside = (key >= lo) & (key < hi) & (key > NEG_INF)
        if gather:
            append(key, inside, big_count_ptr + row * 2, into, into_cap)
        else:
            append(key, inside, count_ptr + row, cand_ptr + row * CAP, CAP)
    big_start = split * share
    big_end = tl.minimum(big_start + share, n_big)
    next_key = fetch_keys(row_big + offset, big_start + lanes, big_end)
    after_key = fetch_keys(row_big + offset, big_start + BLOCK + lanes, big_end)
    for i in range(0, big_blocks):
        key = next_key
        next_key = after_key
        after_key = fetch_keys(row_big + offset, big_start + (i + 2) * BLOCK + lanes, big_end)
        inside = (key >= lo) & (key < hi) & (key > NEG_INF)
        if gather:
            append(key, inside, big_count_ptr + row * 2 + 1, into, into_cap)
        else:
            append(key, inside, count_ptr + row, cand_ptr + row * CAP, CAP)


@triton.jit
def append(key, inside, count_ptr, out_ptr, cap):
    """Append the keys marked inside to a row's list (count_ptr: its length; past cap: dropped)."""
    n_in = tl.sum(inside.to(tl.int32), axis=0)
    if n_in > 0:
        base = tl.atomic_add(count_ptr, n_in)
        pos = base + tl.cumsum(inside.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + pos, key, mask=inside & (pos < cap))
