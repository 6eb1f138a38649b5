"""A trainer's client of the pool's collective data plane (``cluster.data_plane: collective``), from the run's
config: one data-plane group per pipeline stage (its data-parallel trainers and every server of the pool), under
a session the run's rank 0 draws and every rank learns from it, and one decision for the whole run when the group
store is out of reach (every rank falls back to ZeroMQ frames together, and the step records say ``zmq``).
The group's collectives time out after ``transport.timeout_s``, as the byte path's replies do."""

from __future__ import annotations

import uuid

import torch
import torch.distributed as dist

from distca.config import DistCAConfig
from distca.errors import ConfigError
from distca.parts import client_settings, server_dtype
from distca.runtime.client import CADClient
from distca.runtime.group_client import GroupClient, connect_group_client
from distca.server.exchange import RowFormat


def run_session() -> str:
    """A name for this run's data-plane groups, drawn by global rank 0 and broadcast (a collective of the world:
    every rank calls it)."""
    box = [uuid.uuid4().hex[:16] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_agree(ok: bool) -> bool:
    """Whether every rank of the world says ``ok`` (a collective: every rank calls it)."""
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def collective_client(cfg: DistCAConfig, stage: int, dp_rank: int, addresses: list[str],
                      device: torch.device) -> GroupClient | CADClient:
    """This rank's client: trainer ``dp_rank`` of stage ``stage``'s group with the servers at ``addresses``."""
    if device.type != "cpu":
        raise ConfigError("cluster.data_plane: collective moves host tensors over gloo; CUDA trainers are not "
                          "supported on it yet (use cluster.data_plane: inplace or zmq)")
    settings = client_settings(cfg)
    m = cfg.model
    fmt = RowFormat(m.n_heads, m.n_kv_heads, m.head_dim, getattr(torch, server_dtype(cfg)))
    return connect_group_client(dp_rank, addresses, settings.transport, fmt, n_trainers=cfg.data_parallel,
                                group=stage, session=run_session(), backend=settings.backend, agree=all_agree)
