"""Megatron-style tensor parallelism for the compact model: this rank's shard and the collectives.

Sharding (rank r of T; H query heads, KV kv heads, I intermediate, W logit rows):
- qkv: column-parallel by heads -- rows of query heads [r*H/T, (r+1)*H/T) and of kv heads
  [r*KV/T, (r+1)*KV/T), fused as [q | k | v] like the full model (biases alike; q/k norms whole);
- o_proj: row-parallel (the matching input columns), then all_reduce;
- gate_up: column-parallel, the same rows of gate and of up, fused as [gate | up];
- down: row-parallel, then all_reduce;
- lm_head: vocab-parallel (ceil(W/T) rows each, zero-padded), then all_gather to full logits;
- embeddings and norms: replicated. Each rank's KV cache holds only its kv heads.
H and KV must be divisible by T (a ValueError says which is not), and so must I.

After the gather every rank holds the same logits, bit for bit, so every rank samples the same
tokens and stays in lockstep without further communication (see distributed/groups.py). Mixing on
vocab shards without gathering full rows is future work.

Weights come from a Hugging Face model anywhere (CPU, or the target device) and are sliced per
projection before they move, so no rank ever holds another rank's shard on its device. Tensors
on the meta device are initialised randomly on the target device (benchmarks: a 32B model's
shard built from its config alone).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...config import TensorParallel
from ...models.loading import check_shards_divide
from .cache_plan import plan_max_len
from .engine import FastEngine
from .model import CompactModel, LayerWeights, tied_embeddings
from .spec import ModelSpec, rope_tables, spec_of

INIT_STD = 0.02


def materialize(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype, norm: bool = False):
    """t on device (contiguous); a meta tensor becomes random (or ones for a norm weight)."""
    if t is None:
        return None
    if t.is_meta:
        if norm:
            return torch.ones(t.shape, device=device, dtype=dtype)
        return torch.randn(t.shape, device=device, dtype=dtype).mul_(INIT_STD)
    return t.detach().to(device=device, dtype=dtype).contiguous()


def rows(t: torch.Tensor | None, part: int, rank: int) -> torch.Tensor | None:
    """The rank-th block of `part` rows of t."""
    return None if t is None else t[rank * part : (rank + 1) * part]


def cat_rows(parts: list, device, dtype) -> torch.Tensor | None:
    if any(p is None for p in parts):
        return None
    return torch.cat([materialize(p, device, dtype) for p in parts], dim=0)


def shard_layer(layer, spec: ModelSpec, tp: TensorParallel, device, dtype) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    r, t, d = tp.rank, tp.size, spec.head_dim
    q_rows, kv_rows = spec.heads // t * d, spec.kv_heads // t * d
    inter = mlp.gate_proj.weight.shape[0] // t
    projections = ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows))
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return LayerWeights(
        input_norm=materialize(layer.input_layernorm.weight, device, dtype, norm=True),
        qkv=cat_rows([rows(p.weight, n, r) for p, n in projections], device, dtype),
        qkv_bias=cat_rows([rows(p.bias, n, r) for p, n in projections], device, dtype),
        q_norm=None if q_norm is None else materialize(q_norm.weight, device, dtype, norm=True),
        k_norm=None if k_norm is None else materialize(k_norm.weight, device, dtype, norm=True),
        o_proj=materialize(attn.o_proj.weight[:, r * q_rows : (r + 1) * q_rows], device, dtype),
        post_norm=materialize(layer.post_attention_layernorm.weight, device, dtype, norm=True),
        gate_up=cat_rows(
            [rows(mlp.gate_proj.weight, inter, r), rows(mlp.up_proj.weight, inter, r)], device, dtype
        ),
        down=materialize(mlp.down_proj.weight[:, r * inter : (r + 1) * inter], device, dtype),
    )


def shard_lm_head(weight: torch.Tensor, tp: TensorParallel, device, dtype) -> torch.Tensor:
    """Rows [r*c, (r+1)*c) of the output embedding, c = ceil(W / T), zero rows past W."""
    width = weight.shape[0]
    per = -(-width // tp.size)
    shard = materialize(weight[tp.rank * per : (tp.rank + 1) * per], device, dtype)
    if shard.shape[0] < per:
        shard = torch.cat([shard, shard.new_zeros(per - shard.shape[0], shard.shape[1])])
    return shard


def rotary_source(hf_model):
    """An object rope_tables can read: the model itself, or a fresh CPU rotary module for a meta model."""
    rotary = hf_model.model.rotary_emb
    if not rotary.inv_freq.is_meta:
        return hf_model
    with torch.device("cpu"):
        fresh = type(rotary)(config=hf_model.config)
    return SimpleNamespace(model=SimpleNamespace(rotary_emb=fresh))


class TensorParallelModel(CompactModel):
    """This rank's shard of a CompactModel; `spec` holds the per-rank head counts."""

    def __init__(self, hf_model, max_len: int, tp: TensorParallel, device: torch.device, fused: bool = False):
        full = spec_of(hf_model)
        inner = hf_model.model
        intermediate = inner.layers[0].mlp.gate_proj.weight.shape[0]
        check_shards_divide(tp.size, "model", full.heads, full.kv_heads, intermediate)
        self.full_spec = full
        self.spec = replace(full, heads=full.heads // tp.size, kv_heads=full.kv_heads // tp.size)
        self.tp = tp
        self.dtype = inner.embed_tokens.weight.dtype
        self.device = torch.device(device)
        self.fused = fused
        self.embed_tokens = materialize(inner.embed_tokens.weight, self.device, self.dtype)  # [W, hidden]
        self.lm_head = shard_lm_head(hf_model.get_output_embeddings().weight, tp, self.device, self.dtype)
        self.tied = tied_embeddings(hf_model)  # two copies here (embedding whole, head sharded)
        self.final_norm = materialize(inner.norm.weight, self.device, self.dtype, norm=True)
        self.layers = [shard_layer(layer, full, tp, self.device, self.dtype) for layer in inner.layers]
        self.cos, self.sin = rope_tables(rotary_source(hf_model), max_len, self.device, self.dtype)

    def shard_index(self) -> tuple[int, int]:
        return self.tp.rank, self.tp.size

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of the row-parallel partial outputs over the group (in place)."""
        dist.all_reduce(partial, group=self.tp.group)
        return partial

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> full logits [..., W] on every rank: the vocab shards, all-gathered."""
        local = F.linear(normed, self.lm_head).reshape(-1, self.lm_head.shape[0])  # [N, W/T]
        gathered = torch.empty(
            self.tp.size * local.shape[0], local.shape[1], dtype=local.dtype, device=local.device
        )
        gather = (
            getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        )  # torch >= 2.13 | older
        gather(gathered, local.contiguous(), group=self.tp.group)
        full = gathered.view(self.tp.size, *local.shape).permute(1, 0, 2).reshape(local.shape[0], -1)
        return full[:, : self.spec.logit_width].reshape(*normed.shape[:-1], -1)


class TensorParallelEngine(FastEngine):
    """FastEngine over this rank's shards (TensorParallelModel); every method is FastEngine's.
    `load_weights` takes full tensors and copies this rank's shard of each (see `weight_map`).

    One stream: both models' all-reduces go through one communicator, which needs them in the
    same order on every rank (so no prefill beside decode steps either)."""

    concurrent_models = False
    overlaps_prefill = False
    pipelines = False  # the leader sends its helpers each step's tokens (EngineProxy)
    shares_model_weights = False  # the shards are copies cut from the Hugging Face models

    def __init__(self, base: TensorParallelModel, teacher: TensorParallelModel, *args, **kwargs):
        super().__init__(base, teacher, *args, **kwargs)
        self.tp = base.tp


def build_tensor_parallel_engine(
    base_model, teacher_model, vocab_size: int, config, tp: TensorParallel, device: torch.device,
    max_len: int | None = None,
) -> TensorParallelEngine:  # fmt: skip
    """Shards of two Hugging Face models (anywhere; meta = random) on `device`, then the caches.

    max_len None: as long as context and memory allow (planned after the shards are placed)."""
    from .spec import unsupported_reason

    for model in (base_model, teacher_model):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(
                f"tensor parallelism runs on the fast engine, which cannot run this model: {reason}"
            )
    longest = min(spec_of(m).context for m in (base_model, teacher_model)) if max_len is None else max_len
    fused = torch.device(device).type == "cuda"
    nets = [TensorParallelModel(m, longest, tp, device, fused) for m in (base_model, teacher_model)]
    slots = config.max_batch_size
    if max_len is None:
        # shards already on their device: free memory excludes them
        dtype_bytes = nets[0].embed_tokens.element_size()
        specs = [net.spec for net in nets]
        max_len = plan_max_len(
            specs, dtype_bytes, nets[0].device, slots, vocab_size, config.mem_fraction_static
        )
    return TensorParallelEngine(*nets, vocab_size, slots, max_len, use_graphs=config.use_cuda_graphs)
