"""Chat templates: a prompt as the model's own chat format expects it (one user turn).

`chat_prompts` applies each model's template to its side of the prompt pair; a mode names which
sides are wrapped. The CLI's `--chat-template` and the API's `chat_template=` use the same modes.
"""

from __future__ import annotations

from collections.abc import Sequence

CHAT_TEMPLATE_MODES = ("auto", "none", "base", "teacher", "both")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer, prompt: str) -> str:
    """One user turn plus the generation prompt; a BOS the tokenizer adds itself is not doubled."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def template_choice(mode: str, base_tokenizer, teacher_tokenizer) -> tuple[bool, bool]:
    """(wrap the base's prompts, wrap the teacher's): `auto` wraps each side that has a template;
    naming a side whose tokenizer has none is a `ValueError`."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}; got {mode!r}")
    has_base, has_teacher = has_chat_template(base_tokenizer), has_chat_template(teacher_tokenizer)
    if mode == "auto":
        return has_base, has_teacher
    use_base, use_teacher = mode in ("base", "both"), mode in ("teacher", "both")
    for used, has, who in ((use_base, has_base, "base"), (use_teacher, has_teacher, "teacher")):
        if used and not has:
            raise ValueError(f"--chat-template {mode}: the {who} tokenizer has no chat template")
    return use_base, use_teacher


def chat_prompts(
    mode: str, prompts: Sequence[str], teacher_prompts: Sequence[str], base_tokenizer, teacher_tokenizer
) -> tuple[list[str], list[str]]:
    """(base prompts, teacher prompts) as the models see them under `mode`."""
    use_base, use_teacher = template_choice(mode, base_tokenizer, teacher_tokenizer)
    base = [apply_chat_template(base_tokenizer, p) for p in prompts] if use_base else list(prompts)
    teacher = (
        [apply_chat_template(teacher_tokenizer, p) for p in teacher_prompts]
        if use_teacher
        else list(teacher_prompts)
    )
    return base, teacher
