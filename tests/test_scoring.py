"""score() reproduces generate()'s per-token fields by a teacher-forced pass."""

from __future__ import annotations

import numpy as np
import pytest

from optimal_sampling import OptimalSampler


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance", "entropy"])
def test_score_reproduces_generate(tiny_pair, method):
    base, teacher = tiny_pair("qwen2")
    sampler = OptimalSampler(base, teacher, alpha_method=method, device="cpu", engine="reference")
    prompts = ["What is AI?", "def add(a, b):"]
    teacher_prompts = ["Explain: What is AI?", "Python: def add(a, b):"]
    out = sampler.generate(prompts, max_tokens=12, temperature=0.7, top_p=0.9, seed=4,
                           teacher_prompts=teacher_prompts, collect_diagnostics=True)  # fmt: skip
    scored = sampler.score(prompts, out.generated_ids, teacher_prompts=teacher_prompts,
                           temperature=0.7, top_p=0.9)  # fmt: skip
    for g, s in zip(out.samples, scored.samples):
        assert s.token_ids == g.token_ids and s.text == g.text
        for name in ("logprobs_base", "logprobs_teacher", "logprobs_q", "alphas", "ess_ratios", "kl_q_base"):
            np.testing.assert_allclose(getattr(s, name), getattr(g, name), atol=2e-4, rtol=1e-4, err_msg=name)
        assert s.log_weight_base == pytest.approx(g.log_weight_base, abs=1e-3)


def test_score_errors(tiny_pair):
    base, teacher = tiny_pair("qwen2")
    sampler = OptimalSampler(base, teacher, device="cpu", engine="reference")
    with pytest.raises(ValueError, match="completions has 1 entries but prompts has 2"):
        sampler.score(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="outside the shared vocabulary"):
        sampler.score(["a"], [[5, 100000]])
    with pytest.raises(TypeError, match="completion 0 must be a string or a list of token ids"):
        sampler.score(["a"], [3.5])
