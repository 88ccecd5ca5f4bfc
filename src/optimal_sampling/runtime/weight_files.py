"""Weights on disk for live updates: a Hugging Face directory, or safetensors / PyTorch files.

Contracts: `weight_files` resolves what to read (a directory's `*.safetensors`, else its
`pytorch_model*.bin`; or the files given) and fails with a ValueError naming the path;
`file_shapes` reads (name, shape, dtype) from the safetensors headers alone, so an update can be
refused before any tensor is read; `check_config` refuses a directory whose config.json
describes another architecture (naming the field). Tensors are read onto the CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..engines.weights import check_model_name

SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# config.json fields that fix the architecture; a weight update must keep every one of them
ARCHITECTURE_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings",
)  # fmt: skip
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip

PathLike = str | os.PathLike


def weight_files(path: PathLike | Sequence[PathLike]) -> list[Path]:
    """The files holding the weights: of a Hugging Face directory, or the file(s) given."""
    if isinstance(path, (list, tuple)):
        return [checked_file(Path(p)) for p in path]
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a weights path must be a path or a list of paths, got {type(path).__name__}")
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(root.glob("*.safetensors")) or sorted(root.glob("pytorch_model*.bin"))
        if not files:
            raise ValueError(f"{root} holds no *.safetensors or pytorch_model*.bin files")
        return files
    return [checked_file(root)]


def checked_file(file: Path) -> Path:
    file = file.expanduser()
    if not file.is_file():
        raise ValueError(f"weights file not found: {file}")
    if file.suffix not in SUFFIXES:
        raise ValueError(f"{file} is not a weights file ({', '.join(SUFFIXES)})")
    return file


def file_shapes(files: list[Path]) -> list[tuple[str, tuple[int, ...], torch.dtype | None]] | None:
    """(name, shape, dtype) of every tensor, from safetensors headers; None if a file is not safetensors."""
    if any(f.suffix != ".safetensors" for f in files):
        return None
    from safetensors import safe_open

    shapes = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                shapes.append((name, tuple(piece.get_shape()), SAFETENSORS_DTYPES.get(piece.get_dtype())))
    return shapes


def read_weights(files: list[Path]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the files, on the CPU."""
    weights: list[tuple[str, torch.Tensor]] = []
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights += load_file(str(file)).items()
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict):
                raise ValueError(f"{file} does not hold a state dict")
            weights += state.items()
    return weights


def check_config(path: PathLike | Sequence[PathLike], config, model: str) -> None:
    """ValueError if `path` is a directory whose config.json differs from `config` in architecture."""
    if isinstance(path, (list, tuple)):
        return
    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        return
    theirs = json.loads(file.read_text(encoding="utf-8"))
    for field in ARCHITECTURE_FIELDS:
        ours = getattr(config, field, None)
        if field in theirs and ours is not None and theirs[field] != ours:
            raise ValueError(
                f"{file} has {field}={theirs[field]!r} but the {model} model has {ours!r}: "
                "a weight update must keep the architecture"
            )


def read_update(
    path: PathLike | Sequence[PathLike], engine, model: str, config
) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of an update from disk, refused from config.json and the safetensors
    headers (against `engine`'s `model`) before any tensor is read."""
    check_model_name(model)
    files = weight_files(path)
    check_config(path, config, model)
    shapes = file_shapes(files)
    if shapes is not None:
        engine.check_weights(model, shapes)
    return read_weights(files)
