"""The server pool's collective data plane on a real simulated cluster: attention-server processes and trainer
processes forming one gloo group per trainer group (a pipeline stage) from the store server 0 hosts, rows moving
by all-to-all, ZeroMQ carrying only control. Results must equal the in-process plan execution exactly in fp64,
with documents spanning ranks, a sliding window, dedicated and colocated placements, a server without tasks, two
rounds in flight and two trainer groups at once; failures (a failing computation, a malformed message, a server
gone or never joining, an unreachable store) end in a clear error or the byte path, never a hang.

One module-scoped set of three float64 servers serves every test; each test's groups run under a session of
their own."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
import torch
import zmq

from distca.runtime import group_client
from distca.runtime.client import ServerError
from distca.runtime.group_client import DataPlaneError, GroupClient, connect_group_client
from distca.runtime.plan_exec import RankTensors, execute_plan
from distca.server.exchange import RowFormat
from distca.server.loop import ServerConfig
from distca.server.processes import server_processes
from distca.transport.channel import Endpoint, TransportConfig
from distca.transport.wire import Kind

pytestmark = pytest.mark.cluster  # spawns trainer/server processes (left out of `make test-fast`)

TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=60.0, secret=b"group-secret", checksum=False,
                       shm_max_bytes=0)
QUICK = dataclasses.replace(TCFG, timeout_s=3.0)  # the group timeout of the failure tests


def _server_cfg(cad_case) -> ServerConfig:
    return ServerConfig(n_heads=cad_case.heads, n_kv_heads=cad_case.kv_heads, head_dim=cad_case.dim,
                        dtype="float64", backend="reference", max_plans=16, max_rows=1 << 16, transport=TCFG)


@pytest.fixture(scope="module")
def servers(cad_case):
    """Three float64 reference servers; a test with fewer servers uses the first ones."""
    with server_processes(3, _server_cfg(cad_case)) as running:
        yield running


def _fmt(cad_case, dtype: str = "float64") -> RowFormat:
    return RowFormat(cad_case.heads, cad_case.kv_heads, cad_case.dim, getattr(torch, dtype))


def _session() -> str:
    return uuid.uuid4().hex[:12]


def _round_trip(client, cases: list, rank: int) -> list[dict[str, np.ndarray]]:
    """Every case's forward in flight at once, then every backward: each case's tensors on this rank."""
    pending = [client.start_forward(plan, ranks[rank]) for plan, ranks, _ in cases]
    outs = [p.wait() for p in pending]
    pending = [client.start_backward(plan, ranks[rank], o, lse, douts[rank])
               for (plan, ranks, douts), (o, lse) in zip(cases, outs, strict=True)]
    grads = [p.wait() for p in pending]
    return [{k: v.numpy() for k, v in dict(out=o, lse=lse, dq=g[0], dk=g[1], dv=g[2]).items()}
            for (o, lse), g in zip(outs, grads, strict=True)]


def _group_trainer(index: int, rank: int, addresses: list[str], specs: list[dict], session: str, group: int,
                   tcfg: TransportConfig, fmt: RowFormat, make_case, q) -> None:
    """Spawned trainer ``rank`` of trainer group ``group``: joins the data-plane group, runs ``specs``' plans
    (all in flight together) twice, or first a poisoned round (NaN rows) that must fail; puts its tensors, the
    error texts it saw and its client type, or its own error."""
    torch.set_num_threads(1)
    cases = [make_case(s) for s in specs]
    client = None
    try:
        client = connect_group_client(rank, addresses, tcfg, fmt, n_trainers=len(cases[0][1]), group=group,
                                      session=session, backend="reference")
        errors = []
        if specs[0].get("poison"):
            plan, ranks, _ = cases[0]
            bad = RankTensors(torch.full_like(ranks[rank].q, float("nan")), ranks[rank].k, ranks[rank].v)
            try:
                client.forward(plan, bad)
                errors.append("no error")
            except ServerError as exc:
                errors.append(str(exc))
        got = [_round_trip(client, cases, rank) for _ in range(2)]  # buffers are reused across rounds
        same = all(np.array_equal(a[k], b[k]) for a, b in zip(got[0], got[1], strict=True) for k in a)
        q.put((index, {"cases": got[0], "same_each_repeat": same, "errors": errors, "client": type(client).__name__}))
    except Exception as exc:  # report, never hang the parent
        q.put((index, repr(exc)))
    finally:
        if client is not None:
            client.close()


def _check(got: dict, specs: list[dict], rank: int, make_case) -> None:
    assert isinstance(got, dict), f"trainer {rank} failed: {got}"
    assert got["client"] == "GroupClient" and got["same_each_repeat"]
    for spec, mine in zip(specs, got["cases"], strict=True):
        plan, ranks, douts = make_case(spec)
        want = execute_plan(plan, ranks, douts, backend="reference")
        for key in ("out", "lse", "dq", "dk", "dv"):
            a, b = mine[key], want[key][rank].numpy()
            finite = np.isfinite(b)
            assert np.array_equal(finite, np.isfinite(a)), f"rank {rank} {key}: -inf pattern differs"
            err = np.abs(a[finite] - b[finite]).max(initial=0.0)
            assert err <= 1e-10 * max(1.0, np.abs(b[finite]).max(initial=0.0)), f"rank {rank} {key}: error {err:.2e}"


BASE = dict(eps=0.0, dtype="float64", backend="reference")
SPANNING = [dict(BASE, ranks=[[300, 200], [500], [100, 250, 150]], continues=[False, True, True], servers=3,
                 placement="dedicated", window=-1, seed=1)]
WINDOW = [dict(BASE, ranks=[[600, 20, 10], [90, 540]], continues=[False, False], servers=2, placement="colocated",
               eps=0.02, window=48, seed=2)]
# the third server gets no task of the first plan, yet joins its every round; both plans in flight (ping-pong)
IDLE_TWO_IN_FLIGHT = [dict(BASE, ranks=[[300], [64]], continues=[False, False], servers=3, placement="dedicated",
                           eps=0.5, window=-1, seed=7),
                      dict(BASE, ranks=[[200], [100]], continues=[False, False], servers=3, placement="dedicated",
                           window=-1, seed=8)]


def test_colocated_window_rounds_equal_in_process_plan_execution(cad_case, run_trainers, servers):
    plan, ranks, _ = cad_case.make(WINDOW[0])
    assert (plan.task_server >= 0).any(), "the case must send rows to the servers"
    session, n = _session(), len(ranks)
    got = run_trainers(_group_trainer, [(r, r, servers.addresses[:2], WINDOW, session, 0, TCFG, _fmt(cad_case),
                                         cad_case.make) for r in range(n)])
    for r in range(n):
        _check(got[r], WINDOW, r, cad_case.make)


def test_two_trainer_groups_share_the_servers_exactly_and_without_deadlock(cad_case, run_trainers, servers):
    """Two pipeline stages' groups run their rounds at the same time on the same three servers — one with
    documents spanning its three trainers, one with an idle server and two plans in flight: each server serves
    each group on its own thread, so neither waits for the other, and both equal the in-process execution."""
    stage = {0: SPANNING, 1: IDLE_TWO_IN_FLIGHT}
    plan, _, _ = cad_case.make(IDLE_TWO_IN_FLIGHT[0])
    assert (np.bincount(plan.task_server[plan.task_server >= 0], minlength=3) == 0).any(), "no idle server"
    session = _session()
    args, who = [], []
    for g, specs in stage.items():
        for r in range(len(specs[0]["ranks"])):
            args.append((len(args), r, servers.addresses, specs, session, g, TCFG, _fmt(cad_case), cad_case.make))
            who.append((g, r))
    got = run_trainers(_group_trainer, args)
    for i, (g, r) in enumerate(who):
        _check(got[i], stage[g], r, cad_case.make)


def test_a_failing_computation_fails_the_round_on_every_trainer_and_the_server_serves_on(cad_case, run_trainers,
                                                                                         servers):
    specs = [dict(SPANNING[0], continues=[False, False, False], servers=2, poison=True)]
    session = _session()
    got = run_trainers(_group_trainer, [(r, r, servers.addresses[:2], specs, session, 0, TCFG, _fmt(cad_case),
                                         cad_case.make) for r in range(3)])
    for r in range(3):
        assert isinstance(got[r], dict), f"trainer {r} failed: {got[r]}"
        (error,) = got[r]["errors"]
        assert "NaN or inf" in error and "attention server" in error, error  # the server's own words
        _check(got[r], [{k: v for k, v in specs[0].items() if k != "poison"}], r, cad_case.make)  # then exact


def _one_trainer(cad_case, addresses: list[str], tcfg: TransportConfig, **kw):
    return connect_group_client(0, addresses, tcfg, _fmt(cad_case), n_trainers=1, group=0, session=_session(),
                                backend="reference", **kw)


SOLO = dict(BASE, ranks=[[300, 200]], continues=[False], servers=2, placement="dedicated", window=-1, seed=4)
ALL_LOCAL = dict(SOLO, ranks=[[16, 8]])  # too small to offload: no round at all


def _assert_exact(client, cad_case, spec: dict) -> None:
    plan, ranks, douts = cad_case.make(spec)
    out, lse = client.forward(plan, ranks[0])
    dq, dk, dv = client.backward(plan, ranks[0], out, lse, douts[0])
    want = execute_plan(plan, ranks, douts, backend="reference")
    for key, got in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items():
        finite = torch.isfinite(want[key][0])
        assert torch.equal(got[finite], want[key][0][finite]), key


def test_malformed_and_unexpected_group_messages_get_errors_and_change_nothing(cad_case, servers):
    client = _one_trainer(cad_case, servers.addresses[:2], TCFG)
    ctx = zmq.Context()
    ep = Endpoint.client(ctx, TCFG, servers.addresses[0])
    try:
        assert isinstance(client, GroupClient)
        _assert_exact(client, cad_case, SOLO)
        bad = [
            (Kind.ROUND, 0, {"session": "nobody", "group": 0, "pass": "fwd"}, "not joined"),
            (Kind.ROUND, 12345, {"session": client.session, "group": 0, "pass": "fwd"}, "unknown plan"),
            (Kind.ROUND, 0, {"session": client.session, "group": 0, "pass": "sideways"}, "pass must be"),
            (Kind.ROUND, 0, {"group": "zero"}, "required"),
            (Kind.GROUP, 0, {"op": "dance"}, "op must be"),
            (Kind.GROUP, 0, {"op": "join", "session": "bad session!"}, "session must be"),
            (Kind.GROUP, 0, {"op": "join", "session": "s1", "group": 0, "rank": 0, "n_trainers": 1, "n_servers": 2,
                             "server": 0, "store": ["127.0.0.1", 1], "timeout_s": 5, "format": [9, 9, 9, "float32"]},
             "this server computes"),
            (Kind.GROUP, 0, {"op": "join", "session": client.session, "group": 0, "rank": 0, "n_trainers": 2,
                             "n_servers": 2, "server": 0, "store": ["127.0.0.1", 1], "timeout_s": 5,
                             "format": [cad_case.heads, cad_case.kv_heads, cad_case.dim, "float64"]}, "was joined as"),
        ]
        for kind, pid, extra, words in bad:
            ep.send(kind, plan_id=pid, extra=extra)
            _, msg, _ = ep.recv()
            assert msg.kind == Kind.ERROR and words in msg.extra["error"], (extra, msg.extra)
        _assert_exact(client, cad_case, SOLO)  # the group still serves, in step
        ep.send(Kind.PING)
        _, pong, _ = ep.recv()
        assert pong.kind == Kind.PONG and pong.extra["served"] >= 4  # the group's rounds count as served
        assert (cad_case.make(ALL_LOCAL)[0].task_server < 0).all()
        _assert_exact(client, cad_case, ALL_LOCAL)  # every member skips the rounds of a plan without server tasks
        _assert_exact(client, cad_case, SOLO)
    finally:
        ep.close()
        ctx.term()
        client.close()


def test_a_server_gone_mid_run_fails_the_round_within_the_timeout_naming_it(cad_case, servers):
    with server_processes(1, _server_cfg(cad_case)) as extra:
        client = _one_trainer(cad_case, [servers.addresses[0], extra.addresses[0]], QUICK)
        try:
            _assert_exact(client, cad_case, SOLO)
            os.kill(extra.processes[0].pid, signal.SIGKILL)
            extra.processes[0].join(timeout=10)
            plan, ranks, _ = cad_case.make(SOLO)
            t0 = time.monotonic()
            with pytest.raises(DataPlaneError, match=r"servers \[1\] do not answer PING"):
                client.forward(plan, ranks[0])
            assert time.monotonic() - t0 < 3 * QUICK.timeout_s + 5
        finally:
            client.close()


def _fake_server(ctx: zmq.Context, endpoint: str) -> Endpoint:
    """A bound ROUTER endpoint with the address a server would publish (endpoint#session)."""
    ep = Endpoint(ctx, zmq.ROUTER, TCFG)
    ep.sock.bind(endpoint)
    ep.endpoint, ep.address = endpoint, f"{endpoint}#{ep.session.hex()}"
    return ep


def _ack_everything(ep: Endpoint, stop: threading.Event) -> None:
    """A fake server: ACKs every request (a JOIN too) but never joins a group."""
    try:
        while not stop.is_set():
            if ep.sock.poll(100):
                ident, msg, _ = ep.recv()
                ep.send(Kind.ACK, to=ident, request_id=msg.request_id)
    finally:
        ep.close()


def test_a_server_that_never_joins_or_never_answers_fails_the_trainer_within_the_timeout(cad_case, servers, tmp_path):
    # never answers the JOIN: an address nobody serves
    t0 = time.monotonic()
    with pytest.raises(DataPlaneError, match="did not answer the data-plane group's JOIN"):
        _one_trainer(cad_case, [servers.addresses[0], f"ipc://{tmp_path}/nobody.sock#{'00' * 16}"], QUICK)
    # answers, but never joins the group: the group does not form, and the error says within what
    ctx = zmq.Context()
    stop = threading.Event()
    fake_ep = _fake_server(ctx, f"ipc://{tmp_path}/fake.sock")
    fake = fake_ep.address
    thread = threading.Thread(target=_ack_everything, args=(fake_ep, stop), daemon=True)
    thread.start()
    try:
        with pytest.raises(DataPlaneError, match="did not form"):
            _one_trainer(cad_case, [servers.addresses[0], fake], QUICK)
    finally:
        stop.set()
        thread.join(timeout=5)
        ctx.term()
    assert time.monotonic() - t0 < 4 * QUICK.timeout_s + 10


def test_an_unreachable_store_falls_back_to_zeromq_frames_and_says_so(cad_case, servers, monkeypatch, caplog):
    def unreachable(host, port, timeout_s):
        raise RuntimeError(f"cannot connect to {host}:{port}")

    monkeypatch.setattr(group_client, "_connect_store", unreachable)
    with caplog.at_level(logging.WARNING, logger="distca.runtime.group_client"):
        client = _one_trainer(cad_case, servers.addresses[:2], TCFG)
    try:
        assert getattr(client, "data_plane", "zmq") == "zmq"  # what a step record says
        assert "rows go as ZeroMQ frames instead" in caplog.text and "cannot connect" in caplog.text
        _assert_exact(client, cad_case, SOLO)
    finally:
        client.close()
    with pytest.raises(DataPlaneError, match="out of reach: RuntimeError: cannot connect"):
        _one_trainer(cad_case, servers.addresses[:2], TCFG, fallback=False)
