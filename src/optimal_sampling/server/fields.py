"""Our per-token fields in responses, and incremental text for streams.

Both schemas carry the same extra fields (clients that do not know them ignore them):
`token_ids`, `logprobs_q` (log q of each token, the distribution sampled from), `logprobs_base`,
`logprobs_teacher` (the untempered policies), `log_weight_base` / `log_weight_teacher` (sequence
log importance weights, on finished samples), and with `collect_diagnostics` `alphas`,
`ess_ratios`, `kl_q_base`, `kl_q_teacher`. JSON has no infinities: a non-finite value is null.

`TextStream` turns a growing token list into text deltas without decoding the whole sequence
each time (a few tokens of context, as vLLM's incremental detokenizer), holding back an
incomplete UTF-8 sequence and the last characters that could still start a stop string.
"""

from __future__ import annotations

import math

from ..outputs import DIAGNOSTIC_FIELDS, SAMPLE_FIELD_OF_STEP, Sample

PER_TOKEN = ("logprobs_q", "logprobs_base", "logprobs_teacher")


INF = math.inf


def finite(values: list[float]) -> list[float | None]:
    return [v if -INF < v < INF else None for v in values]  # NaN compares False too


def finite_one(value: float) -> float | None:
    return value if -INF < value < INF else None


def sample_fields(sample: Sample, diagnostics: bool, start: int = 0) -> dict:
    """The extra fields of a finished sample, per-token lists from token `start` on (a stream's
    last chunk), and the sequence log weights."""
    out = {"token_ids": sample.token_ids[start:]}
    for name in PER_TOKEN + (DIAGNOSTIC_FIELDS if diagnostics else ()):
        out[name] = finite((getattr(sample, name) or [])[start:])
    out["log_weight_base"] = finite_one(sample.log_weight_base)
    out["log_weight_teacher"] = finite_one(sample.log_weight_teacher)
    out["weight_version"] = getattr(sample, "weight_version", 0)
    if getattr(sample, "weight_versions", None) is not None:  # the sample spans a weight update
        out["weight_versions"] = sample.weight_versions
    return out


def delta_fields(tokens: list[int], columns: dict[str, list[float]], diagnostics: bool) -> dict:
    """The extra fields of new tokens (columns named by step field, as the engine reports them)."""
    out: dict = {"token_ids": tokens}
    for step_name, values in columns.items():
        name = SAMPLE_FIELD_OF_STEP.get(step_name)
        if name in PER_TOKEN or (diagnostics and name in DIAGNOSTIC_FIELDS):
            out[name] = finite(values)
    return out


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in ids]


def fast_decoder(tokenizer):
    """The Rust tokenizer's own decode where it gives what `tokenizer.decode` gives (a fast
    tokenizer that does not clean up spaces afterwards): it skips the Python wrapper, which costs
    more than the decoding itself at thousands of chunks a second."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode
    return backend.decode


class TextStream:
    """Text deltas of a growing token list (module docstring)."""

    def __init__(self, tokenizer, skip_special_tokens: bool, stops: tuple[str, ...]):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.decode = fast_decoder(tokenizer)
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # tokens[prefix:read] is context already turned into text
        self.text = ""  # decoded so far
        self.sent = 0  # characters of text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.decode(ids, skip_special_tokens=self.skip)

    def add(self, tokens: list[int]) -> str:
        """Append tokens; the text that is now safe to send."""
        self.tokens += tokens
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        safe = len(self.text) - self.holdback
        if safe <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : safe], safe
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the sample's final text (stop string cut, as the engine decoded it)."""
        delta = final_text[self.sent :]
        self.sent = len(final_text)
        return delta
