"""In-step recovery from a lost attention server (``cluster.server_loss: in_step``), on real server processes.

A server SIGKILLed between rounds or inside one, or stopped (alive but silent), is found lost after
``lost_after_s``; the trainers finish its rounds themselves and the results equal the undisturbed plan execution
bit for bit (the same fused call over the same rows). A document cut at the rank boundary makes a lost server's
round need rows of two trainers: they exchange them over a gloo group. A late reply of an abandoned round is
dropped, and every recovery is counted. The end-to-end case (a PP=2 x DP=2 run) is in ``tests/test_train.py``."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch

from distca.runtime.client import CADClient
from distca.runtime.plan_exec import execute_plan
from distca.runtime.recovery import Recovery
from distca.scheduler.calls import server_call
from distca.server.loop import ServerConfig
from distca.server.processes import server_processes
from distca.transport.channel import TransportConfig
from distca.transport.wire import Kind

pytestmark = pytest.mark.cluster  # spawns server (and trainer) processes

LOST_AFTER_S = 1.0  # a stopped server (alive, connected, silent) is lost after this
PATIENT_S = 30.0  # where a killed server is found lost by its dropped connection, long before this
TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=30.0, secret=None, checksum=False,
                       shm_max_bytes=1 << 20)


def _spec(ranks, continues, seed=1) -> dict:
    return dict(ranks=ranks, continues=continues, servers=2, placement="dedicated", eps=0.0, window=-1, seed=seed,
                dtype="float32", backend="sdpa")


def _scfg(cad_case) -> ServerConfig:
    return ServerConfig(n_heads=cad_case.heads, n_kv_heads=cad_case.kv_heads, head_dim=cad_case.dim, dtype="float32",
                        backend="sdpa", max_plans=16, max_rows=1 << 14, transport=TCFG)


def _same(got: dict, want: dict, rank: int = 0) -> None:
    for k in ("out", "lse", "dq", "dk", "dv"):
        g = got[k] if isinstance(got[k], torch.Tensor) else torch.from_numpy(got[k])
        assert torch.equal(g, want[k][rank]), (k, (g - want[k][rank]).abs().max())


@pytest.mark.parametrize("shm", [False, True], ids=["zmq", "shm"])
def test_one_trainer_finishes_rounds_of_a_killed_and_a_stopped_server_exactly(cad_case, shm):
    """Server 1 is killed between rounds (after the plan is registered); server 0 is stopped with a round of
    the next step inside it and killed there. Both rounds come out exact, and the killed server's late reply
    for the abandoned round (server 0 is let go on first, answering late) is dropped."""
    plan, ranks, douts = cad_case.make(_spec([[160, 96]], [False]))
    want = execute_plan(plan, ranks, douts, backend="sdpa")
    assert all(server_call(plan, s).n_tasks for s in range(2))  # both servers have work
    with server_processes(2, _scfg(cad_case)) as running:
        rec = Recovery(LOST_AFTER_S)
        client = CADClient(0, running.addresses, TCFG, backend="sdpa", shm=shm, recovery=rec)
        try:
            out, lse = client.forward(plan, ranks[0])  # undisturbed
            client.register(plan)
            os.kill(running.processes[1].pid, signal.SIGKILL)  # between rounds
            out, lse = client.forward(plan, ranks[0])
            dq, dk, dv = client.backward(plan, ranks[0], out, lse, douts[0])
            _same(dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), want)
            assert rec.lost == {1} and rec.rounds == 2 and rec.tasks == 2 * server_call(plan, 1).n_tasks

            # server 0 alive but silent inside a round: it is lost after lost_after_s; its late answer is dropped
            os.kill(running.processes[0].pid, signal.SIGSTOP)
            try:
                out, lse = client.forward(plan, ranks[0])
            finally:
                os.kill(running.processes[0].pid, signal.SIGCONT)
            dq, dk, dv = client.backward(plan, ranks[0], out, lse, douts[0])  # sent to nobody: both are lost
            _same(dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), want)
            assert rec.lost == {0, 1} and rec.rounds == 6
            assert client.ping(0) == {} and client.ping(1) == {}  # lost servers are not asked
            client.eps[0].send(Kind.PING)  # the late FWD_OUT comes first and is dropped, then the PONG
            msg, _ = client._expect(0, (Kind.PONG,), None, timeout_s=TCFG.timeout_s)
            assert msg.kind == Kind.PONG and rec.late == 1
            assert rec.stats()["servers_lost"] == [0, 1] and rec.detected_s > 0
        finally:
            client.close()


def test_a_server_killed_inside_a_round_is_recovered(cad_case):
    """The request is sent, then the server dies before answering: the trainer finishes the round itself. A
    replacement server then rejoins and serves the next rounds."""
    plan, ranks, douts = cad_case.make(_spec([[160, 96]], [False], seed=2))
    want = execute_plan(plan, ranks, douts, backend="sdpa")
    with server_processes(2, _scfg(cad_case)) as running:
        rec = Recovery(PATIENT_S)
        client = CADClient(0, running.addresses, TCFG, backend="sdpa", recovery=rec)
        try:
            client.register(plan)
            os.kill(running.processes[1].pid, signal.SIGSTOP)  # so that it cannot answer before it dies
            pending = client.start_forward(plan, ranks[0])
            os.kill(running.processes[1].pid, signal.SIGKILL)
            out, lse = pending.wait()
            dq, dk, dv = client.backward(plan, ranks[0], out, lse, douts[0])
            _same(dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), want)
            assert rec.lost == {1} and rec.rounds == 2 and rec.late == 0
            assert rec.detected_s < PATIENT_S / 2  # the dropped connection said so, not the timeout
            with server_processes(1, _scfg(cad_case)) as spare:  # the pool's replacement, at a new address
                client.rejoin(1, spare.addresses[0])
                out, lse = client.forward(plan, ranks[0])
                dq, dk, dv = client.backward(plan, ranks[0], out, lse, douts[0])
                _same(dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), want)
                assert rec.lost == set() and rec.rounds == 2 and rec.rejoined == 1  # served by the new server
                assert client.ping(1)["served"] == 2
        finally:
            client.close()


def _recovering_trainer(rank: int, world: int, port: int, addresses: list[str], spec: dict, kill: int, q) -> None:
    """Spawned trainer of a two-trainer plan: registers, rank 0 kills server ``kill``, both run forward and backward
    with recovery over a gloo group of the two; puts its tensors and counters, or its error."""
    import datetime

    import torch.distributed as dist

    from tests.conftest import _make_cad_case

    torch.set_num_threads(1)
    client = None
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        plan, ranks, douts = _make_cad_case(spec)
        rec = Recovery(PATIENT_S, peers=list(range(world)), group=dist.new_group(list(range(world))),
                       exchange_timeout_s=30)
        client = CADClient(rank, addresses, TCFG, backend="sdpa", shm=True, recovery=rec)
        client.register(plan)
        dist.barrier()
        if rank == 0:
            os.kill(spec["pids"][kill], signal.SIGKILL)
        dist.barrier()
        out, lse = client.forward(plan, ranks[rank])
        dq, dk, dv = client.backward(plan, ranks[rank], out, lse, douts[rank])
        agreed = rec.agree(len(addresses))
        q.put((rank, {**{k: v.numpy() for k, v in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items()},
                      "lost": sorted(agreed), "rounds": rec.rounds, "tasks": rec.tasks}))
    except Exception as exc:  # report, never hang the parent
        import traceback

        q.put((rank, traceback.format_exc() + repr(exc)))
    finally:
        if client is not None:
            client.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_trainers_exchange_rows_to_finish_a_lost_servers_round(cad_case, run_trainers):
    """A document cut at the rank boundary: the lost server's round holds rows of both trainers (rank 1's queries
    see rank 0's keys). Rank 0 stands in: it gets rank 1's rows, runs the call, sends rank 1 its results; the key
    gradients reach rank 0 through the same exchange. Both ranks' results equal the undisturbed execution."""
    from distca.train.launch import free_port

    spec = _spec([[100, 60], [80, 40, 40]], [False, True])
    plan, ranks, douts = cad_case.make(spec)
    kill = 1
    assert sorted(server_call(plan, kill).senders) == [0, 1]  # the round needs rows of both trainers
    want = execute_plan(plan, ranks, douts, backend="sdpa")
    with server_processes(2, _scfg(cad_case)) as running:
        spec = {**spec, "pids": [p.pid for p in running.processes]}
        port = free_port()
        got = run_trainers(_recovering_trainer, [(r, 2, port, running.addresses, spec, kill) for r in range(2)],
                           timeout_s=120)
    for r in range(2):
        assert isinstance(got[r], dict), got[r]
        _same(got[r], want, r)
        assert got[r]["lost"] == [kill] and got[r]["rounds"] == 2
    assert got[0]["tasks"] == 2 * server_call(plan, kill).n_tasks and got[1]["tasks"] == 0  # rank 0 stood in


def _lonely_stand_in(rank: int, world: int, port: int, spec: dict, q) -> None:
    """Spawned trainer: rank 0 stands in for server 1's round, but rank 1 never sends its rows (it got its reply
    before the server died, say); puts what rank 0 raised, or rank 1's "absent"."""
    import datetime
    import time

    import torch.distributed as dist

    from tests.conftest import _make_cad_case

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        group = dist.new_group(list(range(world)))
        plan, ranks, _ = _make_cad_case(spec)
        if rank == 1:
            time.sleep(spec["exchange_timeout_s"] + 2)
            q.put((rank, "absent"))
            return
        rec = Recovery(PATIENT_S, peers=list(range(world)), group=group, exchange_timeout_s=spec["exchange_timeout_s"])
        t = ranks[0]
        from distca.runtime.client import _rows

        qr, kr = _rows(plan.q_xfer, 0, 1), _rows(plan.kv_xfer, 0, 1)
        t0 = time.monotonic()
        try:
            rec.stand_in(plan, 0, 1, 0, "fwd", {"q": t.q[qr], "k": t.k[kr], "v": t.v[kr]}, "sdpa")
            q.put((rank, "no error"))
        except Exception as exc:
            q.put((rank, (type(exc).__name__, str(exc), time.monotonic() - t0)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_stand_in_whose_peer_never_sends_raises_for_the_run_level_restart(cad_case, run_trainers):
    """The case no rank can settle alone: the stand-in waits ``exchange_timeout_s`` for a peer's rows, then raises
    :class:`RecoveryError` (the run-level restart takes over) instead of hanging."""
    from distca.train.launch import free_port

    spec = {**_spec([[100, 60], [80, 40, 40]], [False, True]), "exchange_timeout_s": 2.0}
    port = free_port()
    got = run_trainers(_lonely_stand_in, [(r, 2, port, spec) for r in range(2)], timeout_s=60)
    assert got[1] == "absent"
    name, text, waited = got[0]
    assert name == "RecoveryError" and "run-level restart" in text and waited < 30


def test_config_knobs():
    from distca.config import load_config
    from distca.errors import ConfigError

    cfg = load_config(None, [])
    assert cfg.cluster.server_loss == "in_step" and cfg.cluster.lost_after_s > 0
    with pytest.raises(ConfigError, match="server_loss"):
        load_config(None, ["--cluster.server_loss=never"])
    with pytest.raises(ConfigError, match="lost_after_s"):
        load_config(None, ["--cluster.lost_after_s=0"])
    assert dataclasses.is_dataclass(cfg.cluster)
