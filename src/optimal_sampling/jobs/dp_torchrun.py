"""A torchrun rank of data-parallel `generate` (RANK and WORLD_SIZE > 1 in the environment).

A worker that checks for itself, uses cuda:LOCAL_RANK, waits for the others at a
torch.distributed (gloo) barrier; rank 0 holds the output's lock, writes the sidecar before and
merges after. The output path must be on a filesystem all nodes share.

Invariants:
- Each rank writes only its shard; only rank 0 writes the output and the sidecar.
- NVLink multicast is off (NO_MULTICAST) in this process before torch.distributed is initialised.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from datetime import timedelta

from ..distributed.environment import disable_nvlink_multicast, rank_device, uses_cuda
from ..errors import UsageError
from .dp_shard import Reporter, Role, generate_shard, shard_prompts, shard_remaining
from .generate import (
    PROG,
    CheckedModels,
    GenerateOptions,
    GenerateSetup,
    check_models,
    finish_output,
    lock_output,
    prepare,
)

BARRIER_TIMEOUT = timedelta(days=7)  # ranks that finish early wait for the slowest one


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
