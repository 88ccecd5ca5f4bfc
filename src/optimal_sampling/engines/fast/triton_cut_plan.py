"""The cut search's per-row kernels (triton_cut.py holds the passes over the keys and the row
state's layout): `search_combine_kernel` merges a pass's (row, split) partials, finds the bracket
where the target is crossed and plans what the next pass does for the row; `finish_kernel` reads
the exact cut from the row's collected keys, sorted."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import safe
from .triton_cut import (
    BASE_N,
    BASE_S,
    COLLECT,
    COLLECT_HI,
    COLLECTED,
    EXACT,
    G_BASE_N,
    G_BASE_S,
    GATHER,
    GATHERED,
    HI,
    LO,
    MAX_SPLITS,
    N_HI,
    NEG_INF,
    NO_CUT,
    PHASE,
    POS_INF,
    REFINE,
    S_HI,
    SEARCH_STATE_W,
    TIED,
    TOP,
    TOTAL_N,
    TOTAL_S,
    first_thresholds,
)


@triton.jit
def merged_pass(part_ptr, row, SPLITS, K: tl.constexpr):
    """A pass's (row, split) partials merged: the largest key, and per threshold the count, the
    mass relative to e^max (float64) and the smallest key at or above it."""
    sp = tl.arange(0, MAX_SPLITS)[:, None]
    jj = tl.arange(0, K)[None, :]
    at = part_ptr + (row * SPLITS + sp) * (1 + 3 * K)
    ok = sp < SPLITS
    m = tl.load(at, mask=ok, other=NEG_INF)  # [MAX_SPLITS, 1]
    top = tl.max(tl.max(m, axis=1), axis=0)
    w = tl.exp((m - safe(top)).to(tl.float64))
    n = tl.sum(tl.load(at + 1 + jj, mask=ok, other=0.0).to(tl.float64), axis=0)  # [K]
    s = tl.sum(tl.load(at + 1 + K + jj, mask=ok, other=0.0).to(tl.float64) * w, axis=0)
    smallest = tl.min(tl.load(at + 1 + 2 * K + jj, mask=ok, other=POS_INF), axis=0)
    return top, n, s, smallest


@triton.jit(do_not_specialize=["SPLITS"])  # one build for every batch size
def search_combine_kernel(
    part_ptr, thr_ptr, search_ptr, count_ptr, target_ptr, big_count_ptr, gather_cap1, gather_cap2,
    SPLITS, K: tl.constexpr, KN: tl.constexpr, FIRST: tl.constexpr, BY_COUNT: tl.constexpr,
    ALL_ABOVE: tl.constexpr, SECOND: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    """Per row: the bracket [lo, hi) where the count (BY_COUNT: target k) or the mass (target p of
    the total) crosses, lo the smallest key at or above the crossing threshold, then what the next
    pass does: collect it, gather it (and refine it there), refine it, or nothing (no cut; or the
    target met by keys tied at lo, which settles the cut unless a SECOND cut, top-p after top-k,
    needs the keys above lo). A pass over gathered keys adds the count and mass above them."""
    row = tl.program_id(0).to(tl.int64)
    k, p = tl.load(target_ptr), tl.load(target_ptr + 1).to(tl.float32)
    srch = search_ptr + row * SEARCH_STATE_W
    if FIRST:
        phase = REFINE
    else:
        phase = tl.load(srch + PHASE)
        tl.store(srch + PHASE, tl.where(phase == COLLECT, COLLECTED, phase))
    if (phase == REFINE) | (phase == GATHER):
        top, n, s, smallest = merged_pass(part_ptr, row, SPLITS, K)
        jj = tl.arange(0, K)
        if FIRST:
            thr = first_thresholds(jj, K)
            m = top
            rel = 1.0
            hi = tl.full([], POS_INF, tl.float32)
            n_hi, s_hi = tl.zeros([], tl.float64), tl.zeros([], tl.float64)
            total_n, total_s = tl.sum(tl.where(jj == K - 1, n, 0.0)), tl.sum(tl.where(jj == K - 1, s, 0.0))
            tl.store(count_ptr + row, 0)
            tl.store(big_count_ptr + row * 2, 0)
            tl.store(big_count_ptr + row * 2 + 1, 0)
            gathered, g_n, g_s = tl.zeros([], tl.float64), tl.zeros([], tl.float64), tl.zeros([], tl.float64)
            tl.store(srch + TOP, m.to(tl.float64))
            tl.store(srch + TOTAL_N, total_n)
            tl.store(srch + TOTAL_S, total_s)
            tl.store(srch + EXACT, 1.0)
        else:
            thr = tl.load(thr_ptr + row * K + jj)
            m = tl.load(srch + TOP).to(tl.float32)
            rel = tl.exp((top - safe(m)).to(tl.float64))  # this pass's masses relative to e^M
            hi, n_hi, s_hi = tl.load(srch + HI).to(tl.float32), tl.load(srch + N_HI), tl.load(srch + S_HI)
            total_n, total_s = tl.load(srch + TOTAL_N), tl.load(srch + TOTAL_S)
            gathered = tl.load(srch + GATHERED) + tl.where(phase == GATHER, 1.0, 0.0)
            g_n, g_s = tl.load(srch + G_BASE_N), tl.load(srch + G_BASE_S)
        s = s * rel
        if not FIRST:  # a pass over the gathered keys: add the keys above them
            n += tl.where(gathered > 0, g_n, 0.0)
            s += tl.where(gathered > 0, g_s, 0.0)
        if BY_COUNT:
            target_k = k.to(tl.float64)
            if SECOND:  # top-p still cuts a row with fewer than k keys: all of them are its top-k set
                target_k = tl.minimum(target_k, total_n)
            below = n < target_k
            target_ok = total_n >= target_k
        else:
            below = s < p * total_s
            target_ok = total_s > 0
        # The ends are known from the pass before (sums in another order may round across the
        # target): t_0 = hi is below it, the last threshold (lo, or -inf) reaches it.
        if not FIRST:  # (int arithmetic: Triton's interpreter cannot AND a scalar with a vector)
            hi_first = (tl.sum(tl.where(jj == 0, thr, 0.0)) == hi).to(tl.int32)
            below = tl.where(jj == 0, (below.to(tl.int32) + hi_first) > 0, below)
        below = below & (jj != K - 1)
        crossing = tl.sum(below.to(tl.int32))  # the first threshold whose count/mass reaches the target
        lo = tl.sum(tl.where(jj == crossing, smallest, 0.0))  # a key: no key lies in [threshold, lo)
        n_lo = tl.sum(tl.where(jj == crossing, n, 0.0))
        prev = jj == crossing - 1
        new_hi = tl.where(crossing > 0, tl.sum(tl.where(prev, thr, 0.0)), hi)
        n_hi = tl.where(crossing > 0, tl.sum(tl.where(prev, n, 0.0)), n_hi)
        s_hi = tl.where(crossing > 0, tl.sum(tl.where(prev, s, 0.0)), s_hi)
        # Below the pass before's lo + 1 ulp (threshold K - 2) but not at lo: keys tied at lo meet
        # the target (lo is then the cut, unless a SECOND cut needs the keys above it).
        tied = crossing < 0  # false
        if not FIRST and not SECOND:
            t_last = tl.sum(tl.where(jj == K - 1, thr, 0.0))
            t_up = tl.sum(tl.where(jj == K - 2, thr, 0.0))
            tied = (crossing == K - 1).to(tl.int32) + (t_up == next_up(t_last)).to(tl.int32) == 2
        plan_next(
            srch, thr_ptr, row, lo, new_hi, n_lo, n_hi, s_hi, m, target_ok, tied, gathered, g_n, g_s,
            gather_cap1, gather_cap2,
            KN, ALL_ABOVE, CAP,
        )  # fmt: skip


@triton.jit
def plan_next(srch, thr_ptr, row, lo, hi, n_lo, n_hi, s_hi, m, target_ok, tied, gathered, g_n, g_s,
              gather_cap1, gather_cap2,
              K: tl.constexpr, ALL_ABOVE: tl.constexpr, CAP: tl.constexpr):  # fmt: skip
    """Store the bracket and the next phase; a refining row's next K thresholds (the next pass's)
    span [lo, min(hi, M)] evenly, the last two lo + 1 ulp and lo (whether the keys tied at lo
    settle the target). A bracket of at most gather_cap1 keys not gathered yet, or of at most
    gather_cap2 gathered once, is gathered next (the keys the collect would take, with the count
    and mass above them)."""
    if ALL_ABOVE:
        size, collect_hi = n_lo, tl.full([], POS_INF, tl.float32)
        base_n, base_s = tl.zeros([], tl.float64), tl.zeros([], tl.float64)
    else:
        size, collect_hi, base_n, base_s = n_lo - n_hi, hi, n_hi, s_hi
    span_hi = tl.minimum(hi, m)
    settled = (tied.to(tl.int32) + (span_hi <= lo).to(tl.int32)) > 0
    gather = ((gathered == 0) & (size <= gather_cap1)) | ((gathered == 1) & (size <= gather_cap2))
    phase = tl.where(size <= CAP, COLLECT, tl.where(settled, TIED, tl.where(gather, GATHER, REFINE)))
    phase = tl.where(target_ok, phase, NO_CUT)
    tl.store(srch + PHASE, phase)
    tl.store(srch + GATHERED, gathered)
    tl.store(srch + G_BASE_N, tl.where(phase == GATHER, base_n, g_n))
    tl.store(srch + G_BASE_S, tl.where(phase == GATHER, base_s, g_s))
    tl.store(srch + LO, lo.to(tl.float64))
    tl.store(srch + HI, hi.to(tl.float64))
    tl.store(srch + N_HI, n_hi)
    tl.store(srch + S_HI, s_hi)
    tl.store(srch + COLLECT_HI, collect_hi.to(tl.float64))
    tl.store(srch + BASE_N, base_n)
    tl.store(srch + BASE_S, base_s)
    jj = tl.arange(0, K)
    floor = tl.maximum(lo, span_hi - 1e4)  # lo may be -inf; keys below M - 1e4 carry no mass
    even = span_hi - (span_hi - floor) * jj.to(tl.float32) / (K - 2)
    up = next_up(lo)
    tl.store(thr_ptr + row * K + jj, tl.where(jj == K - 1, lo, tl.maximum(even, up)))


@triton.jit
def next_up(x):
    """The smallest float32 above x (finite x)."""
    bits = x.to(tl.int32, bitcast=True)
    up = tl.where(x < 0, bits - 1, tl.where(x == 0, 1, bits + 1))
    return up.to(tl.float32, bitcast=True)


@triton.jit
def sorted_cut(search_ptr, cand_ptr, count_ptr, row, m, k, p, CAP: tl.constexpr, TOP_K: tl.constexpr,
               TOP_P: tl.constexpr, SEQUENTIAL: tl.constexpr, SECOND: tl.constexpr):  # fmt: skip
    """The top-k / top-p cut read from a row's collected keys, sorted (what a collected row's cut is)."""
    srch = search_ptr + row * SEARCH_STATE_W
    count = tl.load(count_ptr + row)
    idx = tl.arange(0, CAP)
    valid = idx < count
    c = tl.sort(tl.load(cand_ptr + row * CAP + idx, mask=valid, other=NEG_INF), descending=True)
    e = tl.where(valid, tl.exp(c.to(tl.float64) - m), 0.0)
    cut_k = tl.full([], NEG_INF, tl.float32)
    mass = tl.load(srch + TOTAL_S)
    if TOP_K:
        kth = k
        if SECOND:  # (a row with fewer than k keys: all of them)
            kth = tl.minimum(k, tl.load(srch + TOTAL_N).to(tl.int32))
        cut_k = tl.sum(tl.where(idx == kth - tl.load(srch + BASE_N).to(tl.int32) - 1, c, 0.0))
        if SEQUENTIAL:
            mass = tl.load(srch + BASE_S) + tl.sum(tl.where(c >= cut_k, e, 0.0))
    cut = cut_k
    if TOP_P:
        eligible = valid & (c >= cut_k) if SEQUENTIAL else valid
        cum = tl.load(srch + BASE_S) + tl.cumsum(e, axis=0)
        last = tl.sum((eligible & (cum < p * mass)).to(tl.int32))  # keys kept before the crossing
        has = tl.sum(eligible.to(tl.int32)) > last
        cut_p = tl.where(has, tl.sum(tl.where(idx == last, c, 0.0)), NEG_INF)
        cut = tl.maximum(cut, cut_p)
    return cut


@triton.jit
def finish_kernel(
    search_ptr, cand_ptr, count_ptr, cut_ptr, target_ptr, which,
    CAP: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr,
    SEQUENTIAL: tl.constexpr, SECOND: tl.constexpr,
):  # fmt: skip
    """Per row: the cut from the sorted collected keys (exact), the bracket's lo (tied keys, or a
    search that did not converge: EXACT = 0), or -inf (no cut); then at least M + log(min_p).
    SEQUENTIAL: top-p counts mass within the top-k survivors (q's cuts); else within all keys
    (the teacher's set is its top-k set AND its top-p set)."""
    row = tl.program_id(0).to(tl.int64)
    k, p = tl.load(target_ptr).to(tl.int32), tl.load(target_ptr + 1).to(tl.float32)
    log_min_p = tl.load(target_ptr + 2).to(tl.float32)
    srch = search_ptr + row * SEARCH_STATE_W
    phase = tl.load(srch + PHASE)
    m = tl.load(srch + TOP)
    cut = tl.full([], NEG_INF, tl.float32)
    if TOP_K or TOP_P:  # (min-p alone collects nothing: no sort)
        cut = sorted_cut(search_ptr, cand_ptr, count_ptr, row, m, k, p, CAP, TOP_K, TOP_P, SEQUENTIAL, SECOND)
    collected = (phase == COLLECTED) | (phase == COLLECT)  # COLLECT: by the collect after the last pass
    cut = tl.where(collected, cut, tl.where(phase == NO_CUT, NEG_INF, tl.load(srch + LO).to(tl.float32)))
    exact = collected | (phase == NO_CUT)
    if not SECOND:
        exact = exact | (phase == TIED)
    tl.store(srch + EXACT, exact.to(tl.float64))
    if MIN_P:
        cut = tl.maximum(cut, m.to(tl.float32) + log_min_p)
    tl.store(cut_ptr + row * 2 + which, cut)
