"""One decoding step after the models: logits of both models -> token, importance data, diagnostics.

A pure tensor function (no host sync, no Python per row), so an engine may capture it together
with its forward passes in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..config import MixConfig, SamplingParams
from . import MixedStep, mix_step, policy_logprobs_of, step_diagnostics
from .draw import sample_tokens


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
        return self.copy_to_host().to_host()

    def copy_to_host(self) -> HostCopy:
        """Start the one device-to-host transfer now (into pinned memory, not waiting for it):
        the device tensors may then be overwritten (e.g. by the next replay of a captured step)."""
        names = [f.name for f in fields(self) if f.name != "host_rows" and getattr(self, f.name) is not None]
        if self.host_rows is not None and self.host_rows.shape[1] == len(names):
            rows = self.host_rows
        else:
            rows = torch.stack([getattr(self, n).double() for n in names], dim=1)
        return HostCopy(names, rows)


class HostCopy:
    """A step's results [B, fields] on their way to the host; `to_host` waits for this copy only,
    so a host loop can queue the next step before it reads this one."""

    def __init__(self, names: list[str], rows: torch.Tensor):
        self.names = names
        self.event = None
        if rows.device.type == "cuda":
            self.rows = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            self.rows.copy_(rows, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(rows.device))
        else:
            self.rows = rows.clone()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def to_host(self) -> dict[str, list]:
        if self.event is not None:
            self.event.synchronize()
        out = {n: column.tolist() for n, column in zip(self.names, self.rows.T)}
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
    mixed = mix_step(
        logits_base, logits_teacher, mix, params.temperature, params.top_k, params.top_p, params.min_p
    )
    tokens = sample_tokens(mixed.lp_q, params.greedy, row_seeds, steps)
    return importance_data(logits_base, logits_teacher, mixed, tokens, params.collect_diagnostics)


def importance_data(
    logits_base: torch.Tensor,  # [B, V]
    logits_teacher: torch.Tensor,  # [B, V]
    mixed: MixedStep,
    tokens: torch.Tensor,  # [B] int64: drawn (sampling) or given (scoring)
    with_diagnostics: bool,
) -> StepResult:
    """Per row: the token's untempered log pi_base / log pi_teacher, its log q, alpha, and the
    diagnostics of the q it was drawn from. Sampling and teacher-forced scoring both use this."""
    result = StepResult(
        tokens=tokens,
        logprob_base=policy_logprobs_of(logits_base, tokens),
        logprob_teacher=policy_logprobs_of(logits_teacher, tokens),
        logprob_q=mixed.lp_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        alpha=mixed.alpha,
    )
    if with_diagnostics:
        diag = step_diagnostics(mixed.lp_q, mixed.lp_base, mixed.lp_teacher)
        result.ess_ratio, result.kl_q_base, result.kl_q_teacher = (
            diag.ess_ratio,
            diag.kl_q_base,
            diag.kl_q_teacher,
        )
    return result
