"""One decoding step after the models: logits of both models -> token, importance data, diagnostics.

A pure tensor function (no host sync, no Python per row), so an engine may capture it together
with its forward passes in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .config import MixConfig, SamplingParams
from .mixing import mix_step, policy_logprobs_of, step_diagnostics
from .sampling import sample_tokens


@dataclass
class StepResult:
    tokens: torch.Tensor  # [B] int64
    logprob_base: torch.Tensor  # [B] untempered log pi_base(token)
    logprob_teacher: torch.Tensor  # [B] untempered log pi_teacher(token)
    logprob_q: torch.Tensor  # [B] log q(token) of the q sampled from
    alpha: torch.Tensor  # [B]
    ess_ratio: torch.Tensor | None = None  # [B]
    kl_q_base: torch.Tensor | None = None
    kl_q_teacher: torch.Tensor | None = None
    # The fields above that are set, already packed per row as [B, fields] float64 on the device
    # (the fused sampler writes it): to_host then copies it without stacking first.
    host_rows: torch.Tensor | None = field(default=None, repr=False)

    def to_host(self) -> dict[str, list]:
        """All fields as Python lists, in one device-to-host transfer."""
        names = [f.name for f in fields(self) if f.name != "host_rows" and getattr(self, f.name) is not None]
        if self.host_rows is not None and self.host_rows.shape[1] == len(names):
            stacked = self.host_rows.cpu().T
        else:
            stacked = torch.stack([getattr(self, n).double() for n in names]).cpu()
        out = {n: row.tolist() for n, row in zip(names, stacked)}
        out["tokens"] = [int(t) for t in out["tokens"]]
        return out


def sample_step(
    logits_base: torch.Tensor,  # [B, V]
    logits_teacher: torch.Tensor,  # [B, V]
    row_seeds: torch.Tensor,  # [B] int64
    steps: torch.Tensor,  # [B] int64, tokens generated so far per row
    mix: MixConfig,
    params: SamplingParams,
) -> StepResult:
    """Mix, draw one token per row, and gather what importance weighting needs."""
    mixed = mix_step(logits_base, logits_teacher, mix, params.temperature, params.top_k, params.top_p, params.min_p)
    tokens = sample_tokens(mixed.lp_q, params.greedy, row_seeds, steps)
    result = StepResult(
        tokens=tokens,
        logprob_base=policy_logprobs_of(logits_base, tokens),
        logprob_teacher=policy_logprobs_of(logits_teacher, tokens),
        logprob_q=mixed.lp_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        alpha=mixed.alpha,
    )
    if params.collect_diagnostics:
        diag = step_diagnostics(mixed.lp_q, mixed.lp_base, mixed.lp_teacher)
        result.ess_ratio, result.kl_q_base, result.kl_q_teacher = diag.ess_ratio, diag.kl_q_base, diag.kl_q_teacher
    return result
