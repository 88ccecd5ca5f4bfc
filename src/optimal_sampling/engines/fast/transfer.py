"""Host-to-device copies that never make the host wait for work queued on the current stream."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(host: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """A host tensor (or int list) on `device` without blocking the host: a plain copy from
    pageable memory waits for the current stream, i.e. for a prefill already queued on it."""
    if isinstance(host, torch.Tensor):
        if host.device.type != "cpu":
            return host.to(device)
    else:
        host = torch.tensor(list(host), dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
