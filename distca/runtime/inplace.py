"""In-place attention servers: every trainer is also one of its plans' attention servers, in its own process.

The paper's fast path (DistCA §4): no server pool, no sockets. A trainer's rows for other servers move
with one all-to-all per round over the trainers' process group (:class:`~distca.server.exchange.RowExchange`:
NCCL on GPUs, gloo on the CPU cluster); rows for its own server are gathered straight into that server's
buffers; the tasks the plan keeps on the trainer need no copy at all. Every trainer computes the same plan
(DESIGN §3), so no plan is ever sent: each derives its own server's layout from the plan it holds.

A forward round, on every trainer at once::

    all-to-all(q, k, v rows → their servers)  | the trainer's local tasks run meanwhile
    wait; its server's fused call over the rows it received
    all-to-all(out, lse rows → their trainers) — returned as a pending round; ``wait()`` takes the rows

The backward resends q, out, dout, lse, k, v (servers keep nothing between passes) and returns dq, dk, dv,
with dk/dv summed per key row as on any server. The client speaks the same interface as the pool's
:class:`~distca.runtime.client.CADClient` (``start_forward``/``forward``/``start_backward``/``backward``),
so the model's core attention and ping-pong use either.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from distca.attention import lse_dtype
from distca.runtime.pending import BackwardWait, ForwardWait
from distca.runtime.plan_exec import RankTensors, run_local_backward, run_local_forward
from distca.scheduler import Plan
from distca.server.compute import FusedCall, fused_backward, fused_forward
from distca.server.exchange import BWD_IN, BWD_OUT, FWD_IN, FWD_OUT, PlanCache, Round, RowExchange
from distca.server.layout import ServerLayout


class _Pending:
    """A round whose results are on their way back; ``wait()`` puts them into the trainer's tensors."""

    def __init__(self, client: InPlaceClient, slot: int, first: Round, back: Round, roles: tuple[str, ...], plan: Plan,
                 dst: dict[str, torch.Tensor], layout: ServerLayout, results: dict[str, torch.Tensor], event: str):
        self.client, self.slot, self.first, self.back, self.roles = client, slot, first, back, roles
        self.plan, self.dst, self.layout, self.results, self.event = plan, dst, layout, results, event
        self.done = False

    def _finish(self) -> None:
        if self.done:
            return
        c = self.client
        t0 = time.perf_counter()
        try:
            c.x.trainer_results(self.back, self.roles, self.plan, self.dst, self.layout, self.results)
        finally:
            c.x.release(self.slot)
            self.done = True
        c.attn_s += time.perf_counter() - t0
        c.blocked_s += self.first.blocked_s + self.back.blocked_s
        c.note(self.event, self.layout.plan_id)


class PendingForward(ForwardWait, _Pending):
    """A forward round on its way back: ``wait() -> (out, lse)``."""


class PendingBackward(BackwardWait, _Pending):
    """A backward round on its way back: ``wait() -> (dq, dk, dv)``."""


class InPlaceClient:
    """One trainer rank that also serves its share of every plan over ``exchange``'s process group."""

    data_plane = "inplace"

    def __init__(self, exchange: RowExchange, backend: str = "auto",
                 on_event: Callable[[str, int], None] | None = None):
        """``on_event(what, plan_id)`` hears ``forward_sent``/``backward_sent`` when a round's rows are on their
        way and ``forward_received``/``backward_received`` when its results are in (as ``CADClient``'s)."""
        if exchange.roles.trainer is None or exchange.roles.server is None:
            raise ValueError("an in-place client must be both a trainer and a server of its group")
        self.x, self.backend, self.on_event = exchange, backend, on_event
        self.rank = exchange.roles.trainer
        self.blocked_s = 0.0  # waiting for other ranks' rows (exposed communication)
        self.busy_s = 0.0  # this rank's server computing its fused calls
        self.attn_s = 0.0  # all the time spent in core attention: local tasks, server work, waits, copies
        self.served = 0
        self._calls = PlanCache(64)

    def note(self, what: str, pid: int) -> None:
        if self.on_event is not None:
            self.on_event(what, pid)

    def forget_plans(self) -> None:
        """Nothing to forget: plans are never registered anywhere (the interface of ``CADClient``)."""

    def close(self) -> None:
        """Nothing to close: the process group belongs to the caller."""

    def server_stats(self) -> list[dict]:
        """This rank's own server: seconds computing, rounds served, bytes held in buffers, bytes sent to each
        group rank (as trainer, server and relay gateway together), key rows it relayed as a gateway."""
        return [{"busy_s": self.busy_s, "served": self.served, "buffer_bytes": self.x.nbytes(),
                 "sent_bytes": list(self.x.sent_bytes), "relayed_rows": self.x.relayed_rows}]

    def _call(self, plan: Plan, layout: ServerLayout) -> FusedCall:
        return self._calls.get(plan, lambda: FusedCall.of(layout, self.x.device))

    def _serve(self, rnd: Round, roles: tuple[str, ...], plan: Plan, layout: ServerLayout,
               tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bufs = self.x.server_inputs(rnd, roles, layout, plan, tensors)
        call = self._call(plan, layout)
        t0 = time.perf_counter()
        if roles == FWD_IN:
            out, lse = fused_forward(call, bufs["q"], bufs["k"], bufs["v"], self.backend)
            res = {"out": out, "lse": lse}
        else:
            dq, dk, dv = fused_backward(call, bufs["q"], bufs["k"], bufs["v"], bufs["out"], bufs["lse"],
                                        bufs["dout"], self.backend)
            res = {"dq": dq, "dk": dk, "dv": dv}
        self.busy_s += time.perf_counter() - t0
        self.served += 1
        return res

    def _start(self, pending: type[_Pending], plan: Plan, tensors: dict[str, torch.Tensor], roles_in: tuple[str, ...],
               roles_out: tuple[str, ...], local: Callable[[], dict[str, torch.Tensor]], sent: str,
               received: str) -> _Pending:
        """One round: send this rank's rows, run its local tasks (``local``, which returns the trainer's result
        tensors, overlapping the all-to-all), serve its own server's tasks, start the return."""
        t0 = time.perf_counter()
        layout = self.x.own_layout(plan)
        slot = self.x.acquire()
        try:
            first = self.x.to_servers(slot, roles_in, plan=plan, tensors=tensors, layout=layout)
            self.note(sent, layout.plan_id)
            dst = local()
            res = self._serve(first, roles_in, plan, layout, tensors)
            back = self.x.to_trainers(slot, roles_out, layout=layout, results=res, plan=plan)
        except BaseException:
            self.x.release(slot)
            raise
        self.attn_s += time.perf_counter() - t0
        return pending(self, slot, first, back, roles_out, plan, dst, layout, res, received)

    def start_forward(self, plan: Plan, t: RankTensors) -> PendingForward:
        """Send this rank's rows, run its local tasks, serve its own server's tasks, start the return; the
        results are taken with ``.wait()``."""

        def local() -> dict[str, torch.Tensor]:
            out = torch.zeros_like(t.q)
            lse = torch.full(t.q.shape[:2], float("-inf"), dtype=lse_dtype(t.q.dtype), device=t.q.device)
            run_local_forward(plan, self.rank, t, out, lse, self.backend)
            return {"out": out, "lse": lse}

        return self._start(PendingForward, plan, {"q": t.q, "k": t.k, "v": t.v}, FWD_IN, FWD_OUT, local,
                           "forward_sent", "forward_received")

    def forward(self, plan: Plan, t: RankTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``out`` and ``lse`` (its local row layout)."""
        return self.start_forward(plan, t).wait()

    def start_backward(self, plan: Plan, t: RankTensors, out: torch.Tensor, lse: torch.Tensor,
                       dout: torch.Tensor) -> PendingBackward:
        """The backward round: resend the inputs, compute local and own-server gradients, start the return."""
        lse = lse.to(lse_dtype(t.q.dtype))

        def local() -> dict[str, torch.Tensor]:
            dq, dk, dv = torch.zeros_like(t.q), torch.zeros_like(t.k), torch.zeros_like(t.v)
            run_local_backward(plan, self.rank, t, out, lse, dout, dq, dk, dv, self.backend)
            return {"dq": dq, "dk": dk, "dv": dv}

        tensors = {"q": t.q, "k": t.k, "v": t.v, "out": out, "dout": dout, "lse": lse}
        return self._start(PendingBackward, plan, tensors, BWD_IN, BWD_OUT, local, "backward_sent",
                           "backward_received")

    def backward(self, plan: Plan, t: RankTensors, out: torch.Tensor, lse: torch.Tensor,
                 dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``dq, dk, dv``."""
        return self.start_backward(plan, t, out, lse, dout).wait()
