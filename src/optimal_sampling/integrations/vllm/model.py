"""`OptimalSamplingForCausalLM`: one vLLM model holding the base and the teacher network.

Each network is vLLM's own model class for its architecture (Llama, Qwen2, Qwen3, ...), built
under its own prefix (`base.`, `teacher.`), so each has its own attention layers and vLLM pages
a KV cache for both. `forward` runs both on the same tokens and returns their final hidden
states side by side ([N, H_base + H_teacher]); `compute_logits` splits them, takes each
network's logits and returns log q over the shared vocabulary, computed by
`optimal_sampling.mixing`. vLLM's sampler at request temperature 1 then samples exactly from q,
and its returned (raw) log-probs are log q.

Weights: the model directory holds a placeholder tensor only; both networks are declared as
`secondary_weights` sources (their own checkpoints, referenced by path in config.json), which
vLLM's default loader streams with the `base.` / `teacher.` prefixes into `load_weights`.

Not supported: pipeline parallelism, prompt embeddings, and quantized checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.transformers_utils.config import patch_rope_parameters

from .settings import BLOCK_KEY, PLACEHOLDER_TENSOR, PluginSettings, SubModel, mixed_logprobs

# AutoWeightsLoader matches names it may ignore by their top-level module, with the dot.
PLACEHOLDER_MODULE = PLACEHOLDER_TENSOR.split(".")[0] + "."


def sub_config(sub: SubModel) -> PretrainedConfig:
    """The Hugging Face config of one network, as vLLM would have read it from its checkpoint."""
    values = dict(sub.config)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    patch_rope_parameters(config)
    return config


def settings_of(vllm_config: VllmConfig) -> PluginSettings:
    return PluginSettings.from_block(getattr(vllm_config.model_config.hf_config, BLOCK_KEY, None))


class OptimalSamplingForCausalLM(nn.Module):
    """Base and teacher in one vLLM model; its logits are log q of their per-token mixture."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.settings = settings_of(vllm_config)
        self.base = self._build(vllm_config, self.settings.base, maybe_prefix(prefix, "base"))
        self.teacher = self._build(vllm_config, self.settings.teacher, maybe_prefix(prefix, "teacher"))
        self.base_hidden = self.base.config.get_text_config().hidden_size
        self.secondary_weights = [
            DefaultModelLoader.Source(self.settings.base.path, None, prefix="base."),
            DefaultModelLoader.Source(self.settings.teacher.path, None, prefix="teacher."),
        ]

    @staticmethod
    def _build(vllm_config: VllmConfig, sub: SubModel, prefix: str) -> nn.Module:
        config = sub_config(sub)
        return init_vllm_registered_model(vllm_config, hf_config=config, prefix=prefix)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states of both networks side by side: [N, H_base + H_teacher]."""
        if input_ids is None or inputs_embeds is not None or intermediate_tensors is not None:
            raise NotImplementedError(
                "OptimalSamplingForCausalLM needs token ids (no prompt embeddings, no pipeline parallelism)"
            )
        hidden_base = self.base(input_ids, positions)
        hidden_teacher = self.teacher(input_ids, positions)
        return torch.cat([hidden_base, hidden_teacher.to(hidden_base.dtype)], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """log q over the shared vocabulary ([N, V], float32); None on tensor-parallel ranks > 0."""
        logits_base = self.base.compute_logits(hidden_states[:, : self.base_hidden])
        logits_teacher = self.teacher.compute_logits(hidden_states[:, self.base_hidden :])
        if logits_base is None or logits_teacher is None:
            return None
        s = self.settings
        return mixed_logprobs(logits_base, logits_teacher, s.vocab_size, s.mix, s.temperature)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=[PLACEHOLDER_MODULE])
        return loader.load_weights(weights)
