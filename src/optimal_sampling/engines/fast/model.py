"""Compact Llama/Mistral/Qwen2/Qwen3 forward pass over the weights of a loaded Hugging Face model.

The model owns no scheduling: `forward(ids, attend)` runs embed -> layers -> final norm; each
layer hands its q/k/v projection to `attend(layer, qkv)`, which the engine provides (prefill or
decode, CPU or GPU): it rotates q and k (`rope_store`, or inside the decode attention kernel on
CUDA), writes the keys and values into the KV cache at (slot, position), and attends.

On CUDA the elementwise work (residual add + RMSNorm, q/k norm + RoPE + cache write, SiLU * up)
runs as fused Triton kernels (triton_layers.py; in decode, RoPE and the cache write run inside the
attention kernel); on CPU, as torch ops. Weights are the Hugging Face model's own tensors: q/k/v and
gate/up are fused into one matrix each, and the Hugging Face parameters are re-pointed at views
of the fused matrices, so the weights live on the device once (no second disk read, no copy).
`weight_map` says where each Hugging Face parameter lives in these tensors (a row block of a
fused matrix, this rank's shard under tensor parallelism), so live updates copy into them in place.

Numerics follow transformers: RMSNorm in float32 then cast back, RoPE tables cast to the model
dtype, residual adds in the model dtype; so in float32 the logits equal the reference engine's
to rounding, and in bfloat16 they agree to bf16 tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..weights import WeightMap, WeightSlot, WeightTarget
from .spec import ModelSpec, rope_tables, spec_of

# (layer, qkv [..., (heads + 2 kv_heads) * D]) -> attention output [..., heads * D]
Attend = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # [head_dim] (Qwen3)
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor  # [hidden, heads * head_dim]
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


def fuse_rows(linears: list[torch.nn.Linear], attr: str = "weight") -> torch.Tensor | None:
    """Concatenate the rows of several Linear weights (or biases) and re-point them at views of it."""
    params = [getattr(lin, attr) for lin in linears]
    if any(p is None for p in params):
        return None
    fused = torch.cat([p.data for p in params], dim=0)
    start = 0
    for p in params:
        p.data = fused[start : start + p.shape[0]]
        start += p.shape[0]
    return fused


def layer_weights(layer) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    projections = [attn.q_proj, attn.k_proj, attn.v_proj]
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.data,
        qkv=fuse_rows(projections),
        qkv_bias=fuse_rows(projections, "bias"),
        q_norm=attn.q_norm.weight.data if hasattr(attn, "q_norm") else None,
        k_norm=attn.k_norm.weight.data if hasattr(attn, "k_norm") else None,
        o_proj=attn.o_proj.weight.data,
        post_norm=layer.post_attention_layernorm.weight.data,
        gate_up=fuse_rows([mlp.gate_proj, mlp.up_proj]),
        down=mlp.down_proj.weight.data,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, head_dim]; cos/sin: [..., head_dim] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class CompactModel:
    """One causal LM as plain tensors; `forward` is shape-agnostic over leading dims ([B] or [n, T])."""

    def __init__(self, hf_model, max_len: int, fused: bool = False):
        self.spec: ModelSpec = spec_of(hf_model)
        inner = hf_model.model
        self.dtype = inner.embed_tokens.weight.dtype
        self.device = inner.embed_tokens.weight.device
        self.fused = fused
        self.embed_tokens = inner.embed_tokens.weight.data  # [W, hidden]
        self.lm_head = hf_model.get_output_embeddings().weight.data  # [W, hidden] (tied: same tensor)
        self.tied = tied_embeddings(hf_model)
        self.final_norm = inner.norm.weight.data
        self.layers = [layer_weights(layer) for layer in inner.layers]
        self.cos, self.sin = rope_tables(hf_model, max_len, self.device, self.dtype)  # [max_len, head_dim]

    def weight_bytes(self) -> int:
        tensors = [self.embed_tokens, self.final_norm]
        if self.lm_head.data_ptr() != self.embed_tokens.data_ptr():
            tensors.append(self.lm_head)
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def shard_index(self) -> tuple[int, int]:
        """(rank, size) of the tensor-parallel shard these tensors hold; (0, 1) is the whole model."""
        return 0, 1

    def weight_map(self) -> WeightMap:
        """Hugging Face parameter name -> its full shape and the pieces of these tensors holding it."""
        rank, size = self.shard_index()
        slots = embedding_slots(self, rank, size)
        slots["model.norm.weight"] = whole(self.final_norm)
        for i, lw in enumerate(self.layers):
            slots.update(layer_slots(f"model.layers.{i}.", lw, self.spec, rank, size))
        return slots

    # ------------------------------------------------------------------ elementwise steps
    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return triton_layers().rms_norm(x, weight, self.spec.rms_eps)
        return rms_norm(x, weight, self.spec.rms_eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor):
        """(x + delta, norm(x + delta))."""
        if self.fused:
            return triton_layers().add_rms_norm(x, delta, weight, self.spec.rms_eps)
        x = x + delta
        return x, rms_norm(x, weight, self.spec.rms_eps)

    def act(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return triton_layers().silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_store(self, i: int, qkv: torch.Tensor, positions, slots, cache_k, cache_v, keys: bool = False):
        """Rotated q [..., heads, D] (with keys=True, (q, k, v): the rotated k and v [..., kv_heads, D]
        too); the rotated k and v written to cache_k/v [S, L, kv_heads, D] at (slots, positions)."""
        s, lw = self.spec, self.layers[i]
        if self.fused:
            return triton_layers().rope_store(
                qkv, positions, slots, self.cos, self.sin, cache_k, cache_v, lw.q_norm, lw.k_norm, s.rms_eps,
                s.heads, s.kv_heads, keys,
            )  # fmt: skip
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        q = q.unflatten(-1, (s.heads, s.head_dim))
        k = k.unflatten(-1, (s.kv_heads, s.head_dim))
        if lw.q_norm is not None:
            q, k = rms_norm(q, lw.q_norm, s.rms_eps), rms_norm(k, lw.k_norm, s.rms_eps)
        cos, sin = self.cos[positions], self.sin[positions]  # [..., D]
        k, v = apply_rope(k, cos, sin), v.unflatten(-1, (s.kv_heads, s.head_dim))
        cache_k[slots, positions] = k
        cache_v[slots, positions] = v
        q = apply_rope(q, cos, sin)
        return (q, k, v) if keys else q

    # ------------------------------------------------------------------ forward
    def forward(self, ids, attend: Attend) -> torch.Tensor:
        """ids: [...] int64 -> the final-normed hidden states [..., hidden]."""
        x = F.embedding(ids, self.embed_tokens)
        h = self.norm(x, self.layers[0].input_norm)
        for i, lw in enumerate(self.layers):
            attn = attend(i, F.linear(h, lw.qkv, lw.qkv_bias))
            x, h = self.add_norm(x, self.reduce(F.linear(attn, lw.o_proj)), lw.post_norm)
            after = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.final_norm
            x, h = self.add_norm(x, self.reduce(F.linear(self.act(F.linear(h, lw.gate_up)), lw.down)), after)
        return h

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Identity; tensor parallelism sums the row-parallel partial outputs here."""
        return partial

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[..., hidden] final-normed -> [..., W] in the model dtype, as transformers' lm_head."""
        return F.linear(normed, self.lm_head)


def tied_embeddings(hf_model) -> bool:
    return hf_model.get_output_embeddings().weight is hf_model.model.embed_tokens.weight


# ---------------------------------------------------------------------- weight map (live updates)


def whole(dest: torch.Tensor) -> WeightSlot:
    """A replicated parameter held whole."""
    return WeightSlot(tuple(dest.shape), (WeightTarget(dest),))


def block(dest: torch.Tensor, full_shape: tuple[int, ...], dim: int, start: int) -> WeightSlot:
    """A parameter of which dest holds the block [start, start + dest.shape[dim]) along dim."""
    stop = start + dest.shape[dim]
    take = (lambda t: t[start:stop]) if dim == 0 else (lambda t: t[:, start:stop])
    return WeightSlot(full_shape, (WeightTarget(dest, take),))


def split_rows(fused: torch.Tensor | None, counts: list[int]) -> list[torch.Tensor | None]:
    """Row views of a fused matrix (or bias): q/k/v of qkv, gate/up of gate_up."""
    return [None] * len(counts) if fused is None else list(fused.split(counts, dim=0))


def layer_slots(
    prefix: str, lw: LayerWeights, spec: ModelSpec, rank: int, size: int
) -> dict[str, WeightSlot]:
    """One decoder layer; spec holds this shard's head counts (the full model's times size)."""
    d, hidden = spec.head_dim, spec.hidden
    q_rows, kv_rows, inter = spec.heads * d, spec.kv_heads * d, lw.gate_up.shape[0] // 2
    slots = {prefix + "input_layernorm.weight": whole(lw.input_norm),
             prefix + "post_attention_layernorm.weight": whole(lw.post_norm)}  # fmt: skip
    counts = [q_rows, kv_rows, kv_rows]
    for kind, parts in (("weight", split_rows(lw.qkv, counts)), ("bias", split_rows(lw.qkv_bias, counts))):
        for proj, dest, rows in zip(("q_proj", "k_proj", "v_proj"), parts, counts):
            if dest is not None:
                full = (rows * size, hidden)[: dest.dim()]
                slots[f"{prefix}self_attn.{proj}.{kind}"] = block(dest, full, 0, rank * rows)
    slots[prefix + "self_attn.o_proj.weight"] = block(lw.o_proj, (hidden, q_rows * size), 1, rank * q_rows)
    for norm, dest in (("q_norm", lw.q_norm), ("k_norm", lw.k_norm)):
        if dest is not None:
            slots[f"{prefix}self_attn.{norm}.weight"] = whole(dest)
    gate, up = split_rows(lw.gate_up, [inter, inter])
    slots[prefix + "mlp.gate_proj.weight"] = block(gate, (inter * size, hidden), 0, rank * inter)
    slots[prefix + "mlp.up_proj.weight"] = block(up, (inter * size, hidden), 0, rank * inter)
    slots[prefix + "mlp.down_proj.weight"] = block(lw.down, (hidden, inter * size), 1, rank * inter)
    return slots


def embedding_slots(net: CompactModel, rank: int, size: int) -> dict[str, WeightSlot]:
    """Input and output embeddings; the output one vocab-parallel (zero rows past the width are
    padding, never written). Tied: either name updates both copies (one tensor when unsharded)."""
    width, per = net.spec.logit_width, net.lm_head.shape[0]
    real = max(0, min(per, width - rank * per))
    head = block(net.lm_head[:real], (width, net.spec.hidden), 0, rank * per)
    embed = whole(net.embed_tokens)
    if not net.tied:
        return {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    same = net.lm_head.data_ptr() == net.embed_tokens.data_ptr() and size == 1
    both = embed if same else WeightSlot(embed.shape, embed.targets + head.targets)
    return {"model.embed_tokens.weight": both, "lm_head.weight": both}


def triton_layers():
    from . import triton_layers as module

    return module
