"""The mixing math against float64 references, on random and adversarial rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_math import alpha_reference, ess, kl, log_q, log_softmax
from scipy.stats import chisquare

from optimal_sampling.config import ALPHA_METHODS, MixConfig
from optimal_sampling.mixing import mix_logprobs, solve_alpha, step_diagnostics, tempered_logprobs
from optimal_sampling.mixing.support import constrain_to_teacher, top_p_mask, truncate

V = 257


def random_rows(seed: int, batch: int = 16, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    zb = torch.randn(batch, V, generator=g, dtype=torch.float64) * scale
    zt = zb * 0.3 + torch.randn(batch, V, generator=g, dtype=torch.float64) * scale
    return zb, zt


def adversarial_rows():
    """Identical, one-hot, near-disjoint, -inf entries, huge ranges."""
    rows_b, rows_t = [], []
    g = torch.Generator().manual_seed(7)
    base = torch.randn(V, generator=g, dtype=torch.float64)
    rows_b.append(base), rows_t.append(base.clone())  # identical
    one = torch.full((V,), -30.0, dtype=torch.float64)
    one_b, one_t = one.clone(), one.clone()
    one_b[3], one_t[5] = 30.0, 30.0
    rows_b.append(one_b), rows_t.append(one_t)  # near one-hot, different tokens
    disj_b = torch.where(torch.arange(V) < V // 2, 8.0, -8.0).double()
    rows_b.append(disj_b), rows_t.append(-disj_b)  # near-disjoint supports
    inf_b = torch.randn(V, generator=g, dtype=torch.float64)
    inf_t = torch.randn(V, generator=g, dtype=torch.float64)
    inf_b[:40], inf_t[30:70] = -float("inf"), -float("inf")
    rows_b.append(inf_b), rows_t.append(inf_t)  # -inf entries, partly overlapping
    rows_b.append(torch.randn(V, generator=g, dtype=torch.float64) * 200)
    rows_t.append(torch.randn(V, generator=g, dtype=torch.float64) * 200)  # huge logit ranges
    rows_b.append(torch.randn(V, generator=g, dtype=torch.float64) * 0.01)
    rows_t.append(torch.randn(V, generator=g, dtype=torch.float64) * 0.01)  # near-identical, near-uniform
    return torch.stack(rows_b), torch.stack(rows_t)


def check_against_reference(zb, zt, method, lo, hi, dtype, tol):
    config = MixConfig(alpha_method=method, alpha_min=lo, alpha_max=hi, fixed_alpha=0.3)
    got = solve_alpha(zb.to(dtype), zt.to(dtype), config)  # raw logits, as mix_step passes them
    if dtype == torch.float64:  # any per-row shift of the inputs gives the same alpha
        lp_b, lp_t = tempered_logprobs(zb, 1.0), tempered_logprobs(zt, 1.0)
        torch.testing.assert_close(solve_alpha(lp_b + 3.0, lp_t - 1.5, config), got, atol=1e-9, rtol=0)
    for i in range(zb.shape[0]):
        want = alpha_reference(
            log_softmax(zb[i].numpy()), log_softmax(zt[i].numpy()), method, lo, hi, fixed=0.3
        )
        assert abs(float(got[i]) - want) <= tol, (method, i, float(got[i]), want)


@pytest.mark.parametrize("method", ALPHA_METHODS)
@pytest.mark.parametrize("bounds", [(0.5, 1.0), (0.0, 1.0), (0.2, 0.7)])
def test_alpha_matches_float64_reference_on_random_rows(method, bounds):
    zb, zt = random_rows(seed=ALPHA_METHODS.index(method) * 10 + int(bounds[0] * 10))
    check_against_reference(zb, zt, method, *bounds, torch.float64, 1e-6)
    check_against_reference(zb, zt, method, *bounds, torch.float32, 1e-4)


@pytest.mark.parametrize("method", ALPHA_METHODS)
def test_alpha_matches_reference_on_adversarial_rows(method):
    zb, zt = adversarial_rows()
    check_against_reference(zb, zt, method, 0.0, 1.0, torch.float64, 1e-4)
    check_against_reference(zb, zt, method, 0.5, 1.0, torch.float32, 1e-4)


def test_identical_rows_get_the_midpoint():
    zb, _ = random_rows(3)
    lp = tempered_logprobs(zb, 1.0)
    for method in ("kl_symmetry", "ess_balance", "reverse_kl_symmetry", "entropy"):
        alpha = solve_alpha(lp, lp.clone(), MixConfig(alpha_method=method, alpha_min=0.2, alpha_max=0.6))
        assert torch.allclose(alpha, torch.full_like(alpha, 0.4)), method


def test_fixed_alpha_is_not_clamped():
    zb, zt = random_rows(4)
    alpha = solve_alpha(zb, zt, MixConfig(alpha_method="fixed", fixed_alpha=0.1, alpha_min=0.5))
    assert torch.all(alpha == 0.1)


def test_kl_symmetry_root_equalises_the_two_kls():
    zb, zt = random_rows(5)
    lp_b, lp_t = tempered_logprobs(zb, 1.0), tempered_logprobs(zt, 1.0)
    alpha = solve_alpha(lp_b, lp_t, MixConfig(alpha_min=0.0, alpha_max=1.0))
    lp_q = mix_logprobs(lp_b, lp_t, alpha)
    d = step_diagnostics(lp_q, lp_b, lp_t)
    assert torch.allclose(d.kl_q_base, d.kl_q_teacher, atol=1e-8)


def test_ess_balance_root_gives_ess_ratio_one():
    zb, zt = random_rows(6)
    lp_b, lp_t = tempered_logprobs(zb, 1.0), tempered_logprobs(zt, 1.0)
    alpha = solve_alpha(lp_b, lp_t, MixConfig(alpha_method="ess_balance", alpha_min=0.0, alpha_max=1.0))
    d = step_diagnostics(mix_logprobs(lp_b, lp_t, alpha), lp_b, lp_t)
    assert torch.allclose(d.ess_ratio, torch.ones_like(d.ess_ratio), atol=1e-7)


def test_mixture_and_diagnostics_match_float64_reference():
    zb, zt = random_rows(8, batch=4)
    lp_b, lp_t = tempered_logprobs(zb, 0.7), tempered_logprobs(zt, 0.7)
    alpha = torch.tensor([0.0, 0.25, 0.8, 1.0], dtype=torch.float64)
    lp_q = mix_logprobs(lp_b, lp_t, alpha)
    d = step_diagnostics(lp_q, lp_b, lp_t)
    for i in range(4):
        b, t = log_softmax(zb[i].numpy() / 0.7), log_softmax(zt[i].numpy() / 0.7)
        q = log_q(b, t, float(alpha[i]))
        np.testing.assert_allclose(lp_q[i].numpy(), q, atol=1e-10)
        assert abs(float(d.kl_q_base[i]) - kl(q, b)) < 1e-9
        assert abs(float(d.kl_q_teacher[i]) - kl(q, t)) < 1e-9
        assert abs(float(d.ess_ratio[i]) / (ess(b, q) / ess(t, q)) - 1) < 1e-9


def test_alpha_zero_and_one_keep_minus_inf_without_nan():
    lp_b = torch.log_softmax(torch.tensor([[0.0, 1.0, -float("inf")]]), -1)
    lp_t = torch.log_softmax(torch.tensor([[-float("inf"), 1.0, 0.0]]), -1)
    assert torch.equal(mix_logprobs(lp_b, lp_t, torch.tensor([0.0])), lp_b)
    assert torch.equal(mix_logprobs(lp_b, lp_t, torch.tensor([1.0])), lp_t)
    mid = mix_logprobs(lp_b, lp_t, torch.tensor([0.5]))
    assert not torch.isnan(mid).any() and mid[0, 1] == 0.0


def test_teacher_constraint_restricts_support_and_renormalises():
    zb, zt = random_rows(9)
    lp_b, lp_t = tempered_logprobs(zb, 1.0), tempered_logprobs(zt, 1.0)
    mix = MixConfig(constraint_to_target=True, target_top_k=10, target_top_p=0.9)
    lp_q = constrain_to_teacher(
        mix_logprobs(lp_b, lp_t, torch.full((16,), 0.6, dtype=torch.float64)), lp_t, mix
    )
    kept = torch.isfinite(lp_q)
    top10 = torch.zeros_like(kept).scatter(-1, lp_t.topk(10, -1).indices, True)
    assert torch.all(kept <= (top10 & top_p_mask(lp_t, 0.9)))
    assert torch.allclose(torch.logsumexp(lp_q, -1), torch.zeros(16, dtype=torch.float64), atol=1e-12)


def test_truncation_matches_hf_logits_processors():
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    zb, _ = random_rows(10)
    lp = tempered_logprobs(zb, 1.0)
    ours = torch.isfinite(truncate(lp, top_k=50, top_p=0.8, min_p=0.05))
    scores = lp.clone()
    for warper in (TopKLogitsWarper(50), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        scores = warper(None, scores)
    assert torch.equal(ours, torch.isfinite(scores))


row_pairs = st.integers(0, 10_000).map(lambda s: random_rows(s, batch=2, scale=1 + s % 7))


@settings(max_examples=40, deadline=None)
@given(row_pairs, st.sampled_from(ALPHA_METHODS[:4]), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_properties(rows, method, a, b):
    """alpha in bounds; q normalised; alpha=0 gives base, alpha=1 gives teacher; residual or bound."""
    lo, hi = min(a, b), max(a, b)
    zb, zt = rows
    lp_b, lp_t = tempered_logprobs(zb, 1.0), tempered_logprobs(zt, 1.0)
    alpha = solve_alpha(lp_b, lp_t, MixConfig(alpha_method=method, alpha_min=lo, alpha_max=hi))
    assert torch.all((alpha >= lo - 1e-12) & (alpha <= hi + 1e-12))
    lp_q = mix_logprobs(lp_b, lp_t, alpha)
    assert torch.allclose(torch.logsumexp(lp_q, -1), torch.zeros(2, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(mix_logprobs(lp_b, lp_t, torch.zeros(2, dtype=torch.float64)), lp_b)
    assert torch.allclose(mix_logprobs(lp_b, lp_t, torch.ones(2, dtype=torch.float64)), lp_t)
    if method == "kl_symmetry":
        d = step_diagnostics(lp_q, lp_b, lp_t)
        residual = d.kl_q_base - d.kl_q_teacher
        at_bound = ((alpha - lo).abs() < 1e-9) & (residual >= 0) | ((alpha - hi).abs() < 1e-9) & (
            residual <= 0
        )
        assert torch.all((residual.abs() < 1e-6) | at_bound)


def test_uniforms_stay_strictly_inside_0_1_so_gumbel_noise_is_finite():
    """The extreme hashes give uniforms inside (0, 1), exactly and in order: a uniform of 1.0 has
    Gumbel noise +inf, and its token would be drawn whatever its probability."""
    from optimal_sampling.mixing.draw import uniform_of_bits

    bits = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 1024, 2**32 - 513, 2**32 - 512, 2**32 - 1])
    u = uniform_of_bits(bits)
    assert (u > 0).all() and (u < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    assert torch.equal(u.double(), ((bits >> 9).double() + 0.5) / 2**23)  # exact in float32


def test_a_point_mass_is_always_drawn_over_a_full_vocabulary():
    """Every draw from q = a point mass is that token, over a 151,936-token vocabulary and 300
    seeds (with 24-bit uniforms about 1 % of rows held a uniform of 1.0 and drew another token)."""
    from optimal_sampling.mixing.draw import sample_tokens

    rows, vocab = 300, 151936
    lp_q = torch.full((rows, vocab), float("-inf"))
    lp_q[:, 4321] = 0.0
    tokens = sample_tokens(lp_q, False, torch.arange(rows), torch.full((rows,), 3))
    assert (tokens == 4321).all()


def test_two_level_draw_follows_q_across_many_chunks():
    """The chunk-then-token Gumbel-max draws each token with probability q: heavy tokens in
    different chunks (and two in one chunk) plus a spread-out tail, 12,000 draws, chi-square."""
    from optimal_sampling.mixing.draw import DRAW_CHUNKS, draw_chunk, sample_tokens

    vocab = 20_000
    chunk = draw_chunk(vocab)
    assert vocab // chunk > DRAW_CHUNKS // 2  # most chunks hold tokens
    heavy = torch.tensor([3, 700, 701, 5000, 9999, 14_321, 19_999])
    probs = torch.full((vocab,), 0.3 / (vocab - len(heavy)), dtype=torch.float64)
    probs[heavy] = torch.tensor([0.2, 0.15, 0.05, 0.1, 0.08, 0.07, 0.05], dtype=torch.float64)
    lp_q = probs.log().float()
    counts = torch.zeros(len(heavy) + 1)
    for batch in range(6):
        rows = 2000
        seeds = torch.arange(rows) + rows * batch
        tokens = sample_tokens(lp_q.expand(rows, vocab), False, seeds, torch.full((rows,), 5))
        hits = (tokens[:, None] == heavy[None, :]).float()
        counts[:-1] += hits.sum(0)
        counts[-1] += rows - hits.sum()
    expected = torch.cat([probs[heavy], (1 - probs[heavy].sum()).reshape(1)]) * counts.sum()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    # a row draws the same token alone as in a batch (the noise is keyed by seed, step, index)
    alone = [sample_tokens(lp_q[None], False, seeds[i : i + 1], torch.tensor([5])).item() for i in range(20)]
    assert alone == tokens[:20].tolist()
