"""Where a trainer rank runs: its place in the job (:class:`RankInfo`) and what its device implies — the
process-group backend, DeepSpeed's accelerator, the environment DeepSpeed reads, and binding the process to
its GPU.

Each launcher decides a rank's device once, at its entry point, and hands it down in :class:`RankInfo`:

- ``torchrun``: ``cuda:<LOCAL_RANK>`` (torchrun starts one process per GPU of a node);
- Ray Train: the GPU Ray assigned to the worker (``ray.train.torch.get_device()``);
- ``distca train`` (one machine): ``cuda:<rank>``;
- on a CPU run: ``cpu`` everywhere, gloo, DeepSpeed's CPU accelerator — what every CPU test runs.

Nothing below the launchers reads ``LOCAL_RANK`` or asks torch which GPU to take.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: global rank, world size, the rendezvous address, its rank on its node and the
    device it computes on (``cpu`` or ``cuda:N``, N the index among the GPUs this process sees)."""

    rank: int
    world: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_rank: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world}")
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and dev.index is None):
            raise ValueError(f"a rank's device is 'cpu' or 'cuda:N' (an index: one GPU per rank), got {self.device!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def rank_device(device_type: str, local_rank: int) -> str:
    """A rank's device when each rank of a node takes the GPU of its local rank: ``cuda:<local_rank>``, or
    ``cpu`` (``device_type`` is the run's resolved ``train.device``, see :func:`distca.parts.train_device`)."""
    if device_type == "cpu":
        return "cpu"
    if device_type == "cuda":
        return f"cuda:{local_rank}"
    raise ValueError(f"device type must be 'cpu' or 'cuda', got {device_type!r}")


def dist_backend(device: torch.device | str) -> str:
    """The ``torch.distributed`` backend for ranks on ``device``: NCCL between GPUs, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def ds_accelerator(device: torch.device | str) -> str:
    """DeepSpeed's accelerator (``DS_ACCELERATOR``) for ranks on ``device``."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def deepspeed_env(info: RankInfo) -> dict[str, str]:
    """The environment DeepSpeed reads in a rank, which its launcher sets before DeepSpeed is imported.

    ``LOCAL_RANK`` is the rank's GPU index on a CUDA run: DeepSpeed's ``PipelineModule`` and engine move the
    model to ``cuda:<LOCAL_RANK>``, so it must name the very GPU the rank was given (under Ray Train that is
    Ray's choice, not necessarily the worker's local rank). ``DS_ACCELERATOR`` picks DeepSpeed's CUDA or CPU
    accelerator (it is read once, at DeepSpeed's first use)."""
    dev = info.torch_device
    local = dev.index if dev.type == "cuda" else info.local_rank
    return {"RANK": str(info.rank), "WORLD_SIZE": str(info.world), "LOCAL_RANK": str(local),
            "DS_ACCELERATOR": ds_accelerator(dev)}


def bind_device(info: RankInfo) -> torch.device:
    """Make the rank's GPU this process's current CUDA device (a no-op on the CPU); returns the device."""
    dev = info.torch_device
    if dev.type == "cuda":
        visible = torch.cuda.device_count()
        if dev.index >= visible:
            raise RuntimeError(f"rank {info.rank} was given {dev} but this process sees {visible} GPU(s): start at "
                               "most one rank per visible GPU on each node")
        torch.cuda.set_device(dev)
    return dev


def init_process_group(info: RankInfo, timeout_s: float) -> None:
    """Join the job's process group: NCCL bound to the rank's GPU (``device_id``, where this torch takes it),
    or gloo on the CPU; rendezvous over TCP at ``info.master_addr:master_port``."""
    import torch.distributed as dist

    dev = bind_device(info)
    extra = {}
    if dev.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        extra["device_id"] = dev
    dist.init_process_group(dist_backend(dev), init_method=f"tcp://{info.master_addr}:{info.master_port}",
                            rank=info.rank, world_size=info.world, timeout=timedelta(seconds=timeout_s), **extra)
