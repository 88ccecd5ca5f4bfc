"""What a generation returns: one `Sample` per (prompt, sample) and the seed-compatible
`SamplingOutput` that holds them column-wise in prompt-major order.

Per token: logprob_base / logprob_teacher are the untempered policies' log-probs of the token,
logprob_q the log-prob under the distribution it was actually drawn from (after temperature,
teacher constraint and truncation). exp(sum(logprob_base) - sum(logprob_q)) is the exact
sequence importance weight pi_base(y) / q(y); likewise for the teacher.

Weight versions (live updates, runtime/weights.py): `weight_version` is the version of the weights
that drew the sample's first token (0: the weights the sampler was built with). A sample that ran
across an update also lists `weight_versions`, one per token; it is None when every token has
`weight_version`. A request ended by an update with abort_running=True has finish reason "abort".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# One step's result field (engines, `mixing.step.StepResult`) -> the Sample field that collects it.
SAMPLE_FIELD_OF_STEP = {
    "logprob_base": "logprobs_base",
    "logprob_teacher": "logprobs_teacher",
    "logprob_q": "logprobs_q",
    "alpha": "alphas",
    "ess_ratio": "ess_ratios",
    "kl_q_base": "kl_q_base",
    "kl_q_teacher": "kl_q_teacher",
    "weight_version": "weight_versions",
}
DIAGNOSTIC_FIELDS = ("alphas", "ess_ratios", "kl_q_base", "kl_q_teacher")


def sample_columns(step_columns: dict[str, list], with_diagnostics: bool) -> dict[str, list]:
    """Per-token columns named by step field -> the Sample fields they fill (diagnostics only
    when asked for; the importance data always)."""
    columns = {
        SAMPLE_FIELD_OF_STEP[name]: values for name, values in step_columns.items() if name != "tokens"
    }
    for name in ("logprobs_base", "logprobs_teacher", "logprobs_q"):
        columns.setdefault(name, [])
    if with_diagnostics:
        for name in DIAGNOSTIC_FIELDS:
            columns.setdefault(name, [])
    else:
        for name in DIAGNOSTIC_FIELDS:
            columns.pop(name, None)
    versions = columns.pop("weight_versions", None)
    if versions:
        columns["weight_version"] = versions[0]
        if len(set(versions)) > 1:
            columns["weight_versions"] = list(versions)
    return columns


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt: str
    teacher_prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "abort" (a weight update ended it)
    logprobs_base: list[float]
    logprobs_teacher: list[float]
    logprobs_q: list[float]
    alphas: list[float] | None = None
    ess_ratios: list[float] | None = None
    kl_q_base: list[float] | None = None
    kl_q_teacher: list[float] | None = None
    stop_reason: str | int | None = None  # the stop string or EOS id that ended the sample
    weight_version: int = 0  # version of the weights that drew the first token
    weight_versions: list[int] | None = None  # per token, only when the sample spans an update

    @property
    def sum_logprob_base(self) -> float:
        return math.fsum(self.logprobs_base)

    @property
    def sum_logprob_teacher(self) -> float:
        return math.fsum(self.logprobs_teacher)

    @property
    def sum_logprob_q(self) -> float:
        return math.fsum(self.logprobs_q)

    @property
    def log_weight_base(self) -> float:
        """log pi_base(y) / q(y) of the whole sequence."""
        return self.sum_logprob_base - self.sum_logprob_q

    @property
    def log_weight_teacher(self) -> float:
        """log pi_teacher(y) / q(y) of the whole sequence."""
        return self.sum_logprob_teacher - self.sum_logprob_q

    def to_record(self) -> dict:
        """A JSON-able dict (non-finite floats become None in JSON writers that need it)."""
        record = asdict(self)
        record["num_tokens"] = len(self.token_ids)
        record["sum_logprob_base"] = self.sum_logprob_base
        record["sum_logprob_teacher"] = self.sum_logprob_teacher
        record["sum_logprob_q"] = self.sum_logprob_q
        record["log_weight_base"] = self.log_weight_base
        record["log_weight_teacher"] = self.log_weight_teacher
        return record


@dataclass
class SamplingOutput:
    """Seed-compatible result: lists indexed by sample, prompt-major (len(prompts) * n rows)."""

    samples: list[Sample]

    def _column(self, name: str) -> list:
        return [getattr(s, name) for s in self.samples]

    @property
    def generated_texts(self) -> list[str]:
        return self._column("text")

    @property
    def generated_ids(self) -> list[list[int]]:
        return self._column("token_ids")

    @property
    def num_tokens(self) -> list[int]:
        return [len(s.token_ids) for s in self.samples]

    @property
    def finish_reasons(self) -> list[str]:
        return self._column("finish_reason")

    @property
    def logprobs_base(self) -> list[list[float]]:
        return self._column("logprobs_base")

    @property
    def logprobs_teacher(self) -> list[list[float]]:
        return self._column("logprobs_teacher")

    @property
    def logprobs_q(self) -> list[list[float]]:
        return self._column("logprobs_q")

    @property
    def log_weights_base(self) -> list[float]:
        return self._column("log_weight_base")

    @property
    def log_weights_teacher(self) -> list[float]:
        return self._column("log_weight_teacher")

    def _diagnostic(self, name: str) -> list[list[float]] | None:
        values = self._column(name)
        return None if any(v is None for v in values) else values

    @property
    def alphas(self) -> list[list[float]] | None:
        return self._diagnostic("alphas")

    @property
    def ess_ratios(self) -> list[list[float]] | None:
        return self._diagnostic("ess_ratios")

    @property
    def kl_q_base(self) -> list[list[float]] | None:
        return self._diagnostic("kl_q_base")

    @property
    def kl_q_teacher(self) -> list[list[float]] | None:
        return self._diagnostic("kl_q_teacher")

    def __len__(self) -> int:
        return len(self.samples)
