"""A model pair resolved and checked before any weights load: paths and agreeing tokenizers."""

from __future__ import annotations

from dataclasses import dataclass

from .loading import check_tokenizers_compatible, load_tokenizer, resolve_model_path


@dataclass
class ModelPair:
    base_path: str
    teacher_path: str
    base_tokenizer: object
    teacher_tokenizer: object


def resolve_model_pair(base: str | None, teacher: str | None) -> ModelPair:
    """Resolve both models (None, None: the demo pair) and check their tokenizers agree."""
    if (base is None) != (teacher is None):
        raise ValueError("give both --base and --teacher, or neither for the demo pair")
    if base is None:
        from .demo import resolve_demo_pair

        base, teacher = (str(p) for p in resolve_demo_pair())
    base_path, teacher_path = resolve_model_path(base), resolve_model_path(teacher)
    base_tok, teacher_tok = load_tokenizer(base_path), load_tokenizer(teacher_path)
    check_tokenizers_compatible(base_tok, teacher_tok)
    return ModelPair(base_path, teacher_path, base_tok, teacher_tok)
