"""Fault handling of an attention server process: every bad input gets an ERROR reply that names the
problem, the server keeps serving, and nothing hangs (every receive has a timeout).

Timeouts are checked by what arrives (an error naming the timeout, then a server that still answers),
never by wall-clock bounds, which flake on a busy machine."""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid

import pytest
import torch
import zmq

from distca.runtime.client import CADClient, ServerError
from distca.runtime.plan_exec import RankTensors
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.server.layout import plan_id, server_layout
from distca.server.loop import ServerConfig
from distca.server.processes import server_processes
from distca.transport.channel import Endpoint, TransportConfig, TransportTimeout
from distca.transport.shm import PREFIX, Segment
from distca.transport.wire import _PREFIX, MAGIC, VERSION, Kind, WireError
from tests.conftest import client_endpoint

pytestmark = pytest.mark.cluster  # spawns trainer/server processes (left out of `make test-fast`)

SECRET = b"shared-secret"
SHM_MAX = 1 << 20  # the fault server maps segments of at most 1 MiB
TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=5.0, secret=SECRET, checksum=False,
                       shm_max_bytes=SHM_MAX)
MAX_ROWS = 4096  # the most rows a round may bring to the fault server
SCFG = ServerConfig(n_heads=2, n_kv_heads=1, head_dim=4, dtype="float32", backend="sdpa", max_plans=8,
                    max_rows=MAX_ROWS, transport=TCFG)
# A round that cannot complete is abandoned after the server's timeout; a client waits far longer than
# that (a generous bound for a busy machine), so the server's error is what arrives.
PATIENT = dataclasses.replace(TCFG, timeout_s=120.0)
SCHED = SchedulerConfig(eps=0.0, granularity=128, window=-1, min_offload_pairs=0)  # every task on the one server


@pytest.fixture(scope="module")
def server():
    with server_processes(1, SCFG) as running:
        yield running.addresses[0], running.processes[0]


@pytest.fixture()
def ep(server):
    with client_endpoint(TCFG, server[0]) as e:
        yield e


def _error(ep: Endpoint) -> str:
    _, msg, _ = ep.recv()
    assert msg.kind == Kind.ERROR, msg.kind
    return msg.extra["error"]


def _still_serving(ep: Endpoint) -> None:
    ep.send(Kind.PING)
    _, msg, _ = ep.recv()
    assert msg.kind == Kind.PONG


def _ping(address: str, tcfg: TransportConfig) -> None:
    ctx = zmq.Context()
    ep = Endpoint.client(ctx, tcfg, address)
    try:
        _still_serving(ep)
    finally:
        ep.close()
        ctx.term()


def _plan():
    batch = BatchLayout.from_ranks([[64, 32]])
    plan, _ = make_plan(batch, Placement(1, 1, "dedicated"), SCHED)
    return plan


def _register(ep: Endpoint, plan) -> int:
    layout = server_layout(plan, 0)
    ep.send(Kind.PLAN, layout.tensors(), plan_id=layout.plan_id, extra=layout.extra())
    _, msg, _ = ep.recv()
    assert msg.kind == Kind.ACK
    return layout.plan_id


def test_garbage_frame(ep):
    garbage = b"\x00garbage"  # shorter than the header prefix
    ep.sock.send_multipart([garbage])
    assert f"header frame of {len(garbage)} bytes is shorter than the {_PREFIX.size}-byte prefix" in _error(ep)
    ep.sock.send_multipart([garbage * 8])  # long enough, but no DistCA magic
    assert "bad magic" in _error(ep)
    _still_serving(ep)


def test_bad_magic_and_unknown_kind(ep):
    ep.sock.send_multipart([_PREFIX.pack(b"XXXX", VERSION, 1, 0, 0, 0, 0, 0)])
    assert "bad magic" in _error(ep)
    ep.sock.send_multipart([_PREFIX.pack(MAGIC, VERSION, 99, 0, 0, 0, 0, 0)])
    assert "unknown message kind 99" in _error(ep)
    _still_serving(ep)


def test_truncated_message(ep):
    frames = ep.frames(Kind.FWD, [("q", torch.zeros(4, 2, 4)), ("k", torch.zeros(4, 1, 4))])
    ep.sock.send_multipart(frames[:-1])  # the header announces two tensors, one arrives
    assert "truncated message" in _error(ep)
    frames = ep.frames(Kind.FWD, [("q", torch.zeros(4, 2, 4))])
    ep.sock.send_multipart([frames[0], b"short"])  # a frame shorter than announced
    assert "frame has 5 bytes" in _error(ep)
    _still_serving(ep)


def test_wrong_dtype_and_wrong_rows_and_nan(ep):
    plan = _plan()
    pid = _register(ep, plan)
    n = int(plan.server_q_rows[0])
    ep.send(Kind.FWD, [("q", torch.zeros(n, 2, 4, dtype=torch.float64)), ("k", torch.zeros(n, 1, 4)),
                       ("v", torch.zeros(n, 1, 4))], plan_id=pid, extra={"rank": 0})
    assert "float64" in _error(ep)
    ep.send(Kind.FWD, [("q", torch.zeros(n - 1, 2, 4)), ("k", torch.zeros(n, 1, 4)), ("v", torch.zeros(n, 1, 4))],
            plan_id=pid, extra={"rank": 0})
    assert "receive buffer expects" in _error(ep)
    bad = torch.zeros(n, 2, 4)
    bad[3, 1, 2] = float("nan")
    ep.send(Kind.FWD, [("q", bad), ("k", torch.zeros(n, 1, 4)), ("v", torch.zeros(n, 1, 4))], plan_id=pid,
            extra={"rank": 0})
    assert "NaN or inf" in _error(ep)
    _still_serving(ep)


def test_a_plan_larger_than_the_row_bound_is_refused_before_any_buffer_grows(ep):
    """A peer's PLAN never sizes receive buffers past the configured bound (pinned host memory on a GPU server)."""
    before = _pong(ep)["buffer_bytes"]
    batch = BatchLayout.from_ranks([[MAX_ROWS + 64]])
    big, _ = make_plan(batch, Placement(1, 1, "dedicated"), SCHED)
    layout = server_layout(big, 0)
    assert layout.q_rows > MAX_ROWS
    ep.send(Kind.PLAN, layout.tensors(), plan_id=layout.plan_id, extra=layout.extra())
    assert f"exceed this server's bound of {MAX_ROWS} rows" in _error(ep)
    ep.send(Kind.FWD, [("q", torch.zeros(2, 2, 4)), ("k", torch.zeros(2, 1, 4)), ("v", torch.zeros(2, 1, 4))],
            plan_id=layout.plan_id, extra={"rank": 0})
    assert f"unknown plan {layout.plan_id}" in _error(ep)  # it was not registered
    assert _pong(ep)["buffer_bytes"] == before


def _pong(ep: Endpoint) -> dict:
    ep.send(Kind.PING)
    _, msg, _ = ep.recv()
    assert msg.kind == Kind.PONG
    return msg.extra


def test_unknown_plan(ep):
    ep.send(Kind.FWD, [("q", torch.zeros(2, 2, 4)), ("k", torch.zeros(2, 1, 4)), ("v", torch.zeros(2, 1, 4))],
            plan_id=12345, extra={"rank": 0})
    assert "unknown plan 12345" in _error(ep)
    _still_serving(ep)


def test_unauthenticated_peer_is_refused(server):
    ctx = zmq.Context()
    stranger = Endpoint.client(ctx, dataclasses.replace(TCFG, secret=None), server[0])
    stranger.send(Kind.PING)
    _, msg, _ = stranger.recv()
    assert msg.kind == Kind.ERROR and "unauthenticated" in msg.extra["error"]
    # A peer with the wrong key is refused too, and cannot even read the (signed) refusal.
    forger = Endpoint.client(ctx, dataclasses.replace(TCFG, secret=b"wrong"), server[0])
    forger.send(Kind.PING)
    with pytest.raises(WireError, match="authentication failed"):
        forger.recv()
    friend = Endpoint.client(ctx, TCFG, server[0])
    _still_serving(friend)
    for e in (stranger, forger, friend):
        e.close()
    ctx.term()


def test_a_correct_request_after_the_faults_is_served_exactly(ep, server):
    """Faults first, in this test (never relying on other tests having run), then an exact answer."""
    plan = _plan()
    pid = _register(ep, plan)
    n = int(plan.server_q_rows[0])
    ep.sock.send_multipart([b"\x00garbage"])
    assert "shorter than" in _error(ep)
    ep.send(Kind.FWD, [("q", torch.zeros(n, 2, 4, dtype=torch.float64)), ("k", torch.zeros(n, 1, 4)),
                       ("v", torch.zeros(n, 1, 4))], plan_id=pid, extra={"rank": 0})
    assert "float64" in _error(ep)
    bad = torch.full((n, 2, 4), float("nan"))
    ep.send(Kind.FWD, [("q", bad), ("k", torch.zeros(n, 1, 4)), ("v", torch.zeros(n, 1, 4))], plan_id=pid,
            extra={"rank": 0})
    assert "NaN or inf" in _error(ep)

    gen = torch.Generator().manual_seed(0)
    t = RankTensors(*(torch.randn(96, h, 4, generator=gen) for h in (2, 1, 1)))
    client = CADClient(0, [server[0]], TCFG, backend="sdpa")
    try:
        out, lse = client.forward(plan, t)
    finally:
        client.close()
    from distca.runtime.plan_exec import execute_plan

    want = execute_plan(plan, [t], backend="sdpa")
    torch.testing.assert_close(out, want["out"][0])
    torch.testing.assert_close(lse, want["lse"][0])
    assert plan_id(plan) == pid


def test_incomplete_round_times_out_with_an_error_naming_the_missing_rank():
    scfg = dataclasses.replace(SCFG, transport=dataclasses.replace(TCFG, timeout_s=1.0))
    batch = BatchLayout.from_ranks([[64], [64]], [False, True])  # one document over two ranks
    plan, _ = make_plan(batch, Placement(2, 1, "dedicated"), SCHED)
    with server_processes(1, scfg) as running:
        client = CADClient(0, running.addresses, PATIENT, backend="sdpa")
        t = RankTensors(*(torch.zeros(64, h, 4) for h in (2, 1, 1)))
        try:
            # The server's own round timeout (1 s) fires long before the client's receive timeout.
            with pytest.raises(ServerError, match=r"timed out after 1\.0 s waiting for ranks \[1\]"):
                client.forward(plan, t)  # rank 1 never sends
        finally:
            client.close()
        _ping(running.addresses[0], PATIENT)


def test_killed_server_fails_the_step_with_a_named_timeout():
    tcfg = dataclasses.replace(TCFG, timeout_s=2.0)
    plan = _plan()
    with server_processes(1, dataclasses.replace(SCFG, transport=tcfg)) as running:
        (address,), (proc,) = running.addresses, running.processes
        client = CADClient(0, running.addresses, tcfg, backend="sdpa")
        try:
            client.register(plan)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=60)
            assert proc.exitcode == -signal.SIGKILL
            t = RankTensors(*(torch.zeros(96, h, 4) for h in (2, 1, 1)))
            with pytest.raises(TransportTimeout, match=address.replace("/", ".") + r" within 2\.0 s"):
                client.forward(plan, t)
        finally:
            client.close()
    # the launcher removed the dead server's socket file (the address ends in '#<server session>')
    assert not os.path.exists(address.partition("#")[0][len("ipc://"):])


def test_a_failing_computation_reports_to_every_sender_and_the_server_stays_up():
    """A server misconfigured with a backend it cannot run: every trainer of the round gets an error
    naming why (not only the last to arrive), and the server keeps serving."""
    import threading

    tcfg = dataclasses.replace(TCFG, timeout_s=10.0, secret=None)
    scfg = dataclasses.replace(SCFG, backend="flash", transport=tcfg)
    batch = BatchLayout.from_ranks([[64], [64]], [False, True])  # one document over two trainers
    plan, _ = make_plan(batch, Placement(2, 1, "dedicated"), SCHED)
    errors: dict[int, BaseException] = {}
    with server_processes(1, scfg) as running:
        addresses = running.addresses

        def trainer(rank: int) -> None:
            client = CADClient(rank, addresses, tcfg, backend="sdpa")
            try:
                client.forward(plan, RankTensors(*(torch.zeros(64, h, 4) for h in (2, 1, 1))))
            except BaseException as exc:
                errors[rank] = exc
            finally:
                client.close()

        threads = [threading.Thread(target=trainer, args=(r,)) for r in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
        probe = CADClient(0, addresses, tcfg)
        assert probe.ping(0)["name"] == "server0"
        probe.close()
    assert sorted(errors) == [0, 1]
    for exc in errors.values():
        assert isinstance(exc, ServerError) and "BackendUnavailableError" in str(exc) and "flash" in str(exc), exc


# -- the shared-memory data plane: a header names a trainer's segment and regions in it ----------------------

def _segment(size: int) -> Segment:
    return Segment.create(f"{PREFIX}faults-{os.getpid()}-{uuid.uuid4().hex[:8]}", size)


def _shm_fwd(ep: Endpoint, pid: int, seg: str, nq: int, nk: int, **change) -> str:
    """Send a shared-memory FWD header for rank 0 (regions packed from offset 0; ``change`` replaces parts of
    the ``shm`` map or whole ``extra`` keys) and return the server's error."""
    q, kv = nq * 2 * 4 * 4, nk * 4 * 4
    shm = {"seg": seg, "in": [["q", "float32", [nq, 2, 4], 0], ["k", "float32", [nk, 1, 4], q],
                              ["v", "float32", [nk, 1, 4], q + kv]],
           "out": [["out", q + 2 * kv], ["lse", 2 * q + 2 * kv]]}
    extra = {"rank": 0, "shm": shm}
    for key, value in change.items():
        (shm if key in shm else extra)[key] = value
    ep.send(Kind.FWD, plan_id=pid, extra=extra)
    return _error(ep)


def test_shm_headers_that_name_bad_segments_or_regions_get_errors(ep):
    plan = _plan()
    pid = _register(ep, plan)
    _, nq, _, nk = server_layout(plan, 0).senders[0]
    need = 2 * nq * 2 * 4 * 4 + 2 * nk * 4 * 4 + nq * 2 * 4
    seg, big = _segment(need), _segment(2 * SHM_MAX)
    try:
        for name in ("evil", "distca-../../etc/passwd", f"{PREFIX}{'x' * 300}", 42):
            assert "not a DistCA segment name" in _shm_fwd(ep, pid, name, nq, nk)
        assert "cannot open" in _shm_fwd(ep, pid, f"{PREFIX}faults-missing-{uuid.uuid4().hex[:8]}", nq, nk)
        assert f"outside (0, {SHM_MAX}]" in _shm_fwd(ep, pid, big.name, nq, nk)  # larger than the server maps
        assert "lies outside" in _shm_fwd(ep, pid, seg.name, nq, nk, out=[["out", seg.size - 4], ["lse", 0]])
        assert "lies outside" in _shm_fwd(ep, pid, seg.name, nq, nk, out=[["out", 1 << 62], ["lse", 0]])
        assert "not a non-negative multiple" in _shm_fwd(ep, pid, seg.name, nq, nk, out=[["out", 2], ["lse", 0]])
        assert "not a non-negative multiple" in _shm_fwd(ep, pid, seg.name, nq, nk, out=[["out", -64], ["lse", 0]])
        bad_dtype = [["q", "float64", [nq, 2, 4], 0], ["k", "float32", [nk, 1, 4], 0], ["v", "float32", [nk, 1, 4], 0]]
        assert "expects float32" in _shm_fwd(ep, pid, seg.name, nq, nk, **{"in": bad_dtype})
        bad_rows = [["q", "float32", [nq + 1, 2, 4], 0], ["k", "float32", [nk, 1, 4], 0],
                    ["v", "float32", [nk, 1, 4], 0]]
        assert f"expects float32 [{nq}, 2, 4]" in _shm_fwd(ep, pid, seg.name, nq, nk, **{"in": bad_rows})
        assert "needs inputs" in _shm_fwd(ep, pid, seg.name, nq, nk, out=[["out", 0], ["out", 0]])
        assert "expected [role of" in _shm_fwd(ep, pid, seg.name, nq, nk, out=[["dq", 0], ["lse", 0]])
        assert "must be a map" in _shm_fwd(ep, pid, seg.name, nq, nk, shm=[1, 2])
        assert "shm_drop must be" in _shm_fwd(ep, pid, seg.name, nq, nk, shm_drop="x")
        seg.view(0, torch.float32, (nq, 2, 4)).fill_(float("nan"))
        assert "NaN or inf" in _shm_fwd(ep, pid, seg.name, nq, nk)
    finally:
        for s in (seg, big):
            s.unlink()
            s.close()
    _still_serving(ep)


def _exact_forward(address: str, tcfg: TransportConfig, plan, host: str | None = None) -> str:
    """One forward round through a shm-enabled client (``host``: pretend to live there); checks the result
    exactly and returns the data plane the client used."""
    gen = torch.Generator().manual_seed(1)
    t = RankTensors(*(torch.randn(96, h, 4, generator=gen) for h in (2, 1, 1)))
    client = CADClient(0, [address], tcfg, backend="sdpa", shm=True)
    if host is not None:
        client.host = host
    try:
        out, lse = client.forward(plan, t)
        plane = client.data_plane
    finally:
        client.close()
    from distca.runtime.plan_exec import execute_plan

    want = execute_plan(plan, [t], backend="sdpa")
    torch.testing.assert_close(out, want["out"][0])
    torch.testing.assert_close(lse, want["lse"][0])
    return plane


def test_after_shm_faults_a_shm_round_is_served_exactly_and_other_hosts_or_big_rounds_use_frames(ep, server):
    plan = _plan()
    pid = _register(ep, plan)
    _, nq, _, nk = server_layout(plan, 0).senders[0]
    assert "cannot open" in _shm_fwd(ep, pid, f"{PREFIX}faults-missing-{uuid.uuid4().hex[:8]}", nq, nk)
    seg = _segment(64)
    try:
        assert "lies outside" in _shm_fwd(ep, pid, seg.name, nq, nk)  # the rows do not fit in 64 bytes
    finally:
        seg.unlink()
        seg.close()
    assert _exact_forward(server[0], TCFG, plan) == "shm"
    assert _exact_forward(server[0], TCFG, plan, host="another-host") == "zmq"  # not this host: frames
    assert _exact_forward(server[0], dataclasses.replace(TCFG, shm_max_bytes=1024), plan) == "zmq"  # over the bound
    off = dataclasses.replace(SCFG, transport=dataclasses.replace(TCFG, shm_max_bytes=0))
    with server_processes(1, off) as running:  # a server that maps no shared memory
        assert _exact_forward(running.addresses[0], TCFG, plan) == "zmq"
