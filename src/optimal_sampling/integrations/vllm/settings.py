"""The `optimal_sampling` block of a vLLM model directory's config.json, and log q from logits.

This module imports neither vLLM nor transformers: the writer and the vLLM model class both use
it, so the block is written and read by one piece of code. The block holds:

    format       int, bumped when the layout changes
    base/teacher {"path": absolute checkpoint directory (or hub id), "config": its config dict}
    vocab_size   V, the shared vocabulary: logits of both models are cut to their first V ids
    temperature  the mixing temperature T > 0 (requests must use temperature 1)
    mix          the fields of `MixConfig`
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ...config import MixConfig
from ...mixing import mix_step

BLOCK_KEY = "optimal_sampling"
FORMAT = 1
ARCHITECTURE = "OptimalSamplingForCausalLM"
# The one tensor of the directory's own weights file (vLLM's loader wants one); never loaded.
PLACEHOLDER_TENSOR = "optimal_sampling.placeholder"


@dataclass(frozen=True)
class SubModel:
    """One of the two networks: where its weights are and its Hugging Face config."""

    path: str
    config: dict[str, Any]


@dataclass(frozen=True)
class PluginSettings:
    """Everything the vLLM model class needs beyond what vLLM itself reads."""

    base: SubModel
    teacher: SubModel
    vocab_size: int
    temperature: float
    mix: MixConfig

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise TypeError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature <= 0:
            raise ValueError(
                f"the mixing temperature must be > 0, got {self.temperature}; for greedy decoding "
                "write the directory with temperature 1 and send requests with temperature 0"
            )
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {self.vocab_size!r}")

    def to_block(self) -> dict[str, Any]:
        """The JSON-able dict stored under config.json's `optimal_sampling` key."""
        return {
            "format": FORMAT,
            "base": asdict(self.base),
            "teacher": asdict(self.teacher),
            "vocab_size": self.vocab_size,
            "temperature": float(self.temperature),
            "mix": asdict(self.mix),
        }

    @classmethod
    def from_block(cls, block: dict[str, Any]) -> PluginSettings:
        """Parse the stored block; ValueError names what is missing or of a newer format."""
        if not isinstance(block, dict):
            raise ValueError(
                f"config.json has no '{BLOCK_KEY}' block; write the directory with write_vllm_model_dir"
            )
        if block.get("format") != FORMAT:
            raise ValueError(
                f"unsupported '{BLOCK_KEY}' format {block.get('format')!r} (this version reads {FORMAT})"
            )
        known = {f.name for f in fields(MixConfig)}
        mix = MixConfig(**{k: v for k, v in block["mix"].items() if k in known})
        return cls(
            base=SubModel(**block["base"]),
            teacher=SubModel(**block["teacher"]),
            vocab_size=int(block["vocab_size"]),
            temperature=float(block["temperature"]),
            mix=mix,
        )


def mixed_logprobs(
    logits_base: torch.Tensor,  # [N, V_base] (V_base >= vocab_size)
    logits_teacher: torch.Tensor,  # [N, V_teacher]
    vocab_size: int,
    mix: MixConfig,
    temperature: float,
) -> torch.Tensor:
    """log q over the shared vocabulary, float32 or wider: [N, vocab_size]."""
    lp_q = mix_step(logits_base[:, :vocab_size], logits_teacher[:, :vocab_size], mix, temperature).lp_q
    return lp_q if lp_q.dtype in (torch.float32, torch.float64) else lp_q.float()
