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
    elif isinstance(completion, Sequence) and all(isinstance(t, int) for t in completion):
        ids = list(completion)
    else:
        raise TypeError(f"completion {index} must be a string or a list of token ids")
    if not ids:
        raise ValueError(f"completion {index} is empty")
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
    requests = sampler.build_requests(prompts, teacher_prompts, params)
    vocab = sampler.vocab_size
    for req, completion in zip(requests, completions):
        ids = _completion_ids(sampler.base.tokenizer, completion, req.prompt_index)
        if max(ids) >= vocab or min(ids) < 0:
            raise ValueError(
                f"completion {req.prompt_index} has a token id outside the shared vocabulary ({vocab})"
            )
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
