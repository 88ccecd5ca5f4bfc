"""The environment of every process we start or join: NVLink multicast off, one GPU per rank,
children that die with their parent, and one builder of a child's environment.

NVLink multicast (NVLS) is off in every process (NCCL, torch symmetric memory, NVSHMEM): on the
shared machines we run on it is not available to every process, and a collective that tries it
fails or hangs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)  # the folder holding optimal_sampling/


def disable_nvlink_multicast(environ: MutableMapping[str, str] = os.environ) -> None:
    """NVLink multicast (NVLS) off for NCCL, torch symmetric memory and NVSHMEM in `environ`."""
    environ.update(NO_MULTICAST)


def child_env(
    gpus: str | None = None, local_rank: int | None = None, threads: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, str]:  # fmt: skip
    """The parent's environment for a child process we start: no torchrun variables, NVLink
    multicast off, this package importable without installation; optionally its GPUs
    (CUDA_VISIBLE_DEVICES), its LOCAL_RANK and a default thread count (OMP_NUM_THREADS)."""
    env = {k: v for k, v in environ.items() if k not in TORCHRUN_VARS}
    env.update(NO_MULTICAST)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if local_rank is not None:
        env["LOCAL_RANK"] = str(local_rank)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def uses_cuda(device: str, allowed: str) -> bool:
    """Whether processes of a parallel run on `device` go on GPUs; `allowed` ends the error for a
    device other than auto, cuda or cpu (a parallel run chooses each process's GPU itself)."""
    if device == "cpu":
        return False
    if device not in ("auto", "cuda"):
        raise ValueError(f"--device {device}: {allowed}")
    return torch.cuda.is_available()


def rank_device(
    device: str, local_rank: int | None = None, allowed: str = "give auto, cuda or cpu"
) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK (the environment's unless given) for auto/cuda where
    CUDA is there, a cuda:N a launcher already chose, else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device.startswith("cuda:"):  # chosen by a launcher
        torch.cuda.set_device(torch.device(device))
        return torch.device(device)
    if device not in ("auto", "cuda"):
        raise ValueError(f"device {device!r}: {allowed}")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    index = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def exit_with_parent(interval_s: float = 1.0) -> None:
    """A child whose parent is gone (killed) stops too, so no orphan keeps writing or waiting."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
