"""TRL's GRPOTrainer with our sampler as its rollout engine (integrations/trl.py), 2 steps on the
tiny pair: TRL trains on our samples, recomputes our log π_base once weights are synced (and not
without the sync), and its importance ratio is exp(log π_base − log q) under its clip/mask rule."""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[trl]')")

from datasets import Dataset  # noqa: E402 (trl brings datasets)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from optimal_sampling import OptimalSampler  # noqa: E402
from optimal_sampling.integrations.trl import group_repeated, importance_summary, trl_rollout  # noqa: E402

PROMPTS = ["What is AI?", "def add(a, b):", "Hello world!", "import numpy as np"]


def teacher_reward(completion_ids, logprobs_teacher, alphas, log_weight_base, **_):
    """A reward that varies within a group (so the policy moves), read from our extra fields."""
    assert len(logprobs_teacher) == len(completion_ids) == len(alphas) == len(log_weight_base)
    assert all(len(a) == len(c) for a, c in zip(alphas, completion_ids))
    return [sum(lp) / len(lp) for lp in logprobs_teacher]


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_grpo(tiny_pair, tmp_path, monkeypatch, sync: bool, mode: str):
    """Two GRPO steps; returns (trainer, rollout, per-step [(our output, TRL's scored batch)], params before)."""
    for (
        name
    ) in TORCHRUN_VARS:  # a LOCAL_RANK left by an earlier in-process group would make accelerate distributed
        monkeypatch.delenv(name, raising=False)
    base, teacher = tiny_pair("llama")
    sampler = OptimalSampler(base, teacher, engine="reference", device="cpu", seed=0)
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=2, learning_rate=5e-2, beta=0.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, seed=0, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=3.0,
        dataloader_num_workers=0,
    )  # fmt: skip
    rollout = trl_rollout(sampler, sync_weights=sync)
    steps: list = []

    def recording_rollout(prompts, trainer):
        out = rollout(prompts, trainer)
        steps.append([out, None])
        return out

    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    trainer = trl.GRPOTrainer(
        model=policy, reward_funcs=teacher_reward, args=args, train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(base), rollout_func=recording_rollout,
    )  # fmt: skip
    score = trainer._generate_and_score_completions

    def recording_score(inputs):
        scored = score(inputs)
        steps[-1][1] = scored
        return scored

    trainer._generate_and_score_completions = recording_score
    trainer.train()
    return trainer, rollout, steps, before


def unpadded(tensor: torch.Tensor, mask: torch.Tensor) -> list[list]:
    return [row[m.bool()].tolist() for row, m in zip(tensor, mask)]


def trl_rule(log_ratio: torch.Tensor, mask: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    """TRL's documented correction: token or sequence level, truncated at cap or masked outside it."""
    if mode.startswith("sequence"):
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True)
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap)
    return ratio.masked_fill(ratio > cap, 0.0)


def padded(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(like.shape, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_grpo_trains_on_our_samples_with_exact_importance_ratios(
    tiny_pair, tmp_path, monkeypatch, one_torch_thread
):
    trainer, rollout, steps, before = run_grpo(
        tiny_pair, tmp_path, monkeypatch, sync=True, mode="token_truncate"
    )
    assert trainer.state.global_step == 2 and len(steps) == 2 and rollout.rollouts == 2
    assert [s[0]["weight_version"][0] for s in steps] == [1, 2]  # synced before each rollout
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"policy tensors that did not change: {unchanged}"
    for ours, scored in steps:
        mask = scored["completion_mask"]
        assert unpadded(scored["completion_ids"], mask) == ours["completion_ids"]
        assert unpadded(scored["prompt_ids"], scored["prompt_mask"]) == ours["prompt_ids"]
        assert [len(set(map(tuple, ours["prompt_ids"][i : i + 2]))) for i in (0, 2)] == [1, 1]
        base, q = padded(ours["logprobs_base"], mask), padded(ours["logprobs"], mask)
        old = scored["old_per_token_logps"].double()
        assert ((old - base) * mask).abs().max() < 1e-5  # TRL's log π_θ is our log π_base
        expected = trl_rule(base - q, mask, "token_truncate", 3.0) * mask
        assert ((scored["importance_sampling_ratio"].double() * mask - expected).abs().max()) < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_without_weight_sync_trl_log_pi_differs(tiny_pair, tmp_path, monkeypatch, one_torch_thread):
    trainer, rollout, steps, _ = run_grpo(tiny_pair, tmp_path, monkeypatch, sync=False, mode="sequence_mask")
    gaps = []
    for ours, scored in steps:
        mask = scored["completion_mask"]
        old = scored["old_per_token_logps"].double()
        gaps.append(((old - padded(ours["logprobs_base"], mask)) * mask).abs().max().item())
        # the correction still follows TRL's rule, on TRL's own log π_θ and our log q
        expected = trl_rule(old - padded(ours["logprobs"], mask), mask, "sequence_mask", 3.0)
        assert (scored["importance_sampling_ratio"].double() - expected).abs().max() < 1e-5
    assert gaps[0] < 1e-5 and gaps[1] > 1e-3, gaps  # step 1's policy moved; the sampler's base did not


def test_repeated_prompts_become_groups_and_summary_reads_ratios():
    chat = [{"role": "user", "content": "a"}]
    assert group_repeated(["a", "a", "b", "b", "a"]) == [("a", 2), ("b", 2), ("a", 1)]
    assert group_repeated([chat, chat]) == [(chat, 2)]
    same = importance_summary([[-1.0, -2.0]] * 4, [[-1.0, -2.0]] * 4)
    assert same["sequence_ess_fraction"] == pytest.approx(1.0) and same["token_ratio_median"] == 1.0
    skew = importance_summary([[0.0], [-5.0]], [[-1.0], [-1.0]], cap=2.0)
    assert skew["sequence_share_above_cap"] == 0.5 and skew["token_share_above_cap"] == 0.5
    assert skew["sequence_ess_fraction"] == pytest.approx((1 + math.exp(-5)) ** 2 / (1 + math.exp(-10)) / 2)
