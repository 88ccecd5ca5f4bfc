"""A data-parallel rank's identity and its share of the work (shared by `data_parallel.py`'s worker,
`dp_launcher.py` and `dp_torchrun.py`).

Invariant: rank r of N owns the prompts whose index % N == r, with all their samples: shards are
disjoint, and since a sample's randomness depends only on (seed, prompt index, sample index) the
merged output equals a single-process run's, whatever N.
"""

from __future__ import annotations

from dataclasses import dataclass

from .generate import (
    CheckedModels,
    GenerateOptions,
    GenerateSetup,
    generate_kwargs,
    load_sampler,
    write_records,
)


@dataclass(frozen=True)
class Role:
    kind: str  # "launcher", "worker" or "torchrun"
    rank: int  # data-parallel rank (0 for the launcher)
    world: int  # data-parallel ranks
    local_rank: int = 0  # torchrun: the GPU index on this node


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
