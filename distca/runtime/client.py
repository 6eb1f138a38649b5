"""A trainer's side of CAD attention over the network: send its rows of a plan to the attention
servers, receive the results, run the tasks the plan keeps local, all with timeouts.

Trainer tensors may live on any device. The rows a server needs are gathered where they are, then
staged to host memory (one copy per tensor per server: ZeroMQ sends host bytes); replies are copied
back to the trainer tensors' device and dtype, and the tasks the plan keeps local run on that device.

Failure policy (the simpler of the two the design allows): a server that errors, dies or does not
answer within ``TransportConfig.timeout_s`` makes the step fail with an exception naming the server
and the reason — never a hang, never a wrong tensor. Re-planning around a lost server is left to the
caller (the pool restarts dead servers).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import torch
import zmq

from distca.attention.tasks import row_ranges
from distca.errors import DistCAError
from distca.runtime.plan_exec import RankTensors, run_local_backward, run_local_forward
from distca.scheduler import Plan
from distca.server.layout import plan_id, server_layout
from distca.transport.channel import Endpoint, TransportConfig
from distca.transport.wire import Kind


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


class _Pending:
    """Replies still on their way from the servers; ``wait`` records how long the trainer blocked."""

    def __init__(self, client: CADClient, pid: int, servers: list[int], rows: dict, sends: dict,
                 results: tuple[torch.Tensor, ...]):
        self.client, self.pid, self.servers, self.rows, self.sends = client, pid, servers, rows, sends
        self.results = results  # local tasks already written; the servers' rows land here
        self.blocked_s = 0.0

    def _done(self, t0: float, event: str) -> None:
        self.blocked_s = time.perf_counter() - t0
        self.client.blocked_s += self.blocked_s
        self.client.note(event, self.pid)


class PendingForward(_Pending):
    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block until every server's ``out``/``lse`` rows are in; returns this rank's ``(out, lse)``."""
        t0 = time.perf_counter()
        out, lse = self.results
        for s in self.servers:
            _, got = self.client._expect(s, (Kind.FWD_OUT,), self.pid)
            qr = self.rows[s][0]
            out[qr] = _like(got["out"], out)
            lse[qr] = _like(got["lse"], lse)
        self._done(t0, "forward_received")
        return out, lse


class PendingBackward(_Pending):
    def wait(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block until every server's gradient rows are in; returns this rank's ``(dq, dk, dv)``."""
        t0 = time.perf_counter()
        dq, dk, dv = self.results
        for s in self.servers:
            _, got = self.client._expect(s, (Kind.BWD_OUT,), self.pid)
            qr, kr = self.rows[s]
            dq[qr] = _like(got["dq"], dq)
            dk.index_add_(0, kr, _like(got["dk"], dk))
            dv.index_add_(0, kr, _like(got["dv"], dv))
        self._done(t0, "backward_received")
        return dq, dk, dv


class CADClient:
    """One trainer's connections to every attention server."""

    def __init__(self, rank: int, addresses: list[str], cfg: TransportConfig, ctx: zmq.Context | None = None,
                 backend: str = "auto", group: int = 0, on_event: Callable[[str, int], None] | None = None):
        """``rank`` is this trainer's rank *in the plans it runs*; ``group`` tells apart trainer groups that
        run the same plans on one server pool (e.g. the pipeline stage; see ``plan_id``). ``on_event(what,
        plan_id)``, when given, hears when a round's requests are sent (``forward_sent``, ``backward_sent``)
        and when its replies are all in (``forward_received``, ``backward_received``): the order in which
        rounds overlap, for tests and traces."""
        self.rank, self.cfg, self.backend, self.group = rank, cfg, backend, group
        self.on_event = on_event
        self.ctx = ctx or zmq.Context.instance()
        tag = uuid.uuid4().hex[:6]
        self.eps = [Endpoint.client(self.ctx, cfg, a, name=f"trainer{rank}-{tag}-{i}") for i, a in enumerate(addresses)]
        self.registered: set[tuple[int, int]] = set()
        self.blocked_s = 0.0  # total time this trainer waited on servers (exposed communication)
        self.stash: dict[int, list] = {}  # replies that arrived while another request was awaited

    def close(self) -> None:
        """Close the connections to the servers."""
        for ep in self.eps:
            ep.close()

    def note(self, what: str, pid: int) -> None:
        """Report one round event to ``on_event`` (see ``__init__``)."""
        if self.on_event is not None:
            self.on_event(what, pid)

    def _expect(self, s: int, kinds: tuple[Kind, ...], pid: int | None = None):
        """The next reply from server ``s`` of one of ``kinds`` (for plan ``pid``). Replies to other
        requests in flight (ping-pong keeps two) are set aside for their own ``_expect``."""
        stash = self.stash.setdefault(s, [])
        for i, (msg, named) in enumerate(stash):
            if msg.kind in kinds and (pid is None or msg.plan_id == pid):
                del stash[i]
                return msg, named
        while True:
            _, msg, tensors = self.eps[s].recv()
            # Replies are views of receive frames; copy them out only when set aside.
            named = {spec.name: t for spec, t in zip(msg.tensors, tensors, strict=True)}
            if msg.kind == Kind.ERROR and (pid is None or msg.plan_id in (0, pid)):
                raise ServerError(f"attention server {s} ({self.eps[s].address}): {msg.extra.get('error', '?')}")
            if msg.kind in kinds and (pid is None or msg.plan_id == pid):
                return msg, named
            stash.append((msg, {k: v.clone() for k, v in named.items()}))

    def forget_plans(self) -> None:
        """Register plans afresh on next use (servers keep a bounded number of layouts; re-registering a
        layout a server still holds costs one small round trip)."""
        self.registered.clear()

    def ping(self, s: int, timeout_s: float | None = None) -> dict:
        """Health check: the server's name and how many rounds it served."""
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
        todo = [s for s in self._servers(plan) if (pid, s) not in self.registered]
        for s in todo:
            layout = server_layout(plan, s, self.group)
            self.eps[s].send(Kind.PLAN, layout.tensors(), plan_id=pid, extra=layout.extra())
        for s in todo:
            self._expect(s, (Kind.ACK,), pid)
            self.registered.add((pid, s))
        return pid

    def start_forward(self, plan: Plan, t: RankTensors) -> PendingForward:
        """Send this rank's rows to the servers and run its local tasks; collect with ``.wait()``.

        Between the two the trainer is free: ping-pong computes the other nano-batch's linear work here.
        """
        pid = self.register(plan)
        servers = self._servers(plan)
        dev = t.q.device
        rows = {s: (_rows(plan.q_xfer, self.rank, s, dev), _rows(plan.kv_xfer, self.rank, s, dev)) for s in servers}
        sends = {}  # zero-copy frames: keep the gathered (host) rows alive until the replies are in
        for s in servers:
            qr, kr = rows[s]
            sends[s] = [("q", _host(t.q[qr])), ("k", _host(t.k[kr])), ("v", _host(t.v[kr]))]
            self.eps[s].send(Kind.FWD, sends[s], plan_id=pid, extra={"rank": self.rank})
        self.note("forward_sent", pid)
        lse_dtype = torch.float64 if t.q.dtype == torch.float64 else torch.float32
        out = torch.zeros_like(t.q)
        lse = torch.full(t.q.shape[:2], float("-inf"), dtype=lse_dtype, device=dev)
        run_local_forward(plan, self.rank, t, out, lse, self.backend)  # overlaps with the servers' work
        return PendingForward(self, pid, servers, rows, sends, (out, lse))

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
        lse_dtype = torch.float64 if t.q.dtype == torch.float64 else torch.float32
        sends = {}
        for s in servers:
            qr, kr = rows[s]
            sends[s] = [("q", _host(t.q[qr])), ("out", _host(out[qr])), ("dout", _host(dout[qr])),
                        ("lse", _host(lse[qr].to(lse_dtype))), ("k", _host(t.k[kr])), ("v", _host(t.v[kr]))]
            self.eps[s].send(Kind.BWD, sends[s], plan_id=pid, extra={"rank": self.rank})
        self.note("backward_sent", pid)
        dq, dk, dv = torch.zeros_like(t.q), torch.zeros_like(t.k), torch.zeros_like(t.v)
        run_local_backward(plan, self.rank, t, out, lse.to(lse_dtype), dout, dq, dk, dv, self.backend)  # overlaps too
        return PendingBackward(self, pid, servers, rows, sends, (dq, dk, dv))

    def backward(self, plan: Plan, t: RankTensors, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor):
        """This rank's ``dq, dk, dv``; a key row sent to several servers sums their gradients here."""
        return self.start_backward(plan, t, out, lse, dout).wait()
