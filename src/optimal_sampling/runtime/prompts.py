"""Prompt arguments of the API into `PromptIds`: text tokenized by each model's tokenizer, or token
ids taken as given (and decoded for the samples' prompt text). Type mistakes are `TypeError`s
naming the argument; ranges, emptiness of ids and context are checked where requests are built
(`requests.requests_from_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

from .requests import PromptIds


def as_prompt_list(name: str, prompts: object) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a list of strings")
    return list(prompts)


def as_id_lists(name: str, value: object) -> list[tuple[int, ...]]:
    """Token-id prompts as tuples of ints; TypeError for anything but a list of lists of ints
    (a bool is refused: True would silently be read as id 1)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of token-id lists")
    out = []
    for index, ids in enumerate(value):
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"{name}[{index}] must be a list of token ids, got {type(ids).__name__}")
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, Integral)), None)
        if bad is not None:
            raise TypeError(f"{name}[{index}] holds {bad!r}; token ids are ints (not booleans)")
        out.append(tuple(int(t) for t in ids))
    return out


def check_id_call(prompts, teacher_prompts, chat_template: str) -> None:
    """A call with prompt_ids gives no text prompts and no chat template."""
    if prompts is not None or teacher_prompts is not None:
        raise ValueError(
            "give prompts (text) or prompt_ids (token ids), not both; teacher_prompt_ids goes with prompt_ids"
        )
    if chat_template != "none":
        raise ValueError("chat_template applies to text prompts; prompt_ids are used as given")


def tokenize(tokenizer, text: str, index: int, what: str) -> tuple[int, ...]:
    ids = tuple(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"{what} {index} is empty after tokenization")
    return ids


def tokenized_pairs(
    base_tokenizer, teacher_tokenizer, prompts: list[str], teacher_prompts: list[str], indices: list[int]
) -> list[PromptIds]:
    """Text prompts as each model tokenizes them (errors name the prompt's index)."""
    return [
        PromptIds(
            tokenize(base_tokenizer, prompt, index, "prompt"),
            tokenize(teacher_tokenizer, teacher_prompt, index, "teacher prompt"),
            prompt,
            teacher_prompt,
        )
        for index, prompt, teacher_prompt in zip(indices, prompts, teacher_prompts)
    ]


def decoded_text(tokenizer, ids: tuple[int, ...]) -> str:
    # out-of-vocabulary ids are refused later, with the prompt's index; never decode them here
    if ids and (min(ids) < 0 or max(ids) >= len(tokenizer)):
        return ""
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def decoded_pairs(
    base_tokenizer, teacher_tokenizer, base: list[tuple[int, ...]], teacher: list[tuple[int, ...]]
) -> list[PromptIds]:
    """Token-id prompts, with their text decoded for the samples."""
    return [
        PromptIds(b, t, decoded_text(base_tokenizer, b), decoded_text(teacher_tokenizer, t))
        for b, t in zip(base, teacher)
    ]
