"""Node-level relay routes of a plan's key/value transfers (``distca.scheduler.relay``), on real plans from the CAD
planner: every route's union is exactly what its members need, each member's positions pick its own rows in its
receive-block order, only cross-node pairs with at least two servers in a node relay, and the bytes kept off the
inter-node links are the members' rows beyond the union. The data plane that runs the routes is tested on a gloo
cluster in tests/test_inplace.py."""

from __future__ import annotations

import numpy as np
import pytest

from distca.attention.cost import AttentionShape
from distca.attention.tasks import row_ranges
from distca.data.packing import pack_into_ranks
from distca.errors import InputError
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.scheduler.relay import kv_relay, nodes_of
from distca.sim.workload import sample_documents

SHAPE = AttentionShape(8, 2, 16, 2)


def _plan(n: int, seed: int, window: int = -1):
    tokens = 1024
    lengths = sample_documents("pretrain", n * tokens // 4, n * tokens, seed)
    p = pack_into_ranks(lengths, n, tokens)
    batch = BatchLayout.from_ranks(p.ranks, p.continues)
    cfg = SchedulerConfig(eps=0.02, granularity=32, window=window)
    return make_plan(batch, Placement(n, n, "colocated"), cfg, SHAPE)[0]


def _pair_rows(plan, r: int, s: int) -> np.ndarray:
    x = plan.kv_xfer
    m = (x.rank == r) & (x.server == s)
    return row_ranges(x.src_row[m], x.n[m])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [-1, 256])
def test_routes_carry_exactly_what_their_members_need(seed, window):
    n, dpn = 16, 4
    plan = _plan(n, seed, window)
    nodes = nodes_of(n, dpn)
    relay = kv_relay(plan, nodes, nodes, min_gain=0.0)  # every route (the gain rule: the next test)
    x = plan.kv_xfer
    cross = sorted({(r, s) for r, s, k in zip(x.rank.tolist(), x.server.tolist(), x.n.tolist(), strict=True)
                    if k > 0 and nodes[r] != nodes[s]})
    per_node: dict[tuple[int, int], list[int]] = {}
    for r, s in cross:
        per_node.setdefault((r, nodes[s]), []).append(s)
    expected = {(r, s) for (r, _), ss in per_node.items() if len(ss) >= 2 for s in ss}
    assert set(relay.via) == expected
    if window == -1 and seed == 0:
        assert relay, "causal plans of documents spanning ranks must relay"
    saved = 0
    for route in relay.routes:
        assert {nodes[s] for s in route.members} == {nodes[route.gateway]} != {nodes[route.src]}
        assert np.array_equal(route.rows, np.unique(route.rows))
        assert route.gateway in route.members and list(route.members) == sorted(route.members)
        assert route.n_rows == route.rows.size  # the union's size, counted on runs, is the rows spelled out
        union = set()
        for s in route.members:
            pos = route.pos(s)
            want = _pair_rows(plan, route.src, s)
            assert route.size(s) == want.size
            assert np.array_equal(route.rows[pos], want)  # in the member's receive-block order
            union |= set(want.tolist())
            assert relay.wire_rows(route.src, s, want).size == (route.rows.size if s == route.gateway else 0)
        assert union == set(route.rows.tolist())
        saved += sum(route.size(s) for s in route.members) - route.rows.size
    assert relay.bytes_saved(7) == 7 * saved
    for r, s in cross:
        if (r, s) not in expected:
            rows = _pair_rows(plan, r, s)
            assert relay.route(r, s) is None and relay.wire_rows(r, s, rows) is rows
    for gw in range(n):  # what a gateway forwards is what its members take in, route by route
        for member, routes in relay.forwards(gw).items():
            assert [rt.src for rt in relay.incoming(member)[gw]] == [rt.src for rt in routes]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [-1, 256])
def test_a_plan_relays_only_where_it_cuts_the_busiest_devices_inter_node_rows(seed, window):
    n, dpn = 16, 4
    plan = _plan(n, seed, window)
    nodes = np.array(nodes_of(n, dpn))
    every = kv_relay(plan, nodes.tolist(), nodes.tolist(), min_gain=0.0)
    x = plan.kv_xfer
    direct_out, direct_in = np.zeros(n), np.zeros(n)
    cross = nodes[x.rank] != nodes[x.server]
    np.add.at(direct_out, x.rank[cross], x.n[cross])
    np.add.at(direct_in, x.server[cross], x.n[cross])
    out, inn = direct_out.copy(), direct_in.copy()
    for rt in every.routes:  # members' rows leave the inter-node links, each route's union crosses once
        for s in rt.members:
            out[rt.src] -= rt.pos(s).size
            inn[s] -= rt.pos(s).size
        out[rt.src] += rt.rows.size
        inn[rt.gateway] += rt.rows.size
    gain = 1 - max(out.max(), inn.max()) / max(direct_out.max(), direct_in.max(), 1)
    default = kv_relay(plan, nodes.tolist(), nodes.tolist())
    assert bool(default) == (bool(every) and gain >= 0.1)
    if default:
        assert default.via == every.via
    assert not kv_relay(plan, nodes.tolist(), nodes.tolist(), min_gain=0.99) or gain >= 0.99


def test_one_node_or_no_spanning_keys_relays_nothing():
    plan = _plan(8, 0)
    assert not kv_relay(plan, [0] * 8, [0] * 8)
    assert not kv_relay(plan, list(range(8)), list(range(8)))  # one device a node: a node has one server


def test_bad_node_maps_are_refused():
    plan = _plan(4, 0)
    with pytest.raises(InputError, match="node maps must name 4 trainers and 4 servers"):
        kv_relay(plan, [0, 0, 1], [0, 0, 1, 1])
    with pytest.raises(InputError, match="min_members"):
        kv_relay(plan, [0, 0, 1, 1], [0, 0, 1, 1], min_members=1)
    with pytest.raises(InputError, match="min_gain"):
        kv_relay(plan, [0, 0, 1, 1], [0, 0, 1, 1], min_gain=1.0)
    with pytest.raises(InputError, match="devices_per_node"):
        nodes_of(4, 0)
    assert nodes_of(5, 2) == (0, 0, 1, 1, 2) and nodes_of(3, None) is None


def test_row_exchange_refuses_a_node_map_of_the_wrong_size_or_on_a_pool_group():
    import torch

    from distca.server.exchange import GroupRoles, RowExchange, RowFormat

    fmt = RowFormat(4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="nodes must name the node of each of the group's 1 ranks, got 2"):
        RowExchange(None, GroupRoles.inplace(1, 0), fmt, "cpu", nodes=(0, 1))
    assert not RowExchange(None, GroupRoles.inplace(1, 0), fmt, "cpu", nodes=(0,)).relaying
    with pytest.raises(ValueError, match="relayed key/value rows need an in-place group"):
        RowExchange(object(), GroupRoles.pool(2, 2, 0), fmt, "cpu", nodes=(0, 0, 1, 1))  # checked before any use
