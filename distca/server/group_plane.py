"""An attention server's side of the pool's collective data plane (``cluster.data_plane: collective``).

The pool's servers and the trainers of each pipeline stage form one standalone ``torch.distributed`` group per
stage — the stage's data-parallel trainers at group ranks ``0..T-1``, then every server of the pool at
``T..T+S-1`` (:meth:`GroupRoles.pool <distca.server.exchange.GroupRoles.pool>`) — built from a TCPStore that
server 0 hosts, each group under its own key prefix. Plan rows move by one all-to-all per round
(:class:`~distca.server.exchange.RowExchange`, the same code as in-place servers); ZeroMQ stays the control
plane and carries only small messages::

    trainer   → server 0      GROUP {op: store}                     ACK {host, port}: where the store listens
    trainer   → every server  GROUP {op: join, session, group, rank, n_trainers, n_servers, server, store,
                                     timeout_s, format}              ACK; the group's thread joins the group
    dp rank 0 → every server  PLAN  (each plan's layout, to every server: all members join every round)
    dp rank 0 → every server  ROUND {session, group, pass} plan_id   no reply: the group's next round
    server    → its trainers  ERROR {error, group, round}           a round whose computation failed
    dp rank 0 → every server  GROUP {op: leave, session, group}     ACK; the group's thread ends

One worker thread per group serves its ROUND notices first in, first out — the order the stage's trainers run
their rounds — so the rounds of different stages never wait on each other on a server (one thread joining stage
0's collective while another server is in stage 1's would deadlock). The threads never touch the server's
ZeroMQ socket (sockets are not thread-safe): what they have to say waits in an outbox that the server's loop
sends (:meth:`GroupPlane.flush`).

Never a hang, never a wrong tensor: every collective has the group's timeout; a round whose computation fails
still completes its collectives, with zero rows and a non-zero status block that every trainer of the group
reads in the same collective (then the ERROR's text); a collective that fails (a peer gone or late) breaks the
group for good and every later notice to it gets an ERROR. A malformed or unexpected GROUP or ROUND message gets
an ERROR reply and changes no state. Sessions (one per training run, chosen by the trainers) keep the groups of
different runs on one pool apart.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import zmq

from distca.server.compute import FusedCall, fused_backward, fused_forward
from distca.server.exchange import BWD_IN, BWD_OUT, FWD_IN, FWD_OUT, KV_ROLES, GroupRoles, RowExchange, RowFormat
from distca.server.layout import ServerLayout
from distca.server.peerlog import MAX_REPLY, PeerLog, peer_text
from distca.transport.channel import Endpoint
from distca.transport.wire import Kind, Message, WireError

log = logging.getLogger(__name__)

MAX_GROUPS = 32  # live data-plane groups per server; past it the oldest is closed
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}")
PASSES = {"fwd": (FWD_IN, FWD_OUT), "bwd": (BWD_IN, BWD_OUT)}


def group_prefix(session: str, group: int) -> str:
    """The store prefix of one data-plane group: ``session`` (a training run) and ``group`` (its stage)."""
    return f"distca/{session}/group{group}"


def store_client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the group store at ``host:port`` (raises when it cannot connect within ``timeout_s``)."""
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def row_format_key(fmt: RowFormat) -> list:
    """What a JOIN says about the rows (heads, kv heads, head dim, dtype): trainers and servers must agree."""
    return [fmt.n_heads, fmt.n_kv_heads, fmt.head_dim, str(fmt.dtype).removeprefix("torch.")]


@dataclass(frozen=True)
class Join:
    """The fields of a JOIN, checked; every trainer of a group sends the same ones but its ``rank``."""

    session: str
    group: int
    rank: int
    n_trainers: int
    n_servers: int
    server: int
    store: tuple[str, int]
    timeout_s: float

    @classmethod
    def parse(cls, x: dict[str, Any]) -> Join:
        def integer(key: str, lo: int, hi: int) -> int:
            v = x.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise WireError(f"GROUP join: {key} must be an integer in [{lo}, {hi}], got {v!r}")
            return v

        session = x.get("session")
        if not isinstance(session, str) or not _SESSION.fullmatch(session):
            raise WireError(f"GROUP join: session must be 1-64 letters, digits, '-' or '_', got {session!r}")
        n_trainers, n_servers = integer("n_trainers", 1, 1 << 16), integer("n_servers", 1, 1 << 16)
        store = x.get("store")
        if not (isinstance(store, list | tuple) and len(store) == 2 and isinstance(store[0], str)
                and 0 < len(store[0]) <= 255 and isinstance(store[1], int) and 0 < store[1] < 65536):
            raise WireError(f"GROUP join: store must be [host, port], got {store!r}")
        timeout = x.get("timeout_s")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 86400:
            raise WireError(f"GROUP join: timeout_s must be in (0, 86400] seconds, got {timeout!r}")
        return cls(session, integer("group", 0, 1 << 16), integer("rank", 0, n_trainers - 1), n_trainers, n_servers,
                   integer("server", 0, n_servers - 1), (store[0], store[1]), float(timeout))

    def same_group(self, other: Join) -> bool:
        return (self.n_trainers, self.n_servers, self.server, self.store, self.timeout_s) == (
            other.n_trainers, other.n_servers, other.server, other.store, other.timeout_s)


class _Group:
    """One data-plane group on this server: its trainers' ZeroMQ identities (main thread) and the worker thread
    that joins the group and serves its rounds."""

    def __init__(self, plane: GroupPlane, join: Join):
        self.plane, self.join = plane, join
        self.trainers: dict[int, bytes] = {}  # dp rank -> identity, for ERRORs (main thread only)
        self.todo: queue.SimpleQueue = queue.SimpleQueue()  # (pass, layout) notices; None: leave
        self.broken: str | None = None  # why the group cannot serve any more (set by the worker)
        self.rounds = 0
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"{plane.name}-group{join.group}-{join.session}")
        self.thread.start()

    @property
    def label(self) -> str:
        return f"data-plane group {self.join.group} (session {self.join.session})"

    def stop(self) -> None:
        self.todo.put(None)

    def _run(self) -> None:
        j = self.join
        try:
            store = dist.PrefixStore(group_prefix(j.session, j.group), store_client(*j.store, j.timeout_s))
            pg = dist.ProcessGroupGloo(store, j.n_trainers + j.server, j.n_trainers + j.n_servers,
                                       timedelta(seconds=j.timeout_s))
        except Exception as exc:  # the trainers' own rendezvous fails too; this names the server's side
            self._fail(f"{self.plane.name}: could not join {self.label}: {type(exc).__name__}: {exc}")
            return
        x = RowExchange(pg, GroupRoles.pool(j.n_trainers, j.n_servers, j.n_trainers + j.server), self.plane.fmt,
                        "cpu", status=True)
        while True:
            item = self.todo.get()
            if item is None:
                break
            try:
                self._round(x, *item)
            except Exception as exc:  # a collective failed: a peer is gone or late; the group is done
                self._fail(f"{self.plane.name}: {item[0]} round {self.rounds} of plan {item[1].plan_id} in "
                           f"{self.label} failed: {type(exc).__name__}: {exc}")
                break
        del x, pg  # the group's connections close here

    def _fail(self, why: str) -> None:
        self.plane.say(logging.WARNING, why)
        self.broken = why
        self.plane.outbox.put((self, 0, why, self.rounds))

    def _round(self, x: RowExchange, kind: str, layout: ServerLayout) -> None:
        self.rounds += 1
        roles_in, roles_out = PASSES[kind]
        slot = x.acquire()
        try:
            bufs = x.server_inputs(x.to_servers(slot, roles_in, layout=layout), roles_in, layout)
            t0 = time.perf_counter()
            code = 0
            try:
                res = self.plane.compute(layout, kind, bufs)
            except Exception as exc:  # the round completes anyway, with zeros its trainers are told not to use
                self.plane.say(logging.ERROR, f"{self.plane.name}: {kind} round of plan {layout.plan_id} failed",
                               exc_info=exc)
                code = 1
                res = {role: torch.zeros((layout.kv_rows if role in KV_ROLES else layout.q_rows,
                                          *x.fmt.spec(role)[0]), dtype=x.fmt.spec(role)[1]) for role in roles_out}
                self.plane.outbox.put((self, layout.plan_id, f"{self.plane.name}: {type(exc).__name__}: {exc}",
                                       self.rounds))
            self.plane.account(time.perf_counter() - t0)
            x.to_trainers(slot, roles_out, layout=layout, results=res, status=(code, self.rounds)).wait()
        finally:
            x.release(slot)


class GroupPlane:
    """The data-plane groups of one attention server; its loop calls :meth:`handle` for GROUP and ROUND
    messages and :meth:`flush` on every turn, all on the loop's thread."""

    def __init__(self, name: str, fmt: RowFormat, device: str, backend: str, reject_nonfinite: bool, host: str):
        self.name, self.fmt, self.backend, self.host = name, fmt, backend, host
        self.device = torch.device(device)
        self.reject_nonfinite = reject_nonfinite
        self.groups: OrderedDict[tuple[str, int], _Group] = OrderedDict()
        self.retired: list[_Group] = []  # groups told to stop whose threads may still be finishing
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # (group, plan id, error, round) for the loop to send
        self.store: dist.TCPStore | None = None
        self._lock = threading.Lock()
        self.busy_s = 0.0
        self.served = 0
        self.peer_log = PeerLog(log)  # the groups' lines: a peer's joins and rounds can make many

    def say(self, level: int, text: str, exc_info: BaseException | None = None) -> None:
        """Log a line about a group (text that may quote a peer's fields, escaped; within the log budget)."""
        with self._lock:
            self.peer_log.line(level, None, peer_text(text), exc_info=exc_info)

    @classmethod
    def of(cls, cfg: Any) -> GroupPlane:
        """The plane of a server with :class:`~distca.server.loop.ServerConfig` ``cfg`` (not imported: the loop
        imports this module)."""
        fmt = RowFormat(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, getattr(torch, cfg.dtype))
        return cls(cfg.name, fmt, cfg.device, cfg.backend, cfg.reject_nonfinite, cfg.transport.host)

    # -- the worker threads' computation ----------------------------------------------------------
    def account(self, busy_s: float) -> None:
        with self._lock:
            self.busy_s += busy_s
            self.served += 1

    def compute(self, layout: ServerLayout, kind: str, bufs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One round's fused call on this server's device (rows staged from and back to host memory)."""
        if self.reject_nonfinite:
            for role, t in bufs.items():
                if role != "lse" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    for rank, (qd, nq, kd, nk) in sorted(layout.senders.items()):
                        a, n = (kd, nk) if role in KV_ROLES else (qd, nq)
                        if not bool(torch.isfinite(t[a:a + n]).all()):
                            raise WireError(f"tensor {role} of rank {rank} holds NaN or inf")
                    raise WireError(f"tensor {role} holds NaN or inf")
        dev = self.device
        on = (lambda t: t) if dev.type == "cpu" else (lambda t: t.to(dev))
        call = FusedCall.of(layout, dev)
        b = {role: on(t) for role, t in bufs.items()}
        if kind == "fwd":
            out, lse = fused_forward(call, b["q"], b["k"], b["v"], self.backend)
            res = {"out": out, "lse": lse}
        else:
            dq, dk, dv = fused_backward(call, b["q"], b["k"], b["v"], b["out"], b["lse"], b["dout"], self.backend)
            res = {"dq": dq, "dk": dk, "dv": dv}
        return res if dev.type == "cpu" else {role: t.to("cpu") for role, t in res.items()}

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"busy_s": self.busy_s, "served": self.served, "groups": len(self.groups)}

    # -- the loop's side ---------------------------------------------------------------------------
    def handle(self, ep: Endpoint, ident: bytes, msg: Message, plans: dict[int, ServerLayout]) -> None:
        """Answer one GROUP or ROUND message; a bad one raises :class:`WireError` (the loop replies ERROR)."""
        if msg.kind == Kind.ROUND:
            self._notice(msg, plans)
            return
        op = msg.extra.get("op")
        if op == "store":
            if self.store is None:
                self.store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                           timeout=timedelta(seconds=300))
            ep.send(Kind.ACK, to=ident, request_id=msg.request_id, extra={"host": self.host, "port": self.store.port})
        elif op == "join":
            self._join(ident, msg)
            ep.send(Kind.ACK, to=ident, request_id=msg.request_id)
        elif op == "leave":
            key = self._key(msg.extra, "leave")
            group = self.groups.pop(key, None)
            if group is not None:
                self._retire(group)
            ep.send(Kind.ACK, to=ident, request_id=msg.request_id)
        else:
            raise WireError(f"GROUP op must be 'store', 'join' or 'leave', got {op!r}")

    @staticmethod
    def _key(x: dict[str, Any], what: str) -> tuple[str, int]:
        session, group = x.get("session"), x.get("group")
        if not isinstance(session, str) or isinstance(group, bool) or not isinstance(group, int):
            raise WireError(f"{what}: session (str) and group (int) are required, got {session!r}, {group!r}")
        return session, group

    def _join(self, ident: bytes, msg: Message) -> None:
        j = Join.parse(msg.extra)
        want = row_format_key(self.fmt)
        if msg.extra.get("format") != want:
            raise WireError(f"GROUP join: the trainer's rows are {msg.extra.get('format')!r} (heads, kv heads, head "
                            f"dim, dtype), this server computes {want!r}")
        key = (j.session, j.group)
        group = self.groups.get(key)
        if group is not None and not group.join.same_group(j):
            raise WireError(f"GROUP join: {group.label} was joined as {group.join}, now asked as {j}")
        if group is not None and group.broken:
            raise WireError(f"{group.label} is broken: {group.broken}")
        if group is None:
            while len(self.groups) >= MAX_GROUPS:
                _, old = self.groups.popitem(last=False)
                log.warning("%s: closing %s (more than %d groups)", self.name, old.label, MAX_GROUPS)
                self._retire(old)
            group = self.groups[key] = _Group(self, j)
        group.trainers[j.rank] = ident

    def _notice(self, msg: Message, plans: dict[int, ServerLayout]) -> None:
        key = self._key(msg.extra, "ROUND")
        group = self.groups.get(key)
        if group is None:
            raise WireError(f"ROUND for data-plane group {key[1]} of session {key[0]!r}: not joined here")
        if group.broken:
            raise WireError(f"{group.label} is broken: {group.broken}")
        kind = msg.extra.get("pass")
        if kind not in PASSES:
            raise WireError(f"ROUND: pass must be 'fwd' or 'bwd', got {kind!r}")
        layout = plans.get(msg.plan_id)
        if layout is None:
            raise WireError(f"ROUND: unknown plan {msg.plan_id}: send PLAN first")
        if any(not 0 <= r < group.join.n_trainers for r in layout.senders):
            raise WireError(f"ROUND: plan {msg.plan_id} has senders {sorted(layout.senders)} outside the "
                            f"{group.join.n_trainers} trainers of {group.label}")
        group.todo.put((kind, layout))

    def flush(self, ep: Endpoint) -> None:
        """Send what the worker threads have to say: each failed round's (or broken group's) ERROR, to every
        trainer of the group."""
        while True:
            try:
                group, pid, error, rnd = self.outbox.get_nowait()
            except queue.Empty:
                return
            for ident in group.trainers.values():
                try:
                    ep.send(Kind.ERROR, to=ident, plan_id=pid,
                            extra={"error": peer_text(error, MAX_REPLY), "group": group.join.group, "round": rnd})
                except zmq.ZMQError as exc:  # a trainer gone: it learns nothing more anyway
                    log.warning("%s: could not send an error to a trainer of %s: %s", self.name, group.label, exc)

    def _retire(self, group: _Group) -> None:
        group.stop()
        self.retired = [g for g in self.retired if g.thread.is_alive()] + [group]

    def close(self, join_s: float = 10.0) -> None:
        """End every group's thread (after the rounds it was told about; a process must not exit while one
        still tears its process group down) and stop hosting the store."""
        for group in self.groups.values():
            self._retire(group)
        self.groups.clear()
        deadline = time.monotonic() + join_s
        for group in self.retired:
            group.thread.join(timeout=max(deadline - time.monotonic(), 0.0))
            if group.thread.is_alive():
                log.warning("%s: the thread of %s did not end within %.0f s", self.name, group.label, join_s)
        self.retired = []
        self.store = None
