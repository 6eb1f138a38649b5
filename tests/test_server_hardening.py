"""Hardening of the attention server against any peer (issue 16, the server's part): no message stops the loop, a
rejected message changes no rows, a PLAN must cover every row it points at, open rounds and their buffers are
bounded and freed, peer text in logs is escaped and rate-limited, and a Ray actor whose loop died says so.

Real servers and sockets throughout: server processes (``server_processes``), or a server on a thread of the test
process where the test reads its log records."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import msgpack
import pytest
import torch
import zmq

from distca.config import config_from_dict
from distca.parts import server_settings
from distca.runtime.client import CADClient
from distca.runtime.plan_exec import RankTensors, execute_plan
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.server.layout import server_layout
from distca.server.loop import AttentionServer, ServerConfig
from distca.server.pool import _ServerActor
from distca.server.processes import server_processes
from distca.transport.channel import Endpoint, TransportConfig, TransportTimeout
from distca.transport.wire import _PREFIX, MAGIC, VERSION, Kind, encode
from tests.conftest import client_endpoint

pytestmark = pytest.mark.cluster  # spawns server processes (left out of `make test-fast`)

SECRET = b"hardening-secret"
TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=5.0, secret=SECRET, checksum=False,
                       shm_max_bytes=0)
SCFG = ServerConfig(n_heads=2, n_kv_heads=1, head_dim=4, dtype="float32", backend="sdpa", max_plans=64,
                    max_rows=4096, transport=TCFG)
SCHED = SchedulerConfig(eps=0.0, granularity=128, window=-1, min_offload_pairs=0)  # every task on the one server


@pytest.fixture(scope="module")
def server():
    with server_processes(1, SCFG) as running:
        yield running.addresses[0], running.processes[0]


@pytest.fixture()
def ep(server):
    with client_endpoint(TCFG, server[0]) as e:
        yield e


def _reply(ep: Endpoint, timeout_s: float = 5.0):
    return ep.recv(timeout_s=timeout_s)[1]


def _error(ep: Endpoint) -> str:
    msg = _reply(ep)
    assert msg.kind == Kind.ERROR, msg.kind
    return msg.extra["error"]


def _pong(ep: Endpoint) -> dict:
    ep.send(Kind.PING)
    msg = _reply(ep)
    assert msg.kind == Kind.PONG, msg.kind
    return msg.extra


def _raw_header(kind: Kind, specs: list, extra: dict | None = None) -> bytes:
    """A header whose tensor specs are whatever the test says (types the encoder would never write), signed."""
    import hashlib
    import hmac

    meta = msgpack.packb({"t": specs, "x": extra or {}}, use_bin_type=True)
    head = _PREFIX.pack(MAGIC, VERSION, int(kind), 2, len(specs), 7, 0, len(meta)) + meta
    return head + hmac.new(SECRET, head, hashlib.sha256).digest()


def _two_rank_plan(length: int = 64):
    """One document over two trainers, all of it on one server: both ranks send to it."""
    batch = BatchLayout.from_ranks([[length], [length]], [False, True])
    plan, _ = make_plan(batch, Placement(2, 1, "dedicated"), SCHED)
    return plan


# -- no message stops the loop ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    ["q", ["float32"], [2], 8, 0],  # a dtype sent as a list: unhashable in the decoder's lookup
    ["q", {"a": 1}, [2], 8, 0],  # ... or as a map
    ["q", "float32", [2], 8, "crc"],  # a CRC sent as a string
    ["q", "float32", [2], 8, None],  # ... as None
    ["q", "float32", [2], 8, float("inf")],  # ... as inf
    ["q", "float32", [2 ** 63, 1], 8, 0],  # a shape of 2**63
    ["q", "float32", [True, 2], 8, 0],  # a bool dimension
])
def test_a_header_that_makes_the_decoder_raise_anything_gets_an_error_and_the_server_serves_on(ep, spec):
    ep.sock.send_multipart([_raw_header(Kind.FWD, [spec]), b"\x00" * 8])
    msg = _reply(ep)
    assert msg.kind == Kind.ERROR, msg.kind  # (or a clean refusal of a well-typed header: still an ERROR)
    _pong(ep)


def test_requests_with_odd_fields_get_errors_and_change_nothing(ep):
    plan = _two_rank_plan()
    layout = server_layout(plan, 0)
    ep.send(Kind.PLAN, layout.tensors(), plan_id=layout.plan_id, extra=layout.extra())
    assert _reply(ep).kind == Kind.ACK
    before = _pong(ep)
    _, nq, _, nk = layout.senders[0]
    rows = [("q", torch.zeros(nq, 2, 4)), ("k", torch.zeros(nk, 1, 4)), ("v", torch.zeros(nk, 1, 4))]
    for rank in ([0], {"r": 0}, True, 2 ** 63, "0", None, -1, 0.0):
        ep.send(Kind.FWD, rows, plan_id=layout.plan_id, extra={"rank": rank})
        err = _error(ep)  # the server's check, or the wire's strict types first
        assert "sends nothing to this server" in err or "extra field 'rank' must be" in err, err
    # the tensors of another shape with the same element count would have landed in the rows before
    ep.send(Kind.FWD, [("q", torch.zeros(nq, 4, 2)), *rows[1:]], plan_id=layout.plan_id, extra={"rank": 0})
    assert "receive buffer expects" in _error(ep)
    after = _pong(ep)
    assert after["rounds_open"] == 0 and after["buffer_bytes"] == before["buffer_bytes"]


def test_a_plan_with_huge_rows_is_refused_before_any_buffer_grows(ep):
    layout = server_layout(_two_rank_plan(), 0)
    before = _pong(ep)["buffer_bytes"]
    for field in ("q_rows", "kv_rows", "max_q", "max_k"):
        extra = {**layout.extra(), field: 2 ** 40}
        ep.send(Kind.PLAN, layout.tensors(), plan_id=layout.plan_id + 1, extra=extra)
        assert "PLAN" in _error(ep)
    ep.send(Kind.PLAN, layout.tensors(), plan_id=layout.plan_id + 1, extra={**layout.extra(), "kv_rows": [1]})
    assert "kv_rows must be an integer" in _error(ep)
    assert _pong(ep)["buffer_bytes"] == before


# -- a rejected message changes no rows --------------------------------------------------------------------------

def _round_with_a_duplicate(address: str, dup_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 arrives, then a second rank-0 FWD carrying ``dup_q`` (refused), then rank 1: rank 0's output and the
    colocated reference for its real rows."""
    plan = _two_rank_plan()
    gen = torch.Generator().manual_seed(3)
    ranks = [RankTensors(*(torch.randn(64, h, 4, generator=gen) for h in (2, 1, 1))) for _ in range(2)]
    got: dict[int, object] = {}

    def trainer(r: int) -> None:
        client = CADClient(r, [address], TCFG, backend="sdpa")
        try:
            got[r] = client.forward(plan, ranks[r])[0]
        except Exception as exc:
            got[r] = exc
        finally:
            client.close()

    ctx = zmq.Context()
    intruder = Endpoint.client(ctx, TCFG, address)
    try:
        t0 = threading.Thread(target=trainer, args=(0,))
        t0.start()
        deadline = time.monotonic() + 30
        while _pong(intruder)["rounds_open"] == 0:  # rank 0 has arrived
            assert time.monotonic() < deadline, "rank 0 never arrived"
            time.sleep(0.05)
        layout = server_layout(plan, 0)
        _, nq, _, nk = layout.senders[0]
        intruder.send(Kind.FWD, [("q", dup_q.expand(nq, 2, 4).contiguous()), ("k", torch.ones(nk, 1, 4)),
                                 ("v", torch.full((nk, 1, 4), 7.0))], plan_id=layout.plan_id, extra={"rank": 0})
        assert "sent FWD twice" in _error(intruder)
        t1 = threading.Thread(target=trainer, args=(1,))
        t1.start()
        t0.join(60)
        t1.join(60)
    finally:
        intruder.close()
        ctx.term()
    assert isinstance(got[0], torch.Tensor), got[0]
    return got[0], execute_plan(plan, ranks, backend="sdpa")["out"][0]


@pytest.mark.parametrize("value", [float("nan"), 3.0])
def test_a_refused_duplicate_does_not_touch_the_rows_of_the_rank_it_repeats(server, value):
    out, want = _round_with_a_duplicate(server[0], torch.full((1, 2, 4), value))
    torch.testing.assert_close(out, want)


# -- a PLAN must cover its rows -------------------------------------------------------------------------------

def _plan_message(layout, senders: list[list[int]]) -> tuple[list, dict]:
    tensors = dict(layout.tensors())
    tensors["senders"] = torch.tensor(senders, dtype=torch.int64).reshape(-1, 5)
    return list(tensors.items()), layout.extra()


def test_a_plan_whose_senders_leave_rows_unwritten_or_write_them_twice_is_refused(ep):
    layout = server_layout(_two_rank_plan(96), 0)
    (r0, b0), (r1, b1) = sorted(layout.senders.items())
    assert b0[1] and b1[1]  # both ranks send q rows
    pid = layout.plan_id
    cases = {
        "rank 1 missing": [[r0, *b0]],  # rank 1's rows would hold whatever the last round left there
        "a hole": [[r0, *b0], [r1, b1[0] + 1, b1[1] - 1, b1[2], b1[3]]],
        "an overlap": [[r0, *b0], [r1, b1[0] - 1, b1[1], b1[2], b1[3]]],
        "rank twice": [[r0, *b0], [r1, *b1], [r1, *b1]],
    }
    for i, (what, table) in enumerate(cases.items()):
        tensors, extra = _plan_message(layout, table)
        ep.send(Kind.PLAN, tensors, plan_id=pid + 1 + i, extra=extra)
        err = _error(ep)
        assert "cover" in err or "twice" in err or "outside" in err, (what, err)
        ep.send(Kind.FWD, [("q", torch.zeros(b0[1], 2, 4)), ("k", torch.zeros(b0[3], 1, 4)),
                           ("v", torch.zeros(b0[3], 1, 4))], plan_id=pid + 1 + i, extra={"rank": r0})
        assert "unknown plan" in _error(ep), what  # nothing was registered, nothing is served


def test_a_plan_id_registered_again_with_another_layout_is_refused(ep):
    a, b = server_layout(_two_rank_plan(64), 0), server_layout(_two_rank_plan(128), 0)
    ep.send(Kind.PLAN, a.tensors(), plan_id=a.plan_id, extra=a.extra())
    assert _reply(ep).kind == Kind.ACK
    ep.send(Kind.PLAN, b.tensors(), plan_id=a.plan_id, extra=b.extra())
    assert "different layout" in _error(ep)
    ep.send(Kind.PLAN, a.tensors(), plan_id=a.plan_id, extra=a.extra())
    assert _reply(ep).kind == Kind.ACK


# -- open rounds are bounded, and their buffers freed ----------------------------------------------------------

def test_open_rounds_are_bounded_and_their_buffers_freed_after_they_time_out():
    tcfg = dataclasses.replace(TCFG, timeout_s=3.0)
    scfg = dataclasses.replace(SCFG, transport=tcfg, max_open_rounds=8)
    plan = _two_rank_plan(512)
    layouts = [server_layout(plan, 0, group=g) for g in range(1, 13)]  # 12 plans of the same size
    _, nq, _, nk = layouts[0].senders[0]
    rows = [("q", torch.ones(nq, 2, 4)), ("k", torch.ones(nk, 1, 4)), ("v", torch.ones(nk, 1, 4))]
    with server_processes(1, scfg) as running:
        ctx = zmq.Context()
        ep = Endpoint.client(ctx, dataclasses.replace(tcfg, timeout_s=30.0), running.addresses[0])
        try:
            idle = _pong(ep)["buffer_bytes"]
            for lay in layouts:
                ep.send(Kind.PLAN, lay.tensors(), plan_id=lay.plan_id, extra=lay.extra())
                assert _reply(ep).kind == Kind.ACK
            for i, lay in enumerate(layouts):  # rank 0 only: every round stays open, waiting for rank 1
                ep.send(Kind.FWD, rows, plan_id=lay.plan_id, extra={"rank": 0})
                if i >= 8:
                    assert "rounds are open on this server, its bound is 8" in _error(ep)
            full = _pong(ep)
            assert full["rounds_open"] == 8
            timed_out = 0
            while timed_out < 8:  # the server abandons each round and says so
                assert "timed out" in _error(ep)
                timed_out += 1
            assert _pong(ep)["rounds_open"] == 0
            per_slot = (full["buffer_bytes"] - idle) / 8
            deadline = time.monotonic() + 60
            while _pong(ep)["buffer_bytes"] - idle > 2 * per_slot:  # slots past the first two, idle for the timeout
                assert time.monotonic() < deadline, "the idle slots' buffers were not freed"
                time.sleep(0.5)
            ep.send(Kind.FWD, rows, plan_id=layouts[-1].plan_id, extra={"rank": 0})  # a refused plan's round opens now
            with pytest.raises(TransportTimeout):
                _reply(ep, timeout_s=0.2)  # accepted: no reply until rank 1 or the timeout
        finally:
            ep.close()
            ctx.term()


def test_a_round_that_needs_more_than_the_buffer_bound_is_refused():
    scfg = dataclasses.replace(SCFG, max_buffer_bytes=64 * 1024)  # less than one round of 2 x 1024 rows
    layout = server_layout(_two_rank_plan(1024), 0)
    _, nq, _, nk = layout.senders[0]
    with server_processes(1, scfg) as running:
        ctx = zmq.Context()
        ep = Endpoint.client(ctx, TCFG, running.addresses[0])
        try:
            ep.send(Kind.PLAN, layout.tensors(), plan_id=layout.plan_id, extra=layout.extra())
            assert _reply(ep).kind == Kind.ACK
            ep.send(Kind.FWD, [("q", torch.ones(nq, 2, 4)), ("k", torch.ones(nk, 1, 4)), ("v", torch.ones(nk, 1, 4))],
                    plan_id=layout.plan_id, extra={"rank": 0})
            assert "bound of 65536 bytes" in _error(ep)
            pong = _pong(ep)
            assert pong["buffer_bytes"] <= 64 * 1024 and pong["rounds_open"] == 0
        finally:
            ep.close()
            ctx.term()


def test_the_run_config_sets_the_server_bounds():
    cfg = config_from_dict({"train": {"max_server_rows": 5000, "max_server_rounds": 6, "server_buffer_mb": 3}})
    s = server_settings(cfg)
    assert (s.max_rows, s.max_open_rounds, s.max_buffer_bytes) == (5000, 6, 3 << 20)
    default = config_from_dict({})
    derived = server_settings(default)
    assert derived.max_rows == default.cluster.n_trainers * default.train.tokens_per_rank
    assert derived.max_open_rounds == 4 * default.cluster.n_trainers  # two in flight per trainer, and slack
    assert derived.max_buffer_bytes == 0  # the server's own: max_open_rounds full rounds


# -- peer text in logs -----------------------------------------------------------------------------------------

def test_peer_text_in_logs_is_escaped_and_log_lines_per_peer_are_bounded(caplog):
    """A server on a thread of this process (its log records are this process's): 300 malformed messages whose
    tensor name carries a newline, an escape sequence and a forged log line."""
    server = AttentionServer(dataclasses.replace(SCFG, name="logsrv"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_s": 0.05}, daemon=True)
    evil = "q\n2026-01-01 CRITICAL forged line\x1b[2J" + "x" * 5000
    ctx = zmq.Context()
    ep = Endpoint.client(ctx, TCFG, server.address)
    try:
        with caplog.at_level(logging.INFO, logger="distca.server"):
            thread.start()
            for _ in range(300):
                ep.sock.send_multipart(encode(Kind.FWD, [(evil, torch.zeros(2))], secret=SECRET))
                # (the other half of the flood: the same message with a shape the decoder refuses)
                ep.sock.send_multipart([_raw_header(Kind.FWD, [[evil, "float32", [-1], 4, 0]]), b"\x00" * 4])
            for _ in range(600):
                err = _error(ep)
                assert "\n" not in err and "\x1b" not in err and len(err) < 1200
            assert _pong(ep)["refused"] == 600
            # a data-plane group whose store host is peer text: its join fails on the group's thread, which logs it
            ep.send(Kind.GROUP, extra={"op": "join", "session": "s", "group": 0, "rank": 0, "n_trainers": 1,
                                       "n_servers": 1, "server": 0, "store": ["no-such-host\nforged\x1b[2J", 1],
                                       "timeout_s": 0.5, "format": [2, 1, 4, "float32"]})
            assert _reply(ep).kind == Kind.ACK
            err = _error(ep)
            assert "could not join" in err and "\n" not in err
            ep.send(Kind.SHUTDOWN)
            assert _reply(ep).kind == Kind.ACK
            thread.join(10)
    finally:
        ep.close()
        ctx.term()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("distca.server")]
    assert 0 < len(lines) <= 10, len(lines)  # 5 per peer per 10 s (one peer here, and the group's thread)
    assert any("could not join" in line and "no-such-host\\nforged\\x1b" in line for line in lines), lines
    for line in lines:
        assert "\n" not in line and "\x1b" not in line and len(line) < 1000, line[:200]


# -- a Ray actor whose loop died reports unhealthy -------------------------------------------------------------

def test_the_server_actor_reports_unhealthy_once_its_loop_is_gone():
    """The actor class as Ray hosts it (here without Ray): its server's ZeroMQ context is terminated under it, a
    failure no message can cause; the loop ends and health() says why instead of the actor looking alive."""
    threads = torch.get_num_threads()
    actor = _ServerActor(dataclasses.replace(SCFG, name="actor0"))
    torch.set_num_threads(threads)  # (the actor sets one thread for its process: this is the test's process)
    assert actor.health() is True
    term = threading.Thread(target=actor.server.ctx.term, daemon=True)
    term.start()
    term.join(20)
    assert not term.is_alive(), "the loop did not let go of its socket"
    actor._thread.join(10)
    with pytest.raises(RuntimeError, match=r"loop ended.*ContextTerminated"):
        actor.health()
    assert isinstance(actor.server.failure, zmq.ContextTerminated)


def test_the_server_actor_reports_a_shut_down_loop():
    threads = torch.get_num_threads()
    actor = _ServerActor(dataclasses.replace(SCFG, name="actor1"))
    torch.set_num_threads(threads)
    ctx = zmq.Context()
    ep = Endpoint.client(ctx, TCFG, actor.address())
    try:
        ep.send(Kind.SHUTDOWN)
        assert _reply(ep).kind == Kind.ACK
    finally:
        ep.close()
        ctx.term()
    actor._thread.join(10)
    with pytest.raises(RuntimeError, match="SHUTDOWN"):
        actor.health()


# -- a masked plan's rectangles are checked like the rest of a PLAN ---------------------------------------------

def test_a_masked_plan_registers_and_bad_rectangles_are_refused_with_the_server_serving_on(ep):
    from distca.masks import Mask

    batch = BatchLayout.from_ranks([[64], [64]], [False, True])
    plan, _ = make_plan(batch, Placement(2, 1, "dedicated"), dataclasses.replace(SCHED, window=None,
                                                                                   mask=Mask.sink_window(4, 16)))
    layout = server_layout(plan, 0)
    assert layout.rects is not None and layout.rects.shape[0] >= 2  # window band + sink rectangles
    ep.send(Kind.PLAN, layout.tensors(), plan_id=layout.plan_id, extra=layout.extra())
    assert _reply(ep).kind == Kind.ACK
    before = _pong(ep)["buffer_bytes"]
    good = layout.rects
    bad = {"a row past the q buffer": good.clone().index_put_((torch.tensor([0]), torch.tensor([1])),
                                                               torch.tensor(layout.q_rows + 1)),
           "a key row past the k/v buffer": good.clone().index_put_((torch.tensor([0]), torch.tensor([3])),
                                                                    torch.tensor(layout.kv_rows + 5)),
           "an unknown kind": good.clone().index_put_((torch.tensor([0]), torch.tensor([4])), torch.tensor(7)),
           "a table of the wrong width": good[:, :5].contiguous(),
           "a float table": good.double()}
    for i, (what, rects) in enumerate(bad.items()):
        tensors = dict(layout.tensors())
        tensors["rects"] = rects
        ep.send(Kind.PLAN, list(tensors.items()), plan_id=layout.plan_id + 1 + i, extra=layout.extra())
        assert "PLAN" in _error(ep), what
    fused = dict(layout.tensors())  # rectangles and a fused call at once
    fused["cu_q"] = fused["cu_k"] = torch.tensor([0, layout.q_rows], dtype=torch.int32)
    ep.send(Kind.PLAN, list(fused.items()), plan_id=layout.plan_id + 99, extra=layout.extra())
    assert "rectangles layout has no fused call" in _error(ep)
    assert _pong(ep)["buffer_bytes"] == before
