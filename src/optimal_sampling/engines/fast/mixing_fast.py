"""The per-step sampler of the fast engine: the fused Triton kernel where it applies, else `sample_step`.

`make_step_sampler(mix, params, vocab, device)` is made once per sampler key (`sampler_key`). Both
samplers are graph-capturable callables `(logits_base, logits_teacher, row_seeds, steps) -> tuple`
of [B] tensors in the order of `result_fields(params)`, so the engine captures them in the same
CUDA graph as the two forward passes.

The fused kernels (triton_solve.py: the alpha passes; triton_draw.py: the draw; triton_policy.py:
entropies, tilted moments and diagnostics, merged per row by triton_merge.py; triton_ess.py: the
ess_balance passes; triton_cut.py, driven by cut_search.py: the teacher constraint and top-k /
top-p / min-p as per-row thresholds; triton_row_state.py: the buffers' layout) cover every alpha_method, with or without
diagnostics, any temperature, the teacher constraint and the truncations (all but a top-k above
triton_cut.CAP together with a top-p). They keep |alpha - alpha_float64| <= 1e-4 (tested against the float64 reference) with a grid pass and up to len(REFINE_POINTS)
refining passes of a few points, which rows already solved skip, instead of 24 Newton
iterations over [B, V] tensors; they spread every row over the whole GPU and never write a
[B, V] tensor. Other configurations use the exact `optimal_sampling.mixing.step.sample_step`.

For the sampler: `fused_sample_step` has the signature of `mixing.step.sample_step`; select it where
`fused_supported(mix, params)` and the logits are on CUDA.
"""

from __future__ import annotations

import math

import torch

from ...config import MixConfig, SamplingParams
from ...mixing.draw import CHUNK_NOISE, DRAW_ALIGN, DRAW_CHUNKS, draw_chunk
from ...mixing.step import StepResult, sample_step
from .cut_search import cut_thresholds, truncates
from .transfer import to_device

BASE_FIELDS = ("tokens", "logprob_base", "logprob_teacher", "logprob_q", "alpha")
DIAG_FIELDS = ("ess_ratio", "kl_q_base", "kl_q_teacher")
GRID_POINTS = 4  # the bracketing pass: evenly spaced over [alpha_min, alpha_max], with 0 and 1 (a power of 2)
REFINE_POINTS = (4, 4, 8, 8)  # points per refining pass; a row whose bracket is tight skips the rest
BLOCK = 256  # vocabulary entries per step of a (row, chunk) program
assert DRAW_ALIGN % BLOCK == 0  # a draw chunk is whole blocks
PROGRAMS = 2112  # (row, chunk) programs to aim for per pass (16 per SM of an H100)
MAX_SPLITS = 64  # chunks per row at most (triton_cut.MAX_SPLITS: its merge reads that many)
ROW_WARPS = 4
STATS_WARPS = 4
SAMPLE_WARPS = 4
MASS_WARPS = 4
DRAW_WARPS = 4
DRAW_SCAN = 1024  # tokens per step of the in-chunk draw (a chunk is draw_chunk(V) tokens)


def result_fields(params: SamplingParams) -> tuple[str, ...]:
    return BASE_FIELDS + (DIAG_FIELDS if params.collect_diagnostics else ())


def result_from_tensors(outputs: tuple[torch.Tensor, ...], params: SamplingParams) -> StepResult:
    """outputs: the fields of `result_fields(params)`, then optionally the same rows packed as
    [B, fields] float64 (the fused sampler's), which `StepResult.to_host` copies in one go."""
    names = result_fields(params)
    packed = outputs[len(names)] if len(outputs) > len(names) else None
    return StepResult(**dict(zip(names, outputs[: len(names)], strict=True)), host_rows=packed)


def step_key(mix: MixConfig, params: SamplingParams) -> tuple:
    """What a captured torch step depends on (not max_tokens, n, stop or seed)."""
    return (mix, params.temperature, params.top_k, params.top_p, params.min_p, params.collect_diagnostics)


def fused_key(mix: MixConfig, params: SamplingParams, vocab: int) -> tuple:
    """What a captured fused step depends on: the kernels it launches, not the numbers they read
    from `step_values` (1 / T, top-k, top-p, min-p), so one graph serves every temperature other
    than 0 and 1, every top-p, every top-k up to triton_cut.CAP (and every one above), every min-p."""
    from .triton_cut import CAP

    temperature = "greedy" if params.greedy else "plain" if params.temperature == 1.0 else "tempered"
    top_k = "none" if not 0 < params.top_k < vocab else "small" if params.top_k <= CAP else "large"
    return (
        "fused",
        mix,
        temperature,
        top_k,
        params.top_p < 1.0,
        params.min_p > 0.0,
        params.collect_diagnostics,
    )


def step_values(mix: MixConfig, params: SamplingParams, vocab: int) -> list[float]:
    """The numbers a fused step reads on the device (float64): 1 / T, then the cut targets of q
    (top-k, top-p, log min-p) and of the teacher's set (top-k, top-p, 0), triton_cut's order."""
    inv_temp = 1.0 / params.temperature if params.temperature > 0 else 1.0
    no_k = float(2**31 - 1)  # min-p or top-p alone: no count target
    q_k = float(params.top_k) if 0 < params.top_k < vocab else no_k
    t_k = float(mix.target_top_k) if mix.constrained and 0 < mix.target_top_k < vocab else no_k
    log_min_p = math.log(params.min_p) if params.min_p > 0.0 else 0.0
    return [inv_temp, q_k, params.top_p, log_min_p, t_k, mix.target_top_p, 0.0]


def values_tensor(mix: MixConfig, params: SamplingParams, vocab: int, device) -> torch.Tensor:
    """step_values on the device, copied without making the host wait (a first draw makes its
    own on the prefill stream, behind a queued prefill)."""
    return to_device(torch.tensor(step_values(mix, params, vocab), dtype=torch.float64), torch.device(device))


FUSED_METHODS = ("kl_symmetry", "fixed", "entropy", "reverse_kl_symmetry", "ess_balance")


def fused_supported(mix: MixConfig, params: SamplingParams) -> bool:
    """Every configuration but a top-k above CUT_CAP together with a top-p (of q, or of the
    teacher's set): those need two threshold searches in a row (triton_cut.py)."""
    from .triton_cut import CAP

    both_q = params.top_k > CAP and params.top_p < 1.0
    both_t = mix.constrained and mix.target_top_k > CAP and mix.target_top_p < 1.0
    return mix.alpha_method in FUSED_METHODS and not both_q and not both_t


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class StepSampler:
    """A graph-capturable step sampler for one (mix, params) configuration."""

    def __init__(self, mix: MixConfig, params: SamplingParams):
        self.mix, self.params = mix, params
        self.key = step_key(mix, params)

    def use(self, params: SamplingParams) -> StepSampler:
        """Set the numbers its captured steps read to params' (a torch step has none)."""
        return self

    def __call__(self, logits_b, logits_t, row_seeds, steps, values=None) -> tuple[torch.Tensor, ...]:
        result = sample_step(logits_b, logits_t, row_seeds, steps, self.mix, self.params)
        return tuple(getattr(result, name) for name in result_fields(self.params))


class FusedStepSampler(StepSampler):
    """The fused step of every setting with one `fused_key`: its kernels read the setting's
    numbers from `values`, a device tensor `use` sets (on the current stream, so a step already
    queued keeps the numbers it was queued with)."""

    def __init__(self, mix: MixConfig, params: SamplingParams, vocab: int, device):
        super().__init__(mix, params)
        self.vocab, self.key = vocab, fused_key(mix, params, vocab)
        self.current = step_values(mix, params, vocab)
        self.values = values_tensor(mix, params, vocab, device)

    def use(self, params: SamplingParams) -> FusedStepSampler:
        assert fused_key(self.mix, params, self.vocab) == self.key
        new = step_values(self.mix, params, self.vocab)
        for i, (old, value) in enumerate(zip(self.current, new, strict=True)):
            if old != value:
                self.values[i].fill_(value)  # a kernel with a scalar argument: no host sync
        self.current = new
        return self

    def __call__(self, logits_b, logits_t, row_seeds, steps, values=None) -> tuple[torch.Tensor, ...]:
        """values: the numbers to read instead of `self.values` (an eager call beside queued steps)."""
        values = self.values if values is None else values
        return fused_outputs(logits_b, logits_t, row_seeds, steps, self.mix, self.params, values=values)


def uses_fused(mix: MixConfig, params: SamplingParams, device: torch.device) -> bool:
    return device.type == "cuda" and fused_supported(mix, params) and triton_available()


def sampler_key(mix: MixConfig, params: SamplingParams, vocab: int, device: torch.device) -> tuple:
    """The key of the step sampler (and its graphs) `make_step_sampler` gives for this setting."""
    return fused_key(mix, params, vocab) if uses_fused(mix, params, device) else step_key(mix, params)


def make_step_sampler(
    mix: MixConfig, params: SamplingParams, vocab: int, device: torch.device
) -> StepSampler:
    if uses_fused(mix, params, device):
        return FusedStepSampler(mix, params, vocab, device)
    return StepSampler(mix, params)


def split_count(batch: int, vocab: int, programs: int | None = None) -> int:
    """Chunks per row: about `programs` programs in all, at most MAX_SPLITS, at least a block each.

    A power of two, so that a continuous-batching run, which sees every batch size, meets few
    layouts; the kernels take it at run time (one build serves every batch size)."""
    want = max(1, -(-(programs or PROGRAMS) // batch))
    most = min(MAX_SPLITS, want, -(-vocab // BLOCK))
    return 1 << (most.bit_length() - 1)


def grid_points(lo: float, hi: float, points: int | None = None) -> list[float]:
    """The grid pass's points as the kernel makes them (triton_common.grid), for checks and traces."""
    points = points or GRID_POINTS
    layout = grid_layout(lo, hi, points)
    first = layout["FIRST_IN"]
    extras = [v for v in (0.0, 1.0) if v not in (lo, hi)]
    return extras + [lo + (hi - lo) * (j - first) / (points - 1 - first) for j in range(first, points)]


def grid_layout(lo: float, hi: float, points: int | None = None) -> dict:
    """Where the grid pass puts its points: [lo, hi] evenly from FIRST_IN on, 0 and 1 before it
    where the bracket lacks them (f(1) - f(0) is the Jeffreys divergence of the two rows)."""
    points = points or GRID_POINTS
    extras = [v for v in (0.0, 1.0) if v not in (lo, hi)]
    first = len(extras)
    zero = extras.index(0.0) if 0.0 in extras else (first if lo == 0.0 else points - 1)
    one = extras.index(1.0) if 1.0 in extras else (points - 1 if hi == 1.0 else first)
    return {"FIRST_IN": first, "ZERO_AT": zero, "ONE_AT": one}


def fused_outputs(
    logits_b: torch.Tensor,  # [B, V] (row stride may exceed V)
    logits_t: torch.Tensor,  # [B, V]
    row_seeds: torch.Tensor,  # [B] int64
    steps: torch.Tensor,  # [B] int64
    mix: MixConfig,
    params: SamplingParams,
    trace: list | None = None,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The fused sampler: a row pass, the alpha passes, then the draw: a pass summing the mass of
    each draw chunk and a per-row kernel drawing the chunk and its token (greedy: an argmax pass),
    each pass with a per-row merge.
    Returns tokens, log pi_base, log pi_teacher, log q, alpha, with diagnostics the ESS ratio and
    KL(q || base), KL(q || teacher), and all of them as [B, fields] float64.

    params decides which kernels run; the numbers they read (1 / T, the cuts' targets) come from
    `values` (`step_values` on the device; made from params when None), so a captured step
    serves every setting with its `fused_key`.
    trace: a list to append each alpha pass's points, partial sums and row state to (diagnosis,
    eager only; benchmarks/sampler_diag.py)."""
    from . import triton_draw, triton_row_state, triton_solve

    batch, vocab = logits_b.shape
    assert logits_b.stride(1) == 1 and logits_t.stride(1) == 1 and logits_t.shape == logits_b.shape
    device = logits_b.device
    splits = split_count(batch, vocab)
    chunk = -(-vocab // (splits * BLOCK)) * BLOCK
    rows = (logits_b, logits_t, logits_b.stride(0), logits_t.stride(0), vocab, chunk, chunk // BLOCK)
    if values is None:
        values = values_tensor(mix, params, vocab, device)
    inv_temp = values  # the kernels read 1 / T from values[0]
    tempered = params.temperature not in (0.0, 1.0)
    lo, hi = mix.alpha_min, mix.alpha_max
    solve = mix.alpha_method == "kl_symmetry" and lo < hi
    d_range = mix.alpha_method == "ess_balance" and lo < hi  # its passes pick a summation by the range
    layout = grid_layout(lo, hi)
    state = torch.empty(batch, triton_row_state.STATE, dtype=torch.float64, device=device)
    row_parts = torch.empty(batch, splits, triton_row_state.ROW_STATS, dtype=torch.float64, device=device)
    maxima = torch.empty(batch, splits, GRID_POINTS, dtype=torch.float32, device=device)
    grid_max = torch.empty(batch, GRID_POINTS, dtype=torch.float32, device=device)
    triton_solve.row_kernel[(batch, splits)](
        *rows, inv_temp, lo, hi, row_parts, maxima, SPLITS=splits, K=GRID_POINTS, **layout,
        MAXIMA=solve, TEMPERED=tempered, D_RANGE=d_range, BLOCK=BLOCK, num_warps=ROW_WARPS,
    )  # fmt: skip
    triton_solve.row_combine_kernel[(batch,)](
        row_parts, maxima, grid_max, state, SPLITS=splits, K=GRID_POINTS, MAXIMA=solve, TEMPERED=tempered,
        D_RANGE=d_range, num_warps=1,
    )  # fmt: skip
    alpha = torch.empty(batch, dtype=torch.float32, device=device)
    if solve:
        solve_kl_symmetry(rows, inv_temp, lo, hi, layout, splits, state, grid_max, alpha, trace)
    elif mix.alpha_method == "entropy":
        entropy_alpha(rows, inv_temp, splits, state, lo, hi, alpha)
    elif mix.alpha_method == "reverse_kl_symmetry":
        reverse_kl_alpha(rows, inv_temp, splits, state, lo, hi, alpha)
    elif mix.alpha_method == "ess_balance":
        ess_balance_alpha(rows, inv_temp, splits, state, lo, hi, alpha)
    else:
        alpha.fill_(mix.fixed_alpha if mix.alpha_method == "fixed" else lo)
    cut = mix.constrained or truncates(params, vocab)
    cuts = cut_thresholds(rows, values, splits, state, alpha, mix, params, solve, trace) if cut else alpha
    online = not solve or cut  # greedy: log Z_q of a truncated q comes from argmax's own sums
    # the draw's chunk masses: relative to log Z_q where it bounds every kept key and the top key
    # is kept (q's own cuts keep it; the teacher's set may not)
    masses_online = not solve or mix.constrained
    tokens = torch.empty(batch, dtype=torch.long, device=device)
    logprobs = torch.empty(3, batch, dtype=torch.float32, device=device)
    host = torch.empty(batch, 5, dtype=torch.float64, device=device)
    outputs = (tokens, logprobs, host, batch)
    if params.greedy:
        parts = torch.empty(batch, splits, 4, dtype=torch.float32, device=device)
        triton_draw.argmax_kernel[(batch, splits)](
            *rows, inv_temp, state, alpha, cuts, parts,
            SPLITS=splits, ONLINE_LSE=online, CUT=cut, BLOCK=BLOCK, num_warps=SAMPLE_WARPS,
        )  # fmt: skip
        triton_draw.argmax_finish_kernel[(batch,)](
            *rows[:4], inv_temp, state, alpha, parts, *outputs, SPLITS=splits, ONLINE_LSE=online,
        )  # fmt: skip
    else:  # the two-level draw of mixing.draw.sample_tokens: chunk masses, then one chunk's tokens
        chunk = draw_chunk(vocab)
        masses = torch.empty(
            batch, DRAW_CHUNKS, triton_row_state.MASS_STATS, dtype=torch.float32, device=device
        )
        triton_draw.mass_kernel[(batch, DRAW_CHUNKS)](
            *rows[:5], chunk, chunk // BLOCK, inv_temp, state, alpha, cuts, masses,
            CHUNKS=DRAW_CHUNKS, ONLINE=masses_online, TEMPERED=tempered, CUT=cut, BLOCK=BLOCK,
            num_warps=MASS_WARPS,
        )  # fmt: skip
        triton_draw.draw_kernel[(batch,)](
            *rows[:5], chunk, inv_temp, row_seeds, steps, state, alpha, cuts, masses, *outputs,
            CHUNKS=DRAW_CHUNKS, CHUNK_NOISE=CHUNK_NOISE, SCAN=DRAW_SCAN, CUT=cut, num_warps=DRAW_WARPS,
        )  # fmt: skip
    if not params.collect_diagnostics:
        return tokens, logprobs[0], logprobs[1], logprobs[2], alpha, host
    diag, packed = diagnostics_of(rows, inv_temp, splits, state, alpha, host, cuts if cut else None)
    return tokens, logprobs[0], logprobs[1], logprobs[2], alpha, diag[0], diag[1], diag[2], packed


def entropy_alpha(rows, inv_temp: torch.Tensor, splits: int, state, lo: float, hi: float, alpha) -> None:
    """alpha [B] := H(base) / (H(base) + H(teacher)) clamped to [lo, hi], the midpoint where the two
    policies coincide (Jeffreys divergence at most IDENTICAL_JEFFREYS) or both are one-hot."""
    from . import triton_merge, triton_policy

    batch, device = state.shape[0], state.device
    parts = torch.empty(batch, splits, triton_policy.ENTROPY_STATS, dtype=torch.float64, device=device)
    triton_policy.entropy_kernel[(batch, splits)](
        *rows, inv_temp, state, parts, SPLITS=splits, BLOCK=BLOCK, num_warps=STATS_WARPS
    )
    triton_merge.entropy_merge_kernel[(batch,)](parts, alpha, lo, hi, splits, num_warps=1)


def reverse_kl_alpha(rows, inv_temp: torch.Tensor, splits: int, state, lo: float, hi: float, alpha) -> None:
    """alpha [B] := KL(t~ || b~) / (KL(t~ || b~) + KL(b~ || t~)) on the joint support, clamped to
    [lo, hi]; the midpoint where the policies coincide or share no token (as mixing.alpha)."""
    from . import triton_merge, triton_policy

    batch, device = state.shape[0], state.device
    parts = torch.empty(batch, splits, triton_policy.TILT_STATS, dtype=torch.float64, device=device)
    triton_policy.tilt_kernel[(batch, splits)](
        *rows, inv_temp, state, parts, SPLITS=splits, BLOCK=BLOCK, num_warps=STATS_WARPS
    )
    triton_merge.tilt_merge_kernel[(batch,)](parts, alpha, lo, hi, splits, num_warps=1)


# ESS_GRID: alphas of the ess_balance grid pass, evenly over [alpha_min, alpha_max] (a power of 2;
# 4 missed 1e-4 on CUDA's test rows by 1.6e-4, H100, 2026-12-06)
ESS_GRID = 8
ESS_REFINE = (4, 4, 4)  # alphas per refining pass: Newton from each end, secant, Hermite root
ESS_WARPS = 8  # the grid pass holds 5 sums per point and lane, 2 points per alpha


def ess_balance_alpha(rows, inv_temp: torch.Tensor, splits: int, state, lo: float, hi: float, alpha) -> None:
    """alpha [B] float32 := ess_balance's (triton_ess.py): a grid pass of ESS_GRID alphas over
    [lo, hi] (with s = 1), then one refining pass per ESS_REFINE entry, which rows already solved
    skip; each pass is one (row, chunk) kernel and one per-row merge. lo == hi needs no pass:
    mixing.alpha returns lo then, whatever the rows."""
    from . import triton_ess

    batch, device = state.shape[0], state.device
    if lo == hi:
        alpha.fill_(lo)
        return
    ess = torch.empty(batch, triton_ess.STATE, dtype=torch.float64, device=device)
    counts = (ESS_GRID, *ESS_REFINE)
    alphas = alpha  # the grid pass makes its own
    for p, k in enumerate(counts):
        grid, last = p == 0, p == len(counts) - 1
        kn = 4 if last else counts[p + 1]  # the merge's candidates need at least 4 alphas
        parts = torch.empty(batch, splits, k, 2, triton_ess.STATS, dtype=torch.float64, device=device)
        extras = torch.empty(batch, splits, triton_ess.EXTRAS, dtype=torch.float64, device=device)
        triton_ess.ess_kernel[(batch, splits)](
            *rows, inv_temp, lo, hi, state, ess, alphas, parts, extras,
            SPLITS=splits, J=k, GRID=grid, BLOCK=BLOCK, num_warps=ESS_WARPS,
        )  # fmt: skip
        next_alphas = torch.empty(batch, kn, dtype=torch.float32, device=device)
        triton_ess.ess_combine_kernel[(batch,)](
            parts, extras, state, ess, alphas, next_alphas, alpha, lo, hi,
            SPLITS=splits, J=k, JN=kn, GRID=grid, LAST=last, num_warps=1,
        )  # fmt: skip
        alphas = next_alphas


def diagnostics_of(rows, inv_temp: torch.Tensor, splits: int, state, alpha, host, cuts=None):
    """ESS ratio, KL(q || base) and KL(q || teacher) of the q at each row's alpha (within the cuts,
    if any): [3, B] float32, and the packed rows [B, 8] float64 (host's five columns, then these)."""
    from . import triton_merge, triton_policy

    batch, device = state.shape[0], state.device
    parts = torch.empty(batch, splits, triton_policy.DIAG_STATS, dtype=torch.float32, device=device)
    triton_policy.diagnostics_kernel[(batch, splits)](
        *rows, inv_temp, state, alpha, alpha if cuts is None else cuts, parts,
        SPLITS=splits, CUT=cuts is not None, BLOCK=BLOCK, num_warps=STATS_WARPS,
    )  # fmt: skip
    diag = torch.empty(3, batch, dtype=torch.float32, device=device)
    packed = torch.empty(batch, 8, dtype=torch.float64, device=device)
    triton_merge.diagnostics_merge_kernel[(batch,)](
        parts, alpha, host, diag, packed, batch, splits, num_warps=1
    )
    return diag, packed


def solve_kl_symmetry(
    rows,
    inv_temp: torch.Tensor,
    lo: float,
    hi: float,
    layout: dict,
    splits: int,
    state,
    grid_max,
    alpha,
    trace=None,
):
    """alpha [B]: the grid pass, then REFINE_POINTS passes (skipped by rows already done)."""
    from . import triton_row_state, triton_solve

    batch, device = alpha.shape[0], alpha.device
    counts = (GRID_POINTS, *REFINE_POINTS)
    points, refs = grid_max, grid_max  # the grid pass makes its own points; refs are the exact maxima
    shift_parts = torch.empty(batch, splits, triton_row_state.SHIFT_STATS, dtype=torch.float64, device=device)
    for p, k in enumerate(counts):
        grid, last = p == 0, p == len(counts) - 1
        kn = 4 if last else counts[p + 1]
        parts = torch.empty(batch, splits, k, triton_row_state.STATS, dtype=torch.float64, device=device)
        triton_solve.stats_kernel[(batch, splits)](
            *rows, inv_temp, lo, hi, points, refs, state, parts, shift_parts,
            SPLITS=splits, K=k, GRID=grid, **layout, BLOCK=BLOCK, num_warps=STATS_WARPS,
        )  # fmt: skip
        next_points = torch.empty(batch, kn, dtype=torch.float32, device=device)
        next_refs = torch.empty(batch, kn, dtype=torch.float32, device=device)
        triton_solve.combine_kernel[(batch,)](
            parts, shift_parts, grid_max, state, points, refs, next_points, next_refs, alpha, lo, hi,
            SPLITS=splits, K=k, KG=GRID_POINTS, KN=kn, GRID=grid, LAST=last, **layout, num_warps=1,
        )  # fmt: skip
        if trace is not None:
            evaluated = torch.tensor(grid_points(lo, hi), device=device).expand(batch, k) if grid else points
            trace.append({"points": evaluated, "parts": parts, "state": state.clone()})
        points, refs = next_points, next_refs


def fused_sample_step(
    logits_b, logits_t, row_seeds, steps, mix: MixConfig, params: SamplingParams
) -> StepResult:
    """Drop-in for `mixing.step.sample_step` where `fused_supported(mix, params)`."""
    return result_from_tensors(fused_outputs(logits_b, logits_t, row_seeds, steps, mix, params), params)
