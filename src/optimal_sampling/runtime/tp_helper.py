"""Entry of a self-started tensor-parallel helper (`python -m optimal_sampling.runtime.tp_helper`).

The leader's `OptimalSampler(tp_size=T)` starts T-1 of these; each reads the leader's
`SamplerSpec` and rendezvous from stdin, builds the same sampler on its shard, and runs every
engine call the leader announces until it says stop (see `distributed.groups`).
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from ..distributed.environment import disable_nvlink_multicast, exit_with_parent, rank_device
from ..distributed.groups import RANK_DEVICES, init_world, read_helper_payload, serve
from .sampler import OptimalSampler
from .spec import SamplerSpec


def main() -> int:
    exit_with_parent()
    spec, init_method, rank, size = read_helper_payload()
    if not isinstance(spec, SamplerSpec):
        raise TypeError(f"a helper needs a SamplerSpec, got {type(spec).__name__}")
    disable_nvlink_multicast()
    init_world(rank_device(spec.engine.device, allowed=RANK_DEVICES), init_method, rank, size)
    sampler = OptimalSampler.from_configs(
        spec.model_base, spec.model_teacher, spec.mix, spec.engine, spec.parallel, spec.seed
    )
    serve(sampler.engine, sampler.tp)
    dist.destroy_process_group()
    return 0


def run() -> int:
    """`main`, with a user error (a ValueError/TypeError: the leader checks the same options and
    reports them itself) told in one line instead of a traceback per helper."""
    try:
        return main()
    except (ValueError, TypeError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"optimal-sampling tensor-parallel helper: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
