"""A trainer's side of the pool's collective data plane (``cluster.data_plane: collective``).

The trainers of one pipeline stage and every server of the pool form a standalone gloo group (the stage's
data-parallel trainers at group ranks ``0..T-1``, the servers at ``T..T+S-1``), built from the TCPStore that
server 0 hosts and hands out over ZeroMQ; DeepSpeed's world stays the trainers. Rows move by one all-to-all per
round (:class:`~distca.server.exchange.RowExchange`), ZeroMQ carries the control messages the server side
describes (:mod:`distca.server.group_plane`). A round, on every trainer of the stage::

    dp rank 0 only: PLAN (once per plan) and a ROUND notice to every server over ZeroMQ
    all-to-all(q, k, v rows → servers) and, queued right behind it, all-to-all(results → trainers)
    the trainer's local tasks run meanwhile; ``wait()`` takes the results and every server's status block

Both collectives of a round are issued at once, so ping-pong's two rounds in flight reach the servers in the
order their notices did. A failed round raises: a server's failed computation as :class:`ServerError` with the
server's message, a collective that fails or times out (a server gone, a peer late) as :class:`DataPlaneError`
naming the servers that no longer answer PING. The client speaks the interface of
:class:`~distca.runtime.client.CADClient`, ``ping`` and ``eps`` included, so the model's core attention, ping-pong
and the step metrics use it unchanged.

:func:`connect_group_client` builds it; when the store cannot be reached it falls back to the ZeroMQ byte path
(a plain ``CADClient``, whose ``data_plane`` reads ``zmq`` in the step records) and logs why, or raises.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import zmq

from distca.attention import lse_dtype
from distca.errors import DistCAError
from distca.runtime.client import CADClient, ServerError
from distca.runtime.pending import BackwardWait, ForwardWait
from distca.runtime.plan_exec import RankTensors, run_local_backward, run_local_forward
from distca.scheduler import Plan
from distca.server.exchange import BWD_IN, BWD_OUT, FWD_IN, FWD_OUT, GroupRoles, Round, RowExchange, RowFormat
from distca.server.group_plane import group_prefix, row_format_key, store_client
from distca.server.layout import plan_id, server_layout
from distca.transport.channel import Endpoint, TransportConfig, TransportTimeout
from distca.transport.wire import Kind, Message, WireError

log = logging.getLogger(__name__)


class DataPlaneError(DistCAError, RuntimeError):
    """The collective data plane failed: its group did not form, or a round's collective failed or timed out."""


class _Control:
    """ZeroMQ requests to every server of the pool, one at a time per server; ERRORs about rounds (they carry a
    round number) are kept per server for the round that asks for them."""

    def __init__(self, ctx: zmq.Context, cfg: TransportConfig, addresses: list[str], name: str):
        self.cfg = cfg
        self.eps = [Endpoint.client(ctx, cfg, a, name=f"{name}-{i}") for i, a in enumerate(addresses)]
        self.errors: list[list[Message]] = [[] for _ in addresses]
        self.registered: set[tuple[int, int]] = set()

    def close(self) -> None:
        for ep in self.eps:
            ep.close()

    def reply(self, s: int, kinds: tuple[Kind, ...], pid: int = 0, timeout_s: float | None = None) -> Message:
        """Server ``s``'s next reply of ``kinds``; an ERROR about this request (plan ``pid`` or none) raises."""
        while True:
            _, msg, _ = self.eps[s].recv(timeout_s=timeout_s)
            if msg.kind == Kind.ERROR:
                if "round" not in msg.extra and msg.plan_id in (0, pid):
                    raise ServerError(f"attention server {s} ({self.eps[s].address}): {msg.extra.get('error', '?')}")
                self.errors[s].append(msg)
            elif msg.kind in kinds:
                return msg
            else:
                log.debug("server %d: %s dropped (a late reply)", s, msg.kind.name)

    def request(self, s: int, kind: Kind, extra: dict | None = None, timeout_s: float | None = None) -> Message:
        self.eps[s].send(kind, extra=extra)
        return self.reply(s, (Kind.ACK, Kind.PONG), timeout_s=timeout_s)

    def register_all(self, plan: Plan, group: int) -> int:
        """Send every server its layout of ``plan`` (a server without tasks too: all members join every round)."""
        pid = plan_id(plan, group)
        todo = [s for s in range(len(self.eps)) if (pid, s) not in self.registered]
        for s in todo:
            layout = server_layout(plan, s, group)
            self.eps[s].send(Kind.PLAN, layout.tensors(), plan_id=pid, extra=layout.extra())
        for s in todo:
            self.reply(s, (Kind.ACK,), pid)
            self.registered.add((pid, s))
        return pid

    def round_error(self, s: int, rnd: int, timeout_s: float) -> str:
        """The text of server ``s``'s ERROR about its round ``rnd`` (waiting up to ``timeout_s`` for it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, msg in enumerate(self.errors[s]):
                if msg.extra.get("round") == rnd:
                    del self.errors[s][i]
                    return str(msg.extra.get("error", "?"))
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TransportTimeout(f"none within {timeout_s:.1f} s")
                _, msg, _ = self.eps[s].recv(timeout_s=left)
            except (TransportTimeout, WireError) as exc:
                return f"(its error message did not arrive: {exc})"
            if msg.kind == Kind.ERROR:
                self.errors[s].append(msg)

    def pending_errors(self, wait_s: float) -> list[str]:
        """Every ERROR the servers sent so far (waiting up to ``wait_s`` in all for late ones), as text."""
        out = []
        deadline = time.monotonic() + wait_s
        for s, ep in enumerate(self.eps):
            with contextlib.suppress(TransportTimeout, WireError, ServerError):
                while ep.sock.poll(int(max(deadline - time.monotonic(), 0.0) * 1000), zmq.POLLIN):
                    _, msg, _ = ep.recv(timeout_s=0.01)
                    if msg.kind == Kind.ERROR:
                        self.errors[s].append(msg)
            out += [f"server {s}: {m.extra.get('error', '?')}" for m in self.errors[s]]
            self.errors[s].clear()
        return out

    def silent(self, timeout_s: float) -> list[int]:
        """The servers that do not answer a PING within ``timeout_s``."""
        dead = []
        for s in range(len(self.eps)):
            try:
                self.request(s, Kind.PING, timeout_s=timeout_s)
            except (TransportTimeout, WireError, ServerError):
                dead.append(s)
        return dead


class _Pending:
    """A round on its way: ``wait()`` checks every server's status and puts the results into the trainer's
    tensors (no rounds: a plan whose tasks all stay on their trainers)."""

    def __init__(self, client: GroupClient, pid: int, kind: str, slot: int, first: Round | None, back: Round | None,
                 plan: Plan, dst: dict[str, torch.Tensor], event: str):
        self.client, self.pid, self.kind, self.slot, self.first, self.back = client, pid, kind, slot, first, back
        self.plan, self.dst, self.event = plan, dst, event
        self.done = False
        self.error: BaseException | None = None

    def _finish(self) -> None:
        if self.error is not None:
            raise self.error
        if self.done:
            return
        try:
            self._collect()
        except BaseException as exc:
            self.error = exc
            raise
        self.done = True

    def _collect(self) -> None:
        c = self.client
        if self.back is None:  # a plan without server tasks: no round was run
            c.note(self.event, self.pid)
            return
        t0 = time.perf_counter()
        try:
            try:
                status = c.x.trainer_status(self.back)
                self.first.wait()
            except RuntimeError as exc:  # gloo: a peer gone, or the group's timeout
                raise c.round_failed(self.kind, self.pid, exc, time.perf_counter() - t0) from exc
            failed = {s: rnd for s, (code, rnd) in status.items() if code}
            if failed:
                errors = [f"attention server {s} ({c.eps[s].address}) failed its {self.kind} round {rnd} of plan "
                          f"{self.pid} (stage {c.group}): {c.control.round_error(s, rnd, c.cfg.timeout_s)}"
                          for s, rnd in sorted(failed.items())]
                raise ServerError("; ".join(errors))
            roles = FWD_OUT if self.kind == "fwd" else BWD_OUT
            c.x.trainer_results(self.back, roles, self.plan, self.dst)
        finally:
            c.x.release(self.slot)
            c.blocked_s += time.perf_counter() - t0
        c.note(self.event, self.pid)


class PendingForward(ForwardWait, _Pending):
    """A forward round on its way back: ``wait() -> (out, lse)``."""


class PendingBackward(BackwardWait, _Pending):
    """A backward round on its way back: ``wait() -> (dq, dk, dv)``."""


class GroupClient:
    """One trainer of a stage's data-plane group with the pool's servers (build it with
    :func:`connect_group_client`)."""

    data_plane = "collective"

    def __init__(self, control: _Control, exchange: RowExchange, cfg: TransportConfig, session: str, group: int,
                 backend: str = "auto", on_event: Callable[[str, int], None] | None = None):
        self.control, self.x, self.cfg, self.session, self.group = control, exchange, cfg, session, group
        self.rank = exchange.roles.trainer
        self.backend, self.on_event = backend, on_event
        self.blocked_s = 0.0  # waiting for the servers' results (exposed communication)

    @property
    def eps(self) -> list[Endpoint]:
        """The control endpoints, one per server (the step meter pings them)."""
        return self.control.eps

    def note(self, what: str, pid: int) -> None:
        if self.on_event is not None:
            self.on_event(what, pid)

    def ping(self, s: int, timeout_s: float | None = None) -> dict:
        """Health check: the server's name, rounds served and busy seconds (both data planes)."""
        return self.control.request(s, Kind.PING, timeout_s=timeout_s).extra

    def forget_plans(self) -> None:
        """Register plans afresh on next use (servers keep a bounded number of layouts)."""
        self.control.registered.clear()

    def close(self) -> None:
        """Tell the servers the group is done (its first trainer does, after its last round) and disconnect."""
        if self.rank == 0:
            for s in range(len(self.eps)):
                with contextlib.suppress(TransportTimeout, WireError, ServerError, zmq.ZMQError):
                    self.control.request(s, Kind.GROUP, {"op": "leave", "session": self.session, "group": self.group},
                                         timeout_s=min(self.cfg.timeout_s, 2.0))
        self.control.close()

    def round_failed(self, kind: str, pid: int, exc: BaseException, waited_s: float) -> DataPlaneError:
        """The error of a round whose collective failed: what gloo said, what the servers said, who is silent."""
        errors = self.control.pending_errors(wait_s=1.0)
        silent = self.control.silent(timeout_s=min(self.cfg.timeout_s, 2.0))
        what = [f"the {kind} round of plan {pid} on the data-plane group of stage {self.group} failed after "
                f"{waited_s:.1f} s: {exc}"]
        if silent:
            what.append(f"attention servers {silent} do not answer PING (gone?)")
        if errors:
            what.append("server errors: " + "; ".join(errors))
        return DataPlaneError("; ".join(what))

    def _announce(self, plan: Plan, kind: str) -> int:
        """The stage's first trainer registers the plan and tells every server which round comes next."""
        pid = plan_id(plan, self.group)
        if self.rank == 0:
            self.control.register_all(plan, self.group)
            for ep in self.eps:
                ep.send(Kind.ROUND, plan_id=pid, extra={"session": self.session, "group": self.group, "pass": kind})
        return pid

    def _start(self, plan: Plan, kind: str,
               tensors: dict[str, torch.Tensor]) -> tuple[int, int, Round | None, Round | None]:
        if tensors["q"].device.type != "cpu":
            raise ValueError("the collective data plane moves host tensors over gloo; trainer tensors on "
                             f"{tensors['q'].device} are not supported yet (use the inplace or zmq data plane)")
        if not (plan.task_server >= 0).any():  # every task stays on its trainer: every member of the group skips
            return plan_id(plan, self.group), -1, None, None
        pid = self._announce(plan, kind)
        roles_in, roles_out = (FWD_IN, FWD_OUT) if kind == "fwd" else (BWD_IN, BWD_OUT)
        slot = self.x.acquire()
        try:
            first = self.x.to_servers(slot, roles_in, plan=plan, tensors=tensors)
            back = self.x.to_trainers(slot, roles_out, plan=plan)
        except RuntimeError as exc:
            self.x.release(slot)
            raise self.round_failed(kind, pid, exc, 0.0) from exc
        except BaseException:
            self.x.release(slot)
            raise
        self.note(f"{'forward' if kind == 'fwd' else 'backward'}_sent", pid)
        return pid, slot, first, back

    def start_forward(self, plan: Plan, t: RankTensors) -> PendingForward:
        """Send this rank's rows and run its local tasks; collect ``(out, lse)`` with ``.wait()``."""
        pid, slot, first, back = self._start(plan, "fwd", {"q": t.q, "k": t.k, "v": t.v})
        out = torch.zeros_like(t.q)
        lse = torch.full(t.q.shape[:2], float("-inf"), dtype=lse_dtype(t.q.dtype), device=t.q.device)
        run_local_forward(plan, self.rank, t, out, lse, self.backend)  # overlaps with the servers' work
        return PendingForward(self, pid, "fwd", slot, first, back, plan, {"out": out, "lse": lse}, "forward_received")

    def forward(self, plan: Plan, t: RankTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``out`` and ``lse`` (its local row layout)."""
        return self.start_forward(plan, t).wait()

    def start_backward(self, plan: Plan, t: RankTensors, out: torch.Tensor, lse: torch.Tensor,
                       dout: torch.Tensor) -> PendingBackward:
        """Send q, out, dout, lse, k, v rows and run local tasks; collect ``(dq, dk, dv)`` with ``.wait()``."""
        lse = lse.to(lse_dtype(t.q.dtype))
        pid, slot, first, back = self._start(plan, "bwd", {"q": t.q, "k": t.k, "v": t.v, "out": out, "dout": dout,
                                                           "lse": lse})
        dq, dk, dv = torch.zeros_like(t.q), torch.zeros_like(t.k), torch.zeros_like(t.v)
        run_local_backward(plan, self.rank, t, out, lse, dout, dq, dk, dv, self.backend)
        return PendingBackward(self, pid, "bwd", slot, first, back, plan, {"dq": dq, "dk": dk, "dv": dv},
                               "backward_received")

    def backward(self, plan: Plan, t: RankTensors, out: torch.Tensor, lse: torch.Tensor,
                 dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``dq, dk, dv``; a key row sent to several servers sums their gradients here."""
        return self.start_backward(plan, t, out, lse, dout).wait()


def _connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the group store (a function of its own so a test can make the store unreachable)."""
    return store_client(host, port, timeout_s)


def connect_group_client(rank: int, addresses: list[str], cfg: TransportConfig, fmt: RowFormat, *, n_trainers: int,
                         group: int, session: str, backend: str = "auto", agree: Callable[[bool], bool] | None = None,
                         fallback: bool = True, on_event: Callable[[str, int], None] | None = None,
                         ctx: zmq.Context | None = None) -> GroupClient | CADClient:
    """Join stage ``group``'s data-plane group as its trainer ``rank`` of ``n_trainers``, with every server at
    ``addresses``; every trainer of the stage calls this at the same time, with the same ``session`` (one per
    training run). The group's collectives time out after ``cfg.timeout_s``.

    ``agree(ok)`` (e.g. an all-reduce over the trainers) makes every trainer of the run decide alike: if any
    cannot reach the group store, all of them fall back to the ZeroMQ byte path (``fallback``; a warning says so)
    or raise :class:`DataPlaneError`. Without it each trainer decides for itself. Once the store is reached, a
    group that does not form (a server that does not answer or never joins) raises."""
    ctx = ctx or zmq.Context.instance()
    control = _Control(ctx, cfg, addresses, f"trainer{rank}-g{group}-{session}")
    n_servers, timeout = len(addresses), cfg.timeout_s
    store, why = None, ""
    try:
        reply = control.request(0, Kind.GROUP, {"op": "store"})
        host, port = str(reply.extra["host"]), int(reply.extra["port"])
        if host in ("", "0.0.0.0", "*", "::"):  # a wildcard bind: reach it where server 0 is reached
            host = addresses[0].split("://", 1)[-1].rsplit(":", 1)[0]
        store = _connect_store(host, port, timeout)
    except (TransportTimeout, WireError, ServerError, KeyError, ValueError, RuntimeError) as exc:
        why = f"{type(exc).__name__}: {exc}"
    ok = store is not None
    everyone = agree(ok) if agree is not None else ok
    if not everyone:
        control.close()
        why = why or "another trainer of the run could not reach it"
        if not fallback:
            raise DataPlaneError(f"trainer {rank} of stage {group}: the collective data plane's group store (hosted "
                                 f"by attention server 0) is out of reach: {why}")
        log.warning("trainer %d of stage %d: the collective data plane's group store is out of reach (%s); rows go "
                    "as ZeroMQ frames instead (data_plane: zmq)", rank, group, why)
        return CADClient(rank, addresses, cfg, ctx=ctx, backend=backend, group=group, on_event=on_event)
    join = {"op": "join", "session": session, "group": group, "rank": rank, "n_trainers": n_trainers,
            "n_servers": n_servers, "store": [host, port], "timeout_s": timeout, "format": row_format_key(fmt)}
    try:
        for s, ep in enumerate(control.eps):
            ep.send(Kind.GROUP, extra={**join, "server": s})
        for s in range(n_servers):
            control.reply(s, (Kind.ACK,))
    except (TransportTimeout, ServerError, WireError) as exc:
        control.close()
        raise DataPlaneError(f"trainer {rank} of stage {group}: an attention server refused or did not answer the "
                             f"data-plane group's JOIN: {exc}") from exc
    t0 = time.monotonic()
    try:
        pg = dist.ProcessGroupGloo(dist.PrefixStore(group_prefix(session, group), store), rank,
                                   n_trainers + n_servers, timedelta(seconds=timeout))
    except RuntimeError as exc:
        silent = control.silent(timeout_s=min(timeout, 2.0))
        control.close()
        gone = f"; servers {silent} do not answer PING" if silent else ""
        raise DataPlaneError(f"trainer {rank} of stage {group}: the data-plane group ({n_trainers} trainers + "
                             f"{n_servers} servers) did not form in {time.monotonic() - t0:.1f} s (timeout "
                             f"{timeout:.0f} s): {exc}{gone}") from exc
    exchange = RowExchange(pg, GroupRoles.pool(n_trainers, n_servers, rank), fmt, "cpu", status=True)
    return GroupClient(control, exchange, cfg, session, group, backend=backend, on_event=on_event)
