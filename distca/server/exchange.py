"""A plan's rows moved by ``torch.distributed`` all-to-all: the data plane of in-place attention servers and
of a server pool that shares a process group with its trainers.

A *round* is one direction of one pass of one plan: ``to_servers`` (forward: q, k, v; backward: q, out,
dout, lse, k, v) or ``to_trainers`` (forward: out, lse; backward: dq, dk, dv). Each round is **one**
all-to-all over the group: every member packs what it sends to each peer into one byte buffer, peer
after peer, with the plan's split sizes; what it receives lands in one buffer, sender after sender.
The plan's transfer lists (``Plan.q_xfer``/``kv_xfer``, and a server's ``ServerLayout.senders`` table)
say every row that moves; nothing is re-derived. Rows a process sends to a server it hosts itself (an
in-place trainer and its own server) never enter the collective: they are gathered straight into the
server's receive buffers, and its results written straight back.

Within a chunk (one trainer-server pair) the tensors follow the round's role order, each ``rows × row
bytes``, rounded up to 16 bytes so every tensor can be viewed in its own dtype. Receive buffers (bytes
and the server's typed buffers) are grow-only per slot and reused; each round in flight holds a slot
(ping-pong keeps two), released when its results have been taken.

The collectives are asynchronous: a round returns a work handle at once (on CUDA, NCCL runs it on its
own stream), so the caller overlaps it with other work and waits only where it needs the rows. A peer
that never joins a round fails it with the process group's timeout, never a hang.

The group may be any ``torch.distributed`` process group (a subgroup of the trainers' world, or a
standalone group built from a store). Members are described by :class:`GroupRoles`: which group rank
holds each of the plan's trainers and servers.

With ``status=True`` (the server pool's group, :mod:`distca.server.group_plane`) every ``to_trainers``
chunk from a server to a trainer starts with a 16-byte status block — int64 ``(code, round number)``, code 0
for a good round — sent to every trainer of the group even where no rows move, so a trainer learns in the
same collective whether a server's computation failed (its rows are then zeros, never to be used).

It lives with the servers (the lowest layer that runs it) and the trainers' runtime imports it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distca.attention import lse_dtype
from distca.attention.tasks import row_ranges
from distca.scheduler import Plan
from distca.scheduler.relay import KvRelay, Route, kv_relay
from distca.server.layout import ServerLayout, server_layout

FWD_IN = ("q", "k", "v")
FWD_OUT = ("out", "lse")
BWD_IN = ("q", "out", "dout", "lse", "k", "v")
BWD_OUT = ("dq", "dk", "dv")
KV_ROLES = frozenset({"k", "v", "dk", "dv"})
ALIGN = 16
STATUS = "status"  # the status block's role: one row of int64 (code, round number)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class RowFormat:
    """Bytes and shape of one row of each tensor role: q-like roles have the query heads, k/v-like the kv
    heads, ``lse`` one value per query head in the kernels' lse dtype."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def spec(self, role: str) -> tuple[tuple[int, ...], torch.dtype]:
        if role == STATUS:
            return (2,), torch.int64
        if role == "lse":
            return (self.n_heads,), lse_dtype(self.dtype)
        return (self.n_kv_heads if role in KV_ROLES else self.n_heads, self.head_dim), self.dtype

    def row_bytes(self, role: str) -> int:
        tail, dt = self.spec(role)
        return _numel(tail) * torch.empty((), dtype=dt).element_size()

    def chunk(self, roles: tuple[str, ...], nq: int, nk: int) -> tuple[list[tuple[str, int, int]], int]:
        """Where each role sits in one pair's chunk: ``[(role, byte offset, rows)]`` and the chunk's size."""
        out, off = [], 0
        for role in roles:
            rows = nk if role in KV_ROLES else nq
            out.append((role, off, rows))
            off += _align(rows * self.row_bytes(role))
        return out, off


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class GroupRoles:
    """Which group rank holds each of a plan's trainers (``trainers[r]``) and servers (``servers[s]``)."""

    size: int
    me: int
    trainers: tuple[int, ...]
    servers: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.me < self.size:
            raise ValueError(f"group rank {self.me} outside a group of {self.size}")
        for what, ranks in (("trainer", self.trainers), ("server", self.servers)):
            if len(set(ranks)) != len(ranks) or any(not 0 <= r < self.size for r in ranks):
                raise ValueError(f"{what} group ranks {ranks} must be distinct ranks of a group of {self.size}")

    @classmethod
    def inplace(cls, n: int, me: int) -> GroupRoles:
        """``n`` trainers, each also the plan's server of the same index (group rank = trainer index)."""
        return cls(n, me, tuple(range(n)), tuple(range(n)))

    @classmethod
    def pool(cls, n_trainers: int, n_servers: int, me: int) -> GroupRoles:
        """Trainers first (group ranks ``0..T-1``), then the pool's servers (``T..T+S-1``)."""
        t, n = n_trainers, n_trainers + n_servers
        return cls(n, me, tuple(range(t)), tuple(range(t, n)))

    @property
    def trainer(self) -> int | None:
        """The plan trainer this process is, or None."""
        return self.trainers.index(self.me) if self.me in self.trainers else None

    @property
    def server(self) -> int | None:
        """The plan server this process hosts, or None."""
        return self.servers.index(self.me) if self.me in self.servers else None


@dataclass
class _TrainerRows:
    """One trainer's rows of one plan, per server it talks to: (server, q rows, kv rows) in the server's
    row order, index tensors on the trainer's device."""

    pairs: list[tuple[int, torch.Tensor, torch.Tensor]]


@dataclass
class Round:
    """One all-to-all in flight. ``wait()`` blocks until its bytes are in; ``blocked_s`` is how long it did."""

    work: dist.Work | None
    slot: int
    send: torch.Tensor | None  # kept alive until the collective is done
    recv: torch.Tensor | None
    recv_at: dict[int, int] = field(default_factory=dict)  # peer group rank -> byte offset in recv
    blocked_s: float = 0.0
    _done: bool = False

    def wait(self) -> None:
        if self._done:
            return
        t0 = time.perf_counter()
        if self.work is not None:
            self.work.wait()
        self.blocked_s += time.perf_counter() - t0
        self._done = True
        self.send = None


@dataclass
class _Relay:
    """A plan's relay (:mod:`distca.scheduler.relay`) as one member of the group uses it, made once per plan: the
    routes it forwards as a gateway (per member), those it takes in from other gateways (per gateway), and, for the
    routes it is the gateway of, each member's positions in the route's rows as index tensors on its device."""

    routes: KvRelay
    forwards: dict[int, list[Route]]
    incoming: dict[int, list[Route]]
    pos: dict[tuple[int, int], torch.Tensor]  # (route's trainer, member server) -> positions

    def route(self, trainer: int, server: int) -> Route | None:
        return self.routes.route(trainer, server)


class PlanCache:
    """Per-plan derived data, dropped when the plan object is gone or past ``limit`` entries."""

    def __init__(self, limit: int):
        self.limit, self.items = limit, {}

    def get(self, plan: object, make: Callable[[], object]) -> object:
        key = id(plan)
        hit = self.items.get(key)
        if hit is not None and hit[0]() is plan:
            return hit[1]
        value = make()
        self.items[key] = (weakref.ref(plan), value)
        while len(self.items) > self.limit:
            self.items.pop(next(iter(self.items)))
        return value


class RowExchange:
    """Moves plan rows between the trainers and servers of one process group (see the module docstring).

    ``pg`` is the group, ``roles`` who is who in it, ``fmt`` the rows' shape and dtype, ``device`` where this
    process's tensors live (the group's device: CUDA for NCCL, CPU for gloo); ``status``: results carry each
    server's status block (every member of the group must agree). ``nodes``: the node of each group rank's
    device; with more than one node, key/value rows that several servers of a node need from one trainer in another
    node are relayed (:mod:`distca.scheduler.relay`): sent once to a gateway server there, which forwards them in a
    second, intra-node all-to-all and sums their gradients on the way back. In-place groups only (every member a
    trainer and its own server), since every member joins the relay's collectives."""

    def __init__(self, pg: dist.ProcessGroup | None, roles: GroupRoles, fmt: RowFormat, device: torch.device | str,
                 max_plans: int = 64, status: bool = False, nodes: tuple[int, ...] | None = None):
        if pg is None and roles.size != 1:
            raise ValueError(f"a group of {roles.size} members needs a process group")
        if nodes is not None and len(nodes) != roles.size:
            raise ValueError(f"nodes must name the node of each of the group's {roles.size} ranks, got {len(nodes)}")
        self.nodes = tuple(int(n) for n in nodes) if nodes is not None else None
        self.relaying = self.nodes is not None and len(set(self.nodes)) > 1
        if self.relaying and (roles.trainers != roles.servers or status):
            raise ValueError("relayed key/value rows need an in-place group: every member a trainer and its own "
                             "server, without status blocks")
        self._relays = PlanCache(max_plans)
        self.sent_bytes = [0] * roles.size  # bytes this member has put in collectives, per destination group rank
        self.relayed_rows = 0  # key rows this member forwarded to, or summed for, its node as a relay gateway
        self.pg, self.roles, self.fmt, self.device = pg, roles, fmt, torch.device(device)
        self.head = ALIGN if status else 0  # bytes of the status block at the start of each result chunk
        self._bytes: dict[tuple[str, int], torch.Tensor] = {}
        self._typed: dict[tuple[str, int], torch.Tensor] = {}
        self._free: list[int] = []
        self._slots = 0
        self._rows = PlanCache(max_plans)
        self._layouts = PlanCache(max_plans)

    # -- slots and buffers -----------------------------------------------------------------------------
    def acquire(self) -> int:
        """A free buffer slot for one round trip (to the servers and back)."""
        if self._free:
            return self._free.pop()
        self._slots += 1
        return self._slots - 1

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def _byte_buf(self, name: str, slot: int, n: int) -> torch.Tensor:
        buf = self._bytes.get((name, slot))
        if buf is None or buf.numel() < n:
            self._bytes.pop((name, slot), None)
            buf = self._bytes[(name, slot)] = torch.empty(max(n, ALIGN), dtype=torch.uint8, device=self.device)
        return buf[:n]

    def server_buffer(self, role: str, rows: int, slot: int) -> torch.Tensor:
        """A server's typed receive buffer for ``role`` (grow-only, per slot), viewed at ``rows`` rows."""
        tail, dt = self.fmt.spec(role)
        buf = self._typed.get((role, slot))
        if buf is None or buf.shape[0] < rows:
            self._typed.pop((role, slot), None)
            buf = self._typed[(role, slot)] = torch.empty((max(rows, 1), *tail), dtype=dt, device=self.device)
        return buf[:rows]

    def nbytes(self) -> int:
        """Bytes held in receive and send buffers."""
        return sum(t.numel() * t.element_size() for t in (*self._bytes.values(), *self._typed.values()))

    # -- what a plan says ------------------------------------------------------------------------------
    def trainer_rows(self, plan: Plan) -> _TrainerRows:
        """This trainer's rows of ``plan`` per server (cached per plan)."""
        r = self.roles.trainer
        if r is None:
            raise ValueError("this process is not one of the plan's trainers")

        def make() -> _TrainerRows:
            pairs = []
            q, kv = plan.q_xfer, plan.kv_xfer
            rel = self.relay(plan)
            servers = sorted(set(q.server[q.rank == r].tolist()) | set(kv.server[kv.rank == r].tolist()))
            for s in servers:
                idx = []
                for x in (q, kv):
                    m = (x.rank == r) & (x.server == s)
                    rows = row_ranges(x.src_row[m], x.n[m])
                    if x is kv and rel is not None:
                        rows = rel.routes.wire_rows(r, s, rows)  # a gateway gets the route's union, members none
                    t = torch.from_numpy(rows)
                    idx.append(t if self.device.type == "cpu" else t.to(self.device))
                pairs.append((s, *idx))
            return _TrainerRows(pairs)

        return self._rows.get(plan, make)

    def relay(self, plan: Plan) -> _Relay | None:
        """``plan``'s relayed key/value routes as this member uses them (cached per plan); None without a node map
        or without any route."""
        if not self.relaying:
            return None

        def make() -> _Relay | None:
            routes = kv_relay(plan, [self.nodes[p] for p in self.roles.trainers],
                              [self.nodes[p] for p in self.roles.servers])
            if not routes:
                return None
            me = self.roles.server
            pos = {(rt.src, s): self._index(rt.pos(s)) for rt in routes.routes if rt.gateway == me for s in rt.members}
            return _Relay(routes, routes.forwards(me), routes.incoming(me), pos)

        return self._relays.get(plan, make)

    def _wire_nk(self, rel: _Relay | None, trainer: int, nk: int) -> int:
        """Key rows this server receives from ``trainer`` in the first all-to-all (its block holds ``nk``)."""
        route = None if rel is None else rel.route(trainer, self.roles.server)
        if route is None:
            return nk
        return route.n_rows if route.gateway == self.roles.server else 0

    def _index(self, a) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t if self.device.type == "cpu" else t.to(self.device)

    def own_layout(self, plan: Plan) -> ServerLayout:
        """The layout of the server this process hosts, for ``plan`` (cached per plan; in-place servers)."""
        s = self.roles.server
        if s is None:
            raise ValueError("this process hosts none of the plan's servers")
        return self._layouts.get(plan, lambda: server_layout(plan, s))

    # -- the collective --------------------------------------------------------------------------------
    def _alltoall(self, send: torch.Tensor, send_splits: list[int], recv: torch.Tensor,
                  recv_splits: list[int]) -> dist.Work | None:
        if self.roles.size == 1:
            return None  # one member: everything moved in place
        return self.pg.alltoall_base(recv, send, recv_splits, send_splits, dist.AllToAllOptions())

    def _start(self, slot: int, name: str, sends: dict[int, list[tuple[str, int, torch.Tensor]]],
               recv_sizes: dict[int, int], send_sizes: dict[int, int]) -> Round:
        """Pack ``sends`` (peer -> [(role, byte offset, source tensor, rows: index tensor or slice)]) and start
        the all-to-all."""
        size = self.roles.size
        send_splits = [send_sizes.get(p, 0) for p in range(size)]
        recv_splits = [recv_sizes.get(p, 0) for p in range(size)]
        for p, n in enumerate(send_splits):
            self.sent_bytes[p] += n
        send = self._byte_buf(f"{name}-send", slot, sum(send_splits))
        recv = self._byte_buf(f"{name}-recv", slot, sum(recv_splits))
        base, at = 0, {}
        for p in range(size):
            for role, off, src, rows in sends.get(p, ()):
                n = (rows.numel() if isinstance(rows, torch.Tensor) else rows.stop - rows.start)
                tail, dt = self.fmt.spec(role)
                view = send[base + off:base + off + n * self.fmt.row_bytes(role)].view(dt).view(n, *tail)
                if isinstance(rows, torch.Tensor):
                    torch.index_select(src.to(dt) if src.dtype != dt else src, 0, rows, out=view)
                else:
                    view.copy_(src[rows])
            base += send_splits[p]
        base = 0
        for p in range(size):
            at[p] = base
            base += recv_splits[p]
        return Round(self._alltoall(send, send_splits, recv, recv_splits), slot, send, recv, at)

    def _view(self, rnd: Round, peer: int, role: str, off: int, rows: int) -> torch.Tensor:
        tail, dt = self.fmt.spec(role)
        a = rnd.recv_at[peer] + off
        n = rows * self.fmt.row_bytes(role)
        return rnd.recv[a:a + n].view(dt).view(rows, *tail)

    # -- to the servers --------------------------------------------------------------------------------
    def to_servers(self, slot: int, roles: tuple[str, ...], plan: Plan | None = None,
                   tensors: dict[str, torch.Tensor] | None = None, layout: ServerLayout | None = None) -> Round:
        """Start a ``to_servers`` round: as a trainer (``plan`` and this trainer's ``tensors`` by role) send
        its rows; as a server (its ``layout``) receive its senders' rows (:meth:`server_inputs` reads them)."""
        sends: dict[int, list] = {}
        send_sizes: dict[int, int] = {}
        recv_sizes: dict[int, int] = {}
        if plan is not None:
            for s, qi, ki in self.trainer_rows(plan).pairs:
                peer = self.roles.servers[s]
                if peer == self.roles.me:
                    continue  # this process's own server reads the rows directly
                where, total = self.fmt.chunk(roles, qi.numel(), ki.numel())
                sends[peer] = [(role, off, tensors[role], ki if role in KV_ROLES else qi) for role, off, _ in where]
                send_sizes[peer] = total
        if layout is not None:
            rel = self.relay(plan) if plan is not None else None
            for r, (_qd, nq, _kd, nk) in layout.senders.items():
                peer = self.roles.trainers[r]
                if peer != self.roles.me:
                    recv_sizes[peer] = self.fmt.chunk(roles, nq, self._wire_nk(rel, r, nk))[1]
        return self._start(slot, "in", sends, recv_sizes, send_sizes)

    def server_inputs(self, rnd: Round, roles: tuple[str, ...], layout: ServerLayout, plan: Plan | None = None,
                      tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Wait for a ``to_servers`` round and assemble the server's receive buffers by role (q rows, k/v
        rows); an in-place server's own trainer rows (``plan``, ``tensors``) are gathered in directly."""
        bufs = {role: self.server_buffer(role, layout.kv_rows if role in KV_ROLES else layout.q_rows, rnd.slot)
                for role in roles}
        me_t = self.roles.trainer
        if plan is not None and me_t is not None and me_t in layout.senders:
            qd, nq, kd, nk = layout.senders[me_t]
            own = next((p for p in self.trainer_rows(plan).pairs if p[0] == self.roles.server), None)
            if own is not None:
                _, qi, ki = own
                for role in roles:
                    dst = bufs[role][kd:kd + nk] if role in KV_ROLES else bufs[role][qd:qd + nq]
                    src = tensors[role] if tensors[role].dtype == dst.dtype else tensors[role].to(dst.dtype)
                    torch.index_select(src, 0, ki if role in KV_ROLES else qi, out=dst)
        rnd.wait()
        rel = self.relay(plan) if plan is not None else None
        me_s = self.roles.server
        for r, (qd, nq, kd, nk) in layout.senders.items():
            peer = self.roles.trainers[r]
            if peer == self.roles.me:
                continue
            route = None if rel is None else rel.route(r, me_s)
            where, _ = self.fmt.chunk(roles, nq, self._wire_nk(rel, r, nk))
            for role, off, rows in where:
                if role in KV_ROLES and route is not None:
                    if route.gateway == me_s:  # the route's union: this server's own rows out of it
                        got = self._view(rnd, peer, role, off, rows)
                        torch.index_select(got, 0, rel.pos[(r, me_s)], out=bufs[role][kd:kd + nk])
                    continue  # a member's rows come from its gateway (below)
                d0 = kd if role in KV_ROLES else qd
                bufs[role][d0:d0 + rows].copy_(self._view(rnd, peer, role, off, rows))
        if rel is not None and any(role in KV_ROLES for role in roles):
            self._relay_forward(rnd, roles, layout, rel, bufs)
        return bufs

    def _relay_forward(self, rnd: Round, roles: tuple[str, ...], layout: ServerLayout, rel: _Relay,
                       bufs: dict[str, torch.Tensor]) -> None:
        """The relay's second all-to-all (every member joins it): gateways forward their routes' rows, out of the
        first round's receive buffer, to the other members of their node, which put them in their kv buffers."""
        kv = tuple(role for role in roles if role in KV_ROLES)
        me_s = self.roles.server
        sends: dict[int, list] = {}
        send_sizes: dict[int, int] = {}
        recv_sizes: dict[int, int] = {}
        for member, routes in rel.forwards.items():
            pieces, total = self._relay_chunk(kv, routes, member)
            entries = []
            for role, rt, at, _ in pieces:
                nq = layout.senders[rt.src][1]
                first = dict((ro, o) for ro, o, _ in self.fmt.chunk(roles, nq, rt.n_rows)[0])
                union = self._view(rnd, self.roles.trainers[rt.src], role, first[role], rt.n_rows)
                entries.append((role, at, union, rel.pos[(rt.src, member)]))
            sends[self.roles.servers[member]] = entries
            send_sizes[self.roles.servers[member]] = total
            self.relayed_rows += sum(rt.size(member) for rt in routes)
        incoming = {gw: self._relay_chunk(kv, routes, me_s) for gw, routes in rel.incoming.items()}
        for gw, (_, size) in incoming.items():
            recv_sizes[self.roles.servers[gw]] = size
        hop = self._start(rnd.slot, "relay", sends, recv_sizes, send_sizes)
        hop.wait()
        rnd.blocked_s += hop.blocked_s
        for gw, (pieces, _) in incoming.items():
            for role, rt, at, n in pieces:
                kd = layout.senders[rt.src][2]
                bufs[role][kd:kd + n].copy_(self._view(hop, self.roles.servers[gw], role, at, n))

    def _relay_chunk(self, kv: tuple[str, ...], routes: list[Route], member: int) -> tuple[list, int]:
        """One relay chunk between a gateway and ``member``: the member's key rows of each of ``routes``, role after
        role, route after route. Returns ``[(role, route, byte offset, rows)]`` and the chunk's size."""
        where, total = self.fmt.chunk(kv, 0, sum(rt.size(member) for rt in routes))
        pieces = []
        for role, off, _ in where:
            at = off
            for rt in routes:
                n = rt.size(member)
                pieces.append((role, rt, at, n))
                at += n * self.fmt.row_bytes(role)
        return pieces, total

    # -- back to the trainers --------------------------------------------------------------------------
    def to_trainers(self, slot: int, roles: tuple[str, ...], layout: ServerLayout | None = None,
                    results: dict[str, torch.Tensor] | None = None, plan: Plan | None = None,
                    status: tuple[int, int] = (0, 0)) -> Round:
        """Start a ``to_trainers`` round: as a server (its ``layout`` and ``results`` by role, on its rows, and
        with a status block its ``status``) send each trainer its rows; as a trainer (``plan``) receive its rows
        (:meth:`trainer_results`, and :meth:`trainer_status`)."""
        sends: dict[int, list] = {}
        send_sizes: dict[int, int] = {}
        recv_sizes: dict[int, int] = {}
        head = self.head
        if layout is not None:
            rel = self.relay(plan) if plan is not None else None
            sums = self._relay_gradients(slot, roles, layout, rel, results) if rel is not None else {}
            block = torch.tensor([status], dtype=torch.int64, device=self.device)
            for r, peer in enumerate(self.roles.trainers):
                if peer == self.roles.me or not (head or r in layout.senders):
                    continue  # our own trainer's rows are written back directly by trainer_results
                sends[peer] = [(STATUS, 0, block, slice(0, 1))] if head else []
                send_sizes[peer] = head
                if r in layout.senders:
                    qd, nq, kd, nk = layout.senders[r]
                    relayed = rel is not None and rel.route(r, self.roles.server) is not None
                    where, total = self.fmt.chunk(roles, nq, self._wire_nk(rel, r, nk))
                    for role, off, rows in where:
                        if role in KV_ROLES and relayed:  # the gateway returns the route's summed rows, members none
                            if rows:
                                sends[peer].append((role, head + off, sums[r][role], slice(0, rows)))
                            continue
                        sends[peer].append((role, head + off, results[role], slice(kd, kd + nk) if role in KV_ROLES
                                            else slice(qd, qd + nq)))
                    send_sizes[peer] += total
        if plan is not None:
            sizes = {s: self.fmt.chunk(roles, qi.numel(), ki.numel())[1] for s, qi, ki in self.trainer_rows(plan).pairs}
            for s, peer in enumerate(self.roles.servers):
                if peer != self.roles.me and (head or s in sizes):
                    recv_sizes[peer] = head + sizes.get(s, 0)
        return self._start(slot, "out", sends, recv_sizes, send_sizes)

    def _relay_gradients(self, slot: int, roles: tuple[str, ...], layout: ServerLayout, rel: _Relay,
                         results: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        """The relay's way back (every member joins its all-to-all): members send their key-row gradients of each
        route to its gateway, which sums them per key row; returns, for the routes this server is the gateway of,
        ``{trainer: {role: summed rows of the route's union}}`` (empty when the round has no key-row roles)."""
        kv = tuple(role for role in roles if role in KV_ROLES)
        if not kv:
            return {}
        me_s = self.roles.server
        sends: dict[int, list] = {}
        send_sizes: dict[int, int] = {}
        recv_sizes: dict[int, int] = {}
        for gw, routes in rel.incoming.items():
            pieces, total = self._relay_chunk(kv, routes, me_s)
            entries = []
            for role, rt, at, n in pieces:  # this member's gradients of the route's keys: its kv block from rt.src
                kd = layout.senders[rt.src][2]
                entries.append((role, at, results[role], slice(kd, kd + n)))
            sends[self.roles.servers[gw]] = entries
            send_sizes[self.roles.servers[gw]] = total
        forwards = {member: self._relay_chunk(kv, routes, member) for member, routes in rel.forwards.items()}
        for member, (pieces, size) in forwards.items():
            recv_sizes[self.roles.servers[member]] = size
            self.relayed_rows += sum(n for role, _, _, n in pieces if role == kv[0])
        hop = self._start(slot, "relay", sends, recv_sizes, send_sizes)
        hop.wait()
        received: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (route src, member) -> role -> rows
        for member, (pieces, _) in forwards.items():
            for role, rt, at, n in pieces:
                received.setdefault((rt.src, member), {})[role] = self._view(hop, self.roles.servers[member], role,
                                                                              at, n)
        sums: dict[int, dict[str, torch.Tensor]] = {}
        for rt in rel.routes.routes:
            if rt.gateway != me_s:
                continue
            _, _, kd, nk = layout.senders[rt.src]
            acc = {}
            for role in kv:
                tail, dt = self.fmt.spec(role)
                acc[role] = torch.zeros((rt.n_rows, *tail), dtype=dt, device=self.device)
                for member in rt.members:  # in server order: a fixed summation order on every run
                    got = results[role][kd:kd + nk] if member == me_s else received[(rt.src, member)][role]
                    acc[role].index_add_(0, rel.pos[(rt.src, member)], got)
            sums[rt.src] = acc
        return sums

    def trainer_status(self, rnd: Round) -> dict[int, tuple[int, int]]:
        """Wait for a ``to_trainers`` round and read every server's status block: ``{server: (code, round)}``
        (an exchange without status blocks: empty)."""
        rnd.wait()
        if not self.head:
            return {}
        out = {}
        for s, peer in enumerate(self.roles.servers):
            if peer != self.roles.me:
                code, seq = self._view(rnd, peer, STATUS, 0, 1)[0].tolist()
                out[s] = (int(code), int(seq))
        return out

    def trainer_results(self, rnd: Round, roles: tuple[str, ...], plan: Plan, dst: dict[str, torch.Tensor],
                        layout: ServerLayout | None = None, results: dict[str, torch.Tensor] | None = None) -> None:
        """Wait for a ``to_trainers`` round and put its rows into this trainer's tensors ``dst``: query-row
        results are written, key-row gradients (``dk``, ``dv``) added (a key row sent to several servers sums
        their gradients). An in-place server's results for its own trainer (``layout``, ``results``) go in
        directly."""
        rnd.wait()
        me_s = self.roles.server
        for s, qi, ki in self.trainer_rows(plan).pairs:
            peer = self.roles.servers[s]
            if peer == self.roles.me:
                if layout is None or results is None or s != me_s:
                    raise ValueError("an in-place server must pass its layout and results for its own rows")
                qd, nq, kd, nk = layout.senders[self.roles.trainer]
                views = {role: results[role][kd:kd + nk] if role in KV_ROLES else results[role][qd:qd + nq]
                         for role in roles}
            else:
                where, _ = self.fmt.chunk(roles, qi.numel(), ki.numel())
                views = {role: self._view(rnd, peer, role, self.head + off, rows) for role, off, rows in where}
            for role, v in views.items():
                if role in ("dk", "dv"):
                    dst[role].index_add_(0, ki, v.to(dst[role].dtype))
                else:
                    dst[role][qi] = v.to(dst[role].dtype)
