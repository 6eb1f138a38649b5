"""Where attention servers sit relative to trainers, which decides which transfers cost bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

PlacementKind = Literal["colocated", "dedicated"]


@dataclass(frozen=True)
class Placement:
    """``colocated``: server i shares trainer i's device (for i < min(trainers, servers)).
    ``dedicated``: servers have devices of their own; every transfer crosses a link."""

    n_trainers: int
    n_servers: int
    kind: PlacementKind = "colocated"

    def __post_init__(self) -> None:
        if self.n_trainers < 1 or self.n_servers < 1:
            raise ValueError(f"need >= 1 trainer and server, got {self.n_trainers} and {self.n_servers}")
        if self.kind not in ("colocated", "dedicated"):
            raise ValueError(f"placement must be 'colocated' or 'dedicated', got {self.kind!r}")

    def local_server(self, trainer: int) -> int:
        """The server on ``trainer``'s device, or -1."""
        return trainer if self.kind == "colocated" and trainer < self.n_servers else -1

    def home_server(self, trainer: int) -> int:
        """The server a trainer's tasks start on: its local one, else a contiguous block mapping
        (neighbouring trainers share servers, so documents split at rank boundaries stay together)."""
        local = self.local_server(trainer)
        return local if local >= 0 else trainer * self.n_servers // self.n_trainers

    def home_servers(self) -> np.ndarray:
        """``home_server`` of every trainer, vectorised."""
        r = np.arange(self.n_trainers, dtype=np.int64)
        block = r * self.n_servers // self.n_trainers
        return np.where(r < self.n_servers, r, block) if self.kind == "colocated" else block

    def has_local_server(self) -> np.ndarray:
        """Whether each trainer has a server on its device."""
        r = np.arange(self.n_trainers)
        return (r < self.n_servers) if self.kind == "colocated" else np.zeros(self.n_trainers, dtype=bool)

    def is_remote(self, trainer: np.ndarray | int, server: np.ndarray | int) -> np.ndarray | bool:
        """Whether data from ``trainer`` to ``server`` crosses devices (elementwise)."""
        if self.kind == "dedicated":
            return np.ones(np.broadcast(trainer, server).shape, dtype=bool) if np.ndim(trainer) else True
        return np.asarray(trainer) != np.asarray(server) if np.ndim(trainer) or np.ndim(server) else trainer != server
