"""Process groups for tensor parallelism (TP), and the helper processes a sampler starts itself.

Two ways to run T ranks per model replica, one SPMD engine:
- under torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT):
  WORLD_SIZE = DP x T, and ranks r*T .. r*T+T-1 form tensor-parallel group r. Every rank runs
  the same sampler loop on the same inputs; only the group's leader (TP rank 0) writes output.
- self-started (`OptimalSampler(..., tp_size=T)` in a plain process): the sampler starts T-1
  helper processes (`python -m optimal_sampling.runtime.tp_helper`), rendezvous on 127.0.0.1 and a
  free port. Only the calling process runs the sampler loop; its engine is an `EngineProxy` that
  sends each engine call (add / decode / release) to the helpers before running it, and the
  helpers run the same call on their shards (`serve`).

Invariants:
- the logits every rank sees are identical (gathered), and the sampling noise is a pure function
  of (seed, prompt, sample, step), so all ranks draw the same tokens with no extra communication;
  a seed the sampler draws itself is agreed on (broadcast from the TP leader, `agree_seed`).
- NVLink multicast is off in this process before any process group exists, and in every helper.
- Backend: NCCL for the model's collectives on CUDA, gloo on CPU; host objects (seeds, engine
  calls) always travel on a gloo group of the same ranks.
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import SINGLE, TensorParallel
from .environment import child_env, disable_nvlink_multicast, rank_device

TIMEOUT = timedelta(days=7)  # a rank may wait long at a collective while the leader tokenizes
STOP = "stop"
RANK_DEVICES = "with tp_size > 1 give auto, cuda or cpu; each rank picks its GPU"


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def launched_externally() -> bool:
    """True under torchrun (or a launcher like it): RANK and WORLD_SIZE are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device: torch.device, init_method: str | None = None, rank: int | None = None,
               world: int | None = None) -> None:  # fmt: skip
    """The default process group (gloo for host objects, plus NCCL for CUDA tensors on CUDA)."""
    disable_nvlink_multicast()
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world}
    dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)


def new_tp_groups(tp_size: int, device: torch.device) -> TensorParallel:
    """This rank's group: ranks start .. start+T-1 with start = RANK // T * T. Only the members
    synchronise, so a data-parallel replica with nothing left to do need not build its sampler."""
    world, me = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ValueError(f"WORLD_SIZE {world} is not a multiple of tp_size {tp_size}")
    start = me // tp_size * tp_size
    ranks = list(range(start, start + tp_size))
    group = dist.new_group(
        ranks, backend=backend_for(device), timeout=TIMEOUT, use_local_synchronization=True
    )
    control = dist.new_group(ranks, backend="gloo", timeout=TIMEOUT, use_local_synchronization=True)
    return TensorParallel(tp_size, me - start, group, control, start)


def agree_seed(tp: TensorParallel, seed: int) -> int:
    """The leader's seed on every rank of the group (a seed drawn per process differs)."""
    if tp.size == 1 or tp.control is None or tp.helpers:  # self-started: only the leader samples
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=tp.leader, group=tp.control)
    return int(box[0])


# ============================================================================ self-started helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_helpers(module: str, payload: object, tp_size: int, init_method: str) -> list[subprocess.Popen]:
    """Ranks 1..T-1: `python -m module`, reading (payload, rendezvous, rank, size) from stdin."""
    helpers = []
    for rank in range(1, tp_size):
        process = subprocess.Popen(
            [sys.executable, "-m", module], stdin=subprocess.PIPE, env=child_env(local_rank=rank)
        )  # helper i uses the i-th visible GPU
        process.stdin.write(pickle.dumps((payload, init_method, rank, tp_size)))
        process.stdin.close()
        helpers.append(process)
    return helpers


def read_helper_payload() -> tuple[object, str, int, int]:
    """A helper's (payload, rendezvous, rank, size), as `start_helpers` wrote them."""
    return pickle.loads(sys.stdin.buffer.read())


def watch_helpers(helpers: list[subprocess.Popen], interval_s: float = 0.5) -> None:
    """A helper that dies leaves the leader waiting at a collective forever: stop it, naming the rank."""

    def watch() -> None:
        while any(process.poll() is None for process in helpers):  # all exited 0: closed normally
            for rank, process in enumerate(helpers, start=1):
                code = process.poll()
                if code not in (None, 0):
                    print(f"optimal-sampling: error: tensor-parallel rank {rank} died (exit code {code}); "
                          "stopping", file=sys.stderr, flush=True)  # fmt: skip
                    os._exit(1)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="tp-helper-watch", daemon=True).start()


def start_tensor_parallel(
    tp_size: int, device: str, helper_module: str, payload: object
) -> tuple[TensorParallel, torch.device]:
    """This process's group and device: joins torchrun's world, or starts the helpers itself
    (`python -m helper_module`, each given `payload`)."""
    if tp_size == 1:
        return SINGLE, None
    disable_nvlink_multicast()
    if dist.is_initialized() or launched_externally():
        where = rank_device(device, allowed=RANK_DEVICES)
        init_world(where)
        return new_tp_groups(tp_size, where), where
    os.environ["LOCAL_RANK"] = os.environ.get("LOCAL_RANK", "0")
    where = rank_device(device, allowed=RANK_DEVICES)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    helpers = start_helpers(helper_module, payload, tp_size, init_method)
    watch_helpers(helpers)
    init_world(where, init_method, 0, tp_size)
    tp = new_tp_groups(tp_size, where)
    return TensorParallel(tp.size, tp.rank, tp.group, tp.control, tp.leader, tuple(helpers)), where


# ============================================================================ engine calls


def as_host(value):
    """Tensors to lists, so a call pickles small and lands on the helper's own device; the
    (name, tensor) pairs of a weight update to CPU tensors (pickled as raw bytes, not lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, list) and value and all(is_named_tensor(item) for item in value):
        return [(name, tensor.detach().to("cpu")) for name, tensor in value]
    return value


def is_named_tensor(item: object) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)


class EngineProxy:
    """The leader's engine in self-started mode: every model-touching call goes to the helpers
    first (over the gloo control group), then runs here; everything else is delegated."""

    CALLS = ("add", "decode", "decode_and_sample", "admit", "step", "release", "load_weights")

    def __init__(self, engine, tp: TensorParallel):
        self._engine, self._tp = engine, tp
        self._closed = False
        atexit.register(self.close)

    def __getattr__(self, name: str):
        attr = getattr(self._engine, name)
        if name not in self.CALLS:
            return attr

        def call(*args):
            self._send((name, tuple(as_host(a) for a in args)))
            return attr(*args)

        return call

    def _send(self, message) -> None:
        dist.broadcast_object_list([message], src=self._tp.leader, group=self._tp.control)

    def close(self) -> None:
        """Stop the helpers and leave the process group (idempotent; also at interpreter exit)."""
        if self._closed:
            return
        self._closed = True
        self._send(STOP)
        for process in self._tp.helpers:
            process.wait(timeout=60)
        dist.destroy_process_group()


def run_call(engine, name: str, args: tuple) -> None:
    if name == "decode":  # the Engine interface takes tensors here; the others take sequences
        args = tuple(torch.tensor(a, dtype=torch.long, device=engine.device) for a in args)
    getattr(engine, name)(*args)


def serve(engine, tp: TensorParallel) -> None:
    """A helper's loop: run each engine call the leader announces, until it says stop."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=tp.leader, group=tp.control)
        if box[0] == STOP:
            return
        name, args = box[0]
        run_call(engine, name, args)
