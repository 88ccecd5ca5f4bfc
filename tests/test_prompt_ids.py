"""Token ids in: generate / generate_iter / score take prompt_ids (and teacher_prompt_ids) instead
of text, give exactly what the same prompts as text give, and refuse bad ids clearly."""

from __future__ import annotations

import pytest

from optimal_sampling import OptimalSampler

PROMPTS = ["What is AI?", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def sampler(tiny_pair, one_torch_thread):
    base, teacher = tiny_pair("llama")
    return OptimalSampler(base, teacher, engine="reference", device="cpu", seed=3)


def ids_of(sampler, prompts):
    return [sampler.base.tokenizer(p)["input_ids"] for p in prompts]


def test_ids_sample_exactly_what_text_samples(sampler):
    ids = ids_of(sampler, PROMPTS)
    from_text = sampler.generate(PROMPTS, max_tokens=6, n=2, collect_diagnostics=True)
    from_ids = sampler.generate(prompt_ids=ids, max_tokens=6, n=2, collect_diagnostics=True)
    assert from_ids.generated_ids == from_text.generated_ids
    for a, b in zip(from_ids.samples, from_text.samples):
        assert a.logprobs_q == b.logprobs_q and a.alphas == b.alphas
        assert a.prompt == b.prompt  # the ids decoded: the tiny tokenizer adds no special tokens
    streamed = sorted(sampler.generate_iter(prompt_ids=ids, max_tokens=6, n=2), key=lambda s: s.prompt_index)
    assert sorted(s.token_ids for s in streamed) == sorted(from_text.generated_ids)


def test_teacher_prompt_ids_reach_the_teacher(sampler):
    ids = ids_of(sampler, PROMPTS)
    teacher_ids = ids_of(sampler, ["Hello world!", "import numpy as np"])
    from_text = sampler.generate(
        PROMPTS, teacher_prompts=["Hello world!", "import numpy as np"], max_tokens=5
    )
    from_ids = sampler.generate(prompt_ids=ids, teacher_prompt_ids=teacher_ids, max_tokens=5)
    assert from_ids.generated_ids == from_text.generated_ids
    assert [s.logprobs_teacher for s in from_ids.samples] == [s.logprobs_teacher for s in from_text.samples]


def test_score_takes_prompt_ids(sampler):
    out = sampler.generate(PROMPTS, max_tokens=5)
    scored = sampler.score(prompt_ids=ids_of(sampler, PROMPTS), completions=out.generated_ids)
    for s, g in zip(scored.samples, out.samples):
        assert s.logprobs_q == pytest.approx(g.logprobs_q, abs=1e-5)
        assert s.logprobs_base == pytest.approx(g.logprobs_base, abs=1e-5)


@pytest.mark.parametrize(
    "prompt_ids, error, match",
    [
        ("hello", TypeError, "list of token-id lists"),
        ([[1, 2], "ab"], TypeError, r"prompt_ids\[1\]"),
        ([[1, True]], TypeError, "not booleans"),
        ([[1, 2.0]], TypeError, "ints"),
        ([], ValueError, "must not be empty"),
        ([[1], []], ValueError, "prompt 1 is empty"),
        ([[1, 10_000]], ValueError, "outside the vocabulary"),
        ([[-1]], ValueError, "outside the vocabulary"),
        ([[5] * 300], ValueError, "context"),
    ],
)
def test_bad_ids_are_refused(sampler, prompt_ids, error, match):
    with pytest.raises(error, match=match):
        sampler.generate(prompt_ids=prompt_ids, max_tokens=2)


def test_ids_and_text_together_are_refused(sampler):
    with pytest.raises(ValueError, match="not both"):
        sampler.generate(PROMPTS, prompt_ids=[[1, 2]], max_tokens=2)
    with pytest.raises(ValueError, match="chat_template"):
        sampler.generate(prompt_ids=[[1, 2]], chat_template="auto", max_tokens=2)
    with pytest.raises(ValueError, match="teacher_prompt_ids has 2"):
        sampler.generate(prompt_ids=[[1, 2]], teacher_prompt_ids=[[1], [2]], max_tokens=2)
    with pytest.raises(TypeError, match="prompt_ids"):
        sampler.generate(max_tokens=2)
    with pytest.raises(ValueError, match="completions has 1"):
        sampler.score(prompt_ids=[[1, 2], [3]], completions=[[4]])
