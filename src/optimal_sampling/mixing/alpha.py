"""Per-token choice of alpha, the teacher's weight in q = pi_base^(1-alpha) pi_teacher^alpha.

Everything is expressed through the tilted family of the base policy on the joint support S
(tokens both policies give non-zero probability), with r = lp_teacher - lp_base:

    M(s) = log sum_{y in S} pi_base(y) exp(s r(y))      (convex in s)
    q_alpha is proportional to pi_base exp(alpha r) on S, so E_q[r] = M'(alpha), Var_q[r] = M''(alpha).

- kl_symmetry:         KL(q||base) = KL(q||teacher)   <=>  M'(alpha) = 0   (Newton on a convex M)
- ess_balance:         ESS_base(q) = ESS_teacher(q)   <=>  M(2-alpha) - M(-alpha) - 2M(1) + 2M(0) = 0
- reverse_kl_symmetry: KL(base||q) = KL(teacher||q)   <=>  alpha = KL(t||b) / (KL(t||b) + KL(b||t))  (closed form)
- entropy:             alpha = H(base) / (H(base) + H(teacher))
- fixed:               alpha = fixed_alpha, not clamped

The root solvers run a fixed number of safeguarded Newton steps inside the bracket
[alpha_min, alpha_max] on the whole batch, with no host synchronisation; a root outside the
bracket lands on the bound it lies beyond, which is the same as clamping. Rows where the two
policies coincide (every alpha gives the same q) get the midpoint of the bracket.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import MixConfig
from .logprobs import stable_logsumexp


def normalise(scores: torch.Tensor) -> torch.Tensor:
    return scores - stable_logsumexp(scores)


# Jeffreys divergence below which two rows count as the same distribution.
IDENTICAL_JEFFREYS = 1e-9


class TiltedFamily:
    """pi_base tilted by exp(s * r) on the joint support; one object per decoding step."""

    def __init__(self, lp_base: torch.Tensor, lp_teacher: torch.Tensor):  # [B, V] each
        joint = torch.isfinite(lp_base) & torch.isfinite(lp_teacher)
        self.lp_base = lp_base.masked_fill(~joint, float("-inf"))  # [B, V]
        # Rounding the normalisers to float32 shifts every lp of a row by the same ~1e-7, which
        # biases E_q[r] directly; measure each row's residual normaliser in float64 and remove it.
        shift = stable_logsumexp(lp_teacher, True) - stable_logsumexp(lp_base, True)  # [B, 1]
        shift = shift.to(lp_base.dtype)  # rounded once, as a difference: no 1e-7 offset
        self.r = torch.where(joint, lp_teacher - lp_base - shift, torch.zeros_like(lp_base))  # [B, V]
        self.empty = ~joint.any(dim=-1)  # [B]

    def moments(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """M(s), M'(s), M''(s) for s: [B]."""
        w = self.lp_base + s.unsqueeze(-1) * self.r  # [B, V]
        m0 = stable_logsumexp(w)  # [B, 1]
        p = torch.exp(w - m0)
        m1 = (p * self.r).sum(-1, dtype=torch.float64).to(w.dtype)
        m2 = (p * (self.r - m1.unsqueeze(-1)).square()).sum(-1)
        return m0.squeeze(-1), m1, m2

    def jeffreys(self) -> torch.Tensor:
        """KL(b~||t~) + KL(t~||b~) of the two policies renormalised on S: M'(1) - M'(0)."""
        ones = torch.ones(self.r.shape[0], dtype=self.r.dtype, device=self.r.device)
        return self.moments(ones)[1] - self.moments(torch.zeros_like(ones))[1]


Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def solve_increasing_root(fn: Objective, lo: torch.Tensor, hi: torch.Tensor, iterations: int) -> torch.Tensor:
    """Root of an increasing fn in [lo, hi] per row, or the bound the root lies beyond.

    fn(a) -> (value, derivative). Safeguarded Newton: a Newton step that leaves the current
    bracket is replaced by bisection, so the bracket always contains the answer.
    """
    f_lo, _ = fn(lo)
    f_hi, _ = fn(hi)
    below, above = f_lo >= 0, f_hi <= 0  # root at or below lo / at or above hi
    a = torch.where(f_hi > f_lo, lo + (hi - lo) * (-f_lo) / (f_hi - f_lo), (lo + hi) / 2)
    a = _clamp(a, lo, hi)
    left, right = lo.clone(), hi.clone()
    for _ in range(iterations):
        f, df = fn(a)
        left = torch.where(f <= 0, a, left)
        right = torch.where(f >= 0, a, right)
        step = a - f / df
        inside = torch.isfinite(step) & (step >= left) & (step <= right)
        a = torch.where(inside, step, (left + right) / 2)
    return torch.where(below, lo, torch.where(above, hi, a))


def _clamp(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    a = torch.where(torch.isfinite(a), a, (lo + hi) / 2)
    return torch.minimum(torch.maximum(a, lo), hi)


def _kl_symmetry(family: TiltedFamily, lo, hi, iterations: int) -> torch.Tensor:
    def fn(a):
        _, m1, m2 = family.moments(a)
        return m1, m2

    return solve_increasing_root(fn, lo, hi, iterations)


def _ess_balance(family: TiltedFamily, lo, hi, iterations: int) -> torch.Tensor:
    zeros = torch.zeros_like(lo)
    offset = 2.0 * family.moments(zeros + 1.0)[0] - 2.0 * family.moments(zeros)[0]

    def fn(a):  # minus the decreasing balance g, so that the objective increases
        m_hi, d_hi, _ = family.moments(2.0 - a)
        m_lo, d_lo, _ = family.moments(-a)
        return -(m_hi - m_lo - offset), d_hi - d_lo

    return solve_increasing_root(fn, lo, hi, iterations)


def _reverse_kl_symmetry(family: TiltedFamily) -> torch.Tensor:
    zeros = torch.zeros(family.r.shape[0], dtype=family.r.dtype, device=family.r.device)
    m0_0, m1_0, _ = family.moments(zeros)
    m0_1, m1_1, _ = family.moments(zeros + 1.0)
    kl_tb = m1_1 - (m0_1 - m0_0)  # KL(t~||b~) = E_t~[r] - log(Z_t/Z_b)
    kl_bt = (m0_1 - m0_0) - m1_0  # KL(b~||t~)
    return kl_tb / (kl_tb + kl_bt)


def entropy(lp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy per row (nats), with 0 log 0 = 0."""  # [B, V] -> [B]
    p = torch.exp(lp)
    return -torch.where(p > 0, p * lp, torch.zeros_like(lp)).sum(-1)


def solve_alpha(lp_base: torch.Tensor, lp_teacher: torch.Tensor, config: MixConfig) -> torch.Tensor:
    """alpha per row ([B], dtype of the inputs) for the configured method.

    The inputs may be log-probabilities or any per-row shift of them, e.g. the tempered logits
    z / T; passing those is more precise in float32, since normalised log-probs near -10 carry
    ~1e-6 absolute rounding that swamps the tiny differences of two near-identical policies.
    """  # [B, V] x2 -> [B]
    batch, dtype, device = lp_base.shape[0], lp_base.dtype, lp_base.device
    if config.alpha_method == "fixed":
        return torch.full((batch,), config.fixed_alpha, dtype=dtype, device=device)
    lo = torch.full((batch,), config.alpha_min, dtype=dtype, device=device)
    hi = torch.full((batch,), config.alpha_max, dtype=dtype, device=device)
    mid = (lo + hi) / 2
    family = TiltedFamily(lp_base, lp_teacher)
    if config.alpha_method == "entropy":
        h_b, h_t = entropy(normalise(lp_base)), entropy(normalise(lp_teacher))
        alpha = torch.where((h_b + h_t) > 0, _clamp(h_b / (h_b + h_t), lo, hi), mid)
    elif config.alpha_method == "kl_symmetry":
        alpha = _kl_symmetry(family, lo, hi, config.solver_iterations)
    elif config.alpha_method == "ess_balance":
        alpha = _ess_balance(family, lo, hi, config.solver_iterations)
    else:
        alpha = _clamp(_reverse_kl_symmetry(family), lo, hi)
    same = family.jeffreys() <= IDENTICAL_JEFFREYS
    return torch.where(same | family.empty, mid, alpha)
