"""Resolve model references to loaded models and tokenizers, and check the pair is compatible.

A model reference is a local Hugging Face directory, a hub id (where a hub is reachable), or a
`.gguf` file (converted once to a safetensors cache). The pair must share a vocabulary: the same
string maps to the same id for every id both tokenizers have; the sampler uses the common
prefix of the two logit widths and of the tokenizers' sizes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import logging as hf_logging

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    path: str  # the directory or hub id the weights were loaded from


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a valid torch device") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 on CPU and bfloat16 on CUDA unless the user says otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def check_model_reference(reference: str | os.PathLike) -> Path | None:
    """The local file or directory `reference` names (None for a hub id), checked without reading
    any weights: what `resolve_model_path` refuses, it refuses first and at no cost."""
    if not isinstance(reference, (str, os.PathLike)):
        raise TypeError(f"a model must be given as a path or hub id string, got {type(reference).__name__}")
    text = str(reference)
    if not text:
        raise ValueError("a model path or hub id must not be empty")
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {text}")
        return path
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{text} is not a Hugging Face model directory (no config.json)")
        return path
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ValueError(f"model path not found: {text}")
    return None


def resolve_model_path(reference: str | os.PathLike) -> str:
    """A directory or hub id that transformers can load; GGUF files go through the cache
    (`gguf/` under the demo pair's cache directory, keyed by content)."""
    path = check_model_reference(reference)
    if path is None:
        return str(reference)  # a hub id
    if str(reference).endswith(".gguf"):
        from .demo import default_cache_dir
        from .gguf import cached_hf_dir_for_gguf

        return str(cached_hf_dir_for_gguf(path, default_cache_dir() / "gguf"))
    return str(path)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {path}: {str(err).splitlines()[0]}") from err


def load_model(reference: str | os.PathLike, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    path = resolve_model_path(reference)
    hf_logging.disable_progress_bar()  # one bar per tensor is noise in a CLI log
    logger.info("loading %s (%s, %s)", path, dtype, device)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a causal LM from {path}: {str(err).splitlines()[0]}") from err
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(reference), path=path)


@dataclass(frozen=True)
class ModelShape:
    """What a model's config.json says, read before any weights load (for checks that need no weights)."""

    context: int  # longest sequence, prompt + generated (1 << 30 when the config names none)
    logit_width: int
    heads: int | None
    kv_heads: int | None
    intermediate: int | None


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length_of(config) -> int:
    """The longest sequence a Hugging Face config allows (the first of CONTEXT_FIELDS it sets),
    or 1 << 30 when it names none."""
    contexts = [getattr(config, name, None) for name in CONTEXT_FIELDS]
    return next((c for c in contexts if isinstance(c, int) and c > 0), 1 << 30)


def read_model_shape(path: str) -> ModelShape:
    """The `ModelShape` of a resolved model directory or hub id (what `resolve_model_path` returns)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read the model config of {path}: {str(err).splitlines()[0]}") from err
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    return ModelShape(
        context=context_length_of(config), logit_width=int(config.vocab_size), heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=getattr(config, "intermediate_size", None),
    )  # fmt: skip


def check_tensor_parallel_fits(shape: ModelShape, tp_size: int, name: str) -> None:
    """tp_size must divide the heads, key/value heads and MLP width (the shards are cut by them);
    checked from the config so that a bad --tp-size fails before any weights load or helper starts."""
    check_shards_divide(tp_size, name, shape.heads, shape.kv_heads, shape.intermediate)


def check_shards_divide(
    tp_size: int, name: str, heads: int | None, kv_heads: int | None, intermediate: int | None
) -> None:
    """A ValueError unless tp_size divides each size the config gives (None: not given)."""
    sizes = (("attention heads", heads), ("key/value heads", kv_heads), ("intermediate size", intermediate))
    for what, value in sizes:
        if isinstance(value, int) and value % tp_size:
            raise ValueError(
                f"tp_size {tp_size} must divide the {name}'s {what} ({value}); choose a tp_size that divides "
                f"heads {heads}, kv heads {kv_heads} and intermediate size {intermediate}"
            )


def check_tensor_parallel_pair(base: str, teacher: str, tp_size: int) -> None:
    """`check_tensor_parallel_fits` for both models of a pair, given as references."""
    for name, reference in (("base model", base), ("teacher model", teacher)):
        check_tensor_parallel_fits(read_model_shape(resolve_model_path(reference)), tp_size, name)


def logit_width(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def real_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """len(tokenizer) without trailing filler entries "[PAD<id>]" that GGUF converters append
    to match a padded embedding width; they are not real tokens and must never be sampled."""
    size = len(tokenizer)
    while size > 0 and tokenizer.convert_ids_to_tokens(size - 1) == f"[PAD{size - 1}]":
        size -= 1
    return size


def shared_vocab_size(base: LoadedModel, teacher: LoadedModel) -> int:
    """Width of the vocabulary both models and both tokenizers have; checks the id mapping."""
    check_tokenizers_compatible(base.tokenizer, teacher.tokenizer)
    return min(
        real_vocab_size(base.tokenizer), real_vocab_size(teacher.tokenizer),
        logit_width(base.model), logit_width(teacher.model),
    )  # fmt: skip


def check_tokenizers_compatible(base: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """ValueError naming the first id whose token differs between the two tokenizers."""
    base_tokens = {i: t for t, i in base.get_vocab().items()}
    teacher_tokens = {i: t for t, i in teacher.get_vocab().items()}
    shared = min(len(base), len(teacher))
    for i in range(shared):
        if base_tokens.get(i) != teacher_tokens.get(i):
            raise ValueError(
                f"the tokenizers are not compatible: id {i} is {base_tokens.get(i)!r} for the base "
                f"and {teacher_tokens.get(i)!r} for the teacher"
            )


def quiet_transformers() -> None:
    """transformers' warnings and progress bars off (the CLI shows its own progress)."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def eos_ids_of(loaded: LoadedModel) -> set[int]:
    """Every end-of-sequence id the tokenizer and the generation config name."""
    ids: set[int] = set()
    candidates = [loaded.tokenizer.eos_token_id]
    gen = getattr(loaded.model, "generation_config", None)
    if gen is not None:
        candidates.append(gen.eos_token_id)
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
