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

import numpy as np
import torch

from distca.attention.masked import KINDS, RectCall
from distca.errors import AttentionInputError
from distca.scheduler import Plan
from distca.scheduler.calls import server_call, server_rects, server_senders
from distca.transport.wire import WireError

RECT_COLUMNS = ("q0", "q1", "k0", "k1", "kind", "window")  # the rects table's columns (kind: index into KINDS)


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
    # A mask family other than causal/window: its kernel rectangles over the receive buffers, int64 [n, 6] with
    # RECT_COLUMNS (cu_q, cu_k are then [0] and key_rows empty); None: the one fused varlen call above.
    rects: torch.Tensor | None = None

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        table = torch.tensor([[r, *v] for r, v in sorted(self.senders.items())], dtype=torch.int64).reshape(-1, 5)
        out = [("cu_q", self.cu_q), ("cu_k", self.cu_k), ("key_rows", self.key_rows), ("senders", table)]
        return out if self.rects is None else [*out, ("rects", self.rects)]

    def rect_call(self) -> RectCall | None:
        """The rectangles as a planned :class:`~distca.attention.masked.RectCall` (None for a fused-call layout)."""
        if self.rects is None:
            return None
        cols = self.rects.numpy().T
        return RectCall.build(*cols[:4], cols[4], cols[5], n_q=self.q_rows, n_k=self.kv_rows)

    def extra(self) -> dict:
        return {"window": self.window, "max_q": self.max_q, "max_k": self.max_k, "q_rows": self.q_rows,
                "kv_rows": self.kv_rows}

    @classmethod
    def from_message(cls, pid: int, tensors: dict[str, torch.Tensor], extra: dict, max_rows: int) -> ServerLayout:
        """A layout received in a PLAN, checked completely (:meth:`validate`); rows beyond ``max_rows`` are
        refused before anything is sized from them."""
        for key in ("window", "max_q", "max_k", "q_rows", "kv_rows"):
            v = extra.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v < 1 << 62:
                raise WireError(f"PLAN {pid}: {key} must be an integer, got {_short(v)}")
        q_rows, kv_rows = extra["q_rows"], extra["kv_rows"]
        if max(q_rows, kv_rows) > max_rows:
            raise WireError(f"PLAN {pid}: {q_rows} q rows and {kv_rows} k/v rows per round exceed this server's "
                            f"bound of {max_rows} rows")
        want = {"cu_q": torch.int32, "cu_k": torch.int32, "key_rows": torch.int64, "senders": torch.int64}
        if "rects" in tensors:
            want["rects"] = torch.int64
        if sorted(tensors) != sorted(want) or any(tensors[k].dtype != dt for k, dt in want.items()):
            raise WireError(f"PLAN {pid}: needs tensors cu_q, cu_k (int32), key_rows and senders (int64), and "
                            f"optionally rects (int64), got {_short({k: str(t.dtype) for k, t in tensors.items()})}")
        table = tensors["senders"]
        if table.dim() != 2 or table.shape[1] != 5 or any(tensors[k].dim() != 1 for k in ("cu_q", "cu_k", "key_rows")):
            raise WireError(f"PLAN {pid}: cu_q, cu_k and key_rows must be vectors and senders an [n, 5] table")
        senders = {int(r): (int(a), int(b), int(c), int(d)) for r, a, b, c, d in table.tolist()}
        if len(senders) != table.shape[0]:
            raise WireError(f"PLAN {pid}: a rank appears twice in the senders table")
        rects = tensors.get("rects")
        if rects is not None and (rects.dim() != 2 or rects.shape[1] != len(RECT_COLUMNS)):
            raise WireError(f"PLAN {pid}: rects must be an [n, {len(RECT_COLUMNS)}] table, got {tuple(rects.shape)}")
        layout = cls(pid, extra["window"], tensors["cu_q"].clone(), tensors["cu_k"].clone(), extra["max_q"],
                     extra["max_k"], tensors["key_rows"].clone(), q_rows, kv_rows, senders,
                     None if rects is None else rects.clone())
        layout.validate()
        return layout

    def validate(self) -> None:
        """Reject layouts that would index outside the buffers, ask a kernel for more than the rows hold, or leave
        a row no sender writes (the server would serve whatever a previous round left there)."""
        if self.cu_q.dtype != torch.int32 or self.cu_k.dtype != torch.int32 or self.key_rows.dtype != torch.int64:
            raise WireError("PLAN: cu_q/cu_k must be int32 and key_rows int64")
        if self.window != -1 and self.window < 1:
            raise WireError(f"PLAN: window must be -1 or >= 1, got {self.window}")
        if min(self.q_rows, self.kv_rows) < 0:
            raise WireError(f"PLAN: negative buffer rows ({self.q_rows} q, {self.kv_rows} k/v)")
        if self.cu_q.numel() < 1 or self.cu_q.numel() != self.cu_k.numel() or self.cu_q.numel() > self.q_rows + 1:
            raise WireError(f"PLAN: cu_q and cu_k must have the same length, 1 to q_rows + 1 = {self.q_rows + 1}, "
                            f"got {self.cu_q.numel()} and {self.cu_k.numel()}")
        if self.rects is not None:
            self._validate_rects()
        else:
            self._validate_fused()
        self._validate_senders()

    def _validate_rects(self) -> None:
        """A rectangles layout: no fused-call metadata, and rectangles inside the buffers (RectCall checks them)."""
        if self.cu_q.numel() != 1 or self.cu_k.numel() != 1 or self.key_rows.numel() or self.max_q or self.max_k:
            raise WireError("PLAN: a rectangles layout has no fused call (cu_q = cu_k = [0], no key_rows, max 0)")
        if self.rects.dtype != torch.int64 or self.rects.dim() != 2 or self.rects.shape[1] != len(RECT_COLUMNS):
            raise WireError(f"PLAN: rects must be an int64 [n, {len(RECT_COLUMNS)}] table")
        # A family's rectangles per query row: at most 3 (sink + window); a slices mask may stack a few more on a row.
        if self.rects.shape[0] > 8 * self.q_rows + 4096:
            raise WireError(f"PLAN: {self.rects.shape[0]} rectangles for {self.q_rows} q rows, more than a plan makes")
        kinds = self.rects[:, 4]
        if self.rects.numel() and (int(kinds.min()) < 0 or int(kinds.max()) >= len(KINDS)):
            raise WireError(f"PLAN: rectangle kinds must be indices into {KINDS}")
        try:
            self.rect_call()
        except (AttentionInputError, ValueError) as exc:
            raise WireError(f"PLAN: bad rectangles: {exc}") from None

    def _validate_fused(self) -> None:
        dq, dk = self.cu_q.diff(), self.cu_k.diff()
        if int(self.cu_q[0]) or int(self.cu_k[0]) or bool((dq < 1).any()) or bool((dk < 0).any()):
            raise WireError("PLAN: cu_seqlens must start at 0, queries strictly and keys weakly increasing")
        if int(self.cu_q[-1]) != self.q_rows or int(self.cu_k[-1]) != self.key_rows.numel():
            raise WireError("PLAN: cu_seqlens do not match the buffer sizes")
        longest_q, longest_k = (int(dq.max()), int(dk.max())) if dq.numel() else (0, 0)
        if (self.max_q, self.max_k) != (longest_q, longest_k):
            raise WireError(f"PLAN: max_q {self.max_q} and max_k {self.max_k} are not the longest task's rows")
        if self.max_k > self.kv_rows:
            raise WireError(f"PLAN: a task of {self.max_k} keys is longer than the {self.kv_rows} k/v rows")
        if self.key_rows.numel() and (int(self.key_rows.min()) < 0 or int(self.key_rows.max()) >= self.kv_rows):
            raise WireError("PLAN: key_rows index outside the k/v buffer")

    def _validate_senders(self) -> None:
        for r, (qd, nq, kd, nk) in self.senders.items():
            if not 0 <= r < 1 << 31:
                raise WireError(f"PLAN: sender rank {r} outside [0, 2**31)")
            if min(qd, nq, kd, nk) < 0 or qd + nq > self.q_rows or kd + nk > self.kv_rows:
                raise WireError(f"PLAN: rows of rank {r} fall outside the receive buffers")
        for what, blocks, total in (("q", [(v[0], v[1]) for v in self.senders.values()], self.q_rows),
                                    ("k/v", [(v[2], v[3]) for v in self.senders.values()], self.kv_rows)):
            at = 0
            for a, n in sorted(b for b in blocks if b[1]):
                if a != at:
                    break
                at = a + n
            if at != total or sum(n for _, n in blocks) != total:
                raise WireError(f"PLAN: the senders' {what} rows do not cover the {total} {what} rows exactly once "
                                "(every row must be written by one sender each round)")


def _short(value: object, limit: int = 120) -> str:
    """A peer's value in an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def server_layout(plan: Plan, server: int, group: int = 0) -> ServerLayout:
    """Server ``server``'s layout of ``plan`` (for trainer group ``group``, see :func:`plan_id`)."""
    if plan.masked:
        r = server_rects(plan, server)
        kind = np.array([KINDS.index(k) for k in r.kind.tolist()], dtype=np.int64)
        table = torch.from_numpy(np.stack([r.q0, r.q1, r.k0, r.k1, kind, r.window], axis=1).astype(np.int64))
        return ServerLayout(plan_id(plan, group), -1, torch.zeros(1, dtype=torch.int32),
                            torch.zeros(1, dtype=torch.int32), 0, 0, torch.zeros(0, dtype=torch.int64),
                            int(plan.server_q_rows[server]), int(plan.server_kv_rows[server]),
                            server_senders(plan, server), table.reshape(-1, len(RECT_COLUMNS)))
    call = server_call(plan, server)
    return ServerLayout(plan_id(plan, group), plan.window, torch.from_numpy(call.cu_q), torch.from_numpy(call.cu_k),
                        call.max_q, call.max_k, torch.from_numpy(call.key_rows), call.q_rows, call.kv_rows,
                        call.senders)
