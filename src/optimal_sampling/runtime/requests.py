"""Per-request bookkeeping: what was asked, what was generated so far, and when to stop.

Stopping rules: an EOS id of the base model (every one of them: tokenizer and generation
config), a stop string (cut from the returned text; the tokens that completed it stay, with their
log-probs, as in vLLM), `max_tokens`, or either model's context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def __init__(self, tokenizer, eos_ids: set[int], stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stop = stop

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

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
