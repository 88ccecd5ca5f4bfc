"""Truncation of a log-distribution to a top-k / top-p / min-p set, and the teacher constraint.

Ties at the cut are kept (a top-k set may then hold a few more than k tokens), as in vLLM.
The most likely token is always kept, so a truncated row is never empty.
"""

from __future__ import annotations

import torch

from ..config import MixConfig
from .logprobs import renormalise


def top_k_mask(lp: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens whose log-prob is at least the k-th largest of the row."""  # [B, V] -> bool [B, V]
    if k <= 0 or k >= lp.shape[-1]:
        return torch.ones_like(lp, dtype=torch.bool)
    kth = torch.topk(lp, k, dim=-1).values[:, -1:]
    return lp >= kth


def top_p_mask(lp: torch.Tensor, p: float) -> torch.Tensor:
    """Smallest set of most likely tokens whose total probability reaches p, and the tokens tied
    with the last of them: lp at least the last kept log-prob."""  # [B, V] -> bool [B, V]
    if p >= 1.0:
        return torch.ones_like(lp, dtype=torch.bool)
    sorted_lp = torch.sort(lp, dim=-1, descending=True).values
    probs = torch.exp(sorted_lp)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    kept = (mass_before < p).sum(dim=-1, keepdim=True).clamp(min=1)  # a prefix of the sorted row
    return lp >= sorted_lp.gather(-1, kept - 1)


def min_p_mask(lp: torch.Tensor, min_p: float) -> torch.Tensor:
    """Tokens with probability at least min_p times that of the most likely token."""
    if min_p <= 0.0:
        return torch.ones_like(lp, dtype=torch.bool)
    threshold = lp.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p, dtype=lp.dtype))
    return lp >= threshold


def truncate(lp: torch.Tensor, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Apply top-k, then top-p, then min-p (each on the renormalised survivor), as HF does."""
    if top_k > 0:
        lp = renormalise(lp, top_k_mask(lp, top_k))
    if top_p < 1.0:
        lp = renormalise(lp, top_p_mask(lp, top_p))
    if min_p > 0.0:
        lp = renormalise(lp, min_p_mask(lp, min_p))
    return lp


def teacher_support_mask(lp_teacher: torch.Tensor, config: MixConfig) -> torch.Tensor:
    """The teacher's top-k and/or top-p set (both when both are set)."""  # [B, V] -> bool [B, V]
    keep = top_k_mask(lp_teacher, config.target_top_k)
    return keep & top_p_mask(lp_teacher, config.target_top_p)


def constrain_to_teacher(lp_q: torch.Tensor, lp_teacher: torch.Tensor, config: MixConfig) -> torch.Tensor:
    """Restrict q to the teacher's support set and renormalise; a no-op when not configured.

    If q has no mass on the teacher's set (possible only with -inf logits), q falls back to the
    teacher restricted to that set.
    """
    if not config.constrained:
        return lp_q
    keep = teacher_support_mask(lp_teacher, config)
    constrained = renormalise(lp_q, keep)
    empty = torch.isnan(constrained).all(dim=-1, keepdim=True) | torch.isneginf(constrained).all(
        -1, keepdim=True
    )
    return torch.where(empty, renormalise(lp_teacher, keep), constrained)
