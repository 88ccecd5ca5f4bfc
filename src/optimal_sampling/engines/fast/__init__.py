"""The fast engine: compact Llama/Mistral/Qwen2/Qwen3 code, static KV caches, CUDA graphs.

`supports(base, teacher)` says whether both models can run here; `build_fast_engine` sizes the
KV caches (from `mem_fraction_static` of free GPU memory on CUDA, a small fixed budget on CPU)
and builds a `FastEngine`. See engine.py for the invariants.
"""

from __future__ import annotations

from ...config import EngineConfig
from ...models.loading import LoadedModel
from ..base import Engine, spare_slots
from .cache_plan import plan_max_len
from .engine import FastEngine
from .mixing_fast import fused_sample_step, fused_supported
from .spec import spec_of, unsupported_reason

__all__ = [
    "FastEngine",
    "build_fast_engine",
    "fused_sample_step",
    "fused_supported",
    "supports",
    "plan_cache",
]


def supports(base_model, teacher_model) -> bool:
    return unsupported_reason(base_model) is None and unsupported_reason(teacher_model) is None


def plan_cache(base_model, teacher_model, vocab_size: int, config: EngineConfig) -> tuple[int, int]:
    """(slots, max_len): max_batch_size slots plus spare ones for requests prefilled ahead
    (`spare_slots`), each as long as the models' context and memory allow."""
    device = next(base_model.parameters()).device
    slots = config.max_batch_size + spare_slots(config.max_batch_size)
    specs = [spec_of(base_model), spec_of(teacher_model)]
    dtype_bytes = next(base_model.parameters()).element_size()
    return slots, plan_max_len(specs, dtype_bytes, device, slots, vocab_size, config.mem_fraction_static)


def build_fast_engine(
    base: LoadedModel, teacher: LoadedModel, vocab_size: int, config: EngineConfig
) -> Engine:
    for loaded in (base, teacher):
        reason = unsupported_reason(loaded.model)
        if reason is not None:
            raise ValueError(f"the fast engine cannot run {loaded.source}: {reason}")
    slots, max_len = plan_cache(base.model, teacher.model, vocab_size, config)
    return FastEngine(
        base.model, teacher.model, vocab_size, slots, max_len, use_graphs=config.use_cuda_graphs,
        max_batch=config.max_batch_size,
    )  # fmt: skip
