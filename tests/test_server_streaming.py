"""The server's streaming path under load: packed engine messages, paced (coalesced) chunks, the
tokenizing shortcuts, and the fake engine of the load benchmark. Unit tests in this process, and
one server (tiny models, CPU) whose streams are paced far apart, so that each chunk carries many
tokens: every token and every log-prob must still arrive once, in order."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import numpy as np
import pytest

from optimal_sampling import OptimalSampler
from optimal_sampling.config import SamplingParams
from optimal_sampling.outputs import Sample
from optimal_sampling.runtime.requests import PromptIds, StopRules, requests_from_ids
from optimal_sampling.runtime.scheduler import Scheduler
from optimal_sampling.runtime.service import Failed, Finished, Tokens

pytest.importorskip("fastapi")

from test_server import AUTH, MODEL, PROMPTS, sse_events, start_server, stop_cleanly  # noqa: E402

from optimal_sampling.server.bridge import TicketEvents, auto_interval, gather_rows  # noqa: E402
from optimal_sampling.server.engine_process import pack, unpack_block  # noqa: E402
from optimal_sampling.server.fake_engine import FakeSpec  # noqa: E402
from optimal_sampling.server.tokenizing import fast_encoder, same_tokenizer  # noqa: E402

# ------------------------------------------------------------------------------ units


def tokens(ticket: int, index: int, ids: list[int], lps: list[float], **extra) -> Tokens:
    return Tokens(ticket, index, ids, {"logprob_q": lps, **extra})


def test_packed_rows_come_back_per_request_in_order():
    events = [
        tokens(7, 0, [5], [-0.5]),
        tokens(7, 1, [8, 9], [-1.0, -2.0]),  # admission and decode in one step: two tokens
        tokens(9, 0, [3], [float("-inf")], alpha=[0.25]),  # another set of columns: another block
        Failed(4, "boom"),
        tokens(11, 0, [1], [None], weight_version=[1 << 70]),  # not floats, not 64-bit ints: lists
    ]
    blocks, others = pack(events)
    assert others == [Failed(4, "boom")] and len(blocks) == 3
    assert unpack_block(blocks[2]) == ([11], [0], [1], {"logprob_q": [None], "weight_version": [1 << 70]})
    blocks = blocks[:2]
    unpacked = [unpack_block(b) for b in blocks]
    first, second = unpacked
    assert second == ([9], [0], [3], {"logprob_q": [float("-inf")], "alpha": [0.25]})
    # ticket 7's requests are 10 and 11 of the HTTP request, ticket 9's is 12; a later step
    # gives request 11 one more token
    rows = [(first, [0, 1, 2], 10), (second, [0], 12), (first, [1], 10)]
    got = gather_rows(rows)
    assert got[10] == tokens(7, 10, [5], [-0.5])
    assert got[11] == tokens(7, 11, [8, 9, 8], [-1.0, -2.0, -1.0])
    assert got[12] == tokens(9, 12, [3], [float("-inf")], alpha=[0.25])
    assert type(got[11].tokens[0]) is int and list(got) == [10, 11, 12]


def sample(ids: list[int]) -> Sample:
    lps = [-1.0] * len(ids)
    return Sample(0, 0, "", "", "x", ids, "length", lps, lps, lps)


def test_paced_reads_take_the_first_tokens_and_the_end_at_once():
    async def run() -> list[tuple[float, list, list]]:
        pace = 0.3
        stream = TicketEvents([1], {1: 0}, 1, lambda: pace)
        block = unpack_block(pack([tokens(1, 0, [4], [-1.0])])[0][0])
        loop = asyncio.get_running_loop()
        start, seen = loop.time(), []

        def push(event=None) -> None:
            stream.push_rows(block, [0], 1) if event is None else stream.push(event)
            stream.wake(loop.time())

        for at in (0.0, 0.05, 0.1, 0.15):  # one token now, three within the pace
            loop.call_later(at, push)
        loop.call_later(0.5, push)
        loop.call_later(0.55, push, Finished(1, 0, sample([4] * 5)))
        async for batch in stream.batches():
            seen.append((loop.time() - start, [t.tokens for t in batch.tokens], batch.finished))
        return seen

    seen = asyncio.run(run())
    # the token of 0.5 s is not due before 0.6 s: the end (at 0.55 s) carries it in its sample
    assert [s[1] for s in seen] == [[[4]], [[4, 4, 4]], []], seen
    assert seen[0][0] < 0.1  # the first token: at once
    assert 0.29 < seen[1][0] < 0.45  # the next three: one chunk, a pace later
    assert seen[-1][2] and seen[-1][0] < 0.59  # the end: at once, not when due


def test_auto_interval_grows_with_the_open_streams():
    assert auto_interval(0) == 0.0 and auto_interval(4) < 0.002
    assert 0.05 < auto_interval(256) < 0.1


def test_one_tokenizer_for_a_pair_with_the_same_files(tiny_tokenizer, model_root, tmp_path):
    source = model_root / "tokenizer"
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    assert same_tokenizer(str(source), str(copy))
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "model_max_length": 7}', 1))
    assert not same_tokenizer(str(source), str(copy))
    assert not same_tokenizer(str(source), str(tmp_path))  # no tokenizer files at all


def test_fast_encoder_gives_what_the_tokenizer_gives(tiny_tokenizer):
    encode = fast_encoder(tiny_tokenizer)
    for text in PROMPTS + ["<|endoftext|>Hi <pad>", "  spaces\n\nand ünïcödé"]:
        assert encode(text) == tiny_tokenizer(text)["input_ids"]


def test_fake_engine_tokens_do_not_depend_on_the_batch(tiny_tokenizer, model_root):
    spec = FakeSpec(str(model_root / "tokenizer"), max_batch_size=4, step_ms=0.0, prefill_us_per_token=0.0)
    sampler = spec.load_sampler()
    pairs = [PromptIds((5, 6, 7), (5, 6, 7)) for _ in range(6)]

    def run(count: int) -> list[list[int]]:
        requests = requests_from_ids(pairs[:count], range(count), 1, 9, 3, 4096, sampler.vocab_size)
        checker = StopRules(ignore_eos=True).checker(tiny_tokenizer, sampler.eos_ids)
        scheduler = Scheduler(sampler.engine, sampler.mix, SamplingParams(max_tokens=9), checker)
        scheduler.add(requests)
        return sorted((s.prompt_index, s.token_ids) for s in scheduler.run())

    alone, together = run(1), run(6)
    assert alone[0] == together[0] and len(together) == 6 and all(len(t[1]) == 9 for t in together)
    texts = [tiny_tokenizer.decode([t]) for _, ids in together for t in ids]
    assert all(t.isascii() and t.isprintable() for t in texts)


# ------------------------------------------------------------------------------ a paced server

PACE_MS = 150.0


@pytest.fixture(scope="module")
def paced(tiny_pair, tmp_path_factory):
    pair = tiny_pair("llama")
    log = tmp_path_factory.mktemp("paced") / "server.log"
    url, process = start_server(
        pair, log, "--stream-interval-ms", str(PACE_MS), "--seed", "0", "--warmup-temperatures", "0,0.7"
    )
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield pair, client
    stop_cleanly(process, log)


def streamed(client: httpx.Client, path: str, body: dict) -> tuple[list[dict], list[float]]:
    """The events of a stream and when each came (seconds from the request)."""
    start, times, lines = time.perf_counter(), [], []
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data: "):
                times.append(time.perf_counter() - start)
    return sse_events(lines), times


def test_paced_chunks_carry_every_token_and_logprob_in_order(paced, one_torch_thread):
    pair, client = paced
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 48, "seed": 5, "n": 2, "logprobs": 1}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    events, _ = streamed(client, "/v1/completions", body)
    offline = OptimalSampler(pair[0], pair[1], device="cpu", engine="reference")
    want = offline.generate(PROMPTS[1], max_tokens=48, seed=5, n=2).samples
    for index in (0, 1):
        chunks = [c for e in events for c in e["choices"] if c["index"] == index]
        ids = [t for c in chunks for t in c["token_ids"]]
        assert ids == whole[index]["token_ids"] == want[index].token_ids
        for name in ("logprobs_q", "logprobs_base", "logprobs_teacher"):
            got = [v for c in chunks for v in c[name]]
            np.testing.assert_allclose(got, getattr(want[index], name), atol=1e-4)
            assert got == whole[index][name]  # the same floats as the whole response
        assert [v for c in chunks for v in c["logprobs"]["token_logprobs"]] == whole[index]["logprobs"][
            "token_logprobs"
        ]
        assert [v for c in chunks for v in c["logprobs"]["text_offset"]] == whole[index]["logprobs"][
            "text_offset"
        ]
        assert "".join(c["text"] for c in chunks) == whole[index]["text"]
        assert max(len(c["token_ids"]) for c in chunks) > 1  # paced: chunks of several tokens
        assert chunks[-1]["finish_reason"] == whole[index]["finish_reason"] == want[index].finish_reason


def test_paced_generate_stream_ends_with_the_whole_output(paced):
    _, client = paced
    body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 40, "seed": 6, "ignore_eos": True},
            "return_logprob": True}  # fmt: skip
    whole = client.post("/generate", json=body).json()
    events, times = streamed(client, "/generate", body)
    ids = [e["output_ids"] for e in events]
    assert all(a == b[: len(a)] for a, b in zip(ids, ids[1:]))  # cumulative, as SGLang streams
    assert events[-1]["output_ids"] == whole["output_ids"]
    assert events[-1]["meta_info"]["output_token_logprobs"] == whole["meta_info"]["output_token_logprobs"]
    gaps = np.diff(times[:-2])  # between chunks of new tokens (the end comes at once)
    assert len(events) < 40 and (len(gaps) == 0 or gaps.min() > PACE_MS / 1000 * 0.8)
