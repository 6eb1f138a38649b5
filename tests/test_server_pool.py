"""The Ray-managed attention-server pool: start on a local Ray bound to loopback, health checks, a real
CAD step from trainer processes through the pool, restart of a killed server, clean shutdown."""

from __future__ import annotations

import os
import signal
import time

import pytest

from distca.runtime.plan_exec import execute_plan
from distca.server.loop import ServerConfig
from distca.server.pool import AttentionServerPool, PoolConfig
from distca.transport.channel import TransportConfig

pytestmark = pytest.mark.cluster  # spawns trainer/server processes (left out of `make test-fast`)

TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=30.0, secret=b"pool-secret", checksum=False,
                       shm_max_bytes=1 << 30)
SPEC = dict(ranks=[[300, 200], [500]], continues=[False, True], servers=2, placement="dedicated", eps=0.0,
            window=-1, seed=5, dtype="float64", backend="reference")


@pytest.fixture(scope="module")
def pool(cad_case):
    server = ServerConfig(n_heads=cad_case.heads, n_kv_heads=cad_case.kv_heads, head_dim=cad_case.dim,
                          dtype="float64", backend="reference", max_plans=8, max_rows=1 << 16, transport=TCFG)
    cfg = PoolConfig(n_servers=2, placement="dedicated", cpus_per_server=0.0, gpus_per_server=0.0, address=None,
                     server=server)
    with AttentionServerPool(cfg) as p:
        yield p
    import ray

    assert not ray.is_initialized(), "the pool must stop the Ray it started"


def _step_errors(cad_case, run_trainers, addresses, spec=SPEC) -> dict[tuple[int, str], float]:
    """One CAD step from two trainer processes through ``addresses``: the largest error of each rank's
    output and gradients against in-process plan execution."""
    plan, ranks, douts = cad_case.make(spec)
    got = run_trainers(cad_case.trainer, [(r, addresses, spec, TCFG) for r in range(2)])
    want = execute_plan(plan, ranks, douts, backend="reference")
    errors = {}
    for r in range(2):
        assert isinstance(got[r], dict), f"trainer {r} failed: {got[r]}"
        for key in ("out", "dq", "dk", "dv"):
            errors[(r, key)] = float(abs(got[r][key] - want[key][r].numpy()).max())
    return errors


def test_pool_starts_healthy_servers_on_loopback(pool):
    assert pool.health(timeout_s=30.0) == [True, True]
    assert all(a.startswith("ipc://") for a in pool.addresses)


@pytest.mark.parametrize("window", [-1, 96])
def test_trainer_processes_run_a_step_through_the_pool(pool, cad_case, run_trainers, window):
    errors = _step_errors(cad_case, run_trainers, pool.addresses, {**SPEC, "window": window})
    assert max(errors.values()) < 1e-10, errors


def test_the_pool_sees_an_actor_whose_loop_ended_and_replaces_it(pool, cad_case, run_trainers):
    """The actor of a server whose loop ended (SHUTDOWN here; a dead loop alike) stays alive as an actor, yet its
    health() names the reason, AttentionServerPool.health reports it, and restart_dead replaces it."""
    import zmq

    from distca.server.control import request_shutdown

    ctx = zmq.Context()
    try:
        request_shutdown(ctx, TCFG, pool.addresses[1:], timeout_s=30.0)
    finally:
        ctx.term()
    with pytest.raises(Exception, match=r"loop ended \(SHUTDOWN\)"):
        deadline = time.monotonic() + 30
        while pool.ray.get(pool.actors[1].health.remote(), timeout=30):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert pool.ray.get(pool.actors[1].pid.remote(), timeout=30) > 0  # the actor itself still answers
    assert pool.health(timeout_s=5.0) == [True, False]
    assert pool.restart_dead(timeout_s=5.0) == [1]
    assert pool.health(timeout_s=30.0) == [True, True]
    errors = _step_errors(cad_case, run_trainers, pool.addresses)
    assert max(errors.values()) < 1e-10, errors


def test_a_killed_server_is_detected_and_restarted(pool, cad_case, run_trainers):
    old = list(pool.addresses)
    os.kill(pool.pids()[0], signal.SIGKILL)
    # A bounded poll on the condition itself; each health check waits for its PING replies, so the poll
    # needs no sleep, and a live server slow to answer on a busy machine only costs another round.
    deadline = time.monotonic() + 120
    while (health := pool.health(timeout_s=5.0)) != [False, True]:
        assert time.monotonic() < deadline, f"health after killing server 0: {health}"
    assert pool.restart_dead(timeout_s=5.0) == [0]
    assert pool.health(timeout_s=30.0) == [True, True]
    assert pool.addresses[0] != old[0] and pool.addresses[1] == old[1]
    errors = _step_errors(cad_case, run_trainers, pool.addresses)
    assert max(errors.values()) < 1e-10, errors
