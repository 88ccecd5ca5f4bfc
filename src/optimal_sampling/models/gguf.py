"""GGUF checkpoints -> Hugging Face directories, converted once and cached.

This module owns turning a GGUF file (llama.cpp's format, often quantised) into an ordinary
Hugging Face directory (safetensors weights, tokenizer, config, generation_config) and the on-disk
cache of such conversions. transformers can load a GGUF directly (`gguf_file=`), but it dequantises
every tensor on each load, which takes minutes per model on a small CPU; a converted
directory loads in seconds (a fraction of one from a warm page cache).

Invariants:
- A directory exists under its final name only when it is complete: it is written into a hidden
  temporary directory beside it and renamed into place, so a crash never leaves a half-written
  directory that looks finished.
- `generation_config.eos_token_id` lists every end-of-generation token the tokenizer has, not only
  the single eos id a GGUF can store (see `end_of_generation_ids`).
- Every converted directory holds `gguf_source.json`, a small record of where it came from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE_RECORD = "gguf_source.json"

# The dtype a conversion is stored in. bfloat16, because: the upstream checkpoints these files are
# made from are bfloat16; the 4/6-bit quantisation error of a GGUF (percent level) dwarfs bfloat16's
# rounding (2**-9 relative), so little of value is lost; it halves the disk and load time of float32;
# and an engine that computes in float32 upcasts exactly at load.
CACHE_DTYPE = torch.bfloat16

# End-of-generation tokens, after llama.cpp's own list (llama-vocab.cpp): a GGUF stores one eos id,
# but chat models stop on any of these (Qwen instruct: <|im_end|> and <|endoftext|>).
END_OF_GENERATION_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)

_KEY_SAMPLE_BYTES = 1 << 20


def gguf_cache_key(gguf_path: Path) -> str:
    """A cheap content key: SHA-256 over the size, the first MiB and the last MiB, 16 hex digits.

    Content rather than mtime, so a copied or re-assembled identical file still hits the cache.
    The head holds all metadata (architecture, vocabulary, quantisation) and the tail holds weights,
    so two distinct real checkpoints do not share a key in practice.
    """
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(_KEY_SAMPLE_BYTES))
        f.seek(max(size - _KEY_SAMPLE_BYTES, 0))
        digest.update(f.read(_KEY_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def cached_hf_dir_for_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """The converted Hugging Face directory for `gguf_path`, converting on the first call only.

    The directory is `cache_root / f"{stem}-{key}"` with `key = gguf_cache_key(gguf_path)`; a later
    call with the same file content returns it after reading 2 MiB.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(cache_root) / f"{gguf_path.stem}-{gguf_cache_key(gguf_path)}"
    if is_converted(out_dir):
        logger.debug("GGUF cache hit: %s", out_dir)
        return out_dir
    return convert_gguf_to_hf(gguf_path, out_dir)


def is_converted(out_dir: Path) -> bool:
    """Whether `out_dir` is a finished conversion (it is renamed into place only when complete)."""
    return (Path(out_dir) / SOURCE_RECORD).is_file()


def read_source_record(out_dir: Path) -> dict[str, Any]:
    """The `gguf_source.json` of a converted directory."""
    return json.loads((Path(out_dir) / SOURCE_RECORD).read_text())


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, provenance: Mapping[str, Any] | None = None) -> Path:
    """Load `gguf_path` with transformers and save it as a Hugging Face directory at `out_dir`.

    Writes safetensors weights (in `CACHE_DTYPE`), tokenizer files, config and a generation_config
    listing all end-of-generation ids, plus `gguf_source.json` (file name, size, cache key and the
    given `provenance`). The write is atomic: a temporary directory beside `out_dir` is renamed
    into place; an existing `out_dir` is replaced. Returns `out_dir`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        started = time.perf_counter()
        logger.info("Converting %s to safetensors (dequantising; minutes on a small CPU)", gguf_path.name)
        _save_converted(gguf_path, tmp_dir)
        _write_source_record(gguf_path, tmp_dir, provenance)
        _make_readable(tmp_dir)
        _move_into_place(tmp_dir, out_dir)
        logger.info("Converted %s -> %s in %.1f s", gguf_path.name, out_dir, time.perf_counter() - started)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _save_converted(gguf_path: Path, save_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = _plain_model(_load_dequantised(gguf_path))
    eos_ids = end_of_generation_ids(tokenizer, model.config.eos_token_id)
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else (eos_ids or [None])[0]
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)


def _load_dequantised(gguf_path: Path) -> Any:
    """The GGUF as a dense model in `CACHE_DTYPE`.

    Newer transformers (>= 5.2x) load a GGUF through a quantizer that can keep the weights packed
    (when the `kernels` package is installed); ask for dense weights explicitly where that exists.
    Older versions always dequantise.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=CACHE_DTYPE, **kwargs
    )


def _plain_model(loaded: Any) -> Any:
    """The same weights in a freshly built model that carries no GGUF quantizer.

    A GGUF-loaded model refuses `save_pretrained` on newer transformers (its quantizer says it is
    not serialisable) and its config would name the GGUF quantizer; a model built from the config
    alone has neither. Built on the meta device, so no memory or time goes into a random init.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=CACHE_DTYPE)
    # assign=True adopts the loaded tensors; tied embeddings stay one tensor (both keys share it).
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    return model


def end_of_generation_ids(tokenizer: Any, config_eos: int | list[int] | None) -> list[int]:
    """The file's eos id(s) first, then every special token of `END_OF_GENERATION_TOKENS` present.

    Only tokens the tokenizer holds as *special* count, so an ordinary vocabulary entry that happens
    to spell like one never stops generation.
    """
    ids = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    special = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids += sorted(special[t] for t in END_OF_GENERATION_TOKENS if t in special)
    return list(dict.fromkeys(ids))  # de-duplicate, keep order


def _write_source_record(gguf_path: Path, out_dir: Path, provenance: Mapping[str, Any] | None) -> None:
    record = {
        "gguf_file": gguf_path.name,
        "gguf_size": gguf_path.stat().st_size,
        "gguf_cache_key": gguf_cache_key(gguf_path),
        "dtype": str(CACHE_DTYPE).removeprefix("torch."),
        **dict(provenance or {}),
    }
    (out_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _make_readable(directory: Path) -> None:
    """mkdtemp (and some savers) create private entries; a cache is ordinary files, 0755/0644."""
    os.chmod(directory, 0o755)
    for path in directory.iterdir():
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename `tmp_dir` to `out_dir`, replacing an old `out_dir`; tolerate a concurrent winner."""
    if out_dir.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "stale")
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        if not is_converted(out_dir):  # another process finished the same conversion first: keep it
            raise
