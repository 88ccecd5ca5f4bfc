"""Per-request bookkeeping: what was asked, what was generated so far, and when to stop.

Stopping rules: an EOS id of the base model (every one of them: tokenizer and generation
config), a stop string (cut from the returned text; the tokens that completed it stay, with their
log-probs, as in vLLM), `max_tokens`, or either model's context length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..mixing.draw import request_seed
from ..outputs import Sample, sample_columns


@dataclass
class Request:
    prompt_index: int
    sample_index: int
    prompt: str
    teacher_prompt: str
    base_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    seed: int
    token_budget: int  # max new tokens, already capped by the context length


@dataclass(frozen=True)
class PromptIds:
    """One prompt as each model reads it (token ids), and the texts its samples report."""

    base_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    prompt: str = ""
    teacher_prompt: str = ""


def requests_from_ids(
    prompts: Sequence[PromptIds],
    indices: Sequence[int],
    n: int,
    max_tokens: int,
    base_seed: int,
    context: int,
    vocab_size: int,
) -> list[Request]:
    """Requests prompt-major (n per prompt); sample k of the prompt with index i draws with
    `request_seed(base_seed, i, k)`, so it gets the same tokens wherever and with whatever it runs.

    ValueError names the prompt (by index) that is empty, holds an id outside [0, vocab_size) or
    leaves no room in the models' context; `max_tokens` is capped by that room."""
    if len(indices) != len(prompts):
        raise ValueError("prompt_indices must have one entry per prompt")
    requests = []
    for index, pair in zip(indices, prompts):
        for ids, what in ((pair.base_ids, "prompt"), (pair.teacher_ids, "teacher prompt")):
            if not ids:
                raise ValueError(f"{what} {index} is empty")
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise ValueError(f"{what} {index} has a token id outside the vocabulary [0, {vocab_size})")
        longest = max(len(pair.base_ids), len(pair.teacher_ids))
        if longest >= context:
            raise ValueError(f"prompt {index} has {longest} tokens; the models' context is {context}")
        budget = min(max_tokens, context - longest)
        for k in range(n):
            seed = request_seed(base_seed, index, k)
            requests.append(
                Request(
                    index, k, pair.prompt, pair.teacher_prompt, pair.base_ids, pair.teacher_ids, seed, budget
                )
            )
    return requests


@dataclass
class RequestState:
    request: Request
    tokens: list[int] = field(default_factory=list)
    issued: int = 0  # tokens asked of the engine so far: drawn, or in a step not read yet
    columns: dict[str, list[float]] = field(default_factory=dict)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str | None = None

    def append(self, step: dict[str, list], row: int) -> None:
        self.tokens.append(step["tokens"][row])
        for name, values in step.items():
            if name != "tokens":
                self.columns.setdefault(name, []).append(values[row])


class StopChecker:
    """Decides when a request is finished and what text it returns."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: tuple[str, ...], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def check(self, state: RequestState) -> bool:
        """Mark state finished (reason and text) if it is; return whether it is."""
        last = state.tokens[-1]
        if last in self.eos_ids:
            state.finish_reason, state.stop_reason = "stop", last
        elif self.stop:
            text = self.decode(state.tokens)
            hits = [(text.find(s), s) for s in self.stop if s in text]
            if hits:
                cut, string = min(hits)
                state.finish_reason, state.stop_reason, state.text = "stop", string, text[:cut]
                return True
        if state.finish_reason is None and len(state.tokens) >= state.request.token_budget:
            state.finish_reason = "length"
        if state.finish_reason is not None and state.text is None:
            state.text = self.decode(state.tokens)
        return state.finish_reason is not None


@dataclass(frozen=True)
class StopRules:
    """A request's stop rules as plain data (what crosses a process boundary), beyond max_tokens:
    stop strings, extra stop token ids, whether the model's EOS ids stop it, how text is decoded."""

    strings: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def checker(self, tokenizer, eos_ids: set[int]) -> StopChecker:
        eos = set() if self.ignore_eos else set(eos_ids)
        return StopChecker(tokenizer, eos | set(self.token_ids), self.strings, self.skip_special_tokens)


def to_sample(state: RequestState, with_diagnostics: bool) -> Sample:
    req = state.request
    return Sample(
        prompt_index=req.prompt_index,
        sample_index=req.sample_index,
        prompt=req.prompt,
        teacher_prompt=req.teacher_prompt,
        text=state.text or "",
        token_ids=list(state.tokens),
        finish_reason=state.finish_reason or "length",
        stop_reason=state.stop_reason,
        **sample_columns(state.columns, with_diagnostics),
    )
