"""A trainer's side of CAD attention over the network: send its rows of a plan to the attention
servers, receive the results, run the tasks the plan keeps local, all with timeouts.

Two data planes, chosen per server and round; ZeroMQ carries the control plane (plans, round ids,
errors, health) either way:

- **shared memory** (``shm=True`` and the server on this host: its PLAN ACK carries the same host
  identity, see :mod:`distca.transport.shm`): the rows are gathered straight into a segment this trainer
  owns (one per round in flight to that server, grow-only, reused), the request header names their
  regions and the regions the results go to; the server writes out/lse (dq/dk/dv) there and answers
  with a header only, and ``wait`` copies the results from the segment into the trainer's tensors. The
  server removes the segment's name once it has mapped it (the trainer again once answered), so no
  segment outlives the processes.
- **ZeroMQ frames** (a server on another host, shared memory off, or a round larger than
  ``TransportConfig.shm_max_bytes``): the rows are staged to host memory (one copy per tensor per
  server) and sent as frames; replies come back as frames.

``CADClient.data_plane`` says which of the two the rounds used. Trainer tensors may live on any device:
rows are gathered where they are and copied to host memory (the segment or the frame); results are
copied back to the trainer tensors' device and dtype, and the tasks the plan keeps local run there.

Failure policy. Without a :class:`~distca.runtime.recovery.Recovery` (``cluster.server_loss: restart``) a server
that errors, dies or does not answer within ``TransportConfig.timeout_s`` makes the step fail with an exception
naming the server and the reason — never a hang, never a wrong tensor (the failed round's segments are never
reused); the run restarts from its last checkpoint. With one (``in_step``), a server that does not answer a
round within ``Recovery.lost_after_s`` is lost: the trainers compute its rounds themselves, exactly as it would
have (:mod:`distca.runtime.recovery`), it gets no more requests, and its late replies are dropped. A server that
answers with an ERROR still fails the step (it is alive and says the request is wrong).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable

import torch
import zmq

from distca.attention import lse_dtype
from distca.attention.tasks import row_ranges
from distca.errors import DistCAError
from distca.runtime.plan_exec import RankTensors, run_local_backward, run_local_forward
from distca.runtime.recovery import Recovery
from distca.scheduler import Plan
from distca.server.layout import plan_id, server_layout
from distca.transport.channel import Endpoint, TransportConfig, TransportTimeout
from distca.transport.shm import PREFIX, Segment, SegmentSlots, ShmError, aligned, host_identity
from distca.transport.wire import DTYPE_NAMES, Kind, WireError

log = logging.getLogger(__name__)

# One tensor of a request: (role, trainer tensor, its rows for the server, dtype on the wire); one result:
# (role, dtype, shape).
Input = tuple[str, torch.Tensor, torch.Tensor, torch.dtype]
Result = tuple[str, torch.dtype, tuple[int, ...]]


class ServerError(DistCAError, RuntimeError):
    """An attention server refused or failed a request."""


def _rows(x, rank: int, server: int, device: torch.device | None = None) -> torch.Tensor:
    """This rank's local rows sent to ``server`` by transfer list ``x``, in the server's row order (on
    ``device``, where the trainer's tensors are; host when None)."""
    m = (x.rank == rank) & (x.server == server)
    rows = torch.from_numpy(row_ranges(x.src_row[m], x.n[m]))
    return rows if device is None or device.type == "cpu" else rows.to(device)


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host tensor for the wire: ``t`` itself on the host, else one device-to-host copy."""
    return t.contiguous() if t.device.type == "cpu" else t.to("cpu")


def _like(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A received (host) tensor on ``ref``'s device and in its dtype."""
    return got if got.device == ref.device and got.dtype == ref.dtype else got.to(ref.device, ref.dtype)


def _gather_into(dest: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> None:
    """``dest[:] = x[rows]`` (in ``dest``'s dtype), in one copy when ``x`` is a host tensor of that dtype."""
    if x.device.type == "cpu" and x.dtype == dest.dtype:
        torch.index_select(x, 0, rows, out=dest)
    else:
        dest.copy_(x[rows])


class _Pending:
    """Replies still on their way from the servers; ``wait`` records how long the trainer blocked."""

    def __init__(self, client: CADClient, pid: int, servers: list[int], rows: dict, sends: dict,
                 shm: dict[int, tuple[Segment, dict[str, torch.Tensor]]], results: tuple[torch.Tensor, ...],
                 plan: Plan | None = None, mine: Callable[[int], dict[str, torch.Tensor]] | None = None):
        self.client, self.pid, self.servers, self.rows, self.sends = client, pid, servers, rows, sends
        self.shm = shm  # server -> (segment, its reply regions), for the rounds on shared memory
        self.results = results  # local tasks already written; the servers' rows land here
        self.plan, self.mine = plan, mine  # to stand in for a lost server: the plan, this rank's rows for server s
        self.blocked_s = 0.0

    def _collect(self, kind: Kind, take: Callable[[int, dict[str, torch.Tensor]], None], event: str) -> None:
        """Hand every server's result tensors to ``take`` as they arrive, then free the round's segments
        (for later rounds; after a failure they are retired, since a late reply may still write there)."""
        t0 = time.perf_counter()
        c, rec = self.client, self.client.recovery
        try:
            for s in self.servers:
                got = self._reply(s, kind)
                if got is None:  # lost: the trainers compute the round
                    take(s, rec.stand_in(self.plan, c.group, s, c.rank, "fwd" if kind == Kind.FWD_OUT else "bwd",
                                         self.mine(s), c.backend))
                    continue
                msg, frames = got
                if bool(msg.extra.get("shm")) != (s in self.shm):
                    raise ServerError(f"attention server {s}: a {'ZeroMQ' if s in self.shm else 'shared-memory'} "
                                      f"reply to a {'shared-memory' if s in self.shm else 'ZeroMQ'} request")
                if s in self.shm:
                    seg, regions = self.shm[s]
                    seg.unlink()  # the server has mapped it: both mappings outlive the name
                    take(s, regions)
                else:
                    take(s, frames)
        except BaseException:
            self._finish(ok=False)
            raise
        self._finish(ok=True)
        self.blocked_s = time.perf_counter() - t0
        self.client.blocked_s += self.blocked_s
        self.client.note(event, self.pid)

    def _reply(self, s: int, kind: Kind):
        """Server ``s``'s reply to this round, ``(header, tensors)``. With recovery: None when the server is lost,
        known already or now (its connection dropped, or no reply within ``lost_after_s``): the round is abandoned
        and its segment never used again."""
        c, rec = self.client, self.client.recovery
        if rec is None:
            return c._expect(s, (kind,), self.pid)
        if s not in rec.lost:
            t0 = time.perf_counter()
            try:
                return c._expect(s, (kind,), self.pid, timeout_s=rec.lost_after_s)
            except TransportTimeout as exc:
                rec.detected_s += time.perf_counter() - t0
                rec.mark_lost(s, self.pid, str(exc))
        rec.abandoned.add((s, self.pid))
        if s in self.shm:
            seg, _ = self.shm.pop(s)
            c._segment_done(s, seg, ok=False)  # a late reply may still write there
        self.sends.pop(s, None)
        return None

    def _finish(self, ok: bool) -> None:
        for s, (seg, _) in self.shm.items():
            self.client._segment_done(s, seg, ok)
        self.shm, self.sends = {}, {}


class PendingForward(_Pending):
    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block until every server's ``out``/``lse`` rows are in; returns this rank's ``(out, lse)``."""
        out, lse = self.results

        def take(s: int, got: dict[str, torch.Tensor]) -> None:
            qr = self.rows[s][0]
            out[qr] = _like(got["out"], out)
            lse[qr] = _like(got["lse"], lse)

        self._collect(Kind.FWD_OUT, take, "forward_received")
        return out, lse


class PendingBackward(_Pending):
    def wait(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block until every server's gradient rows are in; returns this rank's ``(dq, dk, dv)``."""
        dq, dk, dv = self.results

        def take(s: int, got: dict[str, torch.Tensor]) -> None:
            qr, kr = self.rows[s]
            dq[qr] = _like(got["dq"], dq)
            dk.index_add_(0, kr, _like(got["dk"], dk))
            dv.index_add_(0, kr, _like(got["dv"], dv))

        self._collect(Kind.BWD_OUT, take, "backward_received")
        return dq, dk, dv


class CADClient:
    """One trainer's connections to every attention server."""

    def __init__(self, rank: int, addresses: list[str], cfg: TransportConfig, ctx: zmq.Context | None = None,
                 backend: str = "auto", group: int = 0, on_event: Callable[[str, int], None] | None = None,
                 shm: bool = False, recovery: Recovery | None = None):
        """``rank`` is this trainer's rank *in the plans it runs*; ``group`` tells apart trainer groups that
        run the same plans on one server pool (e.g. the pipeline stage; see ``plan_id``). ``on_event(what,
        plan_id)``, when given, hears when a round's requests are sent (``forward_sent``, ``backward_sent``)
        and when its replies are all in (``forward_received``, ``backward_received``): the order in which
        rounds overlap, for tests and traces. ``shm``: move rows through shared memory with the servers on
        this host (:func:`distca.parts.client_settings` decides it from the run's data plane). ``recovery``: finish
        rounds of lost servers in the step (see the module docstring); None: a lost server fails the step."""
        self.rank, self.cfg, self.backend, self.group = rank, cfg, backend, group
        self.on_event = on_event
        self.ctx = ctx or zmq.Context.instance()
        tag = uuid.uuid4().hex[:6]
        self.eps = [Endpoint.client(self.ctx, cfg, a, name=f"trainer{rank}-{tag}-{i}") for i, a in enumerate(addresses)]
        self.monitors: dict[int, zmq.Socket] = {}  # in-step recovery: each server's connection, watched
        self.down: set[int] = set()  # servers whose connection dropped
        self.recovery = None
        self.registered: set[tuple[int, int]] = set()
        self.blocked_s = 0.0  # total time this trainer waited on servers (exposed communication)
        self.stash: dict[int, list] = {}  # replies that arrived while another request was awaited
        self.shm = shm and cfg.shm_max_bytes > 0
        self.host = host_identity() if self.shm else ""
        self.stem = f"{PREFIX}{os.getpid()}-{tag}"
        self.slots: dict[int, SegmentSlots] = {}  # servers that take this trainer's rows in shared memory
        self.acked: set[int] = set()  # servers that acknowledged a plan (their host is known)
        self.planes: set[str] = set()  # data planes the rounds so far used
        self._fell_back = False
        if recovery is not None:
            self.recover_with(recovery)

    @property
    def data_plane(self) -> str:
        """The data plane(s) of this client's rounds: ``"shm"``, ``"zmq"`` or ``"shm+zmq"`` when some servers
        (or rounds too large for a segment) went over ZeroMQ; before any round, what the servers that
        acknowledged a plan would get."""
        known = {"shm" if s in self.slots else "zmq" for s in self.acked}
        return "+".join(sorted(self.planes or known or {"zmq"}))

    def close(self) -> None:
        """Close the connections to the servers; unlink this trainer's segments and tell the servers to
        unmap them, waiting (at most a second) for each server's answer, so the notice is delivered even
        when the process exits right after (a server that is gone unmaps nothing, and needs not)."""
        told = []
        for s, slots in self.slots.items():
            names = slots.close()
            if self.recovery is not None and s in self.recovery.lost:
                continue
            if names:
                with contextlib.suppress(zmq.ZMQError):
                    self.eps[s].send(Kind.PING, extra={"shm_drop": names})
                    told.append(s)
        self.slots.clear()
        deadline = time.monotonic() + min(1.0, self.cfg.timeout_s)
        for s in told:
            with contextlib.suppress(TransportTimeout, WireError, zmq.ZMQError):
                while deadline > time.monotonic():  # late replies to failed rounds may come first
                    if self.eps[s].recv(timeout_s=deadline - time.monotonic())[1].kind == Kind.PONG:
                        break
        for s in list(self.monitors):
            self._unwatch(s)
        for ep in self.eps:
            ep.close()

    def recover_with(self, recovery: Recovery) -> None:
        """Finish rounds of lost servers in the step from now on. A dropped connection (the server's process is
        gone) makes a server lost at once, without waiting ``lost_after_s``: a socket monitor watches each."""
        self.recovery = recovery
        for s, ep in enumerate(self.eps):
            if s not in self.monitors:
                self.monitors[s] = ep.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._hello()

    def _hello(self) -> None:
        """Every server answers one PING within the transport's timeout (all at once), or this raises: in-step
        recovery is for servers lost after they served, and a server that never answers (a wrong address or key,
        a pool that did not start) is a setup error to report at once, not a loss to work around for the run."""
        for ep in self.eps:
            ep.send(Kind.PING)
        deadline = time.monotonic() + self.cfg.timeout_s
        for s, ep in enumerate(self.eps):
            try:
                self._expect(s, (Kind.PONG,), None, timeout_s=max(deadline - time.monotonic(), 0.0))
            except TransportTimeout as exc:
                raise TransportTimeout(
                    f"attention server {s} ({ep.address}) never answered within {self.cfg.timeout_s:g} s: it is "
                    "unreachable, not lost (in-step recovery covers servers lost after they served); check the "
                    "pool's addresses, the transport key and that the servers run") from exc

    def _unwatch(self, s: int) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.eps[s].sock.disable_monitor()
        self.monitors.pop(s).close(linger=0)

    def _wait(self, s: int, timeout_s: float) -> None:
        """Until server ``s`` has a message for this trainer: raises :class:`TransportTimeout` after ``timeout_s``,
        or at once when its connection dropped (its process is gone) and nothing of it is left to read."""
        sock, mon = self.eps[s].sock, self.monitors.get(s)
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            if s in self.down or mon is None:
                grace = min(left, 0.05) if s in self.down else left  # a reply sent just before it died comes first
                if sock.poll(int(grace * 1000), zmq.POLLIN):
                    return
                raise TransportTimeout(f"no message from {self.eps[s].address} within {timeout_s:.1f} s"
                                       + (" (its connection dropped)" if s in self.down else ""))
            ready = dict(self._poller(s).poll(int(left * 1000)))
            if ready.get(sock):
                return
            if ready.get(mon):
                mon.recv_multipart()  # EVENT_DISCONNECTED, the only event watched
                self.down.add(s)
                continue
            if left <= 0:
                raise TransportTimeout(f"no message from {self.eps[s].address} within {timeout_s:.1f} s")

    def _poller(self, s: int) -> zmq.Poller:
        p = zmq.Poller()
        p.register(self.eps[s].sock, zmq.POLLIN)
        p.register(self.monitors[s], zmq.POLLIN)
        return p

    def note(self, what: str, pid: int) -> None:
        """Report one round event to ``on_event`` (see ``__init__``)."""
        if self.on_event is not None:
            self.on_event(what, pid)

    def _expect(self, s: int, kinds: tuple[Kind, ...], pid: int | None = None, timeout_s: float | None = None):
        """The next reply from server ``s`` of one of ``kinds`` (for plan ``pid``), within ``timeout_s`` in all
        (None: the transport's timeout per message). Replies to other requests in flight (ping-pong keeps two)
        are set aside for their own ``_expect``. Replies to rounds abandoned on a lost server are dropped."""
        stash = self.stash.setdefault(s, [])
        for i, (msg, named) in enumerate(stash):
            if msg.kind in kinds and (pid is None or msg.plan_id == pid):
                del stash[i]
                return msg, named
        dead = self.recovery.abandoned if self.recovery is not None else ()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if left is not None and s in self.monitors:
                self._wait(s, left)
            _, msg, tensors = self.eps[s].recv(timeout_s=left)
            if (s, msg.plan_id) in dead:  # a late reply to a round given up on: the trainers computed it
                log.info("attention server %d: a late %s of abandoned plan %d dropped", s, msg.kind.name,
                         msg.plan_id)
                if self.recovery is not None:
                    self.recovery.late += 1
                continue
            # Replies are views of receive frames; copy them out only when set aside.
            named = {spec.name: t for spec, t in zip(msg.tensors, tensors, strict=True)}
            if msg.kind == Kind.ERROR and (pid is None or msg.plan_id in (0, pid)):
                raise ServerError(f"attention server {s} ({self.eps[s].address}): {msg.extra.get('error', '?')}")
            if msg.kind in kinds and (pid is None or msg.plan_id == pid):
                return msg, named
            stash.append((msg, {k: v.clone() for k, v in named.items()}))

    def rejoin(self, s: int, address: str) -> None:
        """Server ``s`` is back (a replacement at ``address``): a fresh connection, nothing of the lost one kept
        (queued requests, set-aside replies, segments, registered plans). Every trainer calls it at the same step
        boundary, so every rank of the next step sends to it."""
        if s in self.monitors:
            self._unwatch(s)
        self.eps[s].close()
        name = f"trainer{self.rank}-{uuid.uuid4().hex[:6]}-{s}"
        self.eps[s] = Endpoint.client(self.ctx, self.cfg, address, name=name)
        if self.recovery is not None:
            self.monitors[s] = self.eps[s].sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.down.discard(s)
        self.stash.pop(s, None)
        if s in self.slots:
            self.slots.pop(s).close()
        self.acked.discard(s)
        self.registered = {(pid, x) for pid, x in self.registered if x != s}
        if self.recovery is not None:  # late replies of the lost one went to the closed socket
            self.recovery.lost.discard(s)
            self.recovery.abandoned = {(x, pid) for x, pid in self.recovery.abandoned if x != s}
            self.recovery.rejoined += 1

    def forget_plans(self) -> None:
        """Register plans afresh on next use (servers keep a bounded number of layouts; re-registering a
        layout a server still holds costs one small round trip)."""
        self.registered.clear()

    def ping(self, s: int, timeout_s: float | None = None) -> dict:
        """Health check: the server's name and how many rounds it served. With recovery, a lost server answers
        ``{}`` without being asked, and one silent for ``lost_after_s`` is lost (late replies are skipped)."""
        rec = self.recovery
        if rec is not None:
            if s in rec.lost:
                return {}
            self.eps[s].send(Kind.PING)
            t0 = time.perf_counter()
            try:
                return self._expect(s, (Kind.PONG,), None, timeout_s=min(timeout_s or self.cfg.timeout_s,
                                                                          rec.lost_after_s))[0].extra
            except TransportTimeout as exc:
                rec.detected_s += time.perf_counter() - t0
                rec.mark_lost(s, 0, str(exc))
                return {}
        self.eps[s].send(Kind.PING)
        _, msg, _ = self.eps[s].recv(timeout_s=timeout_s)
        if msg.kind != Kind.PONG:
            raise ServerError(f"attention server {s}: PING answered with {msg.kind.name}")
        return msg.extra

    def _servers(self, plan: Plan) -> list[int]:
        mine = set(plan.q_xfer.server[plan.q_xfer.rank == self.rank].tolist())
        mine |= set(plan.kv_xfer.server[plan.kv_xfer.rank == self.rank].tolist())
        return sorted(mine)

    def register(self, plan: Plan) -> int:
        """Send the plan's layout to the servers this rank talks to (idempotent); returns the plan id."""
        pid = plan_id(plan, self.group)
        todo = [s for s in self._live(self._servers(plan)) if (pid, s) not in self.registered]
        for s in todo:
            layout = server_layout(plan, s, self.group)
            self.eps[s].send(Kind.PLAN, layout.tensors(), plan_id=pid, extra=layout.extra())
        for s in todo:
            if self.recovery is None:
                msg, _ = self._expect(s, (Kind.ACK,), pid)
            else:
                t0 = time.perf_counter()
                try:
                    msg, _ = self._expect(s, (Kind.ACK,), pid, timeout_s=self.recovery.lost_after_s)
                except TransportTimeout as exc:
                    self.recovery.detected_s += time.perf_counter() - t0
                    self.recovery.mark_lost(s, pid, str(exc))
                    continue
            self._learn(s, msg.extra)
            self.registered.add((pid, s))
        return pid

    def _live(self, servers: list[int]) -> list[int]:
        """The servers of ``servers`` that still get requests."""
        return servers if self.recovery is None else [s for s in servers if s not in self.recovery.lost]

    def _learn(self, s: int, info: dict) -> None:
        """Shared memory with server ``s`` when it is on this host and maps segments (its PLAN ACK says)."""
        self.acked.add(s)
        host, limit = info.get("host"), info.get("shm_max")
        if self.shm and self.host and host == self.host and type(limit) is int and limit > 0:
            if s not in self.slots:
                self.slots[s] = SegmentSlots(f"{self.stem}-{s}", min(limit, self.cfg.shm_max_bytes))
        elif s in self.slots:
            self.slots.pop(s).close()

    def _segment_done(self, s: int, seg: Segment, ok: bool) -> None:
        """A round on ``seg`` is over: keep it for later rounds, or (``ok`` False) never use it again."""
        slots = self.slots.get(s)
        if slots is None:  # closed meanwhile
            seg.unlink()
            seg.close()
        elif ok:
            slots.release(seg)
        else:
            slots.retire(seg)

    def _send(self, s: int, kind: Kind, pid: int, inputs: list[Input], results: list[Result], sends: dict,
              shm: dict) -> None:
        """Send one round's rows to server ``s``: through shared memory when the server is on this host
        (``shm[s]`` keeps the segment and its result regions), else as frames (``sends[s]`` keeps them alive
        until the replies are in)."""
        extra: dict = {"rank": self.rank}
        slots = self.slots.get(s)
        if slots is not None:
            drop = slots.take_dropped()
            if drop:
                extra["shm_drop"] = drop
            got = self._send_shm(s, slots, kind, pid, inputs, results, extra)
            if got is not None:
                shm[s] = got
                self.planes.add("shm")
                return
        sends[s] = [(role, _host(x[rows].to(dt))) for role, x, rows, dt in inputs]
        self.eps[s].send(kind, sends[s], plan_id=pid, extra=extra)
        self.planes.add("zmq")

    def _send_shm(self, s: int, slots: SegmentSlots, kind: Kind, pid: int, inputs: list[Input],
                  results: list[Result], extra: dict) -> tuple[Segment, dict[str, torch.Tensor]] | None:
        """Gather the rows into a segment and send the header naming their regions and the result regions;
        returns the segment and its result regions, or None when no segment can take the round."""
        regions = [(role, dt, (rows.numel(), *x.shape[1:])) for role, x, rows, dt in inputs] + results
        offsets, size = [], 0
        for _, dt, shape in regions:
            offsets.append(size)
            size += aligned(torch.Size(shape).numel() * dt.itemsize)
        try:
            seg = slots.acquire(size)
        except ShmError as exc:
            if not self._fell_back:
                log.warning("trainer %d: server %d gets ZeroMQ frames for rounds shared memory cannot take: %s",
                            self.rank, s, exc)
                self._fell_back = True
            return None
        views = [seg.view(off, dt, shape) for (_, dt, shape), off in zip(regions, offsets, strict=True)]
        try:
            for (_, x, rows, _), view in zip(inputs, views, strict=False):
                _gather_into(view, x, rows)
            spec = [[role, DTYPE_NAMES[dt], list(shape), off] for (role, dt, shape), off in zip(regions, offsets,
                                                                                                strict=True)]
            extra["shm"] = {"seg": seg.name, "in": spec[:len(inputs)],
                            "out": [[role, off] for role, _, _, off in spec[len(inputs):]]}
            self.eps[s].send(kind, plan_id=pid, extra=extra)
        except BaseException:
            slots.retire(seg)
            raise
        return seg, {role: v for (role, _, _), v in zip(results, views[len(inputs):], strict=True)}

    def start_forward(self, plan: Plan, t: RankTensors) -> PendingForward:
        """Send this rank's rows to the servers and run its local tasks; collect with ``.wait()``.

        Between the two the trainer is free: ping-pong computes the other nano-batch's linear work here.
        """
        pid = self.register(plan)
        servers = self._servers(plan)
        dev = t.q.device
        rows = {s: (_rows(plan.q_xfer, self.rank, s, dev), _rows(plan.kv_xfer, self.rank, s, dev)) for s in servers}
        sends, shm = {}, {}  # frames or segments: kept until the replies are in
        lse_dt = lse_dtype(t.q.dtype)
        for s in self._live(servers):
            qr, kr = rows[s]
            nq = qr.numel()
            self._send(s, Kind.FWD, pid,
                       [("q", t.q, qr, t.q.dtype), ("k", t.k, kr, t.k.dtype), ("v", t.v, kr, t.v.dtype)],
                       [("out", t.q.dtype, (nq, *t.q.shape[1:])), ("lse", lse_dt, (nq, t.q.shape[1]))], sends, shm)
        self.note("forward_sent", pid)
        out = torch.zeros_like(t.q)
        lse = torch.full(t.q.shape[:2], float("-inf"), dtype=lse_dt, device=dev)
        run_local_forward(plan, self.rank, t, out, lse, self.backend)  # overlaps with the servers' work

        def mine(s: int) -> dict[str, torch.Tensor]:
            qr, kr = rows[s]
            return {"q": t.q[qr], "k": t.k[kr], "v": t.v[kr]}

        return PendingForward(self, pid, servers, rows, sends, shm, (out, lse), plan, mine)

    def forward(self, plan: Plan, t: RankTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``out`` and ``lse`` (its local row layout)."""
        return self.start_forward(plan, t).wait()

    def start_backward(self, plan: Plan, t: RankTensors, out: torch.Tensor, lse: torch.Tensor,
                       dout: torch.Tensor) -> PendingBackward:
        """Send q, out, dout, lse, k, v rows and run local tasks; collect ``(dq, dk, dv)`` with ``.wait()``."""
        pid = self.register(plan)
        servers = self._servers(plan)
        dev = t.q.device
        rows = {s: (_rows(plan.q_xfer, self.rank, s, dev), _rows(plan.kv_xfer, self.rank, s, dev)) for s in servers}
        sends, shm = {}, {}
        lse_dt = lse_dtype(t.q.dtype)
        for s in self._live(servers):
            qr, kr = rows[s]
            nq, nk = qr.numel(), kr.numel()
            self._send(s, Kind.BWD, pid,
                       [("q", t.q, qr, t.q.dtype), ("out", out, qr, t.q.dtype), ("dout", dout, qr, t.q.dtype),
                        ("lse", lse, qr, lse_dt), ("k", t.k, kr, t.k.dtype), ("v", t.v, kr, t.v.dtype)],
                       [("dq", t.q.dtype, (nq, *t.q.shape[1:])), ("dk", t.k.dtype, (nk, *t.k.shape[1:])),
                        ("dv", t.v.dtype, (nk, *t.v.shape[1:]))], sends, shm)
        self.note("backward_sent", pid)
        dq, dk, dv = torch.zeros_like(t.q), torch.zeros_like(t.k), torch.zeros_like(t.v)
        # local tasks overlap with the servers' work too
        run_local_backward(plan, self.rank, t, out, lse.to(lse_dtype(t.q.dtype)), dout, dq, dk, dv, self.backend)

        def mine(s: int) -> dict[str, torch.Tensor]:
            qr, kr = rows[s]
            return {"q": t.q[qr], "out": out[qr], "dout": dout[qr], "lse": lse[qr].to(lse_dt), "k": t.k[kr],
                    "v": t.v[kr]}

        return PendingBackward(self, pid, servers, rows, sends, shm, (dq, dk, dv), plan, mine)

    def backward(self, plan: Plan, t: RankTensors, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor):
        """This rank's ``dq, dk, dv``; a key row sent to several servers sums their gradients here."""
        return self.start_backward(plan, t, out, lse, dout).wait()
