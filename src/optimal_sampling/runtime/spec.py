"""What a sampler is built from, as one frozen value: the engine process of a server and the
tensor-parallel helpers receive it and build the same sampler."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import EngineConfig, MixConfig, ParallelConfig


@dataclass(frozen=True)
class SamplerSpec:
    """Everything a sampler is built from; what self-started tensor-parallel helpers receive."""

    model_base: str | None
    model_teacher: str | None
    mix: MixConfig
    engine: EngineConfig
    parallel: ParallelConfig
    seed: int | None = None
    # temperatures whose graphs a server captures at start besides the default's (each stands for
    # its kind: 0, 1 or any other, see OptimalSampler.warmup)
    warmup_temperatures: tuple[float, ...] = ()
