"""What the compact model code needs to know about a Hugging Face model, read once from its config.

Invariants: only architectures whose forward pass is exactly "embed -> N x (RMSNorm, GQA attention
with RoPE, RMSNorm, SwiGLU) -> RMSNorm -> lm_head" are accepted (Llama 2/3, SmolLM, Mistral,
Qwen2/2.5, Qwen3); anything else is refused with a reason, so the sampler falls back to the
reference engine. RoPE frequencies are taken from the loaded model's own rotary module (covers
default, linear, Llama-3 and YaRN scaling); dynamic NTK scaling, which changes with the sequence
length, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    logit_width: int
    context: int  # longest sequence the model attends over exactly (sliding window included)
    qk_norm: bool  # Qwen3: RMSNorm on each head of q and k before RoPE
    act: str


def rope_type_of(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def unsupported_reason(model) -> str | None:
    """Why the fast engine cannot run this model, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return f"architecture {model_type!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if rope_type_of(config) not in STATIC_ROPE_TYPES:
        return f"RoPE scaling {rope_type_of(config)!r} is not supported (only {', '.join(STATIC_ROPE_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not SwiGLU/silu"
    if getattr(config, "mlp_bias", False):
        return "MLP biases are not supported"
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "the model has no static rotary embedding to read frequencies from"
    return None


def sliding_window_of(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def spec_of(model) -> ModelSpec:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    context = int(getattr(config, "max_position_embeddings", 1 << 20))
    window = sliding_window_of(config)
    if window is not None:
        context = min(context, window)  # within the window, sliding attention is full attention
    return ModelSpec(
        model_type=config.model_type,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_eps=float(config.rms_norm_eps),
        logit_width=model.get_output_embeddings().weight.shape[0],
        context=context,
        qk_norm=config.model_type == "qwen3",
        act="silu",
    )


def rope_tables(
    model, max_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] in the model dtype, computed as transformers does (fp32, then cast)."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float32)  # [head_dim / 2]
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    positions = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
