"""Write a model directory that vLLM loads as one optimal-sampling model (`vllm serve DIR`).

The directory holds:
- config.json: the base's own config (so vLLM sizes the model, context and dtype as for the base)
  with `architectures: ["OptimalSamplingForCausalLM"]`, `vocab_size` set to the shared vocabulary
  V, `max_position_embeddings` the smaller of the two, and an `optimal_sampling` block (see
  settings.py) with both networks' configs, absolute paths to (not copies of) their checkpoints,
  the mixing settings and the mixing temperature;
- the base's tokenizer files (the two tokenizers are checked to agree on every shared id);
- generation_config.json with the end-of-sequence ids only, so vLLM applies no sampling defaults
  (a checkpoint's suggested temperature/top-p would change q);
- a one-element placeholder safetensors file: vLLM's loader wants weights in the directory; the
  real ones come from the referenced checkpoints.

This module never imports vLLM, so the directory can be written where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ...config import MixConfig
from ...models.loading import check_tokenizers_compatible, load_tokenizer, resolve_model_path
from .settings import ARCHITECTURE, BLOCK_KEY, PLACEHOLDER_TENSOR, PluginSettings, SubModel

PLACEHOLDER_FILE = "optimal_sampling_placeholder.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def write_vllm_model_dir(
    base: str | os.PathLike,
    teacher: str | os.PathLike,
    out_dir: str | os.PathLike,
    mix: MixConfig | None = None,
    temperature: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write the directory and return its absolute path; base/teacher as for `OptimalSampler`."""
    mix = MixConfig() if mix is None else mix
    if not isinstance(mix, MixConfig):
        raise TypeError(f"mix must be a MixConfig, got {type(mix).__name__}")
    base_path, teacher_path = _reference(base), _reference(teacher)
    base_tok, teacher_tok = load_tokenizer(base_path), load_tokenizer(teacher_path)
    check_tokenizers_compatible(base_tok, teacher_tok)
    base_config, teacher_config = read_config(base_path), read_config(teacher_path)
    settings = PluginSettings(
        base=SubModel(base_path, base_config),
        teacher=SubModel(teacher_path, teacher_config),
        vocab_size=shared_vocab_size(base_config, teacher_config, len(base_tok), len(teacher_tok)),
        temperature=temperature,
        mix=mix,
    )
    out = _prepare_out_dir(Path(out_dir), overwrite)
    _write_json(out / "config.json", top_level_config(settings))
    _write_json(out / "generation_config.json", generation_config(base_path, base_tok))
    copy_tokenizer(base_path, base_tok, out)
    write_placeholder(out / PLACEHOLDER_FILE)
    return out


def _reference(model: str | os.PathLike) -> str:
    """An absolute local directory (GGUF goes through the cache), or a hub id as given."""
    resolved = resolve_model_path(model)
    path = Path(resolved)
    return str(path.resolve()) if path.is_dir() else resolved


def read_config(path: str) -> dict[str, Any]:
    """The checkpoint's config.json exactly as written (vLLM parses it with its own transformers)."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).to_dict()


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def shared_vocab_size(base: dict, teacher: dict, base_tokens: int, teacher_tokens: int) -> int:
    """V: the ids both logit heads and both tokenizers have (padded heads are cut to it)."""
    widths = [text_config(c).get("vocab_size") for c in (base, teacher)]
    if not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError("both model configs must state vocab_size")
    return min(*widths, base_tokens, teacher_tokens)


def top_level_config(settings: PluginSettings) -> dict[str, Any]:
    """The base's config as vLLM's view of the whole model, plus the optimal_sampling block."""
    config = json.loads(json.dumps(settings.base.config))
    for key in ("auto_map", "quantization_config"):
        config.pop(key, None)
    config["architectures"] = [ARCHITECTURE]
    config["vocab_size"] = settings.vocab_size
    positions = [
        text_config(c.config).get("max_position_embeddings") for c in (settings.base, settings.teacher)
    ]
    if all(isinstance(p, int) for p in positions):
        config["max_position_embeddings"] = min(positions)
    config[BLOCK_KEY] = settings.to_block()
    return config


def generation_config(base_path: str, tokenizer) -> dict[str, Any]:
    """Only the special-token ids of the base's generation config (and the tokenizer's EOS)."""
    source = Path(base_path) / "generation_config.json"
    found = json.loads(source.read_text()) if source.is_file() else {}
    config = {k: found[k] for k in GENERATION_KEYS if found.get(k) is not None}
    if "eos_token_id" not in config and tokenizer.eos_token_id is not None:
        config["eos_token_id"] = tokenizer.eos_token_id
    return config


def copy_tokenizer(base_path: str, tokenizer, out: Path) -> None:
    """The base's tokenizer files verbatim; a tokenizer without local files is saved instead."""
    copied = [name for name in TOKENIZER_FILES if (Path(base_path) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(base_path) / name, out / name)
    if not copied:
        tokenizer.save_pretrained(out)


def write_placeholder(path: Path) -> None:
    save_file({PLACEHOLDER_TENSOR: torch.zeros(1)}, str(path))
    path.chmod(0o644)  # safetensors writes it private; the directory may be served by another user


def _prepare_out_dir(out: Path, overwrite: bool) -> Path:
    """Create out, refusing to write into a non-empty directory unless it is ours or overwrite."""
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not _written_by_us(out):
        raise ValueError(
            f"{out} is not empty and is not an optimal-sampling vLLM model directory; pass overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _written_by_us(out: Path) -> bool:
    try:
        return BLOCK_KEY in json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
