"""Log-probabilities of the two policies and of their geometric mixture.

Invariants: all outputs are float32 (or wider if the input is wider), rows are normalised in
log space, and a probability of exactly zero stays `-inf` (never NaN, also at alpha = 0 or 1).
"""

from __future__ import annotations

import torch


def tempered_scores(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in at least float32; T = 0 (greedy) uses T = 1."""  # [B, V] -> [B, V]
    scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature not in (0.0, 1.0):
        scores = scores / temperature
    return scores


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) in at least float32; T = 0 (greedy) uses T = 1."""  # [B, V] -> [B, V]
    scores = tempered_scores(logits, temperature)
    return scores - stable_logsumexp(scores)


def stable_logsumexp(x: torch.Tensor, keep_float64: bool = False) -> torch.Tensor:
    """logsumexp over the last dim, reduced in float64, returned in x's dtype with keepdim.

    A float32 reduction over ~150k entries is off by up to ~1e-4 on CPU, which shifts E_q[r] and
    so alpha by more than the solver tolerance; the reduction alone in float64 removes that.
    """
    lse = torch.logsumexp(x.double(), dim=-1, keepdim=True)
    return lse if keep_float64 else lse.to(x.dtype)


def weighted(weight: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """weight * lp with the measure-theory convention 0 * (-inf) = 0."""  # [B], [B, V]
    w = weight.to(lp.dtype).unsqueeze(-1)
    return torch.where(w == 0, torch.zeros((), dtype=lp.dtype, device=lp.device), w * lp)


def mix_logprobs(lp_base: torch.Tensor, lp_teacher: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log q_alpha = (1-alpha) lp_base + alpha lp_teacher - logsumexp(...).

    lp_base, lp_teacher: [B, V]; alpha: [B]. Rows whose mixture has no support (the two
    policies share no token with non-zero probability) fall back to the teacher.
    """
    unnorm = weighted(1.0 - alpha, lp_base) + weighted(alpha, lp_teacher)  # [B, V]
    log_z = torch.logsumexp(unnorm, dim=-1, keepdim=True)  # [B, 1]
    lp_q = unnorm - log_z
    empty = torch.isneginf(log_z)
    return torch.where(empty, lp_teacher, lp_q)


def renormalise(lp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Restrict a log-distribution to `keep` (bool [B, V]) and renormalise each row."""
    masked = lp.masked_fill(~keep, float("-inf"))
    return masked - torch.logsumexp(masked, dim=-1, keepdim=True)
