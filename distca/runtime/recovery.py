"""In-step recovery from a lost attention server (``cluster.server_loss: in_step``).

A server that dies or does not answer a round within ``cluster.lost_after_s`` is *lost* for this trainer: the
round's tasks on it are computed by the trainers themselves, with the same fused call the server would have run
(:mod:`distca.server.compute`) over the same rows, so the step's result is the undisturbed one. Nothing is sent
to a lost server again; its late replies are dropped by round (plan id).

Which trainer stands in for a lost server's round. The server's call of a plan gathers rows from its *senders*
(``ServerLayout.senders``): usually one trainer (a task's queries and keys are one document's, on one trainer),
but a document cut at a rank boundary sends keys from the previous rank too. The lowest sender is the stand-in:
the other senders send it the rows they sent the server (point-to-point over a gloo group of all trainers), it
runs the call and sends each its result rows back. A round with one sender needs no message at all. No rank
asks another whether the server is lost: a sender that did not get its rows back from a dead server knows every
other sender of that round did not either (the server answers all senders of a round after one fused call), and
a sender that gave up on a server sends it nothing more, so rounds it shares on that server cannot complete for
anyone. What breaks that (a server killed between its replies of one round, or a slow server answering one
sender just inside ``lost_after_s`` and another just outside) leaves a stand-in waiting for rows that never
come: after ``exchange_timeout_s`` it raises :class:`RecoveryError`, and the run-level restart (from the last
checkpoint, ``train.max_restarts``) is the fallback.

At the step boundary the trainers agree on the lost set (:meth:`Recovery.agree`, one all-reduce of a bitmask),
so every rank of step n+1 skips the same servers.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from distca.errors import DistCAError
from distca.scheduler import Plan
from distca.server.compute import FusedCall, fused_backward, fused_forward
from distca.server.layout import server_layout

log = logging.getLogger(__name__)

FWD_IN, FWD_OUT = ("q", "k", "v"), ("out", "lse")
BWD_IN, BWD_OUT = ("q", "out", "dout", "lse", "k", "v"), ("dq", "dk", "dv")
KV_ROLES = ("k", "v", "dk", "dv")


class RecoveryError(DistCAError, RuntimeError):
    """A lost server's round could not be finished by the trainers (a peer's rows did not come)."""


@dataclass
class Recovery:
    """One trainer's view of lost servers and what recovering from them cost.

    ``peers[r]``: the global rank (in ``group``) of plan rank ``r``; ``group``: a gloo group of every trainer
    (None: no peers, only rounds this trainer sends alone can be recovered)."""

    lost_after_s: float
    peers: list[int] = field(default_factory=list)
    group: object = None
    exchange_timeout_s: float = 60.0
    lost: set[int] = field(default_factory=set)  # servers no round is sent to
    abandoned: set[tuple[int, int]] = field(default_factory=set)  # (server, plan id) whose late replies are dropped
    rounds: int = 0  # rounds this trainer finished without their server (sender or stand-in)
    tasks: int = 0  # tasks this trainer computed standing in for a lost server
    seconds: float = 0.0  # wall time spent on it (exchange + compute)
    detected_s: float = 0.0  # wall time spent waiting for servers found lost
    late: int = 0  # late replies of abandoned rounds dropped
    rejoined: int = 0  # replacement servers taken back (CADClient.rejoin)

    def mark_lost(self, s: int, pid: int, why: str) -> None:
        if s not in self.lost:
            log.warning("attention server %d is lost (%s): its rounds run on the trainers from now on", s, why)
        self.lost.add(s)
        self.abandoned.add((s, pid))

    def stats(self) -> dict:
        """The counters, for the step record."""
        return {"servers_lost": sorted(self.lost), "recovered_rounds": self.rounds, "recovered_tasks": self.tasks,
                "recovery_s": round(self.seconds, 4), "loss_detect_s": round(self.detected_s, 4),
                "late_replies_dropped": self.late, "servers_rejoined": self.rejoined}

    def agree(self, n_servers: int, group=None) -> set[int]:
        """Every rank's lost set becomes the union of all ranks' (call on every rank at a step boundary)."""
        mask = torch.zeros(n_servers, dtype=torch.int32)
        for s in self.lost:
            mask[s] = 1
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group if group is not None else self.group)
        self.lost = {int(s) for s in torch.nonzero(mask).flatten().tolist()}
        return set(self.lost)

    # -- standing in for a lost server -----------------------------------------------------------
    def stand_in(self, plan: Plan, group: int, s: int, rank: int, kind: str, mine: dict[str, torch.Tensor],
                 backend: str) -> dict[str, torch.Tensor]:
        """This rank's results of server ``s``'s round of ``plan`` (``kind`` ``fwd`` or ``bwd``) computed by the
        trainers; ``mine``: the rows this rank would have sent the server, by role."""
        t0 = time.perf_counter()
        layout = server_layout(plan, s, group)
        senders = sorted(layout.senders)
        host = senders[0]
        roles_in, roles_out = (FWD_IN, FWD_OUT) if kind == "fwd" else (BWD_IN, BWD_OUT)
        tag = zlib.crc32(f"{layout.plan_id}:{s}:{kind}".encode()) & 0x3FFFFFFF
        dev = mine["q"].device
        if rank != host:
            self._exchange([(mine[role], host, True) for role in roles_in], tag)
            got = {role: _empty_like_role(role, mine, layout.senders[rank]) for role in roles_out}
            self._exchange([(got[role], host, False) for role in roles_out], tag)
            out = {role: t.to(dev) for role, t in got.items()}
        else:
            bufs = {role: mine[role].new_zeros((layout.kv_rows if role in KV_ROLES else layout.q_rows,
                                                *mine[role].shape[1:])) for role in roles_in}
            incoming = []
            for r in senders:
                if r == rank:
                    _place(bufs, mine, layout.senders[r], roles_in)
                else:
                    blk = {role: _empty_like_role(role, mine, layout.senders[r], cpu=True) for role in roles_in}
                    incoming.append((r, blk))
            self._exchange([(t, r, False) for r, blk in incoming for t in blk.values()], tag)
            for r, blk in incoming:
                _place(bufs, {k: v.to(dev) for k, v in blk.items()}, layout.senders[r], roles_in)
            call = FusedCall.of(layout, dev)
            if kind == "fwd":
                res = dict(zip(roles_out, fused_forward(call, bufs["q"], bufs["k"], bufs["v"], backend), strict=True))
            else:
                res = dict(zip(roles_out, fused_backward(call, bufs["q"], bufs["k"], bufs["v"], bufs["out"],
                                                         bufs["lse"], bufs["dout"], backend), strict=True))
            self._exchange([(_take(res, role, layout.senders[r]).cpu(), r, True)
                            for r, _ in incoming for role in roles_out], tag)
            out = {role: _take(res, role, layout.senders[rank]) for role in roles_out}
            self.tasks += layout.cu_q.numel() - 1
        self.rounds += 1
        self.seconds += time.perf_counter() - t0
        return out

    def _exchange(self, ops: list[tuple[torch.Tensor, int, bool]], tag: int) -> None:
        """Point-to-point sends (``True``) and receives of host tensors with plan ranks, all at once."""
        if not ops:
            return
        if self.group is None:
            raise RecoveryError("a lost server's round has rows from several trainers, but this client has no "
                                "peer group to exchange them over")
        works = []
        for t, r, send in ops:
            peer = self.peers[r]
            t = t.contiguous() if t.device.type == "cpu" else t.cpu()
            works.append((dist.isend if send else dist.irecv)(t, peer, group=self.group, tag=tag))
        try:
            for w in works:
                w.wait(timedelta(seconds=self.exchange_timeout_s))
        except RuntimeError as exc:
            raise RecoveryError(f"standing in for a lost attention server: a peer's rows did not arrive within "
                                f"{self.exchange_timeout_s:.0f} s ({exc}); the run-level restart takes over") from exc


def _rows_of(role: str, block: tuple[int, int, int, int]) -> tuple[int, int]:
    q0, nq, k0, nk = block
    return (k0, nk) if role in KV_ROLES else (q0, nq)


def _empty_like_role(role: str, mine: dict[str, torch.Tensor], block, cpu: bool = True) -> torch.Tensor:
    """A receive tensor for ``role``'s rows of a sender's ``block`` (shaped like this rank's own rows)."""
    ref = mine.get(role) if role in mine else mine[{"out": "q", "dq": "q", "dk": "k", "dv": "v"}.get(role, "q")]
    if role == "lse" and "lse" not in mine:
        from distca.attention import lse_dtype

        q = mine["q"]
        return torch.empty((_rows_of(role, block)[1], q.shape[1]), dtype=lse_dtype(q.dtype))
    return torch.empty((_rows_of(role, block)[1], *ref.shape[1:]), dtype=ref.dtype,
                       device="cpu" if cpu else ref.device)


def _place(bufs: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], block, roles) -> None:
    for role in roles:
        r0, n = _rows_of(role, block)
        bufs[role][r0:r0 + n] = rows[role]


def _take(res: dict[str, torch.Tensor], role: str, block) -> torch.Tensor:
    r0, n = _rows_of(role, block)
    return res[role][r0:r0 + n]
