"""The data-parallel launcher (`--data-parallel N`, N > 1): worker subprocesses on one host.

It holds the output's lock (`lock.py`) for the whole run and makes every check a single-process run
makes (options, input, output path, resumability, both tokenizers, prompt lengths, --tp-size, the
GPU count) before any worker starts, writes the output's sidecar, starts one worker per rank that
has work left (`python -m optimal_sampling` with the same arguments plus hidden
`--dp-rank/--dp-world`), each with its own GPUs in CUDA_VISIBLE_DEVICES, shows aggregate progress
from the workers' stdout, stops them all when one dies (a worker's input error is reported as
such, exit 2; anything else as resumable, exit 1), and merges the shards into the output when all
succeed.

Invariants:
- A worker writes only its shard; only the launcher writes the output and the sidecar.
- NVLink multicast stays off (NO_MULTICAST) in every process started here.
- Processes are subprocesses of our own CLI, not torch.multiprocessing: the GPU pinning is in
  the environment before the child imports torch, exit codes and signals are the OS's, the same
  code path serves torchrun ranks, and it works without the package installed (PYTHONPATH).
"""

from __future__ import annotations

import glob
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..distributed.environment import child_env, cpu_count, disable_nvlink_multicast, uses_cuda
from ..errors import UsageError
from .dp_shard import Role, shard_remaining
from .generate import (
    PROG,
    GenerateOptions,
    check_models,
    finish_output,
    lock_output,
    nothing_to_do,
    prepare,
)

STOP_GRACE_S = 10.0
POLL_S = 0.2
USAGE_EXIT = 2  # the CLI's status for a mistake in the command or the input


@dataclass
class Worker:
    rank: int
    process: subprocess.Popen
    log: Path


def run_launcher(options: GenerateOptions, role: Role) -> int:
    with lock_output(options.output):
        return _launch(options, role)


def _launch(options: GenerateOptions, role: Role) -> int:
    from .store import start_fresh, write_meta

    # 1. every check, before anything is started or touched
    disable_nvlink_multicast()
    setup = prepare(options)
    job = setup.job
    if job.remaining == 0:
        return nothing_to_do(job)
    check_models(setup)
    gpus = gpu_plan(options.engine.device, role.world, options.parallel.tp_size)
    ranks = [r for r in range(role.world) if shard_remaining(setup, r, role.world) > 0]
    # 2. the output's sidecar (and --overwrite), then the workers
    if options.overwrite:
        start_fresh(job.plan)
    if options.overwrite or not job.state.meta_ok:
        write_meta(job.plan, job.meta)
    workers = start_workers(options, ranks, role.world, gpus, job.plan)
    # 3. wait, then merge
    sink = AggregateProgress(options, job.total, job.total - job.remaining)
    failure = supervise(workers, sink)
    if failure is not None:
        return report_failure(failure)
    finish_output(job)
    for log in job.plan.target.parent.glob(f"{glob.escape(job.plan.target.name)}.rank*.log"):
        log.unlink(missing_ok=True)
    if not options.quiet:
        print(f"{PROG}: {sink.summary()}", file=sys.stderr)
        print(f"{PROG}: wrote {sink.samples} samples to {job.plan.target} "
              f"({len(workers)} data-parallel workers)", file=sys.stderr)  # fmt: skip
    return 0


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def gpu_plan(device: str, world: int, tp_size: int) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES of each rank (rank r gets GPUs r*T .. r*T+T-1), or None for CPU workers."""
    if not uses_cuda(device, "with --data-parallel give auto, cuda or cpu; each worker gets its own GPU"):
        return None  # cpu, or auto on a machine without CUDA ("cuda" was refused by the checks already)
    gpus = visible_gpus()
    need = world * tp_size
    if need > len(gpus):
        raise UsageError(
            f"--data-parallel {world} with --tp-size {tp_size} needs {need} GPUs; {len(gpus)} visible"
        )
    return [",".join(gpus[r * tp_size : (r + 1) * tp_size]) for r in range(world)]


def worker_env(gpus: str | None, world: int) -> dict[str, str]:
    """The launcher's environment, with the worker's GPUs, a fair share of the CPU threads, no
    NVLink multicast, no torchrun variables, and this package importable without installation."""
    return child_env(gpus=gpus, threads=cpu_count() // world)


def worker_command(options: GenerateOptions, rank: int, world: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "optimal_sampling",
        *options.argv,
        "--dp-rank",
        str(rank),
        "--dp-world",
        str(world),
    ]


def start_workers(
    options: GenerateOptions, ranks: list[int], world: int, gpus: list[str] | None, plan
) -> list[Worker]:
    """One worker per rank; if one cannot be started, those already running are stopped."""
    workers: list[Worker] = []
    try:
        for rank in ranks:
            workers.append(start_worker(options, rank, world, gpus, plan))
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def start_worker(options: GenerateOptions, rank: int, world: int, gpus: list[str] | None, plan) -> Worker:
    log = plan.target.with_name(f"{plan.target.name}.rank{rank}.log")
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            worker_command(options, rank, world), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            env=worker_env(gpus[rank] if gpus else None, world),
        )  # fmt: skip
    return Worker(rank, process, log)


@dataclass
class RankStats:
    ready_at: float | None = None
    last_at: float | None = None
    tokens: int = 0

    def rate(self) -> float:
        span = (self.last_at or 0.0) - (self.ready_at or 0.0)
        return self.tokens / span if self.ready_at is not None and span > 0 else 0.0


class AggregateProgress:
    """The launcher's view of all workers' reports. The progress clock starts when a first
    worker is ready (its models are loaded), so the rate counts sampling, not start-up; per rank,
    the tokens and the time from its `ready` to its last report give its own sampling rate."""

    def __init__(self, options: GenerateOptions, total: int, done: int):
        self.options, self.total, self.done = options, total, done
        self.progress = None
        self.samples = 0
        self.ranks: dict[int, RankStats] = {}

    def handle(self, rank: int, line: str) -> None:
        word, _, value = line.strip().partition(" ")
        stats = self.ranks.setdefault(rank, RankStats())
        stats.last_at = time.monotonic()
        if word == "ready":
            stats.ready_at = stats.last_at
            self._start()
        elif word == "tokens" and value.isdigit():
            stats.tokens += int(value)
            if self.progress is not None:
                self.progress.add_tokens(int(value))
        elif word == "samples" and value.isdigit():
            self.samples += int(value)
            for _ in range(int(value) if self.progress is not None else 0):
                self.progress.add_sample()

    def _start(self) -> None:
        if self.progress is None and not self.options.quiet:
            from .progress import Progress

            self.progress = Progress(self.total, self.done, interval_s=self.options.log_interval)

    def summary(self) -> str:
        """One line: the sum of the ranks' sampling rates, and each rank's."""
        rates = {rank: stats.rate() for rank, stats in sorted(self.ranks.items())}
        each = ", ".join(f"rank {rank} {rate:.1f}" for rank, rate in rates.items())
        return f"sampling rate {sum(rates.values()):.1f} tok/s summed over {len(rates)} workers ({each})"

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


@dataclass(frozen=True)
class WorkerFailure:
    message: str
    input_error: bool  # the worker refused its input or options (exit 2): a rerun would fail again


def report_failure(failure: WorkerFailure) -> int:
    """One line on stderr; the exit code: 2 for an input error, else 1 (a rerun resumes)."""
    if failure.input_error:
        print(f"{PROG}: error: {failure.message}", file=sys.stderr)
        return 2
    print(f"{PROG}: error: {failure.message}; finished samples are kept, run the same command again to resume",
          file=sys.stderr)  # fmt: skip
    return 1


def supervise(workers: list[Worker], sink: AggregateProgress) -> WorkerFailure | None:
    """Relay reports until every worker has exited; on the first failure stop the others and
    return what happened to it (None when all succeeded)."""
    events: queue.Queue[tuple[int, str]] = queue.Queue()
    readers = [
        threading.Thread(target=_read_lines, args=(w.rank, w.process.stdout, events), daemon=True)
        for w in workers
    ]
    for reader in readers:
        reader.start()
    live = list(workers)
    try:
        while live:
            _drain(events, sink, POLL_S)
            for worker in list(live):
                code = worker.process.poll()
                if code is not None and code != 0:
                    stop_workers(live)
                    return describe_failure(worker, code)
                if code == 0:
                    live.remove(worker)
        for reader in readers:
            reader.join()
        _drain(events, sink, 0.0)
        return None
    finally:
        stop_workers(live)
        sink.close()


def _read_lines(rank: int, stream: IO[bytes], events: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        events.put((rank, raw.decode("utf-8", "replace")))
    stream.close()


def _drain(events: queue.Queue, sink: AggregateProgress, wait_s: float) -> None:
    try:
        rank, line = events.get(timeout=wait_s) if wait_s > 0 else events.get_nowait()
        while True:
            sink.handle(rank, line)
            rank, line = events.get_nowait()
    except queue.Empty:
        return


def stop_workers(workers: list[Worker], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live worker, SIGKILL those still there after `grace_s`."""
    running = [w for w in workers if w.process.poll() is None]
    for worker in running:
        worker.process.terminate()
    deadline = time.monotonic() + grace_s
    for worker in running:
        try:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


def describe_failure(worker: Worker, code: int) -> WorkerFailure:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return WorkerFailure(f"data-parallel worker rank {worker.rank} died (signal {-code}, {name})", False)
    last = _last_line(worker.log).removeprefix(f"{PROG}: error: ")
    if code == USAGE_EXIT:
        return WorkerFailure(f"data-parallel worker rank {worker.rank} stopped on an input error: {last} "
                             f"(log {worker.log})", True)  # fmt: skip
    said = f": {last}" if last else ""
    return WorkerFailure(
        f"data-parallel worker rank {worker.rank} failed (exit code {code}{said}; log {worker.log})", False
    )


def _last_line(path: Path, limit: int = 1 << 14) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""
