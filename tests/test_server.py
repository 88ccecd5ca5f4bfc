"""`optimal-sampling serve` end to end: the real server in a subprocess (uvicorn, tiny models,
CPU) and real clients (the `openai` package, httpx). Offline results come from an
OptimalSampler in this process on the same models: a request with a seed must sample what
`generate(prompt, seed=...)` samples alone, whatever else the server runs at the time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from optimal_sampling import OptimalSampler
from optimal_sampling.cli import main

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

KEY = "test-key"
MODEL = "tiny-mix"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["What is AI?", "def add(a, b):", "Hello world!", "The quick brown fox"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the server did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair("llama")


def start_server(pair, log: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    command = [
        sys.executable, "-m", "optimal_sampling", "serve", "--base", pair[0], "--teacher", pair[1],
        "--device", "cpu", "--port", str(port), "--api-key", KEY, "--served-model-name", MODEL,
        "--batch-size", "16", "--log-level", "warning", *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process, log)
    return url, process


def stop_cleanly(process: subprocess.Popen, log: Path) -> None:
    """SIGTERM must end the server with status 0 (its graceful shutdown done)."""
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the server did not stop on SIGTERM:\n{log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module", params=["reference", "fast"])
def engine(request) -> str:
    """Every test runs on both engines: the reference engine's waves and the fast engine's
    continuous batching with pipelined steps (the GPU's engine, here on the CPU)."""
    return request.param


@pytest.fixture(scope="module")
def server(pair, engine, tmp_path_factory):
    """The server, started once per engine; at the end SIGTERM must stop it cleanly."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    url, process = start_server(pair, log, "--engine", engine)
    yield url
    stop_cleanly(process, log)


@pytest.fixture(scope="module")
def offline(pair, engine, one_torch_thread):
    return OptimalSampler(pair[0], pair[1], device="cpu", engine=engine)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        yield c


def same_sample(tokens, logprobs_q, want) -> None:
    assert tokens == want.token_ids
    np.testing.assert_allclose(logprobs_q, want.logprobs_q, atol=1e-4)


def sse_events(lines) -> list:
    """The JSON payloads of a server-sent event stream, up to [DONE] (which must come)."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return events
        events.append(json.loads(line[len("data: ") :]))
    raise AssertionError("the stream ended without [DONE]")


# ------------------------------------------------------------------------------ the OpenAI API


def test_models_health_and_info(server, http, engine):
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    info = http.get("/get_model_info").json()
    assert info["is_generation"] and info["vocab_size"] == 300 and info["max_context"] == 256
    state = http.get("/get_server_info").json()
    assert state["engine"] == {"reference": "ReferenceEngine", "fast": "FastEngine"}[engine]
    assert state["mix"]["alpha_method"] == "kl_symmetry"


def test_completion_equals_offline_generate(client, offline):
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0.8, seed=3, logprobs=1,
        extra_body={"top_k": 50, "collect_diagnostics": True},
    )  # fmt: skip
    want = offline.generate(
        PROMPTS[0], max_tokens=8, temperature=0.8, seed=3, top_k=50, collect_diagnostics=True
    )
    choice = out.choices[0]
    same_sample(choice.token_ids, choice.logprobs.token_logprobs, want.samples[0])
    assert choice.text == want.generated_texts[0] and choice.finish_reason == want.finish_reasons[0]
    np.testing.assert_allclose(choice.logprobs_base, want.logprobs_base[0], atol=1e-4)
    np.testing.assert_allclose(choice.logprobs_teacher, want.logprobs_teacher[0], atol=1e-4)
    np.testing.assert_allclose(choice.alphas, want.alphas[0], atol=1e-4)
    assert choice.log_weight_base == pytest.approx(want.log_weights_base[0], abs=1e-3)
    assert (
        len(choice.ess_ratios) == len(choice.kl_q_base) == len(choice.kl_q_teacher) == len(choice.token_ids)
    )
    assert out.usage.completion_tokens == len(choice.token_ids)


def test_completion_batch_with_n_and_teacher_prompt(client, offline):
    teacher = [p + " Answer briefly." for p in PROMPTS[:2]]
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[:2], max_tokens=6, n=2, seed=5, extra_body={"teacher_prompt": teacher}
    )
    want = offline.generate(PROMPTS[:2], max_tokens=6, n=2, seed=5, teacher_prompts=teacher)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for choice, sample in zip(out.choices, want.samples):
        same_sample(choice.token_ids, choice.logprobs_q, sample)


def chat_text(offline, messages) -> str:
    return offline.base.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_with_teacher_messages_equals_offline(client, offline):
    messages = [{"role": "user", "content": "Write a function."}]
    teacher = [{"role": "system", "content": "Be brief."}, *messages]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, seed=7, logprobs=True,
        extra_body={"teacher_messages": teacher},
    )  # fmt: skip
    want = offline.generate(
        chat_text(offline, messages), max_tokens=6, seed=7, teacher_prompts=[chat_text(offline, teacher)]
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.generated_texts[0]
    same_sample(choice.token_ids, [t.logprob for t in choice.logprobs.content], want.samples[0])


def test_streaming_equals_the_whole_response(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, seed=11)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=12, seed=11, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == whole.choices[0].text
    assert [t for c in with_choices for t in c.choices[0].token_ids] == whole.choices[0].token_ids
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(whole.choices[0].token_ids)

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=2)
    deltas = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=2, stream=True)
    )
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content


# ------------------------------------------------------------------------------ SGLang's /generate, /score


def test_generate_single_batch_and_input_ids(http, offline):
    single = http.post(
        "/generate",
        json={
            "text": PROMPTS[2],
            "sampling_params": {"max_new_tokens": 8, "seed": 4},
            "return_logprob": True,
        },
    ).json()
    want = offline.generate(PROMPTS[2], max_tokens=8, seed=4).samples[0]
    assert single["text"] == want.text and single["meta_info"]["completion_tokens"] == len(want.token_ids)
    logprobs = single["meta_info"]["output_token_logprobs"]
    assert [entry[1] for entry in logprobs] == single["output_ids"] and all(e[2] is None for e in logprobs)
    same_sample(single["output_ids"], [e[0] for e in logprobs], want)
    assert single["meta_info"]["finish_reason"]["type"] == want.finish_reason
    assert "alphas" not in single["meta_info"]

    body = {
        "text": PROMPTS[2],
        "sampling_params": {"max_new_tokens": 8, "seed": 4},
        "collect_diagnostics": True,
    }
    with_diagnostics = http.post("/generate", json=body).json()
    want = offline.generate(PROMPTS[2], max_tokens=8, seed=4, collect_diagnostics=True).samples[0]
    np.testing.assert_allclose(with_diagnostics["meta_info"]["alphas"], want.alphas, atol=1e-4)
    np.testing.assert_allclose(with_diagnostics["meta_info"]["ess_ratios"], want.ess_ratios, rtol=1e-3)

    batch = http.post(
        "/generate", json={"text": PROMPTS[:3], "sampling_params": {"max_new_tokens": 5, "n": 2, "seed": 9}}
    )
    want = offline.generate(PROMPTS[:3], max_tokens=5, n=2, seed=9)
    assert len(batch.json()) == 6
    for out, sample in zip(batch.json(), want.samples):
        same_sample(out["output_ids"], out["meta_info"]["logprobs_q"], sample)

    ids = [offline.base.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    by_ids = http.post(
        "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 5, "n": 2, "seed": 9}}
    )
    assert [o["output_ids"] for o in by_ids.json()] == [o["output_ids"] for o in batch.json()]


def test_generate_per_prompt_settings_teacher_ids_and_stops(http, offline):
    teacher_ids = [offline.teacher.tokenizer(p + " Be brief.")["input_ids"] for p in PROMPTS[:2]]
    settings = [
        {"max_new_tokens": 6, "temperature": 0.7, "seed": 1},
        {"max_new_tokens": 4, "top_p": 0.9, "seed": 1},
    ]
    outs = http.post(
        "/generate", json={"text": PROMPTS[:2], "teacher_input_ids": teacher_ids, "sampling_params": settings}
    ).json()
    teacher = [p + " Be brief." for p in PROMPTS[:2]]
    first = offline.generate(PROMPTS[:2], max_tokens=6, temperature=0.7, seed=1, teacher_prompts=teacher)
    second = offline.generate(PROMPTS[:2], max_tokens=4, top_p=0.9, seed=1, teacher_prompts=teacher)
    assert outs[0]["output_ids"] == first.samples[0].token_ids
    assert outs[1]["output_ids"] == second.samples[1].token_ids  # prompt 1 keeps its index (and seed)

    free = offline.generate(PROMPTS[3], max_tokens=12, seed=8).samples[0]
    stop_id = free.token_ids[3]
    stopped = http.post(
        "/generate",
        json={
            "text": PROMPTS[3],
            "sampling_params": {"max_new_tokens": 12, "seed": 8, "stop_token_ids": [stop_id]},
        },
    ).json()
    cut = free.token_ids.index(stop_id) + 1
    assert stopped["output_ids"] == free.token_ids[:cut]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}


def test_generate_streaming(http):
    body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 10, "seed": 6}, "return_logprob": True}
    whole = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
        events = sse_events(response.iter_lines())
    assert len(events) >= 2 and all(e["index"] == 0 for e in events)
    ids = [e["output_ids"] for e in events]
    assert all(a == b[: len(a)] for a, b in zip(ids, ids[1:]))  # cumulative, as SGLang streams
    last = events[-1]
    assert last["output_ids"] == whole["output_ids"] and last["text"] == whole["text"]
    assert last["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])


def test_score_gives_the_sampled_fields(http, offline):
    sample = offline.generate(PROMPTS[1], max_tokens=6, seed=12, collect_diagnostics=True).samples[0]
    scored = http.post("/score", json={"text": PROMPTS[1], "output_ids": sample.token_ids}).json()
    np.testing.assert_allclose(scored["logprobs_q"], sample.logprobs_q, atol=1e-4)
    np.testing.assert_allclose(scored["logprobs_base"], sample.logprobs_base, atol=1e-4)
    np.testing.assert_allclose(scored["alphas"], sample.alphas, atol=1e-4)
    batch = http.post(
        "/score",
        json={
            "input_ids": [offline.base.tokenizer(PROMPTS[1])["input_ids"]] * 2,
            "output_ids": [sample.token_ids] * 2,
        },
    ).json()
    assert len(batch) == 2 and batch[1]["output_ids"] == sample.token_ids


# ------------------------------------------------------------------------------ concurrency


async def seeded_request(client: httpx.AsyncClient, i: int) -> tuple[list[int], list[float]]:
    """Request i of a mixed load: both schemas, streamed or not, four sampling settings."""
    prompt, seed, temperature = PROMPTS[i % 4], 100 + i, (1.0, 0.7)[i % 2]
    top_p = 0.95 if i % 4 >= 2 else 1.0
    if i % 3 == 0:
        body = {
            "text": prompt, "return_logprob": True, "stream": i % 2 == 0,
            "sampling_params": {"max_new_tokens": 10, "seed": seed, "temperature": temperature, "top_p": top_p},
        }  # fmt: skip
        if not body["stream"]:
            out = (await client.post("/generate", json=body)).json()
            return out["output_ids"], out["meta_info"]["logprobs_q"]
        async with client.stream("POST", "/generate", json=body) as response:
            last = sse_events([line async for line in response.aiter_lines()])[-1]
        return last["output_ids"], last["meta_info"]["logprobs_q"]
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 10,
        "seed": seed,
        "temperature": temperature,
        "top_p": top_p,
    }
    if i % 2 == 0:
        choice = (await client.post("/v1/completions", json=body)).json()["choices"][0]
        return choice["token_ids"], choice["logprobs_q"]
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = sse_events([line async for line in response.aiter_lines()])
    choices = [e["choices"][0] for e in events]
    return [t for c in choices for t in c["token_ids"]], [v for c in choices for v in c["logprobs_q"]]


def test_concurrent_seeded_requests_equal_offline_results(server, offline):
    async def run_all():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(seeded_request(client, i) for i in range(32)))

    results = asyncio.run(run_all())
    for i, (tokens, logprobs_q) in enumerate(results):
        want = offline.generate(
            PROMPTS[i % 4], max_tokens=10, seed=100 + i, temperature=(1.0, 0.7)[i % 2],
            top_p=0.95 if i % 4 >= 2 else 1.0,
        ).samples[0]  # fmt: skip
        same_sample(tokens, logprobs_q, want)


def idle(http, timeout: float = 20.0) -> dict:
    """/get_server_info once no request runs or waits (or the last one seen at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        info = http.get("/get_server_info").json()
        if (info["running"], info["waiting"], info["tickets"]) == (0, 0, 0) or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


LONG = 240  # new tokens of a request that runs until it is aborted (the context is 256)


def test_clients_that_disconnect_mid_stream_free_their_slots(server, http):
    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        if i % 2:
            body = {
                "model": MODEL,
                "prompt": PROMPTS[i % 4],
                "max_tokens": LONG,
                "ignore_eos": True,
                "stream": True,
            }
            path = "/v1/completions"
        else:
            sampling = {"max_new_tokens": LONG, "ignore_eos": True}
            body = {"text": PROMPTS[i % 4], "sampling_params": sampling, "stream": True}
            path = "/generate"
        async with client.stream("POST", path, json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # leaves mid-stream: the connection closes

    async def run_all():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=60) as client:
            await asyncio.gather(*(leave_early(client, i) for i in range(20)))

    before = idle(http)["total_tokens"]
    asyncio.run(run_all())
    info = idle(http)
    assert (info["running"], info["waiting"], info["tickets"]) == (0, 0, 0), info
    assert info["total_tokens"] - before < 20 * LONG // 4  # the requests were dropped, not run out
    assert (
        http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code
        == 200
    )


def test_abort_request_ends_a_running_request(server, http):
    async def run():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=60) as client:
            body = {
                "text": PROMPTS[0],
                "rid": "long-one",
                "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True},
            }
            running = asyncio.create_task(client.post("/generate", json=body))
            while (await client.get("/get_server_info")).json()["running"] == 0:
                await asyncio.sleep(0.01)
            aborted = await client.post("/abort_request", json={"rid": "long-one"})
            return aborted, await running

    aborted, out = asyncio.run(run())
    assert aborted.status_code == 200 and aborted.json()["aborted_tickets"] == 1
    assert out.json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(out.json()["output_ids"]) < LONG
    assert idle(http)["running"] == 0


def test_sigterm_aborts_running_requests_and_exits_cleanly(pair, tmp_path):
    log = tmp_path / "server.log"
    url, process = start_server(pair, log, "--shutdown-timeout", "0.5")
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": LONG, "ignore_eos": True, "n": 8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        process.send_signal(signal.SIGTERM)
        events = sse_events(lines)
    reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]]
    assert len(reasons) == 8 and "abort" in reasons
    assert process.wait(timeout=30) == 0, log.read_text()[-3000:]


def test_weights_update_from_disk_between_steps(http, pair):
    before = http.get("/get_weight_version").json()["weight_version"]
    done = http.post("/update_weights_from_disk", json={"model_path": pair[0]}).json()
    assert done["success"] and done["weight_version"] == before + 1
    assert http.get("/get_weight_version").json()["weight_version"] == before + 1
    out = http.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}}).json()
    assert out["meta_info"]["weight_version"] == before + 1
    refused = http.post("/update_weights_from_disk", json={"model_path": "/nonexistent/model"})
    assert refused.status_code == 400 and not refused.json()["success"]


def broadcast_state_dict(port: int, path: str) -> None:
    """A trainer's rank 0 (spawned): join the server's weights group, broadcast every tensor."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from optimal_sampling.distributed.weights import destroy_weights_group, init_weights_update_group

    torch.set_num_threads(1)
    group = init_weights_update_group("127.0.0.1", port, 0, 2, "trainer")
    for tensor in AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().values():
        dist.broadcast(tensor, group=group.group, group_src=0)
    destroy_weights_group(group)


def test_weights_update_from_a_trainer_broadcast(http, pair, engine, model_root, tiny_tokenizer):
    """The trainer joins /init_weights_update_group over gloo and broadcasts another base model's
    state dict (/update_weights_from_distributed); the next /generate samples what an offline
    sampler on that model samples. The server's base is put back from disk afterwards."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from conftest import build_model
    from transformers import AutoModelForCausalLM

    other = build_model(model_root / "llama-base-trained", tiny_tokenizer, "llama", seed=7)
    sent = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).state_dict()
    port = free_port()
    trainer = multiprocessing.get_context("spawn").Process(
        target=broadcast_state_dict, args=(port, str(other))
    )
    trainer.start()
    join = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": "trainer", "backend": "gloo"}  # fmt: skip
    update = {"names": list(sent), "dtypes": ["float32"] * len(sent), "shapes": [list(t.shape) for t in sent.values()],
              "group_name": "trainer"}  # fmt: skip
    try:
        with ThreadPoolExecutor(1) as pool:  # the group forms only once the trainer joins too
            joined = pool.submit(http.post, "/init_weights_update_group", json=join).result(timeout=120)
        assert joined.json()["success"], joined.text
        done = http.post("/update_weights_from_distributed", json=update)
        assert done.json()["success"], done.text
        got = http.post("/generate", json={"text": PROMPTS[1], "sampling_params": {"max_new_tokens": 6, "seed": 9},
                                           "return_logprob": True}).json()  # fmt: skip
        want = (
            OptimalSampler(str(other), pair[1], device="cpu", engine=engine)
            .generate(PROMPTS[1], max_tokens=6, seed=9)
            .samples[0]
        )
        same_sample(got["output_ids"], [e[0] for e in got["meta_info"]["output_token_logprobs"]], want)
        assert got["meta_info"]["weight_version"] == done.json()["weight_version"]
        again = http.post("/update_weights_from_distributed", json={**update, "group_name": "nobody"})
        assert again.status_code == 400 and "init_weights_update_group" in again.json()["message"]
    finally:
        trainer.join(60)
        assert http.post("/update_weights_from_disk", json={"model_path": pair[0]}).json()["success"]
    assert trainer.exitcode == 0


def test_pause_and_continue_generation(http):
    assert http.post("/pause_generation").json()["success"]
    with httpx.Client(base_url=str(http.base_url), headers=AUTH, timeout=60) as other:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                other.post, "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 3}}
            )
            time.sleep(1.0)
            assert not pending.done()  # held while paused
            assert http.post("/continue_generation").json()["success"]
            assert pending.result(timeout=60).status_code == 200


# ------------------------------------------------------------------------------ bad requests


GOOD = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
BAD = [  # (path, body: dict or raw text, status, the field the error names)
    ("/v1/completions", '{"model": "tiny-mix", "prompt": ', 400, "body"),
    ("/v1/completions", {**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}], "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/generate", {"sampling_params": {}}, 400, "text"),
    ("/generate", {"input_ids": [1, -5]}, 400, "input_ids"),
    ("/generate", {"input_ids": [True, 2]}, 400, "input_ids"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 0}}, 400, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "a", "sampling_params": {"temperature": "hot"}}, 400, "sampling_params.temperature"),
    ("/generate", {"text": ["a", "b"], "sampling_params": [{}]}, 400, "sampling_params"),
    ("/score", {"text": "a"}, 400, "output_text"),
    ("/score", {"text": "a", "output_ids": [1000]}, 400, "output_ids"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(http, path, body, status, param):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, str)
        else {"json": body}
    )
    response = http.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and error["message"], error  # e.g. input_ids.0
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_a_bad_api_key_is_refused(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server}/v1/completions", json=GOOD, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["param"] == "authorization"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_serve_without_the_extra_says_which_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # find_spec then reports it missing
    assert main(["serve", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimal-sampling[serve]" in err and "fastapi" in err


def test_serve_rejects_bad_warmup_temperatures_in_one_line(capsys):
    for bad in ("-1", "0.7,warm", "inf"):
        assert main(["serve", "--device", "cpu", "--warmup-temperatures", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--warmup-temperatures" in err and bad.split(",")[-1] in err, (
            err
        )


def test_warm_temperatures_warms_each_given_temperature():
    """The engine process warms the server's extra temperatures (and nothing without any)."""
    from optimal_sampling.server.engine_process import warm_temperatures

    calls = []

    class Recorder:
        def warmup(self, settings):
            calls.append([p.temperature for p in settings])

    warm_temperatures(Recorder(), ())
    warm_temperatures(Recorder(), (0.0, 0.7))
    assert calls == [[0.0, 0.7]]


def test_serve_with_a_missing_model_fails_in_one_line(capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    argv = ["serve", "--base", missing, "--teacher", missing, "--device", "cpu", "--port", str(free_port())]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-model" in err, err
