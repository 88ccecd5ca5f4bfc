"""Data-parallel `generate`: N worker processes on one host, or one rank of a torchrun job.

Three roles, chosen from the command line and the environment (`role_of`):
- launcher (`--data-parallel N`, N > 1): holds the output's lock (`lock.py`) for the whole run and
  makes every check a single-process run makes (options, input, output path, resumability, both
  tokenizers, prompt lengths, --tp-size, the GPU count) before any worker starts,
  writes the output's sidecar, starts one worker per rank that has work left (`python -m
  optimal_sampling` with the same arguments plus hidden `--dp-rank/--dp-world`), each with its own
  GPUs in CUDA_VISIBLE_DEVICES, shows aggregate progress from the workers' stdout, stops them all
  when one dies (a worker's input error is reported as such, exit 2; anything else as resumable,
  exit 1), and merges the shards into the output when all succeed.
- worker (the hidden flags): samples its share into `<output>.rank<r>.jsonl` and reports
  `ready` / `tokens K` / `samples K` lines on stdout; its stderr goes to `<output>.rank<r>.log`.
- torchrun rank (RANK and WORLD_SIZE > 1 in the environment): a worker that checks for itself,
  uses cuda:LOCAL_RANK, waits for the others at a torch.distributed (gloo) barrier; rank 0 holds
  the output's lock, writes the sidecar before and merges after. The output path must be on a filesystem all nodes share.

Invariants:
- Rank r of N owns the prompts whose index % N == r, with all their samples: shards are
  disjoint, and since a sample's randomness depends only on (seed, prompt index, sample index)
  the merged output equals a single-process run's, whatever N.
- A worker writes only its shard; only the launcher (or torchrun rank 0) writes the output and
  the sidecar. Every (prompt, sample) is in the merged output exactly once (`io.merge_shards`),
  and a rerun after a crash at any point resumes from the output and all shards.
- NVLink multicast stays off (NO_MULTICAST) in every process started here, and in this process
  before torch.distributed is initialised.
- Processes are subprocesses of our own CLI, not torch.multiprocessing: the GPU pinning is in
  the environment before the child imports torch, exit codes and signals are the OS's, the same
  code path serves torchrun ranks, and it works without the package installed (PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import glob
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import IO

from ..distributed.environment import (
    child_env,
    cpu_count,
    disable_nvlink_multicast,
    exit_with_parent,
    rank_device,
    uses_cuda,
)
from ..errors import UsageError
from .generate import (
    PROG,
    CheckedModels,
    GenerateOptions,
    GenerateSetup,
    check_models,
    finish_output,
    generate_kwargs,
    load_sampler,
    lock_output,
    nothing_to_do,
    prepare,
    write_records,
)

BARRIER_TIMEOUT = timedelta(days=7)  # ranks that finish early wait for the slowest one
STOP_GRACE_S = 10.0
POLL_S = 0.2
REPORT_INTERVAL_S = 0.25
USAGE_EXIT = 2  # the CLI's status for a mistake in the command or the input


# ============================================================================ roles


@dataclass(frozen=True)
class Role:
    kind: str  # "launcher", "worker" or "torchrun"
    rank: int  # data-parallel rank (0 for the launcher)
    world: int  # data-parallel ranks
    local_rank: int = 0  # torchrun: the GPU index on this node


def torchrun_ranks(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise UsageError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})") from err
    return (rank, world, local) if world > 1 else None


def role_of(options: GenerateOptions) -> Role | None:
    """The process's part in a data-parallel run, or None for a plain single-process run."""
    check_options(options.data_parallel, options.parallel.tp_size, options.dp_rank, options.dp_world)
    if options.dp_rank is not None:
        return Role("worker", options.dp_rank, options.dp_world)
    ranks = torchrun_ranks()
    if ranks is not None:
        rank, world, local = ranks
        if world % options.parallel.tp_size:
            raise UsageError(f"WORLD_SIZE {world} is not a multiple of --tp-size {options.parallel.tp_size}")
        dp_world = world // options.parallel.tp_size
        if options.data_parallel not in (1, dp_world):
            raise UsageError(f"under torchrun the data-parallel size is WORLD_SIZE / --tp-size = {dp_world}; "
                             "leave --data-parallel out")  # fmt: skip
        return Role("torchrun", rank // options.parallel.tp_size, dp_world, local)
    if options.data_parallel > 1:
        return Role("launcher", 0, options.data_parallel)
    return None


def check_options(data_parallel: int, tp_size: int, dp_rank: int | None, dp_world: int | None) -> None:
    if data_parallel < 1:
        raise UsageError(f"--data-parallel must be at least 1, got {data_parallel}")
    if tp_size < 1:
        raise UsageError(f"--tp-size must be at least 1, got {tp_size}")
    if (dp_rank is None) != (dp_world is None) or (dp_rank is not None and not 0 <= dp_rank < dp_world):
        raise UsageError("--dp-rank and --dp-world are internal: give both, with 0 <= rank < world")


def is_parallel(options: GenerateOptions) -> bool:
    return role_of(options) is not None


def run(options: GenerateOptions) -> int:
    role = role_of(options)
    if options.output is None:
        raise UsageError("data-parallel generation needs --output")
    if role.kind == "launcher":
        return run_launcher(options, role)
    if role.kind == "worker":
        return run_worker(options, role)
    return run_torchrun_rank(options, role)


# ============================================================================ sharding


def shard_prompts(n_prompts: int, rank: int, world: int) -> list[int]:
    """The prompt indices rank `rank` of `world` samples (all n samples of each)."""
    return list(range(rank, n_prompts, world))


def shard_remaining(setup: GenerateSetup, rank: int, world: int) -> int:
    job = setup.job
    indices = shard_prompts(job.n_prompts, rank, world)
    return sum(1 for p in indices for s in range(job.n) if not job.skip(p, s))


class Reporter:
    """Where a shard's progress goes; the default reports nothing."""

    def ready(self) -> None: ...
    def add_tokens(self, count: int) -> None: ...
    def add_sample(self) -> None: ...
    def close(self) -> None: ...


def generate_shard(
    options: GenerateOptions, setup: GenerateSetup, rank: int, world: int, reporter: Reporter,
    checked: CheckedModels | None = None,
) -> int:  # fmt: skip
    """Sample the share of `rank` that no file holds yet into its shard; returns samples written."""
    from .store import JournalWriter, scan_journal

    job = setup.job
    indices = shard_prompts(job.n_prompts, rank, world)
    if shard_remaining(setup, rank, world) == 0:
        return 0
    sampler, base_prompts, teacher_prompts = load_sampler(setup, checked)
    if not sampler.tp.is_leader:  # torchrun TP follower: same loop, its leader writes
        for _ in sampler.generate_iter(
            [base_prompts[i] for i in indices], teacher_prompts=[teacher_prompts[i] for i in indices],
            prompt_indices=indices, skip=job.skip, **generate_kwargs(setup.options.params),
        ):  # fmt: skip
            pass
        return 0
    reporter.ready()
    stream = sampler.generate_iter(
        [base_prompts[i] for i in indices], teacher_prompts=[teacher_prompts[i] for i in indices],
        prompt_indices=indices, skip=job.skip, on_tokens=reporter.add_tokens, **generate_kwargs(setup.options.params),
    )  # fmt: skip
    plan = job.plan.shard_plan(rank)
    state = scan_journal(plan.journal)
    state.meta_ok = plan.meta.is_file()  # written by the launcher or rank 0 before any worker starts
    writer = JournalWriter(plan, state, job.meta)
    try:
        write_records(writer, stream, setup.prompts, job.meta, reporter.add_sample)
    finally:
        writer.close()
        reporter.close()
    return writer.written


# ============================================================================ worker


class StdoutReporter(Reporter):
    """The worker side of the progress channel: a few short lines a second on stdout."""

    def __init__(self, out: IO[str] | None = None, interval_s: float = REPORT_INTERVAL_S):
        self.out = out if out is not None else sys.stdout
        self.interval_s = interval_s
        self.tokens = self.samples = 0
        self.last = time.monotonic()

    def _send(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def ready(self) -> None:
        self._send("ready")

    def add_tokens(self, count: int) -> None:
        self.tokens += count
        self._maybe_flush()

    def add_sample(self) -> None:
        self.samples += 1
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self.last >= self.interval_s:
            self.close()

    def close(self) -> None:
        if self.tokens:
            self._send(f"tokens {self.tokens}")
        if self.samples:
            self._send(f"samples {self.samples}")
        self.tokens = self.samples = 0
        self.last = time.monotonic()


def run_worker(options: GenerateOptions, role: Role) -> int:
    exit_with_parent()
    options = replace(options, overwrite=False)  # the launcher already cleared the old files
    setup = prepare(options)
    generate_shard(options, setup, role.rank, role.world, StdoutReporter())
    return 0


# ============================================================================ launcher


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


# ============================================================================ torchrun


class RankZeroProgress(Reporter):
    """Under torchrun, rank 0 shows the progress of its own share (the others stay quiet)."""

    def __init__(self, options: GenerateOptions, total: int, done: int):
        self.options, self.total, self.done = options, total, done
        self.progress = None

    def ready(self) -> None:
        from .progress import Progress

        self.progress = Progress(self.total, self.done, interval_s=self.options.log_interval)

    def add_tokens(self, count: int) -> None:
        if self.progress:
            self.progress.add_tokens(count)

    def add_sample(self) -> None:
        if self.progress:
            self.progress.add_sample()

    def close(self) -> None:
        if self.progress:
            self.progress.close()
            self.progress = None


def run_torchrun_rank(options: GenerateOptions, role: Role) -> int:
    import torch.distributed as dist

    disable_nvlink_multicast()
    device = torchrun_device(options.engine.device, role.local_rank)
    options = replace(options, engine=replace(options.engine, device=device))
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        return _torchrun_body(options, role, dist)
    finally:
        dist.destroy_process_group()


def torchrun_device(device: str, local_rank: int) -> str:
    """cuda:LOCAL_RANK where CUDA is used; the device is the launcher's to choose, not the user's."""
    if not uses_cuda(device, "under torchrun give auto, cuda or cpu; rank uses cuda:LOCAL_RANK"):
        return device
    return str(rank_device("cuda", local_rank))


def _torchrun_body(options: GenerateOptions, role: Role, dist) -> int:
    with contextlib.ExitStack() as held:  # rank 0: the output's lock, from its first check to the merge
        return _torchrun_job(options, role, dist, held)


def _torchrun_job(options: GenerateOptions, role: Role, dist, held: contextlib.ExitStack) -> int:
    from .store import start_fresh, write_meta

    setup, checked = _checked_by_all(options, role, dist, held)
    job = setup.job
    if dist.get_rank() == 0:
        if options.overwrite:
            start_fresh(job.plan)
        if options.overwrite or not job.state.meta_ok:
            write_meta(job.plan, job.meta)
    dist.barrier()
    shard_total = len(shard_prompts(job.n_prompts, role.rank, role.world)) * job.n
    shard_left = shard_remaining(setup, role.rank, role.world)
    reporter = (
        RankZeroProgress(options, shard_total, shard_total - shard_left)
        if _shows_progress(options)
        else Reporter()
    )
    generate_shard(options, setup, role.rank, role.world, reporter, checked)
    dist.barrier()
    if dist.get_rank() == 0:
        finish_output(job)
        if not options.quiet:
            print(f"{PROG}: wrote {job.total} samples to {job.plan.target} ({role.world} data-parallel ranks)",
                  file=sys.stderr)  # fmt: skip
    return 0


def _shows_progress(options: GenerateOptions) -> bool:
    import torch.distributed as dist

    return dist.get_rank() == 0 and not options.quiet


def _checked_by_all(
    options: GenerateOptions, role: Role, dist, held: contextlib.ExitStack
) -> tuple[GenerateSetup, CheckedModels | None]:
    """Every rank runs the checks (the tokenizers' too, where its share has work left), rank 0
    first takes the output's lock into `held`; if any rank fails, all stop (each failing rank
    says why)."""
    import torch

    error: BaseException | None = None
    setup = checked = None
    try:
        if dist.get_rank() == 0:
            held.enter_context(lock_output(options.output))
        setup = prepare(options)
        if shard_remaining(setup, role.rank, role.world) > 0:
            checked = check_models(setup)
    except (ValueError, TypeError, OSError) as err:
        error = err
    failed = torch.tensor([0 if error is None else 1])
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if int(failed.item()):
        raise UsageError(f"rank {dist.get_rank()}: stopping, another rank's checks failed (see its error)")
    return setup, checked
