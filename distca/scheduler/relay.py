"""Node-level relay of key/value rows: hierarchical dispatch of a plan's ``kv_xfer`` across nodes.

Under causal masks a document spanning many devices has keys that many servers need: every server that runs
some of the document's late queries needs its early keys. Sent directly, the holder's network link carries one
copy per such server, and at 64 GPUs that one link is the step's critical path (``benchmarks/attention_scaling.py``:
the busiest GPU sends ~6x the mean, 88% of it k/v). A relay sends each key row **once per node** over the slow
inter-node link, to one *gateway* server of that node, which forwards to the node's other servers over the fast
intra-node link (NVLink). Gradients take the way back: the node's servers send their ``dk``/``dv`` rows to the
gateway, which sums them and returns one row per key to its trainer. Queries never relay (each query row goes to
one server).

A **route** is one (trainer, destination node) whose key rows at least ``min_members`` servers of that node need.
Its ``rows`` are the union of those servers' key rows on the trainer (sorted, unique); its gateway is chosen to
spread the node's inbound rows over its servers (:func:`kv_relay`); and each member's ``pos`` lists, in the order
of its own kv receive block from that trainer, where its rows sit in ``rows``. Every rank derives the same relay
from the same plan and node map, so nothing about it is ever sent. A route holds its members' rows as runs (the
plan's transfers); sizes, the gateway choice and the gain rule need only those, and ``rows``/``pos`` are spelled
out on first use, so a rank pays only for the routes it sends, forwards or receives. Pure numpy; the data plane is
:class:`distca.server.exchange.RowExchange` (``nodes=``), the cost model ``benchmarks/attention_scaling.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from distca.attention.tasks import row_ranges
from distca.errors import InputError
from distca.scheduler.plan import Plan

MIN_GAIN = 0.1  # relay a plan only if it cuts the busiest device's inter-node key rows by at least this share


@dataclass(frozen=True, eq=False)
class Route:
    """Key rows of trainer ``src`` that several servers of one other node need, sent once to ``gateway``."""

    src: int
    gateway: int
    n_rows: int  # rows of the union: what crosses to the gateway
    members: tuple[int, ...]  # the servers that need rows of it, ascending; the gateway among them
    # per member: its rows on ``src`` as runs (first row, length), in the order of its kv receive block
    runs: tuple[tuple[np.ndarray, np.ndarray], ...]

    def size(self, server: int) -> int:
        """Rows member ``server`` needs."""
        return self._sizes[server]

    @cached_property
    def _sizes(self) -> dict[int, int]:
        return {s: int(n.sum()) for s, (_, n) in zip(self.members, self.runs, strict=True)}

    @cached_property
    def rows(self) -> np.ndarray:
        """The union, spelled out: ``src``'s local rows, sorted and unique (int64)."""
        return np.unique(np.concatenate([row_ranges(a, n) for a, n in self.runs]))

    def pos(self, server: int) -> np.ndarray:
        """Where member ``server``'s rows sit in :attr:`rows`, in its receive-block order (int64)."""
        a, n = self.runs[self.members.index(server)]
        return np.searchsorted(self.rows, row_ranges(a, n))


@dataclass(frozen=True)
class KvRelay:
    """A plan's relayed key/value routes and, per relayed (trainer, server) pair, the route carrying its rows."""

    routes: tuple[Route, ...]
    via: dict[tuple[int, int], int]  # (trainer, server) -> index into routes

    def __bool__(self) -> bool:
        return bool(self.routes)

    def route(self, trainer: int, server: int) -> Route | None:
        i = self.via.get((trainer, server))
        return None if i is None else self.routes[i]

    def wire_rows(self, trainer: int, server: int, rows: np.ndarray) -> np.ndarray:
        """The key rows ``trainer`` sends ``server`` itself, given the rows the plan sends it (``rows``): the route's
        union to its gateway, nothing to the other members, ``rows`` where the pair is not relayed."""
        r = self.route(trainer, server)
        if r is None:
            return rows
        return r.rows if r.gateway == server else rows[:0]

    def forwards(self, gateway: int) -> dict[int, list[Route]]:
        """Routes ``gateway`` forwards, per member server it forwards to (routes in order)."""
        out: dict[int, list[Route]] = {}
        for r in self.routes:
            if r.gateway == gateway:
                for s in r.members:
                    if s != gateway:
                        out.setdefault(s, []).append(r)
        return out

    def incoming(self, server: int) -> dict[int, list[Route]]:
        """Routes whose rows reach ``server`` from another gateway, per gateway (routes in order)."""
        out: dict[int, list[Route]] = {}
        for r in self.routes:
            if r.gateway != server and server in r.members:
                out.setdefault(r.gateway, []).append(r)
        return out

    def bytes_saved(self, row_bytes: int) -> int:
        """Bytes per key/value tensor the relay keeps off the inter-node links (per pass direction)."""
        return row_bytes * sum(sum(r.size(s) for s in r.members) - r.n_rows for r in self.routes)


def kv_relay(plan: Plan, trainer_node: Sequence[int], server_node: Sequence[int], min_members: int = 2,
             min_gain: float = MIN_GAIN) -> KvRelay:
    """The routes of ``plan``'s key/value transfers between nodes (``trainer_node[r]``, ``server_node[s]``: the node
    of the device holding trainer ``r`` and server ``s``; colocated, trainer and server ``i`` on device ``i``); see
    the module docstring. A plan whose routes would cut the busiest device's inter-node key rows (the larger of
    what it sends and receives) by less than ``min_gain`` is not relayed (an empty relay): the second hop is a
    collective of its own, not worth a few rows."""
    if len(trainer_node) != plan.n_ranks or len(server_node) != plan.n_servers:
        raise InputError(f"node maps must name {plan.n_ranks} trainers and {plan.n_servers} servers, got "
                         f"{len(trainer_node)} and {len(server_node)}")
    if min_members < 2:
        raise InputError(f"min_members must be >= 2 (a route with one member relays nothing), got {min_members}")
    if not 0.0 <= min_gain < 1.0:
        raise InputError(f"min_gain must be in [0, 1), got {min_gain}")
    x = plan.kv_xfer
    tn, sn = np.asarray(trainer_node, dtype=np.int64), np.asarray(server_node, dtype=np.int64)
    cross = (x.n > 0) & (tn[x.rank] != sn[x.server])
    # The cross-node transfers grouped by (trainer, server), each pair's in transfer order (its receive block's
    # order): one stable sort, then a slice per pair (a plan has up to trainers x servers pairs).
    idx = np.flatnonzero(cross)
    idx = idx[np.lexsort((idx, x.server[idx], x.rank[idx]))]
    key = x.rank[idx] * plan.n_servers + x.server[idx]
    cuts = np.flatnonzero(np.diff(key)) + 1 if idx.size else np.zeros(0, dtype=np.int64)
    groups: dict[tuple[int, int], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for part in np.split(idx, cuts) if idx.size else ():
        r, s = int(x.rank[part[0]]), int(x.server[part[0]])
        groups.setdefault((r, int(sn[s])), {})[s] = (x.src_row[part], x.n[part])
    # Gateways spread the node's inbound rows: routes largest union first, each to the member that has taken the
    # fewest inter-node rows so far (rows sent to it directly included), then the one needing most of the union
    # (least to forward), then the lowest index.
    cand = [(r, per, _union_size(list(per.values()))) for (r, _), per in groups.items() if len(per) >= min_members]
    taken = np.zeros(plan.n_servers, dtype=np.int64)
    for per in groups.values():
        if len(per) < min_members:
            for s, (_, n) in per.items():
                taken[s] += int(n.sum())
    built: list[tuple[int, Route]] = []
    for i in sorted(range(len(cand)), key=lambda i: (-cand[i][2], i)):
        r, per, union = cand[i]
        need = {s: int(n.sum()) for s, (_, n) in per.items()}
        gateway = min(per, key=lambda s: (int(taken[s]), -need[s], s))
        taken[gateway] += union
        members = tuple(sorted(per))
        built.append((i, Route(r, gateway, union, members, tuple(per[s] for s in members))))
    routes = [rt for _, rt in sorted(built, key=lambda b: b[0])]  # in (trainer, node) order
    via = {(rt.src, s): k for k, rt in enumerate(routes) for s in rt.members}
    relay = KvRelay(tuple(routes), via)
    if routes and min_gain > 0:
        direct, relayed = _busiest(plan, cross, None), _busiest(plan, cross, relay)
        if relayed > (1.0 - min_gain) * direct:
            return KvRelay((), {})
    return relay


def _union_size(runs: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """Rows covered by the union of runs (first row, length), without spelling the rows out."""
    a = np.concatenate([r[0] for r in runs])
    b = a + np.concatenate([r[1] for r in runs])
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    reach = np.maximum.accumulate(b)
    new = np.ones(a.size, dtype=bool)
    new[1:] = a[1:] > reach[:-1]  # a run past everything before it starts a new merged segment
    starts = np.flatnonzero(new)
    ends = np.append(reach[starts[1:] - 1], reach[-1])
    return int((ends - a[starts]).sum())


def _busiest(plan: Plan, cross: np.ndarray, relay: KvRelay | None) -> int:
    """The most key rows any device sends or receives across nodes (trainer and server ``i`` on device ``i``)."""
    x = plan.kv_xfer
    n = max(plan.n_ranks, plan.n_servers)
    out = np.bincount(x.rank[cross], weights=x.n[cross], minlength=n).astype(np.int64)
    inn = np.bincount(x.server[cross], weights=x.n[cross], minlength=n).astype(np.int64)
    if relay is not None:  # a route's members take their rows from the gateway, which takes the union once
        for rt in relay.routes:
            for s in rt.members:
                out[rt.src] -= rt.size(s)
                inn[s] -= rt.size(s)
            out[rt.src] += rt.n_rows
            inn[rt.gateway] += rt.n_rows
    return int(max(out.max(initial=0), inn.max(initial=0)))


def nodes_of(n: int, devices_per_node: int | None) -> tuple[int, ...] | None:
    """Node of each of ``n`` consecutive devices, ``devices_per_node`` to a node (None: one flat network)."""
    if devices_per_node is None:
        return None
    if devices_per_node < 1:
        raise InputError(f"devices_per_node must be >= 1, got {devices_per_node}")
    return tuple(d // devices_per_node for d in range(n))
