"""Prompt tokenizing on the HTTP side, cheap enough for hundreds of requests a second.

- `same_tokenizer`: base and teacher directories that hold the same tokenizer files (the usual
  case: two sizes of one family) share one tokenizer, so a prompt the teacher reads as the base
  does is tokenized once;
- `fast_encoder`: the Rust tokenizer's own `encode`, which skips the Python wrapper (it costs
  more than encoding a short prompt), where it gives what `tokenizer(text)["input_ids"]` gives
  (what `OptimalSampler.generate` uses) on probe texts, special tokens among them; else the wrapper.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
PROBES = ("Hello world!", " two  spaces\tand\nlines ", "ünïcödé 你好 🙂", "def f(x):\n    return x\n")


def same_tokenizer(first: str, second: str) -> bool:
    """Whether two directories hold the same tokenizer: every tokenizer file equal, byte for byte."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    found = False
    for name in TOKENIZER_FILES:
        a, b = Path(first, name), Path(second, name)
        if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
            return False
        found = found or a.is_file()
    return found


def fast_encoder(tokenizer) -> Callable[[str], list[int]]:
    """text -> ids as `tokenizer(text)["input_ids"]`, through the Rust tokenizer where it agrees."""

    def wrapped(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return wrapped

    def fast(text: str) -> list[int]:
        return backend.encode(text).ids

    specials = " ".join(getattr(tokenizer, "all_special_tokens", [])) + " x"
    probes = PROBES + (specials, specials.strip())
    return fast if all(fast(p) == wrapped(p) for p in probes) else wrapped
