"""The attention server loop: receive task rows for a plan round from many trainers, rebatch them
into one fused varlen call, return the results; stateless between rounds except for small plan
layouts. Malformed input gets an ERROR reply naming the problem and the server serves the next
request; a round that does not complete within the timeout is abandoned with an ERROR to the
senders that did arrive (never a hang).

Receive buffers grow to the largest plan seen and are reused, so memory stays flat over rounds.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import zmq

from distca.attention import backward as attn_backward
from distca.attention import forward as attn_forward
from distca.server.layout import ServerLayout
from distca.transport.channel import Endpoint, TransportConfig, TransportTimeout
from distca.transport.wire import Kind, Message, TensorSpec, WireError

log = logging.getLogger(__name__)

FWD_INPUTS = ("q", "k", "v")
BWD_INPUTS = ("q", "k", "v", "out", "dout", "lse")


@dataclass(frozen=True)
class ServerConfig:
    """One attention server."""

    name: str = "server"
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 32
    dtype: str = "float32"
    backend: str = "auto"
    reject_nonfinite: bool = True  # NaN/inf inputs get an ERROR instead of a result
    max_plans: int = 8  # plan layouts kept (ping/pong × forward/backward of a few steps)
    transport: TransportConfig = field(default_factory=TransportConfig)


class _Buffers:
    """Grow-only receive buffers per (slot, tensor role), viewed at the rows a plan needs. Each round in
    flight (ping and pong, forward and backward) owns a slot, so concurrent rounds never share rows."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.store: dict[tuple[int, str], torch.Tensor] = {}

    def get(self, role: str, rows: int, slot: int = 0) -> torch.Tensor:
        c = self.cfg
        dtype = getattr(torch, c.dtype)
        heads = c.n_kv_heads if role in ("k", "v") else c.n_heads
        shape = (rows, heads) if role == "lse" else (rows, heads, c.head_dim)
        lse_dt = torch.float64 if dtype == torch.float64 else torch.float32  # as the kernels produce it
        dt = lse_dt if role == "lse" else dtype
        buf = self.store.get((slot, role))
        if buf is None or buf.shape[0] < rows:
            buf = self.store[(slot, role)] = torch.empty((max(rows, 1), *shape[1:]), dtype=dt)
        return buf[:rows]


@dataclass
class _Round:
    kind: Kind
    slot: int
    arrived: dict[int, bytes] = field(default_factory=dict)  # rank -> identity
    started: float = 0.0


class AttentionServer:
    """Serve core attention on one ROUTER socket until SHUTDOWN."""

    def __init__(self, cfg: ServerConfig, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.ep = Endpoint.server(self.ctx, cfg.transport, cfg.name)
        self.address = self.ep.address
        self.plans: OrderedDict[int, ServerLayout] = OrderedDict()
        self.rounds: dict[tuple[int, Kind], _Round] = {}
        self.bufs = _Buffers(cfg)
        self.served = 0
        self.busy_s = 0.0  # time spent computing rounds (measured attention load)

    # -- receive targets ---------------------------------------------------------------------
    def _into(self, msg: Message, spec: TensorSpec) -> torch.Tensor | None:
        """Where a tensor frame lands: straight into the plan's receive buffer rows."""
        layout = self.plans.get(msg.plan_id)
        rank = msg.extra.get("rank")
        if msg.kind not in (Kind.FWD, Kind.BWD) or layout is None or rank not in layout.senders:
            return None
        qd, nq, kd, nk = layout.senders[rank]
        slot = self._round(msg.plan_id, msg.kind).slot
        if spec.name in ("q", "out", "dout", "lse"):
            return self.bufs.get(spec.name, layout.q_rows, slot)[qd:qd + nq]
        if spec.name in ("k", "v"):
            return self.bufs.get(spec.name, layout.kv_rows, slot)[kd:kd + nk]
        return None

    def _round(self, pid: int, kind: Kind) -> _Round:
        """The round in flight for (plan, kind), opened with the lowest free buffer slot."""
        rnd = self.rounds.get((pid, kind))
        if rnd is None:
            used = {r.slot for r in self.rounds.values()}
            slot = next(i for i in range(len(used) + 1) if i not in used)
            rnd = self.rounds[(pid, kind)] = _Round(kind, slot, started=time.monotonic())
        return rnd

    # -- loop --------------------------------------------------------------------------------
    def serve_forever(self, poll_s: float = 0.5) -> None:
        """Handle messages until SHUTDOWN; time out incomplete rounds."""
        while True:
            try:
                ident, msg, tensors = self.ep.recv(into=self._into, timeout_s=poll_s)
            except TransportTimeout:
                self._expire_rounds()
                continue
            except WireError as exc:
                log.warning("%s: malformed message: %s", self.cfg.name, exc)
                if self.ep.last_identity is not None:
                    self.ep.send(Kind.ERROR, to=self.ep.last_identity, extra={"error": str(exc)})
                continue
            if msg.kind == Kind.SHUTDOWN:
                self.ep.send(Kind.ACK, to=ident, request_id=msg.request_id)
                break
            try:
                self._handle(ident, msg, tensors)
            except WireError as exc:
                self.ep.send(Kind.ERROR, to=ident, request_id=msg.request_id, plan_id=msg.plan_id,
                             extra={"error": str(exc)})
            except Exception as exc:  # a failed computation must not take the server down
                log.exception("%s: request failed", self.cfg.name)
                self.rounds.pop((msg.plan_id, msg.kind), None)
                self.ep.send(Kind.ERROR, to=ident, request_id=msg.request_id, plan_id=msg.plan_id,
                             extra={"error": f"{type(exc).__name__}: {exc}"})
            self._expire_rounds()
        self.ep.close()

    def _handle(self, ident: bytes, msg: Message, tensors: list[torch.Tensor]) -> None:
        if msg.kind == Kind.PING:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            buffers = sum(t.numel() * t.element_size() for t in self.bufs.store.values())
            self.ep.send(Kind.PONG, to=ident, request_id=msg.request_id,
                         extra={"name": self.cfg.name, "served": self.served, "busy_s": self.busy_s,
                                "peak_rss_kb": peak_kb,
                                "buffer_bytes": buffers, "plans": len(self.plans)})
        elif msg.kind == Kind.PLAN:
            if msg.plan_id not in self.plans:
                named = {s.name: t for s, t in zip(msg.tensors, tensors, strict=True)}
                self.plans[msg.plan_id] = ServerLayout.from_message(msg.plan_id, named, msg.extra)
                while len(self.plans) > self.cfg.max_plans:
                    self.plans.popitem(last=False)
            self.ep.send(Kind.ACK, to=ident, request_id=msg.request_id, plan_id=msg.plan_id)
        elif msg.kind in (Kind.FWD, Kind.BWD):
            self._arrive(ident, msg, tensors)
        else:
            raise WireError(f"a server does not accept {msg.kind.name} messages")

    def _arrive(self, ident: bytes, msg: Message, tensors: list[torch.Tensor]) -> None:
        layout = self.plans.get(msg.plan_id)
        if layout is None:
            raise WireError(f"unknown plan {msg.plan_id}: send PLAN first")
        rank = msg.extra.get("rank")
        if rank not in layout.senders:
            raise WireError(f"rank {rank!r} sends nothing to this server in plan {msg.plan_id}")
        want = FWD_INPUTS if msg.kind == Kind.FWD else BWD_INPUTS
        names = [s.name for s in msg.tensors]
        if sorted(names) != sorted(want):
            raise WireError(f"{msg.kind.name} needs tensors {list(want)}, got {names}")
        _qd, nq, _kd, nk = layout.senders[rank]
        for spec, t in zip(msg.tensors, tensors, strict=True):
            rows = nk if spec.name in ("k", "v") else nq
            if spec.shape[:1] != (rows,):
                raise WireError(f"tensor {spec.name} of rank {rank}: {spec.shape[0] if spec.shape else 0} rows, "
                                f"plan {msg.plan_id} expects {rows}")
            if self.cfg.reject_nonfinite and t.is_floating_point() and spec.name != "lse" and \
                    not bool(torch.isfinite(t).all()):
                raise WireError(f"tensor {spec.name} of rank {rank} holds NaN or inf")
        key = (msg.plan_id, msg.kind)
        rnd = self._round(*key)
        if rank in rnd.arrived:
            raise WireError(f"rank {rank} sent {msg.kind.name} twice for plan {msg.plan_id}")
        rnd.arrived[rank] = ident
        if len(rnd.arrived) == len(layout.senders):
            del self.rounds[key]
            t0 = time.perf_counter()
            try:
                self._compute(layout, msg.kind, rnd, msg.request_id)
                self.busy_s += time.perf_counter() - t0
            except Exception as exc:  # every sender of the round learns why, and the server stays up
                log.exception("%s: %s round of plan %d failed", self.cfg.name, msg.kind.name, msg.plan_id)
                for sender in rnd.arrived.values():
                    self.ep.send(Kind.ERROR, to=sender, request_id=msg.request_id, plan_id=msg.plan_id,
                                 extra={"error": f"{self.cfg.name}: {type(exc).__name__}: {exc}"})

    def _compute(self, layout: ServerLayout, kind: Kind, rnd: _Round, request_id: int) -> None:
        c, slot = self.cfg, rnd.slot
        q = self.bufs.get("q", layout.q_rows, slot)
        kb, vb = self.bufs.get("k", layout.kv_rows, slot), self.bufs.get("v", layout.kv_rows, slot)
        kt, vt = kb[layout.key_rows], vb[layout.key_rows]  # each task's keys contiguous
        args = (layout.cu_q, layout.cu_k, layout.max_q, layout.max_k)
        if kind == Kind.FWD:
            out, lse = attn_forward(q, kt, vt, *args, window=layout.window, backend=c.backend)
            for rank, ident in rnd.arrived.items():
                qd, nq, _, _ = layout.senders[rank]
                self.ep.send(Kind.FWD_OUT, [("out", out[qd:qd + nq].contiguous()),
                                            ("lse", lse[qd:qd + nq].contiguous())],
                             to=ident, request_id=request_id, plan_id=layout.plan_id)
        else:
            out, dout = self.bufs.get("out", layout.q_rows, slot), self.bufs.get("dout", layout.q_rows, slot)
            lse = self.bufs.get("lse", layout.q_rows, slot)
            dq, dkt, dvt = attn_backward(q, kt, vt, out, lse, dout, *args, window=layout.window, backend=c.backend)
            # A key row used by several tasks: its gradients are summed here, before they return.
            dk = torch.zeros_like(kb).index_add_(0, layout.key_rows, dkt)
            dv = torch.zeros_like(vb).index_add_(0, layout.key_rows, dvt)
            for rank, ident in rnd.arrived.items():
                qd, nq, kd, nk = layout.senders[rank]
                self.ep.send(Kind.BWD_OUT, [("dq", dq[qd:qd + nq].contiguous()), ("dk", dk[kd:kd + nk].contiguous()),
                                            ("dv", dv[kd:kd + nk].contiguous())],
                             to=ident, request_id=request_id, plan_id=layout.plan_id)
        self.served += 1

    def _expire_rounds(self) -> None:
        now = time.monotonic()
        timeout = self.cfg.transport.timeout_s
        for key, rnd in list(self.rounds.items()):
            if now - rnd.started > timeout:
                del self.rounds[key]
                layout = self.plans.get(key[0])
                missing = sorted(set(layout.senders) - set(rnd.arrived)) if layout else []
                for ident in rnd.arrived.values():
                    self.ep.send(Kind.ERROR, to=ident, plan_id=key[0],
                                 extra={"error": f"{self.cfg.name}: {rnd.kind.name} round of plan {key[0]} timed out "
                                                 f"after {timeout:.1f} s waiting for ranks {missing}"})


def run_server(cfg: ServerConfig, address_queue=None) -> None:
    """Process entry point: start a server, publish its address, serve until SHUTDOWN."""
    torch.set_num_threads(1)
    server = AttentionServer(cfg)
    if address_queue is not None:
        address_queue.put((cfg.name, server.address))
    server.serve_forever()
