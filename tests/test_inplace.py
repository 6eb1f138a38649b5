"""In-place attention servers on a real simulated cluster: trainer processes in a gloo group, every trainer also
one of the plan's servers, rows moving by one all-to-all per round (``distca.server.exchange``). Results must
equal the in-process plan execution (itself tested against per-document attention) exactly in fp64, with
documents spanning ranks, sliding windows and several rounds reusing the buffers."""

from __future__ import annotations

import numpy as np
import pytest

from distca.runtime.plan_exec import execute_plan
from distca.scheduler.relay import kv_relay, nodes_of
from distca.train.launch import free_port

pytestmark = pytest.mark.cluster  # spawns trainer processes (left out of `make test-fast`)

CASES = {
    "spanning-docs-three-ranks": dict(ranks=[[300, 200], [500], [100, 250, 150]], continues=[False, True, True],
                                      servers=3, placement="colocated", eps=0.0, window=-1, seed=1, dtype="float64",
                                      backend="reference", repeat=2),
    "window-two-ranks": dict(ranks=[[1000, 24], [90, 40]], continues=[False, False], servers=2,
                             placement="colocated", eps=0.0, window=48, seed=2, dtype="float64", backend="reference"),
    "sdpa-fp32-four-ranks": dict(ranks=[[900, 124], [1024], [512, 512], [64] * 16], continues=[False, True, False,
                                 False], servers=4, placement="colocated", eps=0.02, window=-1, seed=3,
                                 dtype="float32", backend="sdpa"),
}
# One document over four ranks in two nodes of two: the servers of each node need the same keys of the other node's
# ranks, so those rows cross once to a gateway and are forwarded (distca.scheduler.relay).
RELAY_CASE = dict(ranks=[[256]] * 4, continues=[False, True, True, True], servers=4, placement="colocated", eps=0.02,
                  window=-1, seed=5, dtype="float64", backend="reference", repeat=2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inplace_all_to_all_equals_in_process_plan_execution(name, cad_case, run_trainers):
    spec = CASES[name]
    plan, ranks, douts = cad_case.make(spec)
    world = len(ranks)
    assert (plan.task_server >= 0).any() and plan.q_xfer.remote.any(), "the case must move rows between ranks"
    port = free_port()
    got = run_trainers(cad_case.inplace_trainer, [(r, world, port, spec) for r in range(world)])
    _check_against_plan_execution(spec, plan, ranks, douts, got, tol=0.0 if spec["dtype"] == "float64" else 1e-5)


def _check_against_plan_execution(spec, plan, ranks, douts, got, tol):
    world = len(ranks)
    want = execute_plan(plan, ranks, douts, backend=spec["backend"])
    for r in range(world):
        assert isinstance(got[r], dict), f"trainer {r} failed: {got[r]}"
        assert got[r]["same_each_repeat"], f"trainer {r}: a repeated round gave different results"
        for key in ("out", "lse", "dq", "dk", "dv"):
            a, b = got[r][key], want[key][r].numpy()
            finite = np.isfinite(b)
            assert np.array_equal(finite, np.isfinite(a)), f"rank {r} {key}: -inf pattern differs"
            err = np.abs(a[finite] - b[finite]).max(initial=0.0)
            assert err <= tol * max(1.0, np.abs(b[finite]).max(initial=0.0)), f"rank {r} {key}: error {err:.2e}"
    served = [got[r]["stats"]["served"] for r in range(world)]
    assert served == [2 * spec.get("repeat", 1)] * world  # every rank served its forward and backward rounds


@pytest.mark.parametrize("window", [-1, "prefix_lm:100"])
def test_relayed_key_rows_cross_once_per_node_and_give_the_same_results(cad_case, run_trainers, window):
    """Two nodes of two ranks: the same step with and without the relay. Both equal the in-process execution (the
    relay to rounding: a gateway sums a key row's gradients over its node before the trainer adds them); the relay
    sends exactly the route's saved key rows fewer across nodes, in each of the three rounds with k/v rows (forward
    in, backward in, backward gradients out), and forwards them inside the node instead."""
    spec = {**RELAY_CASE, "window": window}  # causal, and a family run as kernel rectangles (a masked plan)
    plan, ranks, douts = cad_case.make(spec)
    world = len(ranks)
    nodes = nodes_of(world, 2)
    relay = kv_relay(plan, nodes, nodes)
    # the case must relay rows, with a member taking only part of its gateway's union
    assert relay and any(r.size(s) < r.n_rows for r in relay.routes for s in r.members)
    port = free_port()  # one group of trainer processes runs the step relayed, then directly
    got = run_trainers(cad_case.inplace_trainer, [(r, world, port, {**spec, "devices_per_node": 2, "also_direct": True})
                                                  for r in range(world)])
    assert all(isinstance(got[r], dict) for r in range(world)), got
    runs = {"relayed": got, "direct": {r: got[r]["direct"] for r in range(world)}}
    _check_against_plan_execution(spec, plan, ranks, douts, runs["direct"], tol=0.0)
    _check_against_plan_execution(spec, plan, ranks, douts, runs["relayed"], tol=1e-12)

    def link_bytes(got, inter: bool) -> int:
        return sum(n for r in range(world) for p, n in enumerate(got[r]["stats"]["sent_bytes"])
                   if (nodes[p] != nodes[r]) == inter)

    kv_row = cad_case.kv_heads * cad_case.dim * 8  # fp64 rows of k, v, dk, dv: multiples of 16, no padding
    saved = 3 * 2 * relay.bytes_saved(kv_row) * spec["repeat"]  # 3 rounds with key rows, 2 tensors each
    assert link_bytes(runs["direct"], inter=True) - link_bytes(runs["relayed"], inter=True) == saved > 0
    assert link_bytes(runs["relayed"], inter=False) > link_bytes(runs["direct"], inter=False)


def test_a_rank_that_never_joins_fails_the_round_within_the_group_timeout(cad_case, run_trainers):
    import time

    spec = {**CASES["window-two-ranks"], "absent": 1, "timeout_s": 3}
    port = free_port()
    t0 = time.monotonic()
    got = run_trainers(cad_case.inplace_trainer, [(r, 2, port, spec) for r in range(2)], timeout_s=60)
    assert got[1] == "absent"
    assert isinstance(got[0], str) and "time" in got[0].lower(), got[0]  # gloo's timeout, not a hang
    assert time.monotonic() - t0 < 30
