"""Where attention servers sit relative to trainers, which decides which transfers cost bytes."""

from __future__ import annotations

from dataclasses import dataclass
from math import isfinite
from typing import Literal

import numpy as np

from distca.errors import InputError
from distca.limits import MAX_RANKS

PlacementKind = Literal["colocated", "dedicated"]


@dataclass(frozen=True)
class Placement:
    """``colocated``: server ``i`` shares device ``i``; trainer ``t`` sits on device ``devices[t]`` (by
    default device ``t``), so it has a local server when that index is below ``n_servers``.
    ``dedicated``: servers have devices of their own; every transfer crosses a link.

    ``devices`` lets a plan's trainers be any subset of the cluster — e.g. the data-parallel replicas
    of one pipeline stage, which sit on devices ``stage * dp + replica`` while the server pool spans
    every device.

    ``devices_per_node``: devices ``[k·n, (k+1)·n)`` share node ``k`` (a fast intra-node link, NVLink), and a byte
    between nodes costs ``inter_node_cost`` bytes inside one (the bandwidth ratio of the two links: 450 GB/s NVLink
    over a 50 GB/s NIC per GPU on an H100 DGX is 9). Colocated placements only: the planner then sheds work inside
    a donor's node first and weighs every byte by the link it crosses. ``None``: one flat network (every remote
    byte costs the same)."""

    n_trainers: int
    n_servers: int
    kind: PlacementKind = "colocated"
    devices: tuple[int, ...] | None = None
    devices_per_node: int | None = None
    inter_node_cost: float = 9.0

    def __post_init__(self) -> None:
        if self.n_trainers < 1 or self.n_servers < 1:
            raise InputError(f"need >= 1 trainer and server, got {self.n_trainers} and {self.n_servers}")
        if max(self.n_trainers, self.n_servers) > MAX_RANKS:
            raise InputError(f"at most {MAX_RANKS} trainers and servers, got {self.n_trainers} and {self.n_servers}")
        if self.kind not in ("colocated", "dedicated"):
            raise ValueError(f"placement must be 'colocated' or 'dedicated', got {self.kind!r}")
        if self.devices is not None and (len(self.devices) != self.n_trainers or min(self.devices) < 0
                                         or len(set(self.devices)) != self.n_trainers):
            raise ValueError(f"devices must name {self.n_trainers} distinct devices >= 0, got {self.devices}")
        if self.devices_per_node is not None and (not isinstance(self.devices_per_node, int)
                                                  or self.devices_per_node < 1):
            raise InputError(f"devices_per_node must be an int >= 1 or None, got {self.devices_per_node!r}")
        if not (isfinite(self.inter_node_cost) and self.inter_node_cost >= 1):
            raise InputError(f"inter_node_cost must be finite and >= 1, got {self.inter_node_cost}")

    @property
    def topology(self) -> bool:
        """Whether the planner weighs bytes by the link they cross (a node size is given, colocated)."""
        return self.devices_per_node is not None and self.kind == "colocated"

    def _device(self) -> np.ndarray:
        r = np.arange(self.n_trainers, dtype=np.int64)
        return r if self.devices is None else np.asarray(self.devices, dtype=np.int64)

    def local_server(self, trainer: int) -> int:
        """The server on ``trainer``'s device, or -1."""
        dev = int(self._device()[trainer])
        return dev if self.kind == "colocated" and dev < self.n_servers else -1

    def home_server(self, trainer: int) -> int:
        """The server a trainer's tasks start on: its local one, else a contiguous block mapping
        (neighbouring trainers share servers, so documents split at rank boundaries stay together)."""
        return int(self.home_servers()[trainer])

    def home_servers(self) -> np.ndarray:
        """``home_server`` of every trainer, vectorised."""
        r = np.arange(self.n_trainers, dtype=np.int64)
        block = r * self.n_servers // self.n_trainers
        if self.kind != "colocated":
            return block
        dev = self._device()
        return np.where(dev < self.n_servers, dev, block)

    def has_local_server(self) -> np.ndarray:
        """Whether each trainer has a server on its device."""
        if self.kind == "dedicated":
            return np.zeros(self.n_trainers, dtype=bool)
        return self._device() < self.n_servers

    def is_remote(self, trainer: np.ndarray | int, server: np.ndarray | int) -> np.ndarray | bool:
        """Whether data from ``trainer`` to ``server`` crosses devices (elementwise)."""
        if self.kind == "dedicated":
            return np.ones(np.broadcast(trainer, server).shape, dtype=bool) if np.ndim(trainer) else True
        dev = self._device()[np.asarray(trainer)]
        return dev != np.asarray(server) if np.ndim(trainer) or np.ndim(server) else bool(dev != server)
