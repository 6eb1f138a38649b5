"""The Ray-managed attention-server pool: start on a local Ray bound to loopback, health checks, a real
CAD step from trainer processes through the pool, restart of a killed server, clean shutdown."""

from __future__ import annotations

import os
import signal
import time

import pytest
from cluster_harness import run_trainers
from test_cad_cluster import HEADS, KV_HEADS, _trainer, make_case

from distca.runtime.plan_exec import execute_plan
from distca.server.loop import ServerConfig
from distca.server.pool import AttentionServerPool, PoolConfig
from distca.transport.channel import TransportConfig

TCFG = TransportConfig(timeout_s=30.0, secret=b"pool-secret")
SPEC = dict(ranks=[[300, 200], [500]], continues=[False, True], servers=2, placement="dedicated", eps=0.0,
            window=-1, seed=5, dtype="float64", backend="reference")


@pytest.fixture(scope="module")
def pool():
    cfg = PoolConfig(n_servers=2, server=ServerConfig(n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=8,
                                                       dtype="float64", backend="reference", transport=TCFG))
    with AttentionServerPool(cfg) as p:
        yield p
    import ray

    assert not ray.is_initialized(), "the pool must stop the Ray it started"


def _step_matches_oracle(addresses, spec=SPEC):
    plan, ranks, douts = make_case(spec)
    got = run_trainers(_trainer, [(r, addresses, spec, TCFG) for r in range(2)])
    want = execute_plan(plan, ranks, douts, backend="reference")
    for r in range(2):
        assert isinstance(got[r], dict), f"trainer {r} failed: {got[r]}"
        for key in ("out", "dq", "dk", "dv"):
            assert abs(got[r][key] - want[key][r].numpy()).max() < 1e-10, (r, key)


def test_pool_starts_healthy_servers_on_loopback(pool):
    assert pool.health() == [True, True]
    assert all(a.startswith("ipc://") for a in pool.addresses)


@pytest.mark.parametrize("window", [-1, 96])
def test_trainer_processes_run_a_step_through_the_pool(pool, window):
    _step_matches_oracle(pool.addresses, {**SPEC, "window": window})


def test_a_killed_server_is_detected_and_restarted(pool):
    old = list(pool.addresses)
    os.kill(pool.pids()[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pool.health(timeout_s=1.0)[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool.health(timeout_s=1.0) == [False, True]
    assert pool.restart_dead(timeout_s=1.0) == [0]
    assert pool.health() == [True, True] and pool.addresses[0] != old[0] and pool.addresses[1] == old[1]
    _step_matches_oracle(pool.addresses)

