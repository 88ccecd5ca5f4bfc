"""Serving under load: N concurrent streaming clients against `optimal-sampling serve`, against
offline `OptimalSampler.generate` on the same prompts, in the same run (issue 16).

Random-weight models with the real Qwen2.5-0.5B (base) / Qwen2.5-1.5B (teacher) shapes and a
synthetic byte-level BPE of the real vocabulary width (bench_data_parallel's, no EOS inside the
logit width, so every request runs to max_tokens), saved once in a temporary directory; or
`--base/--teacher` directories. Server and clients run on this machine:
1. offline: in a child process, `generate` on all prompts with max_batch_size = --batch-size,
   after a warm-up call on 2 x batch prompts (CUDA graphs captured, as the server's warm-up
   does); tokens/s = tokens / the timed call;
2. the server: `optimal-sampling serve` in a child process; per concurrency N in --concurrency,
   a warm-up round, then N clients (asyncio, one keep-alive connection each, spread over
   --client-processes processes so that the load generator is not what limits) stream
   /v1/completions (seeded, ignore_eos) until --requests prompts are done. Reported: tokens/s
   (tokens / wall time of the round), time to first token and inter-token latency percentiles
   (a chunk of k tokens counts its gap / k for each), tokens per chunk, errors (HTTP status,
   exceptions, error events), lost requests (no [DONE] or fewer tokens than asked), and the
   CPU time the server's HTTP and engine processes spent per token served (Linux /proc; "cores":
   that time over the round's wall time). `--py-spy PREFIX` also samples both processes through
   each round (py-spy on PATH); `--stream-interval-ms` sets the server's pacing of streams.
Target (issue 16): at 256 concurrent requests the server keeps >= 80 % of the offline rate,
with 0 errors and 0 lost requests. Prints a table, then one JSON line last.

    PYTHONPATH=src python3 benchmarks/bench_serve.py [--concurrency 1,64,256] [--requests 1024] [--quick]

`--quick` runs tiny models on the CPU (a smoke test of the script).

`--fake-engine` loads the HTTP side alone, on any machine: the server's engine process runs the
real service and scheduler over `server.fake_engine` (no models: a simulated device that takes
--fake-step-ms per decode step of up to --batch-size rows and --fake-prefill-us per prompt
token, and draws tokens from a hash), and "offline" is the same fake engine under a plain
`Scheduler` in this process. The share then measures what the HTTP side costs.

    PYTHONPATH=src python3 benchmarks/bench_serve.py --fake-engine [--fake-step-ms 10] [--concurrency 256]

The clients speak HTTP/1.1 on raw asyncio streams and count a chunk's tokens from its
`token_ids` without parsing the whole JSON, so that the load generator costs little next to the
server (httpx and json.loads per chunk cost about what the server spends on a chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TARGET_SHARE = 0.8
MODEL = "bench"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="256", help="comma-separated client counts (default 256)")
    p.add_argument("--requests", type=int, default=1024, help="requests per round (default 1024)")
    p.add_argument(
        "--prompt-tokens", type=int, default=128, help="about this many prompt tokens (default 128)"
    )
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per request (default 256)")
    p.add_argument(
        "--batch-size", type=int, default=256, help="server and offline max_batch_size (default 256)"
    )
    p.add_argument("--engine", default="auto", help="auto, fast or reference (default auto)")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--base", default=None, help="a model directory instead of random Qwen2.5-0.5B shapes")
    p.add_argument("--teacher", default=None, help="a model directory instead of random Qwen2.5-1.5B shapes")
    p.add_argument("--client-processes", type=int, default=4, help="processes the clients run in (default 4)")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    p.add_argument("--fake-engine", action="store_true", help="no models: load the HTTP side alone")
    p.add_argument("--fake-step-ms", type=float, default=10.0, help="fake decode step time (default 10)")
    p.add_argument(
        "--fake-prefill-us", type=float, default=5.0, help="fake prefill per prompt token (default 5)"
    )
    p.add_argument("--stream-interval-ms", type=float, default=None, help="the server's (default: its own)")
    p.add_argument("--py-spy", default=None, metavar="PREFIX", help="profile the server's processes (py-spy)")
    p.add_argument("--offline-child", default=None, help=argparse.SUPPRESS)  # JSON file: run the offline part
    p.add_argument("--server-child", default=None, help=argparse.SUPPRESS)  # JSON file: serve the fake engine
    args = p.parse_args()
    if args.fake_engine:
        args.device = "cpu"
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        args.concurrency, args.requests, args.client_processes = "4", min(args.requests, 16), 2
        args.max_tokens, args.prompt_tokens, args.batch_size = (
            min(args.max_tokens, 8),
            16,
            min(args.batch_size, 8),
        )
    return args


def make_prompts(count: int, length: int) -> list[str]:
    """Random lowercase words, about `length` tokens each (the BPE takes 1-3 bytes a token)."""
    rng = random.Random(0)
    words = (
        (
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
            for _ in range(length // 2)
        )
        for _ in range(count)
    )
    return [" ".join(w) for w in words]


# ---------------------------------------------------------------------------------------- offline


def run_offline(spec_path: str) -> None:
    """The child: offline generate on the prompts, one JSON line on stdout."""
    import torch

    from optimal_sampling import OptimalSampler

    spec = json.loads(Path(spec_path).read_text())
    sampler = OptimalSampler(
        spec["base"], spec["teacher"], device=spec["device"], engine=spec["engine"],
        max_batch_size=spec["batch_size"], seed=0,
    )  # fmt: skip
    prompts, max_tokens = spec["prompts"], spec["max_tokens"]
    sampler.generate(prompts[: 2 * spec["batch_size"]], max_tokens=max_tokens)  # warm-up
    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = sampler.generate(prompts, max_tokens=max_tokens)
    wall = time.perf_counter() - start
    card = torch.cuda.get_device_name(sampler.device) if sampler.device.type == "cuda" else "cpu"
    tokens = sum(out.num_tokens)
    print(json.dumps({"offline_tok_s": tokens / wall, "offline_tokens": tokens, "offline_wall_s": wall,
                      "card": card, "engine": type(sampler.engine).__name__}))  # fmt: skip


def offline(args, pair, prompts: list[str], root: Path, env: dict) -> dict:
    spec = root / "offline.json"
    spec.write_text(json.dumps({
        "base": str(pair[0]), "teacher": str(pair[1]), "device": args.device, "engine": args.engine,
        "batch_size": args.batch_size, "prompts": prompts, "max_tokens": args.max_tokens,
    }))  # fmt: skip
    done = subprocess.run(
        [sys.executable, __file__, "--offline-child", str(spec)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"offline generate failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fake_spec(args, tokenizer_path: Path):
    from optimal_sampling.server.fake_engine import FakeSpec

    return FakeSpec(str(tokenizer_path), args.batch_size, args.fake_step_ms, args.fake_prefill_us, seed=0)


def fake_offline(args, tokenizer_path: Path, prompts: list[str]) -> dict:
    """The fake engine under a plain Scheduler in this process: what the server is measured against."""
    from optimal_sampling.config import SamplingParams
    from optimal_sampling.runtime.requests import PromptIds, StopRules, requests_from_ids
    from optimal_sampling.runtime.scheduler import Scheduler

    spec = fake_spec(args, tokenizer_path)
    sampler = spec.load_sampler()
    tokenizer = sampler.base.tokenizer
    ids = [tuple(i) for i in tokenizer(prompts)["input_ids"]]
    pairs = [PromptIds(i, i, p, p) for i, p in zip(ids, prompts)]
    requests = requests_from_ids(
        pairs, range(len(pairs)), 1, args.max_tokens, 0, spec.max_context, sampler.vocab_size
    )
    checker = StopRules(ignore_eos=True).checker(tokenizer, sampler.eos_ids)
    scheduler = Scheduler(sampler.engine, sampler.mix, SamplingParams(max_tokens=args.max_tokens), checker)
    scheduler.add(requests)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(sample.token_ids) for sample in scheduler.run())
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"offline_tok_s": tokens / wall, "offline_tokens": tokens, "offline_wall_s": wall,
            "offline_cpu_us_per_token": round(cpu / tokens * 1e6, 1), "card": "cpu",
            "engine": f"FakeEngine ({args.fake_step_ms} ms/step)"}  # fmt: skip


def run_fake_server(spec_path: str) -> None:
    """The child: `run_server` over the fake engine (the CLI only serves real models)."""
    from optimal_sampling.server.app import run_server
    from optimal_sampling.server.fake_engine import FakeSpec
    from optimal_sampling.server.state import ServerSettings

    spec = json.loads(Path(spec_path).read_text())
    interval = spec["stream_interval_ms"]
    settings = (
        ServerSettings(MODEL) if interval is None else ServerSettings(MODEL, stream_interval_ms=interval)
    )
    run_server(FakeSpec(**spec["fake"]), settings, port=spec["port"], log_level="warning")


# ---------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as answer:
            return answer.status == 200
    except OSError:  # refused, not up yet, or a 503 (urllib's HTTPError)
        return False


def start_server(args, pair, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = server_command(args, pair, port, log.parent)
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {log.read_text()[-3000:]}")
        if healthy(url):
            return process, url
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server did not start in {args.startup_timeout_s} s: {log.read_text()[-3000:]}")


def server_command(args, pair, port: int, root: Path) -> list[str]:
    if args.fake_engine:
        spec = root / "server.json"
        fake = dataclasses.asdict(fake_spec(args, pair[0]))
        fake.pop("mix")
        spec.write_text(
            json.dumps({"fake": fake, "port": port, "stream_interval_ms": args.stream_interval_ms})
        )
        return [sys.executable, __file__, "--server-child", str(spec)]
    pace = [] if args.stream_interval_ms is None else ["--stream-interval-ms", str(args.stream_interval_ms)]
    return [
        sys.executable, "-m", "optimal_sampling", "serve", "--base", str(pair[0]), "--teacher", str(pair[1]),
        "--device", args.device, "--engine", args.engine, "--batch-size", str(args.batch_size),
        "--port", str(port), "--served-model-name", MODEL, "--log-level", "warning", "--seed", "0", *pace,
    ]  # fmt: skip


@dataclass
class Record:
    ttft: float | None = None
    gaps: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the last chunk, tokens)
    tokens: int = 0
    last: float = 0.0  # when the last chunk came
    done: bool = False
    error: str | None = None


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams (reopened after a failure)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        """Send a request; (status, headers) of the answer, its body left to `body_parts`. A kept
        connection the server has closed meanwhile is reopened once."""
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
        request = f"{head}content-length: {len(data)}\r\n\r\n".encode() + data
        while True:
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(request)
                lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                self.close()
                if fresh:
                    raise
        pairs = (line.partition(":") for line in lines[1:] if line)
        return int(lines[0].split()[1]), {k.strip().lower(): v.strip() for k, _, v in pairs}

    async def body_parts(self, headers: dict):
        """The body, chunk by chunk (one server-sent event or more each)."""
        if headers.get("transfer-encoding") != "chunked":
            yield await self.reader.readexactly(int(headers.get("content-length", 0)))
            return
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def tokens_in(event: bytes) -> int:
    """Tokens of a completion chunk: the entries of its `token_ids` list (no full JSON parse)."""
    at = event.find(b'"token_ids":[')
    if at < 0:
        return 0
    start = at + len(b'"token_ids":[')
    end = event.index(b"]", start)
    return 0 if end == start else event.count(b",", start, end) + 1


async def stream_one(conn: Connection, prompt: str, max_tokens: int, seed: int) -> Record:
    record = Record()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "ignore_eos": True}  # fmt: skip
    start = time.perf_counter()
    try:
        status, headers = await conn.post("/v1/completions", body)
        if status != 200:
            text = b"".join([part async for part in conn.body_parts(headers)])
            record.error = f"HTTP {status}: {text[:200]!r}"
            return record
        pending = b""
        async for part in conn.body_parts(headers):
            *events, pending = (pending + part).split(b"\n\n")
            for event in events:
                take_event(record, event, start)
    except Exception as err:  # a load test counts failures, it does not stop at one
        record.error = f"{type(err).__name__}: {err}"
        conn.close()
    return record


def take_event(record: Record, event: bytes, start: float) -> None:
    if event == b"data: [DONE]":
        record.done = True
    elif event.startswith(b'data: {"error"'):
        record.error = event[6:300].decode(errors="replace")
    elif event.startswith(b"data: "):
        count = tokens_in(event)
        if not count:
            return
        now = time.perf_counter()
        if record.ttft is None:
            record.ttft = now - start
        else:
            record.gaps.append((now - record.last, count))
        record.last = now
        record.tokens += count


async def load_share(
    url: str, prompts: list[tuple[int, str]], concurrency: int, max_tokens: int
) -> tuple[list[Record], float, float]:
    """One client process's share: `concurrency` clients, each streaming requests (index i, prompt)
    until none are left; (records, start, end) on the machine's monotonic clock."""
    host, port = url.removeprefix("http://").split(":")
    queue: asyncio.Queue = asyncio.Queue()
    for item in prompts:
        queue.put_nowait(item)
    records: list[Record] = []

    async def client_loop() -> None:
        conn = Connection(host, int(port))
        while not queue.empty():
            i, prompt = queue.get_nowait()
            records.append(await stream_one(conn, prompt, max_tokens, seed=i))
        conn.close()

    start = time.monotonic()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return records, start, time.monotonic()


def run_share(url: str, prompts: list[tuple[int, str]], concurrency: int, max_tokens: int):
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(load_share(url, prompts, concurrency, max_tokens))


def load_round(url: str, prompts: list[str], concurrency: int, max_tokens: int, processes: int):
    """All prompts through `concurrency` clients spread over `processes` processes; (records, wall)."""
    from concurrent.futures import ProcessPoolExecutor

    processes = max(1, min(processes, concurrency))
    items = list(enumerate(prompts))
    shares = [
        (items[p::processes], concurrency // processes + (p < concurrency % processes))
        for p in range(processes)
    ]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(run_share, url, share, clients, max_tokens) for share, clients in shares]
        results = [f.result() for f in futures]
    records = [r for result in results for r in result[0]]
    return records, max(r[2] for r in results) - min(r[1] for r in results)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def server_cpu(pid: int) -> dict[str, float] | None:
    """CPU seconds of the server's HTTP process and of its children (the engine process); None
    where /proc cannot tell."""
    try:
        return {"http": cpu_seconds(pid), "engine": sum(cpu_seconds(c) for c in children(pid))}
    except (OSError, ValueError, IndexError):
        return None


def cpu_use(before: dict | None, after: dict | None, tokens: int, wall: float) -> dict:
    """CPU per token served and CPU busy share (1.0 = one core) of each server process in a round."""
    if before is None or after is None:
        return {}
    out = {}
    for name in before:
        spent = after[name] - before[name]
        out[f"{name}_cpu_us_per_token"] = round(spent / max(1, tokens) * 1e6, 1)
        out[f"{name}_cpu_cores"] = round(spent / wall, 2)
    return out


def start_py_spy(prefix: str | None, pid: int, concurrency: int) -> list[subprocess.Popen]:
    """py-spy (on PATH) sampling the HTTP and engine processes through the round, GIL holders only,
    as raw stacks in PREFIX-N-http.txt / PREFIX-N-engine.txt."""
    if not prefix:
        return []
    pids = {"http": pid, "engine": children(pid)[0]}
    return [
        subprocess.Popen(
            [
                "py-spy",
                "record",
                "-p",
                str(p),
                "-r",
                "100",
                "--gil",
                "-f",
                "raw",
                "-o",
                f"{prefix}-{concurrency}-{name}.txt",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for name, p in pids.items()
    ]


def stop_py_spy(spies: list[subprocess.Popen]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(timeout=60)


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values) * scale, [50, 90, 99])
    return {"p50": round(float(p50), 2), "p90": round(float(p90), 2), "p99": round(float(p99), 2)}


def summarize(
    records: list[Record], wall: float, concurrency: int, max_tokens: int, offline_rate: float
) -> dict:
    tokens = sum(r.tokens for r in records)
    itl = [gap / count for r in records for gap, count in r.gaps for _ in range(count)]
    chunks = sum(len(r.gaps) + (r.ttft is not None) for r in records)
    rate = tokens / wall
    errors = sum(r.error is not None for r in records)
    lost = sum(r.error is None and (not r.done or r.tokens != max_tokens) for r in records)
    return {
        "concurrency": concurrency, "requests": len(records), "tokens": tokens, "wall_s": round(wall, 2),
        "server_tok_s": round(rate, 1), "server_vs_offline": round(rate / offline_rate, 3),
        "ttft_ms": percentiles([r.ttft for r in records if r.ttft is not None]), "itl_ms": percentiles(itl),
        "tokens_per_chunk": round(tokens / max(1, chunks), 2), "errors": errors, "lost": lost,
        "first_error": next((r.error for r in records if r.error), None),
    }  # fmt: skip


def build_models(args, root: Path):
    if args.fake_engine:  # a tokenizer of the real vocabulary width is all the fake engine reads
        from bench_data_parallel import VOCAB, build_tokenizer

        build_tokenizer(VOCAB).save_pretrained(root / "tokenizer")
        return root / "tokenizer", root / "tokenizer"
    if args.base and args.teacher:
        return Path(args.base), Path(args.teacher)
    import torch
    from bench_data_parallel import build_pair

    pair = build_pair(root, args.quick, args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return pair


def models_name(args) -> str:
    if args.fake_engine:
        return f"fake engine, {args.fake_step_ms} ms/step, {args.fake_prefill_us} us/prompt token"
    if args.base:
        return f"{args.base} / {args.teacher}"
    return "tiny" if args.quick else "qwen2.5-0.5b/1.5b shapes, random weights, bf16"


def main() -> None:
    args = parse_args()
    if args.offline_child:
        run_offline(args.offline_child)
        return
    if args.server_child:
        run_fake_server(args.server_child)
        return
    from bench_data_parallel import child_env

    result = {
        "bench": "serve", "requests": args.requests, "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens, "batch_size": args.batch_size, "device": args.device,
        "models": models_name(args),
        "target_share": TARGET_SHARE, "client_processes": args.client_processes,
        "stream_interval_ms": args.stream_interval_ms,
    }  # fmt: skip
    prompts = make_prompts(args.requests, args.prompt_tokens)
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        pair = build_models(args, root)
        if args.fake_engine:
            result.update(fake_offline(args, pair[0], prompts))
        else:
            result.update(offline(args, pair, prompts, root, env))
        process, url = start_server(args, pair, env, root / "server.log")
        try:
            runs = [
                server_round(args, process, url, prompts, int(c), result["offline_tok_s"])
                for c in args.concurrency.split(",")
            ]
        finally:
            process.terminate()
            process.wait(timeout=60)
    report(result, runs)


def server_round(args, process, url: str, prompts: list[str], concurrency: int, offline_rate: float) -> dict:
    """A warm-up round, then the measured one: its summary (printed too)."""
    warm = prompts[: min(len(prompts), 2 * max(concurrency, args.batch_size))]
    load_round(url, warm, concurrency, args.max_tokens, args.client_processes)
    before = server_cpu(process.pid)
    spies = start_py_spy(args.py_spy, process.pid, concurrency)
    records, wall = load_round(url, prompts, concurrency, args.max_tokens, args.client_processes)
    stop_py_spy(spies)
    run = summarize(records, wall, concurrency, args.max_tokens, offline_rate)
    run.update(cpu_use(before, server_cpu(process.pid), run["tokens"], wall))
    print_run(run)
    return run


def report(result: dict, runs: list[dict]) -> None:
    result["offline_tok_s"] = round(result["offline_tok_s"], 1)
    result["runs"] = runs
    top = max(runs, key=lambda r: r["concurrency"])
    result["target_met"] = (
        top["server_vs_offline"] >= TARGET_SHARE and top["errors"] == 0 and top["lost"] == 0
    )
    print(f"offline {result['offline_tok_s']} tok/s on {result['card']} ({result['engine']}); "
          f"target met: {result['target_met']}")  # fmt: skip
    print(json.dumps(result), flush=True)


def print_run(run: dict) -> None:
    print(
        f"N={run['concurrency']:>4}: {run['server_tok_s']:>10.1f} tok/s ({run['server_vs_offline']:.1%} of offline), "
        f"TTFT p50/p99 {run['ttft_ms']['p50']}/{run['ttft_ms']['p99']} ms, "
        f"ITL p50/p99 {run['itl_ms']['p50']}/{run['itl_ms']['p99']} ms, {run['tokens_per_chunk']} tok/chunk, "
        f"errors {run['errors']}, lost {run['lost']}; server CPU us/token: HTTP "
        f"{run.get('http_cpu_us_per_token')} ({run.get('http_cpu_cores')} cores), engine "
        f"{run.get('engine_cpu_us_per_token')} ({run.get('engine_cpu_cores')} cores)",
        flush=True,
    )


if __name__ == "__main__":
    main()
