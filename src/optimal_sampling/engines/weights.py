"""In-place weight updates: where each Hugging Face parameter lives in an engine, checks, copies.

An engine describes its weights as a `WeightMap`: Hugging Face parameter name -> the parameter's
full shape and the engine tensors that hold it (`WeightTarget`: a destination tensor, or a view
of one, and how to cut the piece it holds out of the full tensor). That covers plain parameters,
fused ones (q/k/v rows of one qkv matrix, gate/up rows of one gate_up matrix), tied embeddings
(one name, two destinations where the engine keeps two copies) and tensor-parallel shards
(the destination holds this rank's rows or columns).

Contracts:
- `check_weights` validates every (name, shape, dtype) of an update against the map and raises
  one `ValueError` naming the parameter; `copy_weights` runs only after it passed, so a rejected
  update leaves every weight exactly as it was.
- Copies go into the existing tensors (`copy_`), never re-allocate: captured CUDA graphs and the
  views that alias them stay valid. Any floating dtype and device is accepted (cast on copy).
- Names the update may carry that are not weights (rotary `inv_freq` buffers, which follow from the
  config) are skipped, as vLLM's loaders do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

MODELS = ("base", "teacher")
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)

NamedTensors = Sequence[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightTarget:
    dest: torch.Tensor  # the engine's tensor (or a view of it) holding this parameter's piece
    take: Callable[[torch.Tensor], torch.Tensor] | None = None  # full tensor -> that piece (None: all)


@dataclass(frozen=True)
class WeightSlot:
    shape: tuple[int, ...]  # the Hugging Face parameter's full shape
    targets: tuple[WeightTarget, ...]


WeightMap = dict[str, WeightSlot]


def check_model_name(model: object) -> str:
    if model not in MODELS:
        raise ValueError(f"model must be 'base' or 'teacher', got {model!r}")
    return model


def skipped(name: str) -> bool:
    return name.endswith(SKIPPED_SUFFIXES)


def check_weights(
    weight_map: WeightMap, shapes: Iterable[tuple[str, Sequence[int], torch.dtype | None]], model: str
) -> None:
    """ValueError naming the first (name, shape, dtype) the map does not accept; nothing is touched."""
    for name, shape, dtype in shapes:
        if not isinstance(name, str):
            raise ValueError(f"a parameter name must be a string, got {type(name).__name__}")
        if skipped(name):
            continue
        slot = weight_map.get(name)
        if slot is None:
            raise ValueError(f"the {model} model has no parameter {name!r}{near_names(weight_map, name)}")
        if tuple(shape) != slot.shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(shape)}, the {model} model's is {slot.shape}"
            )
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"parameter {name!r} has dtype {dtype}; weights must be floating point")


def near_names(weight_map: WeightMap, name: str) -> str:
    """A hint for a name that is not there: the parameters sharing its last component."""
    last = name.rsplit(".", 2)[-2:]
    similar = [n for n in weight_map if n.rsplit(".", 2)[-2:] == last][:3]
    return f" (names look like {', '.join(map(repr, similar))})" if similar else ""


def shapes_of(weights: NamedTensors) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    for item in weights:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise ValueError("weights must be (name, tensor) pairs")
    return [(name, tuple(t.shape), t.dtype) for name, t in weights]


@torch.no_grad()
def copy_weights(weight_map: WeightMap, weights: NamedTensors) -> None:
    """Copy each full tensor's pieces into their destinations (checked beforehand)."""
    for name, tensor in weights:
        if skipped(name):
            continue
        for target in weight_map[name].targets:
            target.dest.copy_(tensor if target.take is None else target.take(tensor))


def load_checked(weight_map: WeightMap, weights: NamedTensors, model: str) -> None:
    """check_weights, then copy_weights: all or nothing."""
    weights = list(weights)
    check_weights(weight_map, shapes_of(weights), model)
    copy_weights(weight_map, weights)


def hf_weight_map(model: torch.nn.Module) -> WeightMap:
    """Every parameter of a Hugging Face model under each of its names (tied ones under both)."""
    return {
        name: WeightSlot(tuple(p.shape), (WeightTarget(p.data),))
        for name, p in model.named_parameters(remove_duplicate=False)
    }
