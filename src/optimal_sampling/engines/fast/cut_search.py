"""The fused sampler's cuts, driven from the host: which threshold searches of triton_cut.py (its
passes) and triton_cut_plan.py (its per-row planning and finish) a setting needs (the teacher's
set, then q's top-k / top-p / min-p) and the passes each runs; the targets themselves are read
on the device (mixing_fast.step_values), so a captured step serves every setting of its
kernels."""

from __future__ import annotations

import torch

from ...config import MixConfig, SamplingParams


def truncates(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1.0 or params.min_p > 0.0


def cut_thresholds(
    rows, values: torch.Tensor, splits: int, state, alpha, mix: MixConfig, params: SamplingParams,
    solved: bool, trace=None,
) -> torch.Tensor:  # fmt: skip
    """[B, 2] float32: each row's cut on u (q's top-k / top-p / min-p, inside the teacher's set)
    and on lp_t (the teacher's set); -inf where none applies (triton_cut.py). values: the step's
    numbers (`step_values`): 1 / T, q's targets, the teacher set's targets. solved: alpha came
    from the kl_symmetry solve, so the row state holds log Z_q (pass 1's reference for q's keys).
    trace: a list to append the cuts, each search's row state and alpha to (checks, eager only)."""
    batch, vocab = state.shape[0], rows[4]
    cuts = torch.full((batch, 2), float("-inf"), dtype=torch.float32, device=state.device)
    searches = []
    if mix.constrained:
        teacher = CutSearch(mix.target_top_k, mix.target_top_p, 0.0, vocab, sequential=False)
        searches.append(
            teacher.run(
                rows, values, values[4:], splits, state, alpha, cuts, 1, constrained=False, fixed_ref=True
            )
        )
    if truncates(params, vocab):
        q = CutSearch(params.top_k, params.top_p, params.min_p, vocab, sequential=True)
        fixed = solved and not mix.constrained  # (inside the teacher's set q's top may lie far below)
        searches.append(
            q.run(rows, values, values[1:4], splits, state, alpha, cuts, 0, mix.constrained, fixed_ref=fixed)
        )
    if trace is not None:
        trace.append({"cuts": cuts, "searches": searches, "state": state, "alpha": alpha})
    return cuts


class CutSearch:
    """One row-wise threshold search (triton_cut.py's passes) for a top-k / top-p / min-p: which
    of them apply and how k compares with CAP set its kernels; their targets are read on the device."""

    def __init__(self, top_k: int, top_p: float, min_p: float, vocab: int, sequential: bool):
        from .triton_cut import CAP, PASSES, K

        self.use_k, self.use_p, self.use_min = 0 < top_k < vocab, top_p < 1.0, min_p > 0.0
        self.all_above = self.use_k and top_k <= CAP
        self.second = self.all_above and self.use_p  # top-p needs every key of the top-k set
        self.passes = PASSES if self.use_k or self.use_p else 1
        self.first_k = K if self.use_k or self.use_p else 2  # min-p alone needs only the row's max
        self.sequential = sequential

    def run(
        self, rows, inv_temp: torch.Tensor, targets: torch.Tensor, splits: int, state, alpha, cuts,
        which: int, constrained: bool, fixed_ref: bool,
    ):  # fmt: skip
        """Write column `which` of cuts; returns the rows' search state (triton_cut's columns).
        targets: float64 on the device, k (2**31 - 1 for none: min-p alone, pass 1 finds the max),
        p, log min-p. fixed_ref: pass 1 may sum masses relative to a known reference (search_kernel)."""
        from . import triton_cut as tc
        from . import triton_cut_plan as plan

        batch, device = state.shape[0], state.device
        search = torch.empty(batch, tc.SEARCH_STATE, dtype=torch.float64, device=device)
        thr = torch.empty(batch, tc.K_REFINE, dtype=torch.float32, device=device)
        parts = torch.empty(batch, splits, 1 + 3 * max(tc.K, tc.K_REFINE), dtype=torch.float32, device=device)
        cand = torch.empty(batch, tc.CAP, dtype=torch.float32, device=device)
        count = torch.empty(batch, dtype=torch.int32, device=device)
        cap1 = min(tc.BIG, rows[4])  # keys a row may gather (0: none), then gather again from those
        cap2 = min(tc.BIG2, cap1)
        big = torch.empty(batch, max(cap1 + cap2, 1), dtype=torch.float32, device=device)
        big_count = torch.empty(batch, 2, dtype=torch.int32, device=device)
        common = (*rows[:6], rows[5] // tc.SEARCH_BLOCK, inv_temp, state, alpha, cuts)
        flags = {"Q": which == 0, "CONSTRAINED": constrained, "BLOCK": tc.SEARCH_BLOCK}
        grid = (batch, splits)
        for p in range(self.passes + 1):
            if p > 0:  # rows whose bracket the pass before found small copy it out
                tc.collect_kernel[grid](
                    *common, search, cand, count, big, big_count, cap1, cap2, splits,
                    CAP=tc.CAP, **{**flags, "BLOCK": tc.COLLECT_BLOCK}, num_warps=4,
                )  # fmt: skip
            if p == self.passes:
                break
            k = self.first_k if p == 0 else tc.K_REFINE
            last = p == self.passes - 1  # (a gather after the last pass would be read by nothing)
            tc.search_kernel[grid](
                *common, search, thr, parts, big, big_count, cap1, cap2,
                SPLITS=splits, K=k, FIRST=p == 0, FIXED_REF=fixed_ref and p == 0, **flags, num_warps=4,
            )  # fmt: skip
            plan.search_combine_kernel[(batch,)](
                parts, thr, search, count, targets, big_count, 0 if last else cap1, 0 if last else cap2,
                SPLITS=splits, K=k, KN=tc.K_REFINE, FIRST=p == 0,
                BY_COUNT=self.use_k or not self.use_p, ALL_ABOVE=self.all_above, SECOND=self.second,
                CAP=tc.CAP, num_warps=4,
            )  # fmt: skip
        plan.finish_kernel[(batch,)](
            search, cand, count, cuts, targets, which, CAP=tc.CAP,
            TOP_K=self.use_k, TOP_P=self.use_p, MIN_P=self.use_min, SEQUENTIAL=self.sequential,
            SECOND=self.second, num_warps=8,
        )  # fmt: skip
        return search
