"""The verl agent loop's contract, on CPU with the tiny pair (marker `verl`; needs verl 0.9.1 in its
own venv, see scripts/setup_verl_env.sh):

    /tmp/verl-venv/bin/python -m pytest -m verl tests/test_verl.py

The batch goes through verl's own `AgentLoopWorker.generate_sequences` (registry lookup by
agent name, hydra instantiation, `run`, padding, batching) on a worker whose constructor is
skipped (it would load an HF model config and start tracing): what comes out is the `DataProto`
verl's trainer receives. Checked, for one rollout per prompt and for n > 1 (rows repeated as
verl's trainer repeats them): `rollout_log_probs` is our log q, token for token; the extra
fields carry log π_base, log π_teacher and α per token; the responses are the sampled ids; the
n rollouts of a prompt are drawn in one sampler call and differ; teacher-forced scoring of the
returned ids reproduces every per-token field; and the HTTP route sends token ids to
`/generate` and reads its answer the same way.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytestmark = pytest.mark.verl
verl_loop = pytest.importorskip("verl.experimental.agent_loop.agent_loop")

import httpx  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402

from optimal_sampling import OptimalSampler  # noqa: E402
from optimal_sampling.integrations import verl as osv  # noqa: E402

PROMPT_LEN, RESPONSE_LEN = 32, 8
PROMPTS = [[{"role": "user", "content": "What is AI?"}], [{"role": "user", "content": "def add(a, b):"}]]


def config(n: int):
    return OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {
                    "prompt_length": PROMPT_LEN, "response_length": RESPONSE_LEN, "n": n,
                    "temperature": 1.0, "top_p": 1.0, "top_k": -1, "calculate_log_probs": True,
                    "val_kwargs": {"temperature": 0.0, "top_p": 1.0, "top_k": -1},
                    "agent": {"default_agent_loop": osv.AGENT_NAME},
                }
            },
            "data": {"apply_chat_template_kwargs": {}},
        }
    )  # fmt: skip


def worker(tokenizer, n: int):
    """verl's AgentLoopWorker with the attributes its constructor would set for a text model."""
    w = verl_loop.AgentLoopWorker.__new__(verl_loop.AgentLoopWorker)
    w.config = config(n)
    w.rollout_config = w.config.actor_rollout_ref.rollout
    w.llm_client, w.teacher_client, w.reward_loop_worker_handles = None, None, None
    w.tokenizer, w.processor, w.hf_model_type = tokenizer, None, "llama"
    w.dataset_cls, w.mm_processor_kwargs, w.tools = RLHFDataset, {}, []
    w.distillation_enabled = False
    return w


def batch(n: int) -> DataProto:
    """The rows verl's trainer hands the rollout: each prompt repeated n times, interleaved."""
    raw = np.empty(len(PROMPTS), dtype=object)
    for i, messages in enumerate(PROMPTS):
        raw[i] = messages
    rows = DataProto.from_dict(
        non_tensors={
            "raw_prompt": raw,
            "index": np.arange(len(PROMPTS)),
            "agent_name": np.array([osv.AGENT_NAME] * len(PROMPTS), dtype=object),
        }
    )
    return rows.repeat(repeat_times=n, interleave=True)


@pytest.fixture(scope="module")
def sampler(tiny_pair, one_torch_thread):
    base, teacher = tiny_pair("llama")
    s = OptimalSampler(base, teacher, seed=0, engine="reference", alpha_method="kl_symmetry")
    calls = []
    generate_iter = s.generate_iter

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return generate_iter(*args, **kwargs)

    s.generate_iter, s.calls = spy, calls
    osv.use_sampler(s)
    yield s
    osv.use_sampler(None)


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    return AutoTokenizer.from_pretrained(tiny_pair("llama")[0])


def rollout(tokenizer, n: int) -> DataProto:
    return asyncio.run(worker(tokenizer, n).generate_sequences(batch(n)))


def rows(out: DataProto):
    """Per row: (prompt ids, response ids, rollout_log_probs, extra fields), unpadded."""
    for i in range(len(out)):
        mask = out.batch["response_mask"][i].bool()
        prompt_mask = out.batch["attention_mask"][i, :PROMPT_LEN].bool()
        yield (
            out.batch["prompts"][i][prompt_mask].tolist(),
            out.batch["responses"][i][mask].tolist(),
            out.batch["rollout_log_probs"][i][mask].tolist(),
            {
                k: out.non_tensor_batch[k][i]
                for k in ("logprobs_base", "logprobs_teacher", "alphas", "log_weight_base")
            },
        )


def check_rows(sampler, out: DataProto, expected_rows: int) -> list:
    assert len(out) == expected_rows
    assert "rollout_log_probs" in out.batch.keys()
    found = list(rows(out))
    for prompt, response, log_q, extra in found:
        assert 0 < len(response) <= RESPONSE_LEN
        assert all(len(extra[k]) == len(response) for k in ("logprobs_base", "logprobs_teacher", "alphas"))
        assert all(0.0 <= a <= 1.0 for a in extra["alphas"])
        assert extra["log_weight_base"] == pytest.approx(sum(extra["logprobs_base"]) - sum(log_q), abs=1e-4)
        # the per-token fields are the pair's own numbers: teacher-forcing the ids reproduces them
        scored = sampler.score(prompt_ids=[prompt], completions=[response]).samples[0]
        np.testing.assert_allclose(log_q, scored.logprobs_q, atol=1e-5)  # float32 in verl's tensor
        np.testing.assert_allclose(extra["logprobs_base"], scored.logprobs_base, atol=1e-5)
        np.testing.assert_allclose(extra["logprobs_teacher"], scored.logprobs_teacher, atol=1e-5)
        np.testing.assert_allclose(extra["alphas"], scored.alphas, atol=1e-5)
    return found


def test_single_rollout_carries_log_q_and_extra_fields(sampler, tokenizer):
    sampler.calls.clear()
    out = rollout(tokenizer, n=1)
    found = check_rows(sampler, out, len(PROMPTS))
    # the prompt is verl's own rendering of raw_prompt (chat template, generation prompt)
    text = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=False)
    assert found[0][0] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(sampler.calls) == 1 and sampler.calls[0]["n"] == 1  # both rows in one batch
    assert set(out.non_tensor_batch["finish_reason"]) <= {"stop", "length"}


def test_n_rollouts_are_one_prefill_and_differ(sampler, tokenizer):
    n = 4
    sampler.calls.clear()
    out = rollout(tokenizer, n=n)
    found = check_rows(sampler, out, n * len(PROMPTS))
    assert len(sampler.calls) == 1
    call = sampler.calls[0]
    assert call["n"] == n and len(call["prompt_ids"]) == len(PROMPTS)  # equal rows became n samples
    for p in range(len(PROMPTS)):
        group = found[p * n : (p + 1) * n]
        assert len({tuple(g[0]) for g in group}) == 1
        assert len({tuple(g[1]) for g in group}) > 1, "the n rollouts of a prompt must not repeat one sample"
    # a later step draws new samples (new prompt indices, so new seeds)
    again = list(rows(rollout(tokenizer, n=n)))
    assert [r[1] for r in again] != [r[1] for r in found]


def test_agent_loop_output_and_token_fields(sampler, tokenizer):
    """`AgentLoopOutput.as_dict()` (verl's other consumer of the output) names log q rollout_log_probs."""
    assert verl_loop._agent_loop_registry[osv.AGENT_NAME]["_target_"].endswith("OptimalSamplingAgentLoop")
    w = worker(tokenizer, 1)

    async def run_one():  # verl builds its loops inside the worker's running event loop
        agent = osv.OptimalSamplingAgentLoop(
            trainer_config=verl_loop.DictConfigWrap(w.config), server_manager=None, tokenizer=tokenizer,
            processor=None, dataset_cls=RLHFDataset, data_config=verl_loop.DictConfigWrap(w.config.data),
            hf_model_type="llama",
        )  # fmt: skip
        return await agent.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1}, raw_prompt=PROMPTS[0])

    output = asyncio.run(run_one())
    assert isinstance(output, verl_loop.AgentLoopOutput)
    d = output.as_dict()
    assert d["rollout_log_probs"].tolist() == pytest.approx(output.response_logprobs, abs=1e-6)
    assert d["responses"].tolist() == output.response_ids
    assert output.response_mask == [1] * len(output.response_ids)
    assert output.extra_fields["weight_version"] == sampler.weight_version
    with pytest.raises(ValueError, match="repetition_penalty"):
        osv.settings_of({"repetition_penalty": 1.1}, 8)


def test_server_route_sends_token_ids(sampler, tokenizer):
    """The HTTP route against a stand-in for our server's /generate (the documented SGLang-native
    contract, answered by the same sampler)."""
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        assert request.headers["authorization"] == "Bearer k"
        items = []
        for ids, sp in zip(body["input_ids"], body["sampling_params"]):
            out = sampler.generate(
                prompt_ids=[ids], n=sp["n"], seed=sp["seed"], max_tokens=sp["max_new_tokens"],
                temperature=sp["temperature"], collect_diagnostics=body["collect_diagnostics"],
            )  # fmt: skip
            for s in out.samples:
                meta = {
                    name: getattr(s, name) for name in ("logprobs_q", "logprobs_base", "logprobs_teacher")
                }
                meta.update(
                    alphas=s.alphas, finish_reason={"type": s.finish_reason}, weight_version=s.weight_version
                )
                items.append({"text": s.text, "output_ids": s.token_ids, "meta_info": meta})
        return httpx.Response(200, json=items)

    backend = osv.ServerBackend(
        "http://optimal-sampling.test", seed=0, api_key="k", transport=httpx.MockTransport(answer)
    )
    osv.use_backend(backend)
    try:
        n = 3
        out = rollout(tokenizer, n=n)
    finally:
        osv.use_sampler(sampler)
    check_rows(sampler, out, n * len(PROMPTS))
    assert len(seen) == 1 and [sp["n"] for sp in seen[0]["sampling_params"]] == [n] * len(PROMPTS)
    assert all(isinstance(t, int) for ids in seen[0]["input_ids"] for t in ids)
    assert len({sp["seed"] for sp in seen[0]["sampling_params"]}) == len(PROMPTS)


def test_route_choice(sampler, monkeypatch):
    """No chosen backend: the config's server_url, else $OPTIMAL_SAMPLING_URL, else a clear error."""
    osv.use_backend(None)
    try:
        monkeypatch.delenv(osv.URL_ENV, raising=False)
        with pytest.raises(ValueError, match="use_sampler"):
            osv.backend_for(None, None, None, 10.0)
        configured = osv.backend_for("http://a.test/", None, None, 10.0)
        assert isinstance(configured, osv.ServerBackend) and configured.url == "http://a.test"
        assert osv.backend_for("http://a.test/", None, None, 10.0) is configured  # one per process
        monkeypatch.setenv(osv.URL_ENV, "http://b.test")
        assert osv.backend_for(None, None, None, 10.0).url == "http://b.test"
        with pytest.raises(ValueError, match="module:callable"):
            osv.backend_for(None, "no_colon", None, 10.0)
    finally:
        osv.use_sampler(sampler)
    assert osv.backend_for(None, None, None, 10.0).sampler is sampler
