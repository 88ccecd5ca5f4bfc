"""Data-parallel `generate`: N worker processes on one host, or one rank of a torchrun job.

Three roles, chosen from the command line and the environment (`role_of`):
- launcher (`--data-parallel N`, N > 1): checks everything, starts one worker per rank with its
  own GPUs, shows their aggregate progress, and merges the shards into the output.
- worker (the hidden flags `--dp-rank/--dp-world`): samples its share into
  `<output>.rank<r>.jsonl` and reports `ready` / `tokens K` / `samples K` lines on stdout; its
  stderr goes to `<output>.rank<r>.log`.
- torchrun rank (RANK and WORLD_SIZE > 1 in the environment): a worker that checks for itself,
  with rank 0 in the launcher's place.

Invariants:
- Rank r of N owns the prompts whose index % N == r, with all their samples, so the merged
  output equals a single-process run's, whatever N.
- A worker writes only its shard; only the launcher (or torchrun rank 0) writes the output and
  the sidecar. Every (prompt, sample) is in the merged output exactly once (`io.merge_shards`),
  and a rerun after a crash at any point resumes from the output and all shards.

Here: the role dispatch and the worker; the launcher is in `dp_launcher.py`, the torchrun rank in
`dp_torchrun.py`, the sharding and a rank's sampling loop (`generate_shard`) in `dp_shard.py`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import IO

from ..distributed.environment import exit_with_parent
from ..errors import UsageError
from .dp_launcher import run_launcher
from .dp_shard import Reporter, Role, generate_shard
from .dp_torchrun import run_torchrun_rank
from .generate import GenerateOptions, prepare

REPORT_INTERVAL_S = 0.25


# ============================================================================ roles


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
