"""vLLM plugin: an architecture whose logits are log q of the base/teacher mixture.

`register` is the `vllm.general_plugins` entry point; vLLM calls it in every process it starts
(API server, engine core, workers). It registers `OptimalSamplingForCausalLM` by its import path,
so importing this package (or `optimal_sampling`) never imports vLLM.
`write_vllm_model_dir` writes a directory that `vllm.LLM(DIR)` and `vllm serve DIR` load.
"""

from __future__ import annotations

from .model_dir import write_vllm_model_dir
from .settings import ARCHITECTURE

MODEL_CLASS = "optimal_sampling.integrations.vllm.model:OptimalSamplingForCausalLM"

__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register", "write_vllm_model_dir"]


def register() -> None:
    """Make vLLM's model registry know the optimal-sampling architecture (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
