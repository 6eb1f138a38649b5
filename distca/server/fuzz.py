"""A seeded fuzzer for a running attention server: malformed, mutated, replayed and flooding messages, and what
the server did with each (the fuzz test and ``benchmarks/fuzz.py`` drive it).

Messages are built with the public API (the fuzzer's own connection's ``Endpoint.frames``: signed, bound to the
connection and counted as an insider's would be; :func:`~distca.transport.wire.encode` where an endpoint has no
``frames``) and then mutated as raw multipart frames, so the fuzzer does not depend on the header's layout. Classes:

=========  ===========================================================================================
garbage    random frames (random bytes, a random number of them)
header     a valid message's header frame mutated: bit flips, msgpack type markers, cut, extended
frames     a valid message's tensor frames mutated: dropped, added, cut, extended, reordered, NaN payloads,
           hundreds of empty frames
fields     insider: valid framing (signed) with type-confused extras (rank, shm, shm_drop, GROUP fields) and
           wrong tensors (names, dtypes, rows, extra or missing ones)
plan       insider: PLAN layouts that lie (huge, negative or uncovered rows, unsorted cu_seqlens, ranks twice)
replay     raw re-sends of frames this fuzzer sent earlier (accepted ones included)
flood      a burst of messages without waiting, or one message from each of many fresh connections
=========  ===========================================================================================

Each message is followed by a PING (through an :class:`~distca.transport.channel.Endpoint`, so it stays valid
whatever the wire adds); what comes back before its PONG is the message's outcome: ``error`` (an ERROR reply),
``accepted`` (a reply that serves it, or none while the server's ``refused`` count did not move: a request
waiting for its round) or ``drop`` (no reply, and the server counted it refused). A late "timed out" ERROR of an
abandoned round is counted apart. The fuzzer never sends a SHUTDOWN: a mutated message that decodes as one here is
replaced (a trusted peer may stop a server by design).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import torch
import zmq

from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.server.layout import ServerLayout, server_layout
from distca.transport.channel import Endpoint, TransportConfig, TransportTimeout
from distca.transport.wire import Kind, WireError, decode_header, encode

CLASSES = ("garbage", "header", "frames", "fields", "plan", "replay", "flood")
OUTCOMES = ("error", "drop", "accepted")
_MARKERS = (0xC0, 0xC2, 0xC3, 0xA0, 0x90, 0x80, 0xCF, 0xCB, 0xDC, 0xDE, 0xFF, 0x00, 0x7F, 0x01)
_JUNK = (None, True, False, -1, 0, 2 ** 31, 2 ** 63 - 1, -2 ** 63, 1.5, float("nan"), float("inf"), "", "x" * 2000,
         "\n\x1b[31mforged\r", [], [0], [[[[]]]], {}, {"a": 1}, b"\x00\xff" * 8, [1] * 500, {"seg": 1, "in": 2})


@dataclass
class FuzzReport:
    """Outcomes by class, messages sent, late round-timeout ERRORs, and whether the server still answered."""

    counts: dict[str, Counter] = field(default_factory=lambda: {c: Counter() for c in CLASSES})
    sent: int = 0
    late_timeouts: int = 0
    alive: bool = True
    wall_s: float = 0.0

    def total(self) -> Counter:
        out: Counter = Counter()
        for c in self.counts.values():
            out.update(c)
        return out


def fuzz_plan(group: int) -> tuple[object, ServerLayout]:
    """The fuzzer's own plan: one document over two trainers, all of it on server 0 (``group`` varies its id)."""
    sched = SchedulerConfig(eps=0.0, granularity=128, window=-1, min_offload_pairs=0)
    plan, _ = make_plan(BatchLayout.from_ranks([[48], [48]], [False, True]), Placement(2, 1, "dedicated"), sched)
    return plan, server_layout(plan, 0, group=group)


class Fuzzer:
    """Builds fuzz cases for a server with attention shape ``(heads, kv_heads, dim)`` in float32."""

    def __init__(self, seed: int, secret: bytes | None, heads: int = 2, kv_heads: int = 1, dim: int = 4,
                 build: Callable[..., list] | None = None):
        self.rng = random.Random(seed)
        self.secret = secret
        self.build = build  # an Endpoint's ``frames`` (bound to its connection, next counter); None: bare encode()
        self.shape = (heads, kv_heads, dim)
        self.plan, self.layout = fuzz_plan(group=seed + 1)
        self.captured: list[list[bytes]] = []  # frames sent before, for replays

    # -- valid messages --------------------------------------------------------------------------------------
    def rows(self, rank: int, kind: Kind = Kind.FWD, value: float | None = None) -> list[tuple[str, torch.Tensor]]:
        h, kh, d = self.shape
        _, nq, _, nk = self.layout.senders[rank]
        make = (lambda *s: torch.full(s, value)) if value is not None else (lambda *s: torch.randn(*s))
        out = [("q", make(nq, h, d)), ("k", make(nk, kh, d)), ("v", make(nk, kh, d))]
        if kind == Kind.BWD:
            out += [("out", make(nq, h, d)), ("dout", make(nq, h, d)), ("lse", torch.zeros(nq, h))]
        return out

    def encode(self, kind: Kind, tensors=None, *, plan_id: int = 0, extra: dict | None = None) -> list[bytes]:
        """A valid message as the fuzzer's connection would send it (what an insider with the key can send)."""
        rid = self.rng.getrandbits(63)
        if self.build is not None:
            frames = self.build(kind, tensors, request_id=rid, plan_id=plan_id, extra=extra)
        else:
            frames = encode(kind, tensors, request_id=rid, plan_id=plan_id, extra=extra, secret=self.secret,
                            checksum=self.rng.random() < 0.3)
        return [bytes(f) for f in frames]

    def plan_message(self) -> list[bytes]:
        lay = self.layout
        return self.encode(Kind.PLAN, lay.tensors(), plan_id=lay.plan_id, extra=lay.extra())

    def seed_message(self) -> list[bytes]:
        """A valid message of a random kind the server serves."""
        r = self.rng
        pid = self.layout.plan_id
        choice = r.randrange(7)
        if choice == 0:
            return self.encode(Kind.PING)
        if choice == 1:
            return self.plan_message()
        if choice in (2, 3):
            kind = Kind.FWD if choice == 2 else Kind.BWD
            rank = r.randrange(2)
            return self.encode(kind, self.rows(rank, kind), plan_id=pid, extra={"rank": rank})
        if choice == 4:
            return self.encode(Kind.GROUP, extra={"op": "leave", "session": "fuzz", "group": r.randrange(4)})
        if choice == 5:
            return self.encode(Kind.ROUND, plan_id=pid, extra={"session": "fuzz", "group": 0, "pass": "fwd"})
        return self.encode(r.choice([Kind.ACK, Kind.ERROR, Kind.FWD_OUT, Kind.PONG]), extra={"error": "x"})

    def junk(self, depth: int = 0) -> object:
        r = self.rng
        if depth < 3 and r.random() < 0.15:
            return [self.junk(depth + 1) for _ in range(r.randrange(4))]
        if depth < 3 and r.random() < 0.1:
            return {str(self.junk(depth + 1))[:20]: self.junk(depth + 1) for _ in range(r.randrange(3))}
        return r.choice(_JUNK)

    # -- cases -----------------------------------------------------------------------------------------------
    def case(self, cls: str) -> list[list[bytes]]:
        """One fuzz case of class ``cls``: the messages to send back to back (one, except floods)."""
        return getattr(self, f"_{cls}")()

    def _garbage(self) -> list[list[bytes]]:
        r = self.rng
        frames = [r.randbytes(r.choice([0, 1, 5, 27, 28, 29, 64, 300])) for _ in range(r.randrange(1, 5))]
        if r.random() < 0.3 and frames[0]:
            frames[0] = b"DCA1" + frames[0][4:]  # the magic, then garbage
        return [frames]

    def _mutate_bytes(self, frame: bytes) -> bytes:
        r = self.rng
        b = bytearray(frame)
        op = r.randrange(5)
        if op == 0 and b:
            for _ in range(r.randrange(1, 9)):
                i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
        elif op == 1 and b:
            for _ in range(r.randrange(1, 4)):
                b[r.randrange(len(b))] = r.choice(_MARKERS)
        elif op == 2:
            del b[r.randrange(len(b) + 1):]
        elif op == 3:
            b += r.randbytes(r.randrange(1, 64))
        elif b:  # a run of one byte value (counts, lengths and flags at their extremes)
            i = r.randrange(len(b))
            b[i:i + r.randrange(1, 9)] = bytes([r.choice((0, 0xFF, 0x7F, 0x80))]) * r.randrange(1, 9)
        return bytes(b)

    def _header(self) -> list[list[bytes]]:
        frames = self.seed_message()
        if self.rng.random() < 0.5:
            typed = self._retype(frames[0])
            if typed is not None:
                return [[typed, *frames[1:]]]
        header = frames[0]
        while header == frames[0]:  # a tamper case always changes bytes (a cut at the end can cut nothing)
            header = self._mutate_bytes(frames[0])
        return [[header, *frames[1:]]]

    def _retype(self, header: bytes) -> bytes | None:
        """The header with one value of its msgpack meta swapped for a value of another type and the same packed
        length (a dtype as a list or map, a CRC as nil, a string or a float, a shape dimension as a bool, a rank as
        a list or map), so every length the header announces still holds. The meta is found by decoding, not by
        offset. With a secret the MAC no longer matches (the server must refuse it before parsing)."""
        r = self.rng
        meta, at = _find_meta(header)
        if meta is None:
            return None
        swaps: list[tuple[bytes, bytes]] = []
        for spec in meta["t"]:
            _, dtype, shape, _, crc = spec
            packed = msgpack.packb(spec, use_bin_type=True)
            dt = msgpack.packb(dtype)
            if len(dt) == 8:  # e.g. "float32": a one-string list or a one-entry map of the same length
                swaps += [(packed, packed.replace(dt, b"\x91\xa6" + dt[1:7], 1)),
                          (packed, packed.replace(dt, b"\x81\xa1a\xa4" + dt[1:5], 1))]
            tail = msgpack.packb(crc)
            for junk in ((b"\xc0", b"\xc3", b"\xa0") if len(tail) == 1 else
                         (b"\xca\x7f\x80\x00\x00", b"\xca\x7f\xc0\x00\x00", b"\xa4abcd")):
                if len(junk) == len(tail):
                    swaps.append((packed, packed[:-len(tail)] + junk))
            dims = msgpack.packb(shape)
            if len(dims) > 1 and dims[1] < 0x80:  # a positive fixint dimension: a bool instead
                swaps.append((packed, packed.replace(dims, dims[:1] + b"\xc3" + dims[2:], 1)))
        for key in ("rank", "op", "pass", "group"):
            k = msgpack.packb(key)
            i = header.find(k, at)
            if i >= 0 and header[i + len(k)] < 0x80:
                for junk in (b"\x90", b"\x80", b"\xc0", b"\xc3"):
                    swaps.append((k + header[i + len(k):i + len(k) + 1], k + junk))
        r.shuffle(swaps)
        for old, new in swaps:
            i = header.find(old, at)
            if i >= 0 and len(old) == len(new) and old != new:
                return header[:i] + new + header[i + len(old):]
        return None

    def _frames(self) -> list[list[bytes]]:
        r = self.rng
        rank = r.randrange(2)
        kind = r.choice([Kind.FWD, Kind.BWD])
        signed = self.encode(kind, self.rows(rank, kind), plan_id=self.layout.plan_id, extra={"rank": rank})
        frames = list(signed)
        while frames == signed:  # a tamper case always changes bytes (a frame swapped with itself does not)
            frames = self._tamper_frames(list(signed))
        return [frames]

    def _tamper_frames(self, frames: list[bytes]) -> list[bytes]:
        r = self.rng
        op = r.randrange(7)
        if op == 0:
            del frames[r.randrange(1, len(frames))]
        elif op == 1:
            frames += [r.randbytes(r.randrange(64)) for _ in range(r.randrange(1, 4))]
        elif op == 2:
            i = r.randrange(1, len(frames))
            frames[i] = self._mutate_bytes(frames[i])
        elif op == 3:
            i, j = r.randrange(1, len(frames)), r.randrange(1, len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == 4:
            i = r.randrange(1, len(frames))
            frames[i] = b"\x00\x00\xc0\x7f" * (len(frames[i]) // 4)  # NaN payload (float32)
        elif op == 5:
            frames += [b""] * r.randrange(100, 1000)
        else:  # a payload with flipped bits (the CRC or the MAC over frames catches it, or nothing does)
            i = r.randrange(1, len(frames))
            b = bytearray(frames[i])
            if b:
                b[r.randrange(len(b))] ^= 0x40
            frames[i] = bytes(b)
        return frames

    def _fields(self) -> list[list[bytes]]:
        r = self.rng
        pid = self.layout.plan_id
        kind = r.choice([Kind.FWD, Kind.BWD, Kind.FWD, Kind.PING, Kind.GROUP, Kind.ROUND, Kind.PLAN])
        extra: dict = {"rank": r.randrange(2)}
        if kind == Kind.GROUP:
            extra = {"op": r.choice(["store", "join", "leave", "x"]), "session": "fuzz", "group": 0, "rank": 0,
                     "n_trainers": 1, "n_servers": 1, "server": 0, "store": ["127.0.0.1", 1], "timeout_s": 0.2,
                     "format": [2, 1, 4, "float32"]}
        elif kind == Kind.ROUND:
            extra = {"session": "fuzz", "group": 0, "pass": "fwd"}
        keys = [k for k in (*extra, "shm", "shm_drop", "rank") if k not in ("store", "timeout_s")]
        for key in r.sample(keys, r.randrange(1, 3)):
            extra[key] = self.junk()
        tensors = self.rows(r.randrange(2), Kind.FWD if kind != Kind.BWD else Kind.BWD)
        op = r.randrange(6)
        if op == 0:
            tensors = tensors[:-1]
        elif op == 1:
            tensors = [(n, t.double()) for n, t in tensors]
        elif op == 2:
            tensors = [(n, t[:-1].contiguous()) for n, t in tensors]
        elif op == 3:
            tensors = [(r.choice(["q", "k", "x", "", "lse", "\n"]), t) for _, t in tensors]
        elif op == 4:
            tensors = tensors + tensors[:1]
        if kind in (Kind.PING, Kind.GROUP, Kind.ROUND):
            tensors = tensors if r.random() < 0.3 else None
        try:
            return [self.encode(kind, tensors, plan_id=r.choice([pid, 0, pid ^ 1]), extra=extra)]
        except (WireError, ValueError, TypeError, OverflowError):  # the encoder refuses some junk itself
            return [self.encode(kind, tensors, plan_id=pid, extra={"rank": str(extra.get("rank"))[:50]})]

    def _plan(self) -> list[list[bytes]]:
        r = self.rng
        lay = self.layout
        tensors = dict(lay.tensors())
        extra = lay.extra()
        op = r.randrange(9)
        if op == 0:
            extra[r.choice(["q_rows", "kv_rows", "max_q", "max_k", "window"])] = r.choice(
                [2 ** 40, -5, 0, 2 ** 62, 3])
        elif op == 1:
            tensors["senders"] = tensors["senders"][:1]  # a rank's rows left uncovered
        elif op == 2:
            s = tensors["senders"].clone()
            s[-1, 1] -= 1  # overlapping blocks
            tensors["senders"] = s
        elif op == 3:
            tensors["senders"] = torch.cat([tensors["senders"], tensors["senders"][:1]])  # a rank twice
        elif op == 4:
            tensors["cu_q"] = tensors["cu_q"].flip(0).contiguous()
        elif op == 5:
            tensors["key_rows"] = tensors["key_rows"] + lay.kv_rows
        elif op == 6:
            tensors["cu_k"] = tensors["cu_k"].long()
        elif op == 7:
            del tensors[r.choice(list(tensors))]
        else:
            s = tensors["senders"].clone()
            s[0, 0] = r.choice([-1, 2 ** 62, 7])
            tensors["senders"] = s
        pid = r.choice([lay.plan_id, r.getrandbits(63)])
        return [self.encode(Kind.PLAN, list(tensors.items()), plan_id=pid, extra=extra)]

    def _replay(self) -> list[list[bytes]]:
        if not self.captured:
            return [self.plan_message()]
        return [list(self.rng.choice(self.captured))]

    def _flood(self) -> list[list[bytes]]:
        r = self.rng
        n = r.randrange(20, 200)
        if r.random() < 0.5:
            return [self._garbage()[0] for _ in range(n)]
        return [self.seed_message() for _ in range(n)]


def _find_meta(header: bytes) -> tuple[dict | None, int]:
    """The header's msgpack meta map (with its tensor list ``t``) and where it starts, found by decoding."""
    for at in range(min(len(header), 256)):
        if header[at] & 0xF0 != 0x80:  # a fixmap starts the meta
            continue
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(header[at:])
        try:
            meta = unpacker.unpack()
        except Exception:  # not here
            continue
        if isinstance(meta, dict) and isinstance(meta.get("t"), list) and all(
                isinstance(t, list) and len(t) == 5 for t in meta["t"]):
            return meta, at
    return None, 0


def _is_shutdown(frames: list[bytes], secret: bytes | None) -> bool:
    """Whether this server's decoder would read ``frames`` as a SHUTDOWN (which the fuzzer never sends)."""
    try:
        return decode_header(frames[0], secret)[0].kind == Kind.SHUTDOWN
    except Exception:  # not decodable: not a SHUTDOWN either
        return False


def _pong(ep: Endpoint, rid: int, timeout_s: float) -> tuple[list, dict | None]:
    """Replies up to the PONG of marker ``rid``: (the other replies' headers, the PONG's extra or None)."""
    got = []
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return got, None
        try:
            _, msg, _ = ep.recv(timeout_s=left)
        except TransportTimeout:
            return got, None
        except WireError:  # a reply this client cannot read (not from the server's key): an error all the same
            got.append(None)
            continue
        if msg.kind == Kind.PONG and msg.request_id == rid:
            return got, msg.extra
        got.append(msg)


def run_fuzz(address: str, tcfg: TransportConfig, n: int, seed: int, classes: tuple[str, ...] = CLASSES,
             reply_timeout_s: float = 10.0, fresh_connections: int = 20) -> FuzzReport:
    """Send ``n`` fuzz cases (classes in turn, seeded) to the server at ``address``; every case is followed by a
    marker PING. Stops early, with ``alive=False``, if a marker goes unanswered for ``reply_timeout_s``."""
    report = FuzzReport()
    ctx = zmq.Context()
    ep = Endpoint.client(ctx, tcfg, address)
    fz = Fuzzer(seed, tcfg.secret, build=getattr(ep, "frames", None))
    t0 = time.perf_counter()
    marker = 0

    def ping() -> tuple[list, dict | None]:
        nonlocal marker
        marker += 1
        ep.send(Kind.PING, request_id=marker)
        return _pong(ep, marker, reply_timeout_s)

    try:
        ep.sock.send_multipart(fz.plan_message())
        _, pong = ping()
        refused = pong.get("refused", 0) if pong else 0
        for i in range(n):
            cls = classes[i % len(classes)]
            msgs = [m if not _is_shutdown(m, tcfg.secret) else fz.plan_message() for m in fz.case(cls)]
            for m in msgs:
                ep.sock.send_multipart(m)
            report.sent += len(msgs)
            if cls in ("fields", "flood", "frames"):
                fz.captured = (fz.captured + fz.rng.sample(msgs, min(len(msgs), 2)))[-64:]
            replies, pong = ping()
            if pong is None:
                report.alive = False
                break
            late = [m for m in replies if m is not None and m.kind == Kind.ERROR
                    and "timed out" in str(m.extra.get("error", ""))]
            report.late_timeouts += len(late)
            errors = sum(1 for m in replies if m is None or (m.kind == Kind.ERROR and m not in late))
            delta = pong.get("refused", refused) - refused  # refused by the server: with or without a reply
            refused += delta
            c = report.counts[cls]
            c["error"] += errors
            c["drop"] += max(delta - errors, 0)
            c["accepted"] += max(len(msgs) - max(delta, errors), 0)
        if report.alive and "flood" in classes:  # many peers, one bad message each
            for _ in range(fresh_connections):
                other = ctx.socket(zmq.DEALER)
                other.connect(address)
                other.send_multipart(fz._garbage()[0])
                other.close(linger=1000)
            report.sent += fresh_connections
            report.alive = ping()[1] is not None
    finally:
        report.wall_s = time.perf_counter() - t0
        ep.close()
        ctx.term()
    return report
