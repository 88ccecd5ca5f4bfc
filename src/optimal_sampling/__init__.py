"""optimal-sampling: exact sampling from the geometric mixture of a base and a teacher model.

q(y) is proportional to pi_base(y)^(1-alpha) * pi_teacher(y)^alpha, with alpha chosen per token,
over the full vocabulary, with a KV cache per model; every sample carries the per-token
log-probs that importance weighting needs.

The public names are imported lazily, so `optimal-sampling --help` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "EngineConfig",
    "MixConfig",
    "OptimalSampler",
    "ParallelConfig",
    "Sample",
    "SamplingOutput",
    "SamplingParams",
    "apply_chat_template",
]
__version__ = "0.1.0"

_HOMES = {
    "MixConfig": "config",
    "SamplingParams": "config",
    "Sample": "outputs",
    "SamplingOutput": "outputs",
    "OptimalSampler": "runtime.sampler",
    "EngineConfig": "config",
    "ParallelConfig": "config",
    "apply_chat_template": "models.chat",
}

if TYPE_CHECKING:
    from .config import EngineConfig, MixConfig, ParallelConfig, SamplingParams
    from .models.chat import apply_chat_template
    from .outputs import Sample, SamplingOutput
    from .runtime.sampler import OptimalSampler


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
