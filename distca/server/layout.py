"""What one server needs to know about one plan, shipped once per plan in a PLAN message.

The trainers derive it deterministically from the plan (every rank computes the same plan), so any
of them can register it; the server keeps a few of these small layouts, never tensors, between
rounds. The layout is the wire form of the plan's :class:`~distca.scheduler.calls.ServerCall`: each
sender's rows are one contiguous block of the server's q buffer and one of its k/v buffer — the plan
compiler lays receive buffers out in document order, which is rank order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from distca.scheduler import Plan
from distca.scheduler.calls import server_call
from distca.transport.wire import WireError


def plan_id(plan: Plan, group: int = 0) -> int:
    """A 63-bit id of a plan, equal on every rank that computed the same plan.

    ``group`` tells apart trainer groups that run the same plan side by side on one server pool (the
    data-parallel replicas of each pipeline stage share micro-batch documents, hence plans), so their
    rounds never mix on a server."""
    h = hashlib.blake2b(plan.digest(), digest_size=8)
    if group:
        h.update(group.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class ServerLayout:
    """One server's share of a plan: its fused call's metadata and who sends which rows."""

    plan_id: int
    window: int
    cu_q: torch.Tensor  # int32 [tasks + 1]
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    key_rows: torch.Tensor  # int64: k/v buffer rows, task by task
    q_rows: int
    kv_rows: int
    senders: dict[int, tuple[int, int, int, int]]  # rank -> (q_dst, n_q, kv_dst, n_kv)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        table = torch.tensor([[r, *v] for r, v in sorted(self.senders.items())], dtype=torch.int64).reshape(-1, 5)
        return [("cu_q", self.cu_q), ("cu_k", self.cu_k), ("key_rows", self.key_rows), ("senders", table)]

    def extra(self) -> dict:
        return {"window": self.window, "max_q": self.max_q, "max_k": self.max_k, "q_rows": self.q_rows,
                "kv_rows": self.kv_rows}

    @classmethod
    def from_message(cls, pid: int, tensors: dict[str, torch.Tensor], extra: dict) -> ServerLayout:
        try:
            table = tensors["senders"]
            senders = {int(r): (int(a), int(b), int(c), int(d)) for r, a, b, c, d in table.tolist()}
            layout = cls(pid, int(extra["window"]), tensors["cu_q"].clone(), tensors["cu_k"].clone(),
                         int(extra["max_q"]), int(extra["max_k"]), tensors["key_rows"].clone(), int(extra["q_rows"]),
                         int(extra["kv_rows"]), senders)
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"PLAN message is incomplete or malformed: {exc!r}") from None
        layout.validate()
        return layout

    def validate(self) -> None:
        """Reject layouts that would index outside the buffers."""
        if self.cu_q.dtype != torch.int32 or self.cu_k.dtype != torch.int32 or self.key_rows.dtype != torch.int64:
            raise WireError("PLAN: cu_q/cu_k must be int32 and key_rows int64")
        if int(self.cu_q[-1]) != self.q_rows or int(self.cu_k[-1]) != self.key_rows.numel():
            raise WireError("PLAN: cu_seqlens do not match the buffer sizes")
        if self.key_rows.numel() and (int(self.key_rows.min()) < 0 or int(self.key_rows.max()) >= self.kv_rows):
            raise WireError("PLAN: key_rows index outside the k/v buffer")
        for r, (qd, nq, kd, nk) in self.senders.items():
            if min(qd, nq, kd, nk) < 0 or qd + nq > self.q_rows or kd + nk > self.kv_rows:
                raise WireError(f"PLAN: rows of rank {r} fall outside the receive buffers")


def server_layout(plan: Plan, server: int, group: int = 0) -> ServerLayout:
    """Server ``server``'s layout of ``plan`` (for trainer group ``group``, see :func:`plan_id`)."""
    call = server_call(plan, server)
    return ServerLayout(plan_id(plan, group), plan.window, torch.from_numpy(call.cu_q), torch.from_numpy(call.cu_k),
                        call.max_q, call.max_k, torch.from_numpy(call.key_rows), call.q_rows, call.kv_rows,
                        call.senders)
