"""Teacher-forced recomputation of alpha and the importance data of given completions.

For samples produced elsewhere (the vLLM plugin, another sampler) or to re-score old samples
under a newer base model: one forward pass of each model over prompt + completion gives, per
completion token, exactly what `generate` would have reported for it with the same mixing and
sampling settings (alpha, log pi_base, log pi_teacher, log q, diagnostics).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..config import SamplingParams
from ..mixing import mix_step
from ..mixing.step import importance_data
from ..outputs import Sample, sample_columns


def _completion_ids(tokenizer, completion: str | Sequence[int], index: int) -> list[int]:
    if isinstance(completion, str):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    elif isinstance(completion, Sequence) and all(_is_token_id(t) for t in completion):
        ids = list(completion)
    else:
        raise TypeError(f"completion {index} must be a string or a list of token ids (ints, not booleans)")
    if not ids:
        raise ValueError(f"completion {index} is empty")
    return ids


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True would be read as id 1


def _checked_completion(sampler, req, completion: str | Sequence[int], context: int) -> list[int]:
    """The completion's ids, inside the shared vocabulary and, after either prompt, the context."""
    ids = _completion_ids(sampler.base.tokenizer, completion, req.prompt_index)
    if max(ids) >= sampler.vocab_size or min(ids) < 0:
        raise ValueError(
            f"completion {req.prompt_index} has a token id outside the shared vocabulary ({sampler.vocab_size})"
        )
    longest = max(len(req.base_ids), len(req.teacher_ids)) + len(ids)
    if longest > context:
        raise ValueError(
            f"completion {req.prompt_index} and its prompt have {longest} tokens; the models' context is {context}"
        )
    return ids


@torch.inference_mode()
def _next_token_logits(model, prompt_ids: Sequence[int], completion: list[int], vocab: int) -> torch.Tensor:
    """Logits predicting each completion token: [len(completion), vocab]."""
    device = next(model.parameters()).device
    full = torch.tensor([list(prompt_ids) + completion], device=device)
    logits = model(input_ids=full).logits[0, len(prompt_ids) - 1 : -1, :vocab]
    return logits


def score_iter(
    sampler,
    prompts: list[str],
    completions: list[str | Sequence[int]],
    teacher_prompts: list[str] | None,
    params: SamplingParams,
) -> Iterator[Sample]:
    """Yield one scored Sample per (prompt, completion), in order."""
    if len(completions) != len(prompts):
        raise ValueError(f"completions has {len(completions)} entries but prompts has {len(prompts)}")
    yield from score_requests(
        sampler, sampler.build_requests(prompts, teacher_prompts, params), completions, params
    )


def score_requests(
    sampler, requests: list, completions: list[str | Sequence[int]], params: SamplingParams
) -> Iterator[Sample]:
    """Yield one scored Sample per (request, completion), in order (requests with n = 1, e.g. from
    `OptimalSampler.requests_from_ids` for prompts given as token ids)."""
    vocab, context = sampler.vocab_size, sampler.engine.max_context()
    # every completion is checked before the first is scored: a bad one fails the call at once
    pairs = zip(requests, completions, strict=True)
    checked = [_checked_completion(sampler, request, completion, context) for request, completion in pairs]
    for req, ids in zip(requests, checked, strict=True):
        logits_b = _next_token_logits(sampler.base.model, req.base_ids, ids, vocab)
        logits_t = _next_token_logits(sampler.teacher.model, req.teacher_ids, ids, vocab).to(logits_b.device)
        yield _scored_sample(sampler, req, ids, logits_b, logits_t, params)


def _scored_sample(sampler, req, ids, logits_b, logits_t, params: SamplingParams) -> Sample:
    tokens = torch.tensor(ids, device=logits_b.device)
    mixed = mix_step(
        logits_b, logits_t, sampler.mix, params.temperature, params.top_k, params.top_p, params.min_p
    )
    columns = importance_data(logits_b, logits_t, mixed, tokens, params.collect_diagnostics).to_host()
    last = ids[-1]
    return Sample(
        prompt_index=req.prompt_index,
        sample_index=0,
        prompt=req.prompt,
        teacher_prompt=req.teacher_prompt,
        text=sampler.base.tokenizer.decode(ids, skip_special_tokens=True),
        token_ids=ids,
        finish_reason="stop" if last in sampler.eos_ids else "length",
        **sample_columns(columns, params.collect_diagnostics),
    )
