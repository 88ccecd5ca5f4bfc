"""Receiving a trainer's weights over torch.distributed (SGLang's `init_weights_update_group` +
`update_weights_from_distributed`, which slime, AReaL and OpenRLHF-style trainers call).

Protocol: the trainer and the sampler processes form one extra process group of `world_size`
ranks (the trainer is rank 0; this sampler is `rank_offset`, its tensor-parallel leader receives
for all its ranks and forwards through the engine proxy). For each update the trainer tells the
sampler (names, dtypes, shapes), then broadcasts every tensor from rank 0 in that order; the
sampler posts one receive per tensor and applies them all at once. Backend: NCCL for CUDA tensors,
gloo for CPU ones.

The group lives beside any default process group (tensor parallelism's or none): it is built on
its own TCP rendezvous with torch's group constructor, the way those trainers build theirs, so
both sides' stores use the same key prefix (the group name) and find each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)


@dataclass
class WeightsGroup:
    """A process group joining this sampler to a trainer's rank 0, and where tensors land."""

    name: str
    group: dist.ProcessGroup
    rank: int
    world_size: int
    backend: str
    device: torch.device


def init_weights_update_group(
    master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
    backend: str = "gloo", device: str | torch.device = "cpu", timeout: timedelta = TIMEOUT,
) -> WeightsGroup:  # fmt: skip
    """Join the trainer's group as rank `rank_offset` (blocks until all `world_size` ranks joined).
    A trainer written in Python may join with this function too, as rank 0."""
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world  # what trainers use

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not 0 <= rank_offset < world_size:
        raise ValueError(f"rank_offset must be in [0, world_size={world_size}), got {rank_offset}")
    url = f"tcp://{master_address}:{int(master_port)}"
    store, rank, size = next(dist.rendezvous(url, rank_offset, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(
        size, rank, [], backend, store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[group] = {i: i for i in range(size)}  # so dist.broadcast maps ranks 1:1
    return WeightsGroup(group_name, group, rank, size, backend, torch.device(device))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype as a name ("bfloat16", "torch.bfloat16") or a torch.dtype -> the torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def receive_weights_broadcast(
    group: WeightsGroup, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
    shapes: Sequence[Sequence[int]], src: int = 0,
) -> list[tuple[str, torch.Tensor]]:  # fmt: skip
    """The tensors the trainer broadcasts from `src`, in the order of `names`, on the group's device.

    Every receive is posted even if a name turns out to be wrong later, so the trainer's
    broadcasts always complete; the caller validates the result (the sampler's update_weights)."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(
            f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})"
        )
    device = group.device
    tensors = [
        torch.empty(tuple(shape), dtype=parse_dtype(dtype), device=device)
        for dtype, shape in zip(dtypes, shapes, strict=True)
    ]
    works = [dist.broadcast(t, group=group.group, group_src=src, async_op=True) for t in tensors]
    for work in works:
        work.wait()
    return list(zip(names, tensors, strict=True))


def destroy_weights_group(group: WeightsGroup) -> None:
    """Leave the trainer's group."""
    dist.destroy_process_group(group.group)
