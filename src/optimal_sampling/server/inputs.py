"""From a request's fields to the runtime's tickets: prompts as token ids, sampling settings,
stop rules. Every value is checked against the loaded models here, and a mistake is an `APIError`
naming the field.

Prompts are tokenized as `OptimalSampler.generate` tokenizes them (the tokenizer's own special
tokens added), so a text prompt with a seed samples what `generate(prompt, seed=...)` samples;
token-id prompts are taken as given. Chat messages go through each model's chat template (with
the generation prompt) and are tokenized without adding special tokens again, as vLLM does.
Seeds: sample k of prompt i (its position in the request) draws with request_seed(seed, i, k),
exactly as `generate(prompts, seed=seed, n=...)` does (see README, Serving).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import SamplingParams
from ..runtime.pool import setting_of
from ..runtime.requests import PromptIds, StopRules
from ..runtime.service import Ticket
from .errors import APIError, from_value_error
from .state import ServedPair


def stop_strings(stop: str | list[str] | None, field: str) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in strings):
        raise APIError(f"{field} must hold non-empty strings", field)
    return strings


def sampling_params(names: dict[str, str], **values) -> SamplingParams:
    """SamplingParams(**values); an invalid value is a 400 naming the request's field (names:
    SamplingParams name -> request field name)."""
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as err:
        raise from_value_error(err, None, names) from err


# ---------------------------------------------------------------------------------------- prompts


def prompt_items(value, field: str) -> list[str | list[int]]:
    """A prompt field (text, texts, ids, id lists) as a list of prompts, each text or ids."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(f"{field} must not be empty", field)
    if all(isinstance(v, int) for v in value):
        return [list(value)]
    return list(value)


def token_ids(pair: ServedPair, ids: Sequence[int], field: str) -> tuple[int, ...]:
    if not ids:
        raise APIError(f"{field} must not be empty", field)
    vocab = pair.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(f"{field} holds the token id {bad}, outside the vocabulary [0, {vocab})", field)
    return tuple(ids)


def encode(
    pair: ServedPair, teacher: bool, prompt: str | list[int], field: str
) -> tuple[tuple[int, ...], str]:
    """(ids, text) of one prompt given as text or ids, as the base (or the teacher) reads it."""
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(f"{field} must not be empty", field)
        return token_ids(pair, (pair.encode_teacher if teacher else pair.encode_base)(prompt), field), prompt
    return token_ids(pair, prompt, field), (
        pair.teacher_tokenizer if teacher else pair.base_tokenizer
    ).decode(prompt)


def prompt_pairs(pair: ServedPair, prompts, teacher, field: str, teacher_field: str) -> list[PromptIds]:
    """The (base, teacher) prompt of each prompt; the teacher reads the base's prompt by default."""
    items = prompt_items(prompts, field)
    teacher_items = items if teacher is None else prompt_items(teacher, teacher_field)
    if len(teacher_items) != len(items):
        raise APIError(
            f"{teacher_field} has {len(teacher_items)} prompts but {field} has {len(items)}", teacher_field
        )
    out = []
    for prompt, teacher_prompt in zip(items, teacher_items):
        base_ids, text = encode(pair, False, prompt, field)
        if teacher_prompt is prompt and pair.shared_tokenizer:  # one tokenizer reads it the same way
            teacher_ids, teacher_text = base_ids, text
        else:
            teacher_ids, teacher_text = encode(pair, True, teacher_prompt, teacher_field)
        out.append(PromptIds(base_ids, teacher_ids, text, teacher_text))
    return out


def message_dicts(messages, field: str) -> list[dict]:
    """OpenAI chat messages as the dicts a chat template reads (text content parts joined)."""
    if not messages:
        raise APIError(f"{field} must not be empty", field)
    out = []
    for i, message in enumerate(messages):
        entry = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            if any(part.type != "text" for part in message.content):
                raise APIError(f"{field}[{i}].content: only text parts are supported", f"{field}.{i}.content")
            entry["content"] = "".join(part.text or "" for part in message.content)
        out.append(entry)
    return out


def chat_text(tokenizer, messages: list[dict], field: str, who: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(f"the {who} model's tokenizer has no chat template; use /v1/completions", field)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # a template's own check (e.g. roles must alternate)
        raise APIError(f"{field}: the {who} chat template refused the messages: {err}", field) from err


def chat_pair(pair: ServedPair, messages, teacher_messages) -> PromptIds:
    base_messages = message_dicts(messages, "messages")
    teacher_side = (
        base_messages if teacher_messages is None else message_dicts(teacher_messages, "teacher_messages")
    )
    teacher_field = "messages" if teacher_messages is None else "teacher_messages"
    text = chat_text(pair.base_tokenizer, base_messages, "messages", "base")
    teacher_text = chat_text(pair.teacher_tokenizer, teacher_side, teacher_field, "teacher")
    base_ids = pair.base_tokenizer(text, add_special_tokens=False)["input_ids"]
    teacher_ids = pair.teacher_tokenizer(teacher_text, add_special_tokens=False)["input_ids"]
    return PromptIds(
        token_ids(pair, base_ids, "messages"), token_ids(pair, teacher_ids, teacher_field), text, teacher_text
    )


# ---------------------------------------------------------------------------------------- tickets


def max_tokens_for(pair: ServedPair, prompts: list[PromptIds], asked: int | None, field: str) -> int:
    """The request's max_tokens, checked against the context; None: all the context leaves."""
    context = pair.max_context
    longest = max(max(len(p.base_ids), len(p.teacher_ids)) for p in prompts)
    room = context - longest
    if room < 1:
        raise APIError(f"the prompt has {longest} tokens; the models' context is {context}", field)
    if asked is None:
        return room
    if isinstance(asked, int) and asked >= 1 and asked > room:
        raise APIError(
            f"{field} is {asked} but the prompt has {longest} tokens and the models' context is {context}",
            field,
        )
    return asked


def ticket_of(
    pair: ServedPair, prompts: list[PromptIds], params: SamplingParams, stops: StopRules, stream: bool,
    first_index: int = 0,
) -> Ticket:  # fmt: skip
    """One ticket: n requests per prompt, prompt i of the request seeded as prompt index first_index + i
    (the request's seed, else the server's, else a fresh random one)."""
    indices = list(range(first_index, first_index + len(prompts)))
    try:
        requests = pair.requests_from_ids(prompts, params, indices)
    except (ValueError, TypeError) as err:
        raise APIError(str(err), "prompt") from err
    return Ticket(requests, setting_of(params), stops, stream)
