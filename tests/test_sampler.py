"""The sampler end to end on tiny random models: peers, exactness, batching, stopping, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_math import alpha_reference, log_q, log_softmax
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from optimal_sampling import OptimalSampler

PROMPTS = ["What is AI?", "def add(a, b):\n    return", "Hello"]


@pytest.fixture(scope="session")
def samplers(tiny_pair):
    built = {}

    def make(arch="llama", **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in built:
            base, teacher = tiny_pair(arch)
            built[key] = OptimalSampler(base, teacher, engine="reference", device="cpu", **kwargs)
        return built[key]

    return make


def hf_greedy(path, prompt_ids, max_new_tokens, eos_ids):
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(
        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("which", ["base", "teacher"])
def test_greedy_with_fixed_alpha_equals_transformers_generate(samplers, tiny_pair, arch, which):
    alpha = 1.0 if which == "teacher" else 0.0
    sampler = samplers(arch, alpha_method="fixed", fixed_alpha=alpha)
    out = sampler.generate(PROMPTS, max_tokens=12, temperature=0)
    path = tiny_pair(arch)[1 if which == "teacher" else 0]
    for prompt, ids in zip(PROMPTS, out.generated_ids):
        prompt_ids = sampler.base.tokenizer(prompt)["input_ids"]
        assert ids == hf_greedy(path, prompt_ids, 12, sampler.eos_ids)


def teacher_forced_logprobs(model, prompt_ids, ids):
    full = torch.tensor([list(prompt_ids) + list(ids)])
    with torch.no_grad():
        lp = torch.log_softmax(model(full).logits[0].double(), -1)
    rows = torch.arange(len(prompt_ids) - 1, full.shape[1] - 1)
    return lp[rows, torch.tensor(ids)].numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_logprobs_equal_teacher_forced_forward_passes(samplers, arch):
    sampler = samplers(arch)
    teacher_prompts = [p + " Answer briefly." for p in PROMPTS]
    out = sampler.generate(PROMPTS, max_tokens=10, temperature=0.8, seed=3, teacher_prompts=teacher_prompts)
    for s in out.samples:
        base_ids = sampler.base.tokenizer(s.prompt)["input_ids"]
        teacher_ids = sampler.teacher.tokenizer(s.teacher_prompt)["input_ids"]
        want_b = teacher_forced_logprobs(sampler.base.model, base_ids, s.token_ids)
        want_t = teacher_forced_logprobs(sampler.teacher.model, teacher_ids, s.token_ids)
        np.testing.assert_allclose(s.logprobs_base, want_b, atol=2e-4)
        np.testing.assert_allclose(s.logprobs_teacher, want_t, atol=2e-4)


def test_batched_prompts_of_different_lengths_equal_one_by_one(samplers):
    sampler = samplers("qwen2")
    together = sampler.generate(PROMPTS, max_tokens=10, seed=11, n=2, collect_diagnostics=True)
    for i, prompt in enumerate(PROMPTS):
        alone = sorted(
            sampler.generate_iter(
                [prompt], max_tokens=10, seed=11, n=2, collect_diagnostics=True, prompt_indices=[i]
            ),
            key=lambda s: s.sample_index,
        )
        for k in range(2):
            a, b = together.samples[2 * i + k], alone[k]
            assert a.token_ids == b.token_ids
            np.testing.assert_allclose(a.logprobs_q, b.logprobs_q, atol=1e-4)
            np.testing.assert_allclose(a.alphas, b.alphas, atol=1e-4)


def test_same_seed_same_samples_and_other_seed_other_samples(samplers):
    sampler = samplers("llama")
    first = sampler.generate(PROMPTS, max_tokens=8, seed=5, n=3)
    again = sampler.generate(PROMPTS, max_tokens=8, seed=5, n=3)
    other = sampler.generate(PROMPTS, max_tokens=8, seed=6, n=3)
    assert first.generated_ids == again.generated_ids
    assert first.generated_ids != other.generated_ids
    assert len(first) == 9 and [s.prompt_index for s in first.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(ids) for ids in first.generated_ids[:3]}) > 1  # the n samples differ


def reference_first_token_q(sampler, prompt, method, lo, hi):
    ids = torch.tensor([sampler.base.tokenizer(prompt)["input_ids"]])
    v = sampler.vocab_size
    with torch.no_grad():
        lp_b = log_softmax(sampler.base.model(ids).logits[0, -1, :v].double().numpy())
        lp_t = log_softmax(sampler.teacher.model(ids).logits[0, -1, :v].double().numpy())
    alpha = alpha_reference(lp_b, lp_t, method, lo, hi)
    return np.exp(log_q(lp_b, lp_t, alpha)), alpha


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance"])
def test_first_token_distribution_matches_q(samplers, method):
    """Chi-square goodness of fit of 6,000 first tokens against q from the float64 reference."""
    sampler = samplers("llama", alpha_method=method, alpha_min=0.0, max_batch_size=2000)
    prompt, draws = "What is AI?", 6000
    q, alpha = reference_first_token_q(sampler, prompt, method, 0.0, 1.0)
    out = sampler.generate([prompt], max_tokens=1, n=draws, seed=123, collect_diagnostics=True)
    assert abs(out.alphas[0][0] - alpha) < 1e-4
    counts = np.bincount([ids[0] for ids in out.generated_ids], minlength=len(q)).astype(float)
    expected = q * draws
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert big.sum() > 10  # the test has power: many distinct likely tokens
    assert chisquare(obs, exp).pvalue > 1e-3
    np.testing.assert_allclose(
        [lq[0] for lq in out.logprobs_q], np.log(q[[ids[0] for ids in out.generated_ids]]), atol=1e-4
    )


def test_stop_strings_eos_and_length(samplers):
    sampler = samplers("llama")
    out = sampler.generate(PROMPTS, max_tokens=30, seed=2, n=4)
    reasons = set(out.finish_reasons)
    assert reasons <= {"stop", "length"}
    for s in out.samples:
        if s.finish_reason == "length":
            assert len(s.token_ids) == 30
        else:
            assert s.token_ids[-1] in sampler.eos_ids and s.token_ids.count(s.token_ids[-1]) == 1
    # a stop string taken from an unconstrained sample must end that sample there
    text = next(s.text for s in out.samples if len(s.text) > 6)
    stop = text[3:5]
    cut = sampler.generate(PROMPTS, max_tokens=30, seed=2, n=4, stop=[stop])
    for s in cut.samples:
        assert stop not in s.text
        assert len(s.token_ids) == len(s.logprobs_q) == len(s.logprobs_base)
        if s.finish_reason == "stop" and s.stop_reason == stop:
            full = sampler.base.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            assert full.startswith(s.text) and stop in full


def test_eos_ids_include_generation_config_ones(samplers):
    sampler = samplers("llama")
    tok = sampler.base.tokenizer
    assert sampler.eos_ids == {
        tok.convert_tokens_to_ids("<|endoftext|>"),
        tok.convert_tokens_to_ids("<|im_end|>"),
    }


def test_cached_decoding_equals_uncached_recomputation(samplers):
    sampler = samplers("qwen2")
    from optimal_sampling.engines import SlotRequest

    engine = sampler.engine
    prompts = [tuple(sampler.base.tokenizer(p)["input_ids"]) for p in PROMPTS]
    lb, _ = engine.add([SlotRequest(i, p, p) for i, p in enumerate(prompts)])
    seqs = [list(p) for p in prompts]
    for _ in range(6):
        tokens = lb.argmax(-1)
        for s, t in zip(seqs, tokens.tolist()):
            s.append(t)
        lb, lt = engine.decode(torch.arange(3), tokens)
        for i, seq in enumerate(seqs):
            with torch.no_grad():
                full_b = sampler.base.model(torch.tensor([seq])).logits[0, -1]
                full_t = sampler.teacher.model(torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(lb[i], full_b[: engine.vocab_size], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(lt[i], full_t[: engine.vocab_size], atol=1e-4, rtol=1e-4)
    engine.release([0, 1, 2])


def test_teacher_constraint_and_truncation_bound_the_sampled_support(samplers):
    sampler = samplers("llama", constraint_to_target=True, target_top_k=3)
    out = sampler.generate(["Hello"], max_tokens=1, n=200, seed=1)
    assert len({ids[0] for ids in out.generated_ids}) <= 3
    out = samplers("llama").generate(["Hello"], max_tokens=1, n=200, seed=1, top_k=2)
    assert len({ids[0] for ids in out.generated_ids}) <= 2


def test_padded_logit_width_uses_the_shared_vocabulary(tiny_pair):
    base, teacher = tiny_pair("llama", teacher_width=320)
    sampler = OptimalSampler(base, teacher, engine="reference", device="cpu")
    assert sampler.vocab_size == len(sampler.base.tokenizer) == 300
    out = sampler.generate(PROMPTS, max_tokens=6, seed=0, n=2)
    assert all(t < 300 for ids in out.generated_ids for t in ids)


def test_greedy_diagnostics_and_weights_are_consistent(samplers):
    out = samplers("llama").generate(PROMPTS, max_tokens=6, temperature=0, collect_diagnostics=True)
    for s in out.samples:
        assert len(s.alphas) == len(s.ess_ratios) == len(s.kl_q_base) == len(s.token_ids)
        assert all(0.5 <= a <= 1.0 for a in s.alphas)
        assert s.log_weight_base == pytest.approx(sum(s.logprobs_base) - sum(s.logprobs_q))
    assert samplers("llama").generate(PROMPTS, max_tokens=2).alphas is None
