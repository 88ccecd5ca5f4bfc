"""The fused sampler's cuts (engines/fast/triton_cut.py): the teacher support constraint and
top-k / top-p / min-p found by a threshold search, against mixing.support's sort-based masks.

On CPU the kernels run in Triton's interpreter (a subprocess: it must be switched on before
triton is imported); on CUDA the same checks run in-process (tests/gpu)."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
from triton_interpreter import patch_for_numpy2, run_as_script

from optimal_sampling.config import MixConfig, SamplingParams
from optimal_sampling.mixing import mix_step
from optimal_sampling.mixing.logprobs import mix_logprobs, tempered_logprobs
from optimal_sampling.mixing.step import sample_step
from optimal_sampling.mixing.support import constrain_to_teacher, truncate

HAS_TRITON = importlib.util.find_spec("triton") is not None

# (top_k, top_p, min_p, target_top_k, target_top_p): q's truncation, then the teacher's set
CONFIGS = [
    (40, 1.0, 0.0, -1, 1.0),
    (-1, 0.9, 0.0, -1, 1.0),
    (-1, 1.0, 0.05, -1, 1.0),
    (50, 0.8, 0.02, -1, 1.0),
    (-1, 1.0, 0.0, 20, 1.0),
    (-1, 1.0, 0.0, -1, 0.85),
    (-1, 1.0, 0.0, 30, 0.6),
    (100, 0.95, 0.0, -1, 0.9),
    ("above CAP", 1.0, 0.0, -1, 1.0),  # the bracket of the k-th key is collected, not all above it
]


def logits_rows(vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: flat, peaked (a few tokens hold most mass), two policies that disagree, -inf
    entries, a one-hot teacher, keys tied at the cut, and a wide-range row."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, vocab, generator=g)
    teacher = base + torch.randn(8, vocab, generator=g)
    base[0] *= 0.1
    teacher[0] = 0.1 * teacher[0]
    base[1, :12] += 8 * torch.rand(12, generator=g)
    teacher[1, :12] += 8 * torch.rand(12, generator=g)
    teacher[2] = -base[2]
    base[3, : vocab // 4] = float("-inf")
    teacher[3, vocab // 2 : vocab // 2 + 50] = float("-inf")
    teacher[4, 7] = 60.0
    base[5] = torch.randn(vocab, generator=g).round()  # many exact ties
    teacher[5] = base[5].clone()
    base[6] *= 25
    teacher[6] *= 25
    base[7] = 3 * torch.randn(vocab, generator=g)
    teacher[7] = base[7] + 0.3 * torch.randn(vocab, generator=g)
    return base.to(device), teacher.to(device)


def reference_keep(base, teacher, alpha, mix: MixConfig, params: SamplingParams) -> torch.Tensor:
    """mixing.support's kept set for the q at the given alpha (float64)."""
    t = params.temperature or 1.0
    lp_b, lp_t = tempered_logprobs(base.double(), t), tempered_logprobs(teacher.double(), t)
    lp_q = mix_logprobs(lp_b, lp_t, alpha.double())
    lp_q = truncate(constrain_to_teacher(lp_q, lp_t, mix), params.top_k, params.top_p, params.min_p)
    return lp_q > float("-inf")


def fused_keep(base, teacher, alpha, cuts, state, params: SamplingParams, tol: float = 1e-5) -> torch.Tensor:
    """The set the cuts keep, from the kernel's keys recomputed in float64 with its row state's
    log-normalisers (a key within tol of its cut counts as kept: the cut IS a float32 key)."""
    from optimal_sampling.engines.fast.triton_row_state import LSE_B, LSE_T

    inv_t = 1.0 / (params.temperature or 1.0)
    lp_b = base.double() * inv_t - state[:, LSE_B.value : LSE_B.value + 1]
    lp_t = teacher.double() * inv_t - state[:, LSE_T.value : LSE_T.value + 1]
    a = alpha.double().unsqueeze(-1)
    u = torch.where(a < 1, (1 - a) * lp_b, 0.0) + torch.where(a > 0, a * lp_t, 0.0)
    u = torch.nan_to_num(u, nan=float("-inf"))
    cut_q, cut_t = cuts[:, :1].double(), cuts[:, 1:].double()
    keep = (u >= cut_q - tol) & (lp_t >= cut_t - tol)
    return keep & (mix_logprobs(lp_b, lp_t, alpha.double()) > float("-inf"))  # on q's support


def check_cuts(
    device: str,
    vocab: int,
    cap: int,
    configs: list,
    temperatures: tuple,
    exact: bool,
    refine: tuple = (),
    big: int | None = None,
    big2: int | None = None,
) -> None:
    """Each configuration's kept sets against the sorted masks, and its step against the torch
    step, with `cap` keys per row collectable (exact: every search must end exact); refine:
    (thresholds per refining pass, passes) instead of triton_cut's; big, big2: keys a row may
    gather, then gather again (big 0: refine over the vocabulary only)."""
    from optimal_sampling.engines.fast import triton_cut

    default = triton_cut.CAP, triton_cut.K_REFINE, triton_cut.PASSES, triton_cut.BIG, triton_cut.BIG2
    triton_cut.CAP = cap
    triton_cut.BIG = triton_cut.BIG if big is None else big
    triton_cut.BIG2 = triton_cut.BIG2 if big2 is None else big2
    if refine:
        triton_cut.K_REFINE, triton_cut.PASSES = refine
    try:
        gathered = check_configs(device, vocab, configs, temperatures, exact)
        if big:  # the gathered passes were exercised (brackets of at most big, then big2 keys, above cap)
            assert gathered[0] > 0, f"no row gathered its bracket (cap {cap}, big {big})"
        if big2:
            assert gathered[1] > 0, f"no row gathered its bracket twice (cap {cap}, big {big}, big2 {big2})"
    finally:
        triton_cut.CAP, triton_cut.K_REFINE, triton_cut.PASSES, triton_cut.BIG, triton_cut.BIG2 = default


def check_configs(
    device: str, vocab: int, configs: list, temperatures: tuple, exact_everywhere: bool
) -> list[int]:
    """Returns how many rows' searches gathered their bracket, and how many gathered it twice."""
    from optimal_sampling.engines.fast import mixing_fast, triton_cut

    gathered = [0, 0]
    rows = {"fixed": logits_rows(vocab, device)}
    # kl_symmetry puts row 2 (teacher = -base) at alpha 0.5, where u is one value up to float32
    # rounding: no float64 reference can order its keys as the kernel's do
    solvable = [r for r in range(8) if r != 2]
    rows["kl_symmetry"] = tuple(x[solvable] for x in rows["fixed"])
    for top_k, top_p, min_p, tk, tp in configs:
        top_k = triton_cut.CAP + 100 if top_k == "above CAP" else top_k
        constrained = tk > 0 or tp < 1.0
        # a solved alpha (q's search then sums pass 1 relative to log Z_q) where q's search is unconstrained
        methods = ("fixed",) if constrained else ("fixed", "kl_symmetry")
        for method, temperature in itertools.product(methods, temperatures):
            mix = MixConfig(alpha_method=method, fixed_alpha=0.6, constraint_to_target=constrained,
                            target_top_k=tk, target_top_p=tp)  # fmt: skip
            params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
            if not mixing_fast.fused_supported(mix, params):
                continue
            base, teacher = rows[method]
            n = base.shape[0]
            seeds, steps = torch.arange(n, device=device) * 7 + 1, torch.arange(n, device=device)
            cuts, searches, state, alpha = fused_cuts(base, teacher, seeds, steps, mix, params)
            if method == "fixed":
                assert torch.equal(alpha, torch.full((n,), 0.6, device=device))
            want = reference_keep(base, teacher, alpha, mix, params)
            got = fused_keep(base, teacher, alpha, cuts, state, params)
            exact = torch.stack([s[:, triton_cut.EXACT.value] for s in searches]).amin(0) > 0
            for level in (1, 2):
                gathered[level - 1] += sum(
                    int((s[:, triton_cut.GATHERED.value] >= level).sum()) for s in searches
                )
            label = f"{method} config {(top_k, top_p, min_p, tk, tp)} T={temperature} cap={triton_cut.CAP}"
            assert torch.equal(got[exact], want[exact]), label + f" rows {(got != want).any(-1).tolist()}"
            assert (got | ~want).all(), label + ": an inexact cut keeps a superset"
            if exact_everywhere:
                assert exact.all(), label
            check_step(base, teacher, seeds, steps, mix, params, label)
    return gathered


def fused_cuts(base, teacher, seeds, steps, mix, params):
    """The cuts fused_outputs draws within, each search's row state (its EXACT column), and alpha."""
    from optimal_sampling.engines.fast import mixing_fast

    trace = []
    mixing_fast.fused_outputs(base, teacher, seeds, steps, mix, params, trace=trace)
    found = [t for t in trace if "cuts" in t]
    assert len(found) == 1
    return found[0]["cuts"], found[0]["searches"], found[0]["state"], found[0]["alpha"]


def check_step(base, teacher, seeds, steps, mix, params, label: str) -> None:
    """Tokens, log q and the diagnostics of the fused step against the torch step."""
    from dataclasses import replace

    from optimal_sampling.engines.fast.mixing_fast import fused_sample_step
    from optimal_sampling.mixing.diagnostics import step_diagnostics

    params = replace(params, collect_diagnostics=True)
    fused = fused_sample_step(base, teacher, seeds, steps, mix, params)
    exact = sample_step(base, teacher, seeds, steps, mix, params)
    assert fused.tokens.tolist() == exact.tokens.tolist(), label
    torch.testing.assert_close(fused.logprob_q, exact.logprob_q.float(), atol=1e-4, rtol=1e-4, msg=label)
    mixed = mix_step(
        base.double(), teacher.double(), mix, params.temperature, params.top_k, params.top_p, params.min_p
    )
    want = step_diagnostics(mixed.lp_q, mixed.lp_base, mixed.lp_teacher)
    for name in ("kl_q_base", "kl_q_teacher"):
        torch.testing.assert_close(
            getattr(fused, name).double(), getattr(want, name), atol=1e-4, rtol=1e-3, msg=label
        )
    torch.testing.assert_close(
        fused.ess_ratio.double().log(), want.ess_ratio.log(), atol=1e-3, rtol=1e-3, msg=label
    )


def check_cut_draws_follow_q(device: str) -> None:
    """Chi-square: 40,960 fused draws of one row follow the q they report: kl_symmetry with top-p
    inside the teacher's top-50 and alone, and ess_balance with min-p (the torch step's q as
    expected)."""
    from scipy.stats import chisquare

    from optimal_sampling.engines.fast.mixing_fast import fused_sample_step

    vocab, rows = 4096, 8192
    g = torch.Generator().manual_seed(3)
    base = 2 * torch.randn(vocab, generator=g)
    teacher = base + torch.randn(vocab, generator=g)
    base[:30] += 4
    teacher[:30] += 4
    configs = [
        (MixConfig(constraint_to_target=True, target_top_k=50), SamplingParams(temperature=0.9, top_p=0.9)),
        (MixConfig(), SamplingParams(temperature=1.0, top_p=0.9)),  # pass 1 relative to log Z_q
        (MixConfig(alpha_method="ess_balance"), SamplingParams(temperature=1.0, min_p=0.01)),
    ]
    zb, zt = (
        base.expand(rows, vocab).contiguous().to(device),
        teacher.expand(rows, vocab).contiguous().to(device),
    )
    for mix, params in configs:
        counts = torch.zeros(vocab, dtype=torch.float64)
        for batch in range(5):
            seeds = torch.arange(rows, device=device) + rows * batch
            tokens = fused_sample_step(
                zb, zt, seeds, torch.full((rows,), 2, device=device), mix, params
            ).tokens
            counts += torch.bincount(tokens.cpu(), minlength=vocab).double()
        lp_q = mix_step(base[None].double(), teacher[None].double(), mix, params.temperature,
                        params.top_k, params.top_p, params.min_p).lp_q[0]  # fmt: skip
        expected = lp_q.exp() * counts.sum()
        assert counts[expected == 0].sum() == 0, "a draw outside q's support"
        big = expected >= 5
        obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
        exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
        keep = exp > 0
        assert (
            chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp[keep].sum().item()).pvalue
            > 1e-3
        )


def check_one_sampler_serves_its_key(device: str) -> None:
    """A FusedStepSampler built for one setting and `use`d with another of the same fused_key
    (other temperature, top-k, top-p, min-p and teacher-set numbers read on the device) draws
    what the torch step draws for that other setting, and again for the first after switching back."""
    from optimal_sampling.engines.fast.mixing_fast import FusedStepSampler, fused_key

    vocab = 512
    base, teacher = logits_rows(vocab, device)
    seeds, steps = torch.arange(8, device=device) + 5, torch.full((8,), 3, device=device)
    mix = MixConfig(constraint_to_target=True, target_top_k=30, target_top_p=0.9)
    first = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02)
    other = SamplingParams(temperature=1.6, top_k=90, top_p=0.6, min_p=0.1)
    assert fused_key(mix, first, vocab) == fused_key(mix, other, vocab)
    sampler = FusedStepSampler(mix, first, vocab, torch.device(device))
    for params in (other, first):
        got = sampler.use(params)(base, teacher, seeds, steps)
        want = sample_step(base, teacher, seeds, steps, mix, params)
        assert got[0].tolist() == want.tokens.tolist(), params
        torch.testing.assert_close(got[3], want.logprob_q.float(), atol=1e-4, rtol=1e-4)


def run_cut_checks(device: str) -> None:
    """CUDA: every configuration at the default CAP, then a CAP so small that brackets are refined
    over all passes (some left inexact), gathering them on the way or never. The interpreter
    sorts slowly: a smaller CAP and vocabulary."""
    from optimal_sampling.engines.fast.triton_cut import CAP

    if device == "cuda":  # (a bracket of at most the vocabulary is gathered at once)
        check_cuts(device, 4096, CAP, CONFIGS, (1.0, 0.7, 0.0), exact=True)
        # refined, then gathered, then gathered again
        check_cuts(device, 4096, 32, CONFIGS, (0.7,), exact=False, big=1024, big2=128)
        check_cuts(device, 4096, 64, CONFIGS, (0.7,), exact=False, refine=(16, 4), big=0)  # never gathered
    else:
        check_cuts(device, 512, 256, CONFIGS, (0.7,), exact=True)
        check_cuts(device, 512, 256, CONFIGS[3:4], (0.0,), exact=True)
        check_cuts(device, 512, 4, CONFIGS[1:4], (1.0,), exact=False, big=128, big2=32)
        check_cuts(device, 512, 16, CONFIGS[1:4], (1.0,), exact=False, refine=(16, 4), big=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_cuts_equal_the_sorted_masks():
    if torch.cuda.is_available():
        check_one_sampler_serves_its_key("cuda")
        run_cut_checks("cuda")
        return
    run_as_script(__file__, timeout=900)


if __name__ == "__main__":
    patch_for_numpy2()
    check_one_sampler_serves_its_key("cpu")
    run_cut_checks("cpu")
    print("cut checks passed")
