"""The attention server loop: receive task rows for a plan round from many trainers, rebatch them
into one fused varlen call, return the results; stateless between rounds except for small plan
layouts. Malformed input gets an ERROR reply naming the problem and the server serves the next
request; a round that does not complete within the timeout is abandoned with an ERROR to the
senders that did arrive (never a hang).

Rows arrive on one of two data planes, chosen per request by the trainer. ZeroMQ: the rows are tensor
frames, read straight into the receive buffers. Shared memory (trainer on this host): the header names a
segment of the trainer's (:mod:`distca.transport.shm`), the regions its rows are in and the regions the
results go to; the server checks all of it against the plan and its bounds, maps the segment (and
removes its name), copies the rows into the receive buffers, and later writes out/lse (dq/dk/dv) into
the reply regions and answers with a header only. The PLAN ACK tells trainers the server's host identity
and its segment bound, so they know whether shared memory is possible. At most ``MAX_SEGMENTS`` segments
stay mapped (least recently used out); trainers name segments they retired in ``shm_drop`` of a later
request (or of a PING when they close).

Receive buffers grow to the largest plan seen and are reused, so memory stays flat over rounds. Each open
round holds a slot of them; at most ``max_open_rounds`` rounds are open, the buffers of all slots together stay
under ``max_buffer_bytes``, and the buffers of a slot past the first two are freed once no round has used them for
the transport timeout (after a round completed, failed or timed out there).

A request writes rows only after every check its header allows passed (plan, rank, not a repeat, tensor names,
dtypes and shapes, the bounds); then only its own rank's rows of a round that rank has not arrived in. A PLAN
whose senders do not write every row exactly once is refused, so no row of an earlier round is ever served.
Peer-controlled text is escaped and cut short in logs and ERROR replies, and log lines are limited per peer
(:mod:`distca.server.peerlog`).

``ServerConfig.device`` picks where the fused call runs. On ``cpu`` (the default) the rows land in the
receive buffers and the kernel reads them there. On a GPU the rows still land in host buffers (both
byte data planes are host memory; pinned, so the copies are fast), the round's rows are copied to grow-only
device buffers, the kernel runs on the device and the results come back to the host once per round
before they are sent or written into the reply regions (host staging). ``busy_s`` is the time from a
round's last arrival to its last reply (device synchronised), ``stage_s`` the part of it spent copying
between host and device.

The pool's collective data plane (GROUP and ROUND messages) is :mod:`distca.server.group_plane`: rows move by
all-to-all in a process group shared with the trainers, served by one thread per group; this loop only hands it
those messages and sends what its threads report.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import zmq

from distca.attention import lse_dtype
from distca.server.compute import FusedCall, fused_backward, fused_forward
from distca.server.group_plane import GroupPlane
from distca.server.layout import ServerLayout
from distca.server.peerlog import MAX_REPLY, PeerLog, peer_text
from distca.transport.channel import Endpoint, TransportConfig, TransportTimeout
from distca.transport.shm import MAX_DROP, SegmentCache, host_identity
from distca.transport.wire import DTYPE_NAMES, Kind, Message, TensorSpec, WireError

log = logging.getLogger(__name__)

FWD_INPUTS = ("q", "k", "v")
BWD_INPUTS = ("q", "k", "v", "out", "dout", "lse")
FWD_REPLIES = ("out", "lse")
BWD_REPLIES = ("dq", "dk", "dv")
KV_ROLES = ("k", "v", "dk", "dv")  # rows counted in k/v rows; the others in q rows
MAX_SEGMENTS = 64  # shared-memory segments a server keeps mapped (trainers x stages x rounds in flight)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """One attention server. The fields a run's config decides (shape, dtype, backend, ``max_plans``,
    ``max_rows``, transport) have no default here; :mod:`distca.parts` builds them from the config."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: str
    backend: str
    max_plans: int  # plan layouts kept (ping/pong × forward/backward of a few steps)
    # The most q rows or k/v rows one round may bring: a PLAN asking for more is refused, so receive buffers
    # (pinned host memory on a GPU server) are never sized by a peer's number beyond this bound.
    max_rows: int
    transport: TransportConfig
    # Rounds open at once (ping and pong, forward and backward, of every stage in flight); a request that would
    # open one more is refused. Each holds a slot of receive buffers until it completes, fails or times out.
    max_open_rounds: int = 16
    # Receive-buffer bytes the server may hold (pinned host memory on a GPU server); a round that would need more
    # is refused after idle slots' buffers were freed. 0: max_open_rounds rounds of max_rows rows.
    max_buffer_bytes: int = 0
    name: str = "server"
    reject_nonfinite: bool = True  # NaN/inf inputs get an ERROR instead of a result
    device: str = "cpu"  # where the fused call runs: "cpu", "cuda" or "cuda:N" (rows staged through host)

    def __post_init__(self) -> None:
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"server device must be cpu or cuda[:N], got {self.device!r}")
        if self.max_rows < 1 or self.max_open_rounds < 1 or self.max_buffer_bytes < 0:
            raise ValueError(f"server bounds must be max_rows >= 1, max_open_rounds >= 1, max_buffer_bytes >= 0, got "
                             f"{self.max_rows}, {self.max_open_rounds}, {self.max_buffer_bytes}")


class _Buffers:
    """Grow-only receive buffers per (slot, tensor role), viewed at the rows a plan needs. Each round in
    flight (ping and pong, forward and backward) owns a slot, so concurrent rounds never share rows.

    ``get`` gives the host buffers the frames land in; ``dev`` (device servers only) the device copies the
    kernel reads, one per role, shared by the slots (a round's compute never overlaps another's)."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.pin = self.device.type == "cuda"
        self.store: dict[tuple[int, str], torch.Tensor] = {}
        self.dev_store: dict[str, torch.Tensor] = {}

    def _spec(self, role: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Row shape and dtype of a tensor role (gradients are shaped like what they differentiate)."""
        role = {"dq": "q", "dk": "k", "dv": "v"}.get(role, role)
        c = self.cfg
        dtype = getattr(torch, c.dtype)
        heads = c.n_kv_heads if role in ("k", "v") else c.n_heads
        shape = (heads,) if role == "lse" else (heads, c.head_dim)
        return shape, lse_dtype(dtype) if role == "lse" else dtype  # lse: as the kernels produce it

    def get(self, role: str, rows: int, slot: int = 0) -> torch.Tensor:
        tail, dt = self._spec(role)
        buf = self.store.get((slot, role))
        if buf is None or buf.shape[0] < rows:
            buf = self.store[(slot, role)] = torch.empty((max(rows, 1), *tail), dtype=dt, pin_memory=self.pin)
        return buf[:rows]

    def dev(self, role: str, rows: int) -> torch.Tensor:
        tail, dt = self._spec(role)
        buf = self.dev_store.get(role)
        if buf is None or buf.shape[0] < rows:
            self.dev_store.pop(role, None)  # free the old one first: device memory is the scarce kind
            buf = self.dev_store[role] = torch.empty((max(rows, 1), *tail), dtype=dt, device=self.device)
        return buf[:rows]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.store.values(), *self.dev_store.values()))

    def host_nbytes(self) -> int:
        """Bytes of the host receive buffers (pinned on a GPU server): what ``max_buffer_bytes`` bounds."""
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def growth(self, rows: dict[str, int], slot: int) -> int:
        """Bytes the host buffers of ``slot`` would grow by to hold ``rows`` (role -> rows)."""
        grow = 0
        for role, n in rows.items():
            tail, dt = self._spec(role)
            have = self.store.get((slot, role))
            if have is None or have.shape[0] < n:
                row = torch.empty((), dtype=dt).element_size() * _numel(tail)
                grow += max(n, 1) * row - (have.numel() * have.element_size() if have is not None else 0)
        return grow

    def free(self, slots: set[int]) -> None:
        """Drop the host buffers of ``slots`` and give the memory back to the system."""
        gone = [key for key in self.store if key[0] in slots]
        for key in gone:
            del self.store[key]
        if gone and self.pin and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # pinned blocks go back to CUDA's host cache first
        if gone:
            _trim_heap()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _trim_heap() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise, so a burst's buffers would stay in RSS)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator decides
        pass


@dataclass
class _Round:
    kind: Kind
    slot: int
    arrived: dict[int, bytes] = field(default_factory=dict)  # rank -> identity
    started: float = 0.0
    shm: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # rank -> its reply regions (shm)


# Slots whose buffers stay allocated however long they are idle; the buffers of any other slot are freed once it
# has been idle for the transport timeout (a burst of rounds leaves no memory behind, steady rounds reuse theirs).
RETAIN_SLOTS = 2


class AttentionServer:
    """Serve core attention on one ROUTER socket until SHUTDOWN.

    No message stops the loop: whatever handling a message raises becomes an ERROR reply to its sender (the
    message is drained, nothing it carried is kept); only a failure of the socket itself (its context terminated)
    ends the loop, and then :attr:`failure` says why."""

    def __init__(self, cfg: ServerConfig, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.ep = Endpoint.server(self.ctx, cfg.transport, cfg.name)
        self.address = self.ep.address
        self.plans: OrderedDict[int, ServerLayout] = OrderedDict()
        self.rounds: dict[tuple[int, Kind], _Round] = {}
        self.bufs = _Buffers(cfg)
        self.device = torch.device(cfg.device)
        self.on_device = self.device.type != "cpu"
        self.dev_layouts: dict[int, FusedCall] = {}  # each plan's fused call where the kernel runs
        self.segments = SegmentCache(cfg.transport.shm_max_bytes, MAX_SEGMENTS)
        self.host = host_identity()
        self.served = 0
        self.refused = 0  # messages answered with an ERROR (or dropped) since the start
        self.busy_s = 0.0  # time spent computing rounds (measured attention load)
        self.stage_s = 0.0  # of which host <-> device copies (device servers)
        self.group_plane = GroupPlane.of(cfg)  # the collective data plane's groups, if trainers ask for any
        self.peer_log = PeerLog(log)
        self.failure: BaseException | None = None  # why the loop ended, if not by SHUTDOWN
        self._admitted: tuple[Message | None, tuple | None] = (None, None)  # the message in receipt, its target
        self.idle: dict[int, float] = {}  # slot -> when its last round left it (slots no round holds)
        self.max_buffer_bytes = cfg.max_buffer_bytes or cfg.max_open_rounds * self._round_bytes(cfg.max_rows)

    def _round_bytes(self, rows: int) -> int:
        """Host buffer bytes of the largest round of ``rows`` q rows and ``rows`` k/v rows (a backward)."""
        return sum(self.bufs.growth({r: rows}, -1) for r in BWD_INPUTS)

    # -- admission: every check a request's header allows, before any of its rows is written ------------------
    def _admit(self, msg: Message) -> tuple[ServerLayout, int, int]:
        """``(layout, rank, slot)`` for a FWD/BWD request that may write its rows, or a :class:`WireError` naming
        why not. Checks the plan, the rank, a repeat, the tensors the header announces (names, dtypes, shapes),
        the open-round and buffer bounds: a request that passes writes only its own rows of a round it has not
        yet arrived in, so a rejected one never touches rows another sender wrote."""
        layout = self.plans.get(msg.plan_id)
        if layout is None:
            raise WireError(f"unknown plan {msg.plan_id}: send PLAN first")
        rank = msg.extra.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank not in layout.senders:
            raise WireError(f"rank {peer_text(repr(rank), 80)} sends nothing to this server in plan {msg.plan_id}")
        rnd = self.rounds.get((msg.plan_id, msg.kind))
        if rnd is not None and rank in rnd.arrived:
            raise WireError(f"rank {rank} sent {msg.kind.name} twice for plan {msg.plan_id}")
        want = FWD_INPUTS if msg.kind == Kind.FWD else BWD_INPUTS
        _, nq, _, nk = layout.senders[rank]
        if msg.extra.get("shm") is None:
            names = [s.name for s in msg.tensors]
            if sorted(names) != sorted(want):
                raise WireError(f"{msg.kind.name} needs tensors {list(want)}, got {peer_text(names, 200)}")
            for spec in msg.tensors:
                tail, dtype = self.bufs._spec(spec.name)
                shape = (nk if spec.name in KV_ROLES else nq, *tail)
                if spec.dtype != dtype or spec.shape != shape:
                    raise WireError(f"tensor {spec.name} of rank {rank}: got {spec.dtype} {list(spec.shape)}, the "
                                    f"receive buffer expects {dtype} {list(shape)} (plan {msg.plan_id})"[:400])
        if rnd is not None:
            return layout, rank, rnd.slot
        if len(self.rounds) >= self.cfg.max_open_rounds:
            raise WireError(f"{len(self.rounds)} rounds are open on this server, its bound is "
                            f"{self.cfg.max_open_rounds}: finish or abandon one first")
        used = {r.slot for r in self.rounds.values()}
        slot = next(i for i in range(len(used) + 1) if i not in used)
        rows = {r: layout.kv_rows if r in KV_ROLES else layout.q_rows for r in want}
        if self.bufs.host_nbytes() + self.bufs.growth(rows, slot) > self.max_buffer_bytes:
            self._free_idle({key[0] for key in self.bufs.store} - used - {slot})  # idle slots first
            if self.bufs.host_nbytes() + self.bufs.growth(rows, slot) > self.max_buffer_bytes:
                raise WireError(f"plan {msg.plan_id}'s {msg.kind.name} round needs more receive buffers than this "
                                f"server's bound of {self.max_buffer_bytes} bytes allows with {len(self.rounds)} "
                                "rounds open")
        return layout, rank, slot

    def _target(self, layout: ServerLayout, rank: int, slot: int, role: str) -> torch.Tensor:
        """Where ``rank``'s rows of ``role`` go in ``slot``'s receive buffers."""
        qd, nq, kd, nk = layout.senders[rank]
        if role in KV_ROLES:
            return self.bufs.get(role, layout.kv_rows, slot)[kd:kd + nk]
        return self.bufs.get(role, layout.q_rows, slot)[qd:qd + nq]

    def _into(self, msg: Message, spec: TensorSpec) -> torch.Tensor | None:
        """Where a tensor frame lands: straight into the plan's receive buffer rows if the request passes
        admission (:meth:`_admit`); otherwise nowhere that matters (a fresh frame, then an ERROR)."""
        if msg.kind not in (Kind.FWD, Kind.BWD):
            return None
        if self._admitted[0] is not msg:
            try:
                self._admitted = (msg, self._admit(msg))
            except Exception:  # the request's own checks in _arrive say why
                self._admitted = (msg, None)
        target = self._admitted[1]
        return None if target is None else self._target(*target, spec.name)

    # -- loop --------------------------------------------------------------------------------
    def serve_forever(self, poll_s: float = 0.5) -> None:
        """Handle messages until SHUTDOWN; time out incomplete rounds. A message never ends the loop; a failure of
        the socket does (recorded in :attr:`failure`, then raised)."""
        try:
            while self._turn(poll_s):
                pass
        except BaseException as exc:
            self.failure = exc
            log.critical("%s: the serving loop stopped: %s: %s", self.cfg.name, type(exc).__name__, exc)
            raise
        finally:
            self.group_plane.close()
            self.segments.close()
            self.ep.close()

    def _turn(self, poll_s: float) -> bool:
        """Serve one message (or time out rounds when none comes); False after SHUTDOWN."""
        self.group_plane.flush(self.ep)
        self._admitted = (None, None)
        try:
            ident, msg, tensors = self.ep.recv(into=self._into, timeout_s=poll_s)
        except TransportTimeout:
            self._expire_rounds()
            return True
        except Exception as exc:  # malformed, or a decoder fault: this message only
            _raise_if_socket_gone(exc)
            self.ep.drain()  # a WireError was drained already; anything else left the rest of the message
            self._refuse(self.ep.last_identity, None, exc)
            self._expire_rounds()
            return True
        finally:
            self._admitted = (None, None)
        if msg.kind == Kind.SHUTDOWN:
            self.ep.send(Kind.ACK, to=ident, request_id=msg.request_id)
            return False
        try:
            self._handle(ident, msg, tensors)
        except Exception as exc:  # a bad request or a failed computation must not take the server down
            _raise_if_socket_gone(exc)
            self._refuse(ident, msg, exc)
        self._expire_rounds()
        return True

    def _refuse(self, ident: bytes | None, msg: Message | None, exc: Exception) -> None:
        """Answer a message that could not be served with an ERROR naming why (escaped and cut short), and log it
        within the peer's log budget."""
        self.refused += 1
        what = str(exc) if isinstance(exc, WireError) else f"{type(exc).__name__}: {exc}"
        text = peer_text(what, MAX_REPLY)
        level = logging.WARNING if isinstance(exc, WireError) else logging.ERROR
        self.peer_log.line(level, ident, f"{self.cfg.name}: refused a message: {peer_text(what)}",
                           exc_info=None if isinstance(exc, WireError) else exc)
        if ident is None:
            return
        try:
            self.ep.send(Kind.ERROR, to=ident, request_id=msg.request_id if msg else 0,
                         plan_id=msg.plan_id if msg else 0, extra={"error": text})
        except Exception as send_exc:  # a reply that cannot go is the peer's loss only
            _raise_if_socket_gone(send_exc)

    def _handle(self, ident: bytes, msg: Message, tensors: list[torch.Tensor]) -> None:
        drop = _drop_list(msg.extra)
        if msg.kind == Kind.PING:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            group = self.group_plane.stats()  # rounds served over the collective data plane count too
            self.segments.drop(drop)
            self.ep.send(Kind.PONG, to=ident, request_id=msg.request_id,
                         extra={"name": self.cfg.name, "served": self.served + group["served"],
                                "busy_s": self.busy_s + group["busy_s"],
                                "stage_s": self.stage_s, "device": str(self.device), "peak_rss_kb": peak_kb,
                                "buffer_bytes": self.bufs.nbytes(), "plans": len(self.plans),
                                "rounds_open": len(self.rounds), "refused": self.refused,
                                "shm_segments": len(self.segments.open), "shm_bytes": self.segments.nbytes()})
        elif msg.kind == Kind.PLAN:
            named = {s.name: t for s, t in zip(msg.tensors, tensors, strict=True)}
            if len(named) != len(tensors):
                raise WireError(f"PLAN {msg.plan_id}: a tensor name appears twice")
            layout = ServerLayout.from_message(msg.plan_id, named, msg.extra, self.cfg.max_rows)
            known = self.plans.get(msg.plan_id)
            if known is None:
                self.plans[msg.plan_id] = layout
                while len(self.plans) > self.cfg.max_plans:
                    old, _ = self.plans.popitem(last=False)
                    self.dev_layouts.pop(old, None)
            elif not _same_layout(known, layout):  # never serve a round by another layout than its senders'
                raise WireError(f"PLAN {msg.plan_id} is registered here with a different layout")
            else:
                self.plans.move_to_end(msg.plan_id)  # in use again: the last to be dropped
            self.ep.send(Kind.ACK, to=ident, request_id=msg.request_id, plan_id=msg.plan_id,
                         extra={"host": self.host, "shm_max": self.cfg.transport.shm_max_bytes})
        elif msg.kind in (Kind.FWD, Kind.BWD):
            self._arrive(ident, msg, tensors)
            self.segments.drop(drop)  # after the request was taken: a rejected message changes nothing
        elif msg.kind in (Kind.GROUP, Kind.ROUND):
            self.group_plane.handle(self.ep, ident, msg, self.plans)
        else:
            raise WireError(f"a server does not accept {msg.kind.name} messages")

    def _arrive(self, ident: bytes, msg: Message, tensors: list[torch.Tensor]) -> None:
        layout, rank, slot = self._admit(msg)  # raises before anything changes
        _, nq, _, nk = layout.senders[rank]
        shm = msg.extra.get("shm")
        if shm is None:  # ZeroMQ frames: already in the receive buffers (see _into)
            received = {s.name: t for s, t in zip(msg.tensors, tensors, strict=True)}
            for role, t in received.items():
                if t.data_ptr() != self._target(layout, rank, slot, role).data_ptr():  # (_into admitted it too)
                    raise WireError(f"tensor {role} of rank {rank} did not land in its receive rows")
            replies = None
        else:
            rows_in, replies = self._shm_request(msg, rank, nq, nk, shm)
            received = {role: self._target(layout, rank, slot, role).copy_(src) for role, src in rows_in.items()}
        # Device servers check on the device, after the copy (fast there, slow on one host thread).
        if self.cfg.reject_nonfinite and not self.on_device:
            for role, t in received.items():
                if role != "lse" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise WireError(f"tensor {role} of rank {rank} holds NaN or inf")
        # Accepted: the round opens (or grows) only now. Rows a rejected request wrote were its own rank's, in a
        # round that rank has not arrived in; that rank's accepted request overwrites every one of them.
        key = (msg.plan_id, msg.kind)
        rnd = self.rounds.get(key)
        if rnd is None:
            rnd = self.rounds[key] = _Round(msg.kind, slot, started=time.monotonic())
            self.idle.pop(slot, None)
        rnd.arrived[rank] = ident
        if replies is not None:
            rnd.shm[rank] = replies
        if len(rnd.arrived) == len(layout.senders):
            del self.rounds[key]
            t0 = time.perf_counter()
            try:
                self._compute(layout, msg.kind, rnd, msg.request_id)
                if self.on_device:
                    torch.cuda.synchronize(self.device)
                self.busy_s += time.perf_counter() - t0
            except Exception as exc:  # every sender of the round learns why, and the server stays up
                _raise_if_socket_gone(exc)
                self.peer_log.line(logging.ERROR, None, f"{self.cfg.name}: {msg.kind.name} round of plan "
                                   f"{msg.plan_id} failed", exc_info=exc)
                for sender in rnd.arrived.values():
                    self.ep.send(Kind.ERROR, to=sender, request_id=msg.request_id, plan_id=msg.plan_id,
                                 extra={"error": peer_text(f"{self.cfg.name}: {type(exc).__name__}: {exc}", MAX_REPLY)})
            finally:
                self._release(rnd.slot)

    def _release(self, slot: int) -> None:
        """A round left its slot: its buffers wait for the next round (freed if none comes, see _expire_rounds)."""
        self.idle[slot] = time.monotonic()

    def _free_idle(self, slots: set[int]) -> None:
        self.bufs.free(slots)
        for slot in slots:
            self.idle.pop(slot, None)

    def _shm_request(self, msg: Message, rank: int, nq: int, nk: int,
                     shm: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A shared-memory request's input rows and reply regions, as views of the trainer's segment, after
        checking every name, dtype, shape and region against the plan's layout and the segment's bounds.

        Header: ``extra["shm"] = {"seg": name, "in": [[role, dtype, shape, offset], ...],
        "out": [[role, offset], ...]}``; shapes and dtypes of the replies are the server's own."""
        if msg.tensors:
            raise WireError(f"a shared-memory {msg.kind.name} carries no tensor frames, got {len(msg.tensors)}")
        if not (isinstance(shm, dict) and isinstance(shm.get("in"), list) and isinstance(shm.get("out"), list)):
            raise WireError("shm header must be a map with 'seg', 'in' and 'out'")
        fwd = msg.kind == Kind.FWD
        want_in, want_out = (FWD_INPUTS, FWD_REPLIES) if fwd else (BWD_INPUTS, BWD_REPLIES)
        entries = [("in", e, want_in, 4) for e in shm["in"]] + [("out", e, want_out, 2) for e in shm["out"]]
        for part, entry, roles, n in entries:  # the whole header is checked before a segment is opened
            if not (isinstance(entry, list) and len(entry) == n and entry[0] in roles):
                raise WireError(f"shm {part} entry {str(entry)[:80]}: expected [role of {list(roles)}"
                                + (", dtype, shape, offset]" if n == 4 else ", offset]"))
        if sorted(e[0] for e in shm["in"]) != sorted(want_in) or sorted(e[0] for e in shm["out"]) != sorted(want_out):
            raise WireError(f"shm {msg.kind.name} needs inputs {list(want_in)} and reply regions {list(want_out)}")
        expect = {}
        for role in (*want_in, *want_out):
            tail, dtype = self.bufs._spec(role)
            expect[role] = ((nk if role in KV_ROLES else nq, *tail), dtype)
        for role, dtype, shape, _ in shm["in"]:
            want_shape, want_dtype = expect[role]
            if dtype != DTYPE_NAMES[want_dtype] or shape != list(want_shape):
                raise WireError(f"tensor {role} of rank {rank}: got {dtype} {shape}, plan {msg.plan_id} expects "
                                f"{DTYPE_NAMES[want_dtype]} {list(want_shape)}"[:300])
        seg = self.segments.get(shm.get("seg"))
        rows = {role: seg.view(off, expect[role][1], expect[role][0]) for role, _, _, off in shm["in"]}
        replies = {role: seg.view(off, expect[role][1], expect[role][0]) for role, off in shm["out"]}
        return rows, replies

    def _call(self, layout: ServerLayout) -> FusedCall:
        """The plan's fused call where the kernel runs (its index tensors copied to the device once per plan)."""
        got = self.dev_layouts.get(layout.plan_id)
        if got is None:
            got = self.dev_layouts[layout.plan_id] = FusedCall.of(layout, self.device)
        return got

    def _stage_in(self, layout: ServerLayout, slot: int, roles: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The round's input rows where the kernel runs: the host receive buffers themselves on a CPU
        server, device copies of them on a GPU server (NaN/inf checked there, per sender)."""
        rows = {r: layout.kv_rows if r in ("k", "v") else layout.q_rows for r in roles}
        host = {r: self.bufs.get(r, rows[r], slot) for r in roles}
        if not self.on_device:
            return host
        t0 = time.perf_counter()
        dev = {r: self.bufs.dev(r, rows[r]).copy_(host[r], non_blocking=self.bufs.pin) for r in roles}
        torch.cuda.synchronize(self.device)
        self.stage_s += time.perf_counter() - t0
        if self.cfg.reject_nonfinite:
            for r in roles:
                if r == "lse" or bool(torch.isfinite(dev[r]).all()):
                    continue
                for rank, (qd, nq, kd, nk) in sorted(layout.senders.items()):
                    a, n = (kd, nk) if r in ("k", "v") else (qd, nq)
                    if not bool(torch.isfinite(dev[r][a:a + n]).all()):
                        raise WireError(f"tensor {r} of rank {rank} holds NaN or inf")
                raise WireError(f"tensor {r} holds NaN or inf")
        return dev

    def _to_host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Results as host tensors for the wire (one copy each on a GPU server; fresh memory, so a frame
        still being sent is never overwritten by the next round)."""
        if not self.on_device:
            return list(tensors)
        t0 = time.perf_counter()
        out = [t.to("cpu") for t in tensors]
        self.stage_s += time.perf_counter() - t0
        return out

    def _compute(self, layout: ServerLayout, kind: Kind, rnd: _Round, request_id: int) -> None:
        call = self._call(layout)
        x = self._stage_in(layout, rnd.slot, ("q", "k", "v") if kind == Kind.FWD else ("q", "k", "v", "out", "dout",
                                                                                        "lse"))
        if kind == Kind.FWD:
            out, lse = self._to_host(*fused_forward(call, x["q"], x["k"], x["v"], self.cfg.backend))
            for rank, ident in rnd.arrived.items():
                qd, nq, _, _ = layout.senders[rank]
                self._reply(Kind.FWD_OUT, ident, rnd.shm.get(rank), {"out": out[qd:qd + nq], "lse": lse[qd:qd + nq]},
                            request_id, layout.plan_id)
        else:
            # dk/dv of a key row used by several tasks are summed there, before they return
            dq, dk, dv = self._to_host(*fused_backward(call, x["q"], x["k"], x["v"], x["out"], x["lse"], x["dout"],
                                                       self.cfg.backend))
            for rank, ident in rnd.arrived.items():
                qd, nq, kd, nk = layout.senders[rank]
                self._reply(Kind.BWD_OUT, ident, rnd.shm.get(rank),
                            {"dq": dq[qd:qd + nq], "dk": dk[kd:kd + nk], "dv": dv[kd:kd + nk]}, request_id,
                            layout.plan_id)
        self.served += 1

    def _reply(self, kind: Kind, ident: bytes, regions: dict[str, torch.Tensor] | None,
               results: dict[str, torch.Tensor], request_id: int, pid: int) -> None:
        """One sender's results: as frames, or written into its reply regions with a header-only reply."""
        if regions is None:
            self.ep.send(kind, [(name, t.contiguous()) for name, t in results.items()], to=ident,
                         request_id=request_id, plan_id=pid)
            return
        for name, t in results.items():
            regions[name].copy_(t)
        self.ep.send(kind, to=ident, request_id=request_id, plan_id=pid, extra={"shm": True})

    def _expire_rounds(self) -> None:
        now = time.monotonic()
        timeout = self.cfg.transport.timeout_s
        for key, rnd in list(self.rounds.items()):
            if now - rnd.started > timeout:
                del self.rounds[key]
                self._release(rnd.slot)
                layout = self.plans.get(key[0])
                missing = sorted(set(layout.senders) - set(rnd.arrived)) if layout else []
                for ident in rnd.arrived.values():
                    self.ep.send(Kind.ERROR, to=ident, plan_id=key[0],
                                 extra={"error": f"{self.cfg.name}: {rnd.kind.name} round of plan {key[0]} timed out "
                                                 f"after {timeout:.1f} s waiting for ranks {missing}"})
        used = {r.slot for r in self.rounds.values()}
        for slot in {key[0] for key in self.bufs.store} - used:  # (rows of a refused request may sit in a free slot)
            self.idle.setdefault(slot, now)
        stale = {slot for slot, since in self.idle.items() if slot >= RETAIN_SLOTS and now - since > timeout}
        if stale:
            self._free_idle(stale)


def _same_layout(a: ServerLayout, b: ServerLayout) -> bool:
    return a.extra() == b.extra() and a.senders == b.senders and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(a.tensors(), b.tensors(), strict=True))


def _raise_if_socket_gone(exc: BaseException) -> None:
    """Re-raise what no message can cause: the server's own socket or its context gone."""
    if isinstance(exc, zmq.ZMQError) and exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
        raise exc


def _drop_list(extra: dict) -> list[str]:
    """The segment names a request asks the server to unmap (``shm_drop``), checked."""
    drop = extra.get("shm_drop", [])
    if not (isinstance(drop, list) and len(drop) <= MAX_DROP and all(isinstance(n, str) for n in drop)):
        raise WireError(f"shm_drop must be a list of at most {MAX_DROP} segment names")
    return drop


def run_server(cfg: ServerConfig, address_queue=None) -> None:
    """Process entry point: start a server, publish its address, serve until SHUTDOWN."""
    torch.set_num_threads(1)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.zeros(1, device=device)  # create the CUDA context before the address is published
    server = AttentionServer(cfg)
    if address_queue is not None:
        address_queue.put((cfg.name, server.address))
    server.serve_forever()
