"""An `OptimalSampler` as the rollout engine of TRL's `GRPOTrainer` (tested with trl 1.16.0).

    rollout = trl_rollout(sampler)
    trainer = GRPOTrainer(model=policy, args=GRPOConfig(...), reward_funcs=..., rollout_func=rollout)

TRL's contract (trl/trainer/grpo_trainer.py, `_generate`): `rollout_func(prompts, trainer)` gets this
process's slice of the batch, every dataset prompt already repeated `num_generations` times in a
row, text or conversational (a list of messages); it returns one row per prompt it got, in order:
`prompt_ids`, `completion_ids` and `logprobs` (per-token log-probs of the distribution the tokens
were drawn from). TRL trains on exactly these ids, and hands every other key to the reward
functions, one entry per completion.

What this module guarantees:
- `logprobs` is log q; `logprobs_base`, `logprobs_teacher`, `alphas` (per token) and
  `log_weight_base` (per completion, log π_θ(y)/q(y)) reach the reward functions.
- A run of equal prompts becomes one prompt with n samples; each sample draws with its own seed,
  reproducibly from the sampler's seed, and no two rollouts (or processes) repeat one.
- Conversational prompts go through the trainer's tokenizer's chat template (as TRL would render
  them) for the base, and through the teacher's own template for the teacher.
- Before a rollout whose `trainer.state.global_step` differs from the last synced one (the first
  rollout included), the trainer's current policy parameters are copied into the sampler's base
  (`OptimalSampler.update_weights`), so log π_base is the policy TRL recomputes.
- With `importance_correction=True` (default), TRL's behaviour-policy correction runs on log q:
  TRL 1.16 offers it only in its vLLM mode (`use_vllm`), so the trainer is switched into that mode
  with this rollout standing in for its vLLM client (whose `sync_weights()` TRL calls before a
  rollout when the step moved; it syncs the sampler). Then TRL computes per token
  `exp(log π_θ_old − log q)` and clips or masks it per `vllm_importance_sampling_mode` and
  `vllm_importance_sampling_clip_min/max` of `GRPOConfig`. Mixture data needs a truncating mode
  (`token_truncate`, or `sequence_truncate`): the default `sequence_mask` with cap 3 drops most
  mixture sequences from the loss (README, "Using it for RL").
Not covered: PEFT adapters (parameter names differ from the sampler's), ZeRO-3 sharded parameters
(gather them first), TRL's tools/environments, `repetition_penalty` (refused).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

TESTED_TRL = "1.16"


class _WeightSyncClient:
    """Stands in for TRL's vLLM client: TRL calls `sync_weights()` before a rollout whose step moved."""

    def __init__(self, rollout: TrlRollout, trainer):
        self.rollout, self.trainer = rollout, trainer

    def sync_weights(self) -> None:
        self.rollout.sync(self.trainer)


class TrlRollout:
    """The `rollout_func` for `GRPOTrainer`; see the module docstring for its contract."""

    def __init__(
        self,
        sampler,
        sync_weights: bool = True,
        importance_correction: bool = True,
        teacher_messages: Callable[[list[dict]], list[dict]] | None = None,
    ):
        self.sampler = sampler
        self.sync_weights = sync_weights
        self.importance_correction = importance_correction
        self.teacher_messages = teacher_messages
        self.synced_step: int | None = None  # the trainer step whose weights the sampler holds
        self.rollouts = 0
        self._groups_done = 0  # prompt groups drawn so far: each gets fresh seeds

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        if self.importance_correction:
            enable_importance_correction(trainer, self)
        self.sync(trainer)
        groups = group_repeated(prompts)
        base_ids, teacher_ids = self.prompt_ids([p for p, _ in groups], trainer)
        samples, position = self._sample(base_ids, teacher_ids, [n for _, n in groups], trainer)
        self.rollouts += 1
        return rollout_output([(base_ids[position[s.prompt_index]], s) for s in samples])

    def sync(self, trainer) -> bool:
        """Copy the trainer's policy into the sampler's base unless it holds this step's already."""
        step = trainer.state.global_step
        if not self.sync_weights or step == self.synced_step:
            return False
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.sampler.update_weights({name: p.detach() for name, p in model.named_parameters()})
        self.synced_step = step
        return True

    def prompt_ids(self, prompts: list, trainer) -> tuple[list[list[int]], list[list[int]]]:
        """(base ids, teacher ids) of each prompt: text is tokenized as TRL does; messages are
        rendered by each side's chat template (the teacher's, if it has one)."""
        tokenizer = trainer.processing_class
        if not prompts or not is_messages(prompts[0]):
            ids = [list(tokenizer(text=p)["input_ids"]) for p in prompts]
            return ids, ids  # one shared vocabulary: the teacher reads the same ids
        kwargs = dict(getattr(trainer, "chat_template_kwargs", None) or {})
        template = getattr(trainer, "chat_template", None)
        base = [render(tokenizer, p, template, kwargs) for p in prompts]
        teacher_tok = self.sampler.teacher.tokenizer
        if not getattr(teacher_tok, "chat_template", None) and self.teacher_messages is None:
            return base, base
        teacher_prompts = [self.teacher_messages(p) for p in prompts] if self.teacher_messages else prompts
        return base, [render(teacher_tok, p, None, kwargs) for p in teacher_prompts]

    def _sample(self, base_ids, teacher_ids, counts: list[int], trainer) -> tuple[list, dict[int, int]]:
        """n = the longest run for every prompt, the extra samples of shorter runs skipped. Prompt
        i of this rollout has index (groups drawn before + i) * processes + process: its seeds are
        new in every rollout and on every process, and reproducible from the sampler's seed."""
        process, processes = trainer.accelerator.process_index, trainer.accelerator.num_processes
        indices = [(self._groups_done + i) * processes + process for i in range(len(counts))]
        self._groups_done += len(counts)
        count_of = dict(zip(indices, counts))
        samples = self.sampler.generate_iter(
            prompt_ids=base_ids, teacher_prompt_ids=teacher_ids, n=max(counts), collect_diagnostics=True,
            prompt_indices=indices, skip=lambda i, k: k >= count_of[i], **generation_params(trainer),
        )  # fmt: skip
        order = {index: position for position, index in enumerate(indices)}
        return sorted(samples, key=lambda s: (order[s.prompt_index], s.sample_index)), order


def trl_rollout(
    sampler,
    sync_weights: bool = True,
    importance_correction: bool = True,
    teacher_messages: Callable[[list[dict]], list[dict]] | None = None,
) -> TrlRollout:
    """A `rollout_func` for trl's `GRPOTrainer` drawing from `sampler` (an `OptimalSampler`).

    sync_weights: push the trainer's policy into the sampler's base whenever the step moved (turn
    off only to study what happens without it). importance_correction: make TRL correct for
    sampling from q (see the module docstring). teacher_messages: maps a conversational prompt to
    the one the teacher sees (e.g. with a system prompt holding privileged information)."""
    return TrlRollout(sampler, sync_weights, importance_correction, teacher_messages)


def enable_importance_correction(trainer, rollout: TrlRollout) -> None:
    """Switch `trainer` into the mode in which TRL corrects for its rollout engine's distribution,
    with `rollout` as that engine; idempotent. Only attributes trl 1.16 reads are touched."""
    if isinstance(getattr(trainer, "vllm_generation", None), _WeightSyncClient):
        return
    if getattr(trainer, "use_vllm", False):
        raise ValueError("the trainer already runs vLLM; give it either vLLM or this rollout_func")
    if not hasattr(trainer, "vllm_importance_sampling_mode"):
        raise RuntimeError(
            f"this TRL has no behaviour-policy correction to attach to (tested: trl {TESTED_TRL})"
        )
    _warn_untested_trl()
    trainer.use_vllm = True  # the gate of TRL's correction (and of its weight-sync hook)
    trainer.vllm_mode = "server"  # never the colocated engine TRL would read from in tool loops
    trainer.vllm_generation = _WeightSyncClient(rollout, trainer)
    trainer._last_loaded_step = rollout.synced_step if rollout.synced_step is not None else -1


def _warn_untested_trl() -> None:
    import trl

    if not trl.__version__.startswith(TESTED_TRL + "."):
        warnings.warn(
            f"trl {trl.__version__}: optimal_sampling's TRL rollout was tested with trl {TESTED_TRL}",
            stacklevel=3,
        )


def generation_params(trainer) -> dict:
    """The trainer's sampling settings as `OptimalSampler.generate` arguments."""
    if (getattr(trainer, "repetition_penalty", 1.0) or 1.0) != 1.0:
        raise ValueError("repetition_penalty is not supported: q would no longer be the mixture")
    top_k = trainer.top_k
    return dict(
        max_tokens=trainer.max_completion_length, temperature=trainer.temperature,
        top_k=-1 if not top_k else int(top_k), top_p=1.0 if trainer.top_p is None else trainer.top_p,
        min_p=trainer.min_p or 0.0,
    )  # fmt: skip


def is_messages(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def render(tokenizer, messages: list[dict], template: str | None, kwargs: dict) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        **kwargs,
    )["input_ids"]
    return list(ids)


def group_repeated(prompts: Sequence) -> list[tuple[object, int]]:
    """Runs of equal consecutive prompts as (prompt, run length), in order."""
    groups: list[tuple[object, int]] = []
    for prompt in prompts:
        if groups and groups[-1][0] == prompt:
            groups[-1] = (prompt, groups[-1][1] + 1)
        else:
            groups.append((prompt, 1))
    return groups


def rollout_output(rows: list[tuple[list[int], object]]) -> dict[str, list]:
    """TRL's keys (logprobs = log q) and ours, one entry per (prompt ids, Sample) row."""
    return {
        "prompt_ids": [list(ids) for ids, _ in rows],
        "completion_ids": [list(s.token_ids) for _, s in rows],
        "logprobs": [list(s.logprobs_q) for _, s in rows],
        "logprobs_base": [list(s.logprobs_base) for _, s in rows],
        "logprobs_teacher": [list(s.logprobs_teacher) for _, s in rows],
        "alphas": [list(s.alphas or []) for _, s in rows],
        "log_weight_base": [s.log_weight_base for _, s in rows],
        "weight_version": [s.weight_version for _, s in rows],
    }


def importance_summary(
    logprobs_base: Sequence[Sequence[float]], logprobs_q: Sequence[Sequence[float]], cap: float = 3.0
) -> dict[str, float]:
    """How far q is from π_θ on a batch: per-token and per-sequence ratios π_θ/q (medians, and the
    share above `cap`: what TRL's `*_mask` modes drop and `*_truncate` modes clip, with its default
    clip_min=None), and the effective sample size of the self-normalised sequence weights as a
    fraction of the batch (1 = as good as on-policy samples; compute it per prompt group)."""
    tokens = sorted(math.exp(b - q) for bs, qs in zip(logprobs_base, logprobs_q) for b, q in zip(bs, qs))
    log_seq = [sum(bs) - sum(qs) for bs, qs in zip(logprobs_base, logprobs_q)]
    top = max(log_seq)
    w = [math.exp(x - top) for x in log_seq]
    seq = sorted(math.exp(x) for x in log_seq)
    return {
        "token_ratio_median": tokens[len(tokens) // 2],
        "token_share_above_cap": sum(r > cap for r in tokens) / len(tokens),
        "sequence_ratio_median": seq[len(seq) // 2],
        "sequence_share_above_cap": sum(x > math.log(cap) for x in log_seq) / len(log_seq),
        "sequence_ess_fraction": sum(w) ** 2 / sum(x * x for x in w) / len(w),
    }
