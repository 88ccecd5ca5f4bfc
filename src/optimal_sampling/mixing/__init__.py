"""Pure functions on [B, V] tensors: alpha solvers, log q, support, diagnostics, importance data.

The mixing code never sees a model. `mix_step` is the whole per-token computation from the two
models' logits to the distribution q that is sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MixConfig
from .alpha import solve_alpha
from .diagnostics import StepDiagnostics, step_diagnostics
from .logprobs import mix_logprobs, stable_logsumexp, tempered_logprobs, tempered_scores
from .support import constrain_to_teacher, truncate

__all__ = [
    "MixedStep",
    "StepDiagnostics",
    "mix_step",
    "policy_logprobs_of",
    "solve_alpha",
    "mix_logprobs",
    "tempered_logprobs",
    "step_diagnostics",
]


@dataclass
class MixedStep:
    alpha: torch.Tensor  # [B]
    lp_q: torch.Tensor  # [B, V] the distribution tokens are drawn from (after constraint and truncation)
    lp_base: torch.Tensor  # [B, V] tempered base policy (what alpha was solved on)
    lp_teacher: torch.Tensor  # [B, V] tempered teacher policy


def mix_step(
    logits_base: torch.Tensor,
    logits_teacher: torch.Tensor,
    mix: MixConfig,
    temperature: float,
    top_k: int = -1,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> MixedStep:
    """From raw logits ([B, V] each) to alpha and the final q of one decoding step."""
    scores_base, scores_teacher = (
        tempered_scores(logits_base, temperature),
        tempered_scores(logits_teacher, temperature),
    )
    alpha = solve_alpha(scores_base, scores_teacher, mix)  # on scores: more precise than on lp
    lp_base = scores_base - stable_logsumexp(scores_base)
    lp_teacher = scores_teacher - stable_logsumexp(scores_teacher)
    lp_q = mix_logprobs(lp_base, lp_teacher, alpha)
    lp_q = constrain_to_teacher(lp_q, lp_teacher, mix)
    lp_q = truncate(lp_q, top_k, top_p, min_p)
    return MixedStep(alpha=alpha, lp_q=lp_q, lp_base=lp_base, lp_teacher=lp_teacher)


def policy_logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Untempered log pi(token) per row: the policy's own log-prob, for importance weights."""
    scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = scores.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scores, dim=-1)
