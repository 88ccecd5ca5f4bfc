"""Per-token diagnostics of the distribution q actually sampled from.

ESS is taken over q's support S: ESS_pi(q) = (sum_S pi)^2 / sum_S pi^2 / q, the normalised
effective sample size of importance weights pi/q for draws from q. With full support this is
DESIGN's 1 / sum pi^2/q. KL(q||pi) is +inf when q puts mass where pi has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepDiagnostics:
    ess_ratio: torch.Tensor  # [B] ESS_base(q) / ESS_teacher(q)
    kl_q_base: torch.Tensor  # [B]
    kl_q_teacher: torch.Tensor  # [B]


def kl_from(lp_q: torch.Tensor, lp_other: torch.Tensor) -> torch.Tensor:
    """KL(q || other) per row, summing only where q > 0."""  # [B, V] x2 -> [B]
    q = torch.exp(lp_q)
    terms = torch.where(q > 0, q * (lp_q - lp_other), torch.zeros_like(lp_q))
    return terms.sum(-1)


def log_ess(lp_q: torch.Tensor, lp_pi: torch.Tensor) -> torch.Tensor:
    """log ESS_pi(q) over q's support; -inf when pi has no mass there."""  # [B]
    on_support = torch.isfinite(lp_q)
    lp_pi_s = lp_pi.masked_fill(~on_support, float("-inf"))
    log_mass = torch.logsumexp(lp_pi_s, dim=-1)
    second = torch.where(on_support, 2.0 * lp_pi_s - lp_q, torch.full_like(lp_q, float("-inf")))
    value = 2.0 * log_mass - torch.logsumexp(second, dim=-1)
    return torch.where(torch.isneginf(log_mass), log_mass, value)


def step_diagnostics(lp_q: torch.Tensor, lp_base: torch.Tensor, lp_teacher: torch.Tensor) -> StepDiagnostics:
    """ESS ratio and the two KLs of q against the (tempered) policies it mixes."""
    log_ratio = log_ess(lp_q, lp_base) - log_ess(lp_q, lp_teacher)
    return StepDiagnostics(
        ess_ratio=torch.exp(log_ratio.nan_to_num(nan=0.0)),
        kl_q_base=kl_from(lp_q, lp_base),
        kl_q_teacher=kl_from(lp_q, lp_teacher),
    )
