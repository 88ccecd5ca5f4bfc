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
   a warm-up round, then N clients (asyncio + httpx, one connection each, spread over
   --client-processes processes so that the load generator is not what limits) stream
   /v1/completions (seeded, ignore_eos) until --requests prompts are done. Reported: tokens/s
   (tokens / wall time of the round), time to first token and inter-token latency percentiles
   (a chunk of k tokens counts its gap / k for each), tokens per chunk, errors (HTTP status,
   exceptions, error events), lost requests (no [DONE] or fewer tokens than asked).
Target (issue 16): at 256 concurrent requests the server keeps >= 80 % of the offline rate,
with 0 errors and 0 lost requests. Prints a table, then one JSON line last.

    PYTHONPATH=src python3 benchmarks/bench_serve.py [--concurrency 1,64,256] [--requests 1024] [--quick]

`--quick` runs tiny models on the CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import socket
import string
import subprocess
import sys
import tempfile
import time
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
    p.add_argument("--offline-child", default=None, help=argparse.SUPPRESS)  # JSON file: run the offline part
    args = p.parse_args()
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


# ---------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, pair, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [
        sys.executable, "-m", "optimal_sampling", "serve", "--base", str(pair[0]), "--teacher", str(pair[1]),
        "--device", args.device, "--engine", args.engine, "--batch-size", str(args.batch_size),
        "--port", str(port), "--served-model-name", MODEL, "--log-level", "warning", "--seed", "0",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server did not start in {args.startup_timeout_s} s: {log.read_text()[-3000:]}")


@dataclass
class Record:
    ttft: float | None = None
    gaps: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the last chunk, tokens)
    tokens: int = 0
    done: bool = False
    error: str | None = None


async def stream_one(client, prompt: str, max_tokens: int, seed: int) -> Record:
    record = Record()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "ignore_eos": True}  # fmt: skip
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    record.done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = str(chunk["error"])
                    continue
                count = len(chunk["choices"][0].get("token_ids", [])) if chunk["choices"] else 0
                now = time.perf_counter()
                if count:
                    if record.ttft is None:
                        record.ttft = now - start
                    else:
                        record.gaps.append((now - last, count))
                    last = now
                    record.tokens += count
    except Exception as err:  # a load test counts failures, it does not stop at one
        record.error = f"{type(err).__name__}: {err}"
    return record


async def load_share(
    url: str, prompts: list[tuple[int, str]], concurrency: int, max_tokens: int
) -> tuple[list[Record], float, float]:
    """One client process's share: `concurrency` clients, each streaming requests (index i, prompt)
    until none are left; (records, start, end) on the machine's monotonic clock."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for item in prompts:
        queue.put_nowait(item)
    records: list[Record] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client) -> None:
        while not queue.empty():
            i, prompt = queue.get_nowait()
            records.append(await stream_one(client, prompt, max_tokens, seed=i))

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.monotonic()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        end = time.monotonic()
    return records, start, end


def run_share(url: str, prompts: list[tuple[int, str]], concurrency: int, max_tokens: int):
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
    if args.base and args.teacher:
        return Path(args.base), Path(args.teacher)
    import torch
    from bench_data_parallel import build_pair

    pair = build_pair(root, args.quick, args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return pair


def main() -> None:
    args = parse_args()
    if args.offline_child:
        run_offline(args.offline_child)
        return
    from bench_data_parallel import child_env

    levels = [int(c) for c in args.concurrency.split(",")]
    result = {
        "bench": "serve", "requests": args.requests, "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens, "batch_size": args.batch_size, "device": args.device,
        "models": args.base and f"{args.base} / {args.teacher}" or ("tiny" if args.quick else
                  "qwen2.5-0.5b/1.5b shapes, random weights, bf16"),
        "target_share": TARGET_SHARE, "client_processes": args.client_processes,
    }  # fmt: skip
    prompts = make_prompts(args.requests, args.prompt_tokens)
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        pair = build_models(args, root)
        result.update(offline(args, pair, prompts, root, env))
        process, url = start_server(args, pair, env, root / "server.log")
        try:
            runs = []
            for concurrency in levels:
                warm = prompts[: min(len(prompts), 2 * max(concurrency, args.batch_size))]
                load_round(url, warm, concurrency, args.max_tokens, args.client_processes)
                records, wall = load_round(url, prompts, concurrency, args.max_tokens, args.client_processes)
                runs.append(summarize(records, wall, concurrency, args.max_tokens, result["offline_tok_s"]))
                print_run(runs[-1])
        finally:
            process.terminate()
            process.wait(timeout=60)
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
        f"errors {run['errors']}, lost {run['lost']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
