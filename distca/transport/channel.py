"""ZeroMQ sockets that speak the wire format, with timeouts on every receive.

Servers bind a ROUTER (loopback by default; another interface only by explicit config), trainers
connect DEALERs. ZeroMQ delivers a multipart message all at once, so after the header has been
read and checked, each tensor frame is read either straight into a caller-provided buffer
(``recv_into``: no copy, no allocation — buffers sized from the plan and reused) or as a zero-copy
frame. A malformed message is drained completely, so the socket stays in step for the next one.

These sockets carry the whole message on the ZeroMQ data plane. On the shared-memory data plane
(:mod:`distca.transport.shm`, trainer and server on one host) they carry only the headers: a request
names the regions of a segment its rows are in and where the reply goes, and tensor frames are absent.

Security (with ``secret``; see README "Security"): every message carries an HMAC-SHA256 over its header,
and the header holds the SHA-256 of every tensor frame, so the whole message is authenticated (not
encrypted). Replays are refused: each endpoint has a random session id, and a server's is part of the
address it publishes (``<zmq endpoint>#<session hex>``), so a client knows it without a round trip. Every
message names the session it is meant for and carries the sender's strictly increasing counter; a receiver
refuses a message meant for another session (a captured message replayed to a fresh server fails: the fresh
server has a new session) or whose counter is not above the last one it accepted from that sender (ZeroMQ
keeps a connection's order, so the window is "above the last"). SHUTDOWN is checked under ``owner_secret``
where a server has one: only the process that started it can stop it. All of this happens in
:meth:`Endpoint.recv`, which raises only ``TransportTimeout`` or ``WireError`` (``AuthError``, a WireError, for
what is not authenticated for this receiver: a server may drop those unanswered); a server loop needs no check
of its own. A receive target (``into``) is asked only after the header passed the MAC and the replay check; a
frame whose SHA-256 then fails has landed in that target (the sender's own rows) before the WireError.

Limits: ``max_message_bytes`` is ZeroMQ's MAXMSGSIZE (a larger frame disconnects its peer inside libzmq)
and bounds the sum of a message's tensor bytes; a message of more than ``max_frames`` frames is refused
and drained without copying. Servers raise their descriptor limit to the hard limit and put ipc sockets
in a private (0700) directory of their user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import stat
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import zmq

from distca.errors import DistCAError
from distca.transport.wire import (
    MAX_TENSORS,
    NO_SESSION,
    SESSION_BYTES,
    AuthError,
    Kind,
    Message,
    TensorSpec,
    WireError,
    check_frame,
    decode_header,
    encode,
    frame_tensor,
)

log = logging.getLogger(__name__)

MAX_PEERS = 4096  # sender sessions whose counters a receiver remembers (least recently active forgotten first)
MAX_FRAMES = 1 + MAX_TENSORS  # a header and its tensors: no valid message has more frames


class TransportTimeout(DistCAError, TimeoutError):
    """No (complete) message arrived from a peer within the timeout."""


class BindError(DistCAError, OSError):
    """A server could not bind its socket (address in use, no descriptors left, private directory unusable)."""


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """How attention servers and trainers talk. No field has a default here: a run's ``transport``
    section holds them (:mod:`distca.parts` translates it)."""

    transport: Literal["ipc", "tcp"]
    host: str  # servers bind here; binding another interface is an explicit choice
    timeout_s: float
    secret: bytes | None  # shared MAC key: unauthenticated peers are refused; None: no authentication
    checksum: bool  # CRC32 of every tensor payload (without a secret; with one, SHA-256 digests cover it)
    # Largest shared-memory segment a trainer creates or a server maps (same-host data plane); 0: none.
    shm_max_bytes: int
    # The key a SHUTDOWN must be authenticated with: held by the process that starts servers (parts.server_settings
    # makes one per start), never by trainers. None: any peer that passes ``secret`` may stop a server.
    owner_secret: bytes | None = field(default=None, compare=False)  # not part of what the settings are
    max_message_bytes: int = 4 << 30  # ZeroMQ MAXMSGSIZE (per frame) and the bound on a message's tensor bytes
    max_frames: int = MAX_FRAMES  # frames per message, header included

    def __repr__(self) -> str:  # keys never reach a log line, a traceback's locals or a config dump
        hidden = {"secret": self.secret, "owner_secret": self.owner_secret}
        shown = ", ".join(f"{k}={'<redacted>' if hidden.get(k) else getattr(self, k)!r}"
                          for k in self.__dataclass_fields__)
        return f"TransportConfig({shown})"

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")
        if not 2 <= self.max_frames <= MAX_FRAMES:
            raise ValueError(f"max_frames must be in [2, {MAX_FRAMES}], got {self.max_frames}")
        if self.transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {self.transport!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.shm_max_bytes < 0:
            raise ValueError(f"shm_max_bytes must be >= 0, got {self.shm_max_bytes}")


def private_socket_dir() -> str:
    """This user's directory for ipc sockets: ``<tmp>/distca-<uid>``, mode 0700, owned by this user (made so
    if it is new; refused if someone else owns it or it is a link) -- never world-writable /tmp itself."""
    path = os.path.join(tempfile.gettempdir(), f"distca-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise BindError(f"{path} is not a directory of this user: refusing to put ipc sockets there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def bind_address(cfg: TransportConfig, name: str) -> str:
    """An address for a server to bind: a fresh ipc path in this user's private directory, or tcp on
    ``cfg.host`` with an OS-chosen port."""
    if cfg.transport == "ipc":
        return f"ipc://{private_socket_dir()}/{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    return f"tcp://{cfg.host}:*"


def split_address(address: str) -> tuple[str, bytes | None]:
    """``(ZeroMQ endpoint, server session id or None)`` of a published server address."""
    endpoint, sep, tail = address.partition("#")
    if not sep:
        return endpoint, None
    try:
        session = bytes.fromhex(tail)
    except ValueError:
        session = b""
    if len(session) != SESSION_BYTES:
        raise ValueError(f"server address {address[:200]!r}: the part after '#' must be {SESSION_BYTES} bytes in hex")
    return endpoint, session


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit (every peer connection takes one); returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:  # e.g. a kernel cap below an infinite hard limit
        log.warning("could not raise the descriptor limit from %d to %d: %s", soft, want, exc)
        return soft
    return want


# Receive-target callback: given the message and a tensor spec, a destination tensor of exactly
# spec.nbytes bytes, or None to receive the frame as a fresh zero-copy tensor.
Into = Callable[[Message, TensorSpec], torch.Tensor | None]


class Endpoint:
    """A ZeroMQ socket speaking the wire format (ROUTER on servers, DEALER on trainers)."""

    def __init__(self, ctx: zmq.Context, kind: int, cfg: TransportConfig):
        self.cfg = cfg
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        self.router = kind == zmq.ROUTER
        self.peer = "?"
        self.address = ""  # as published: ZeroMQ endpoint, '#', the server's session id in hex
        self.endpoint = ""  # the ZeroMQ endpoint alone
        self.last_identity: bytes | None = None  # sender of the last message (ROUTER), even a malformed one
        self.session = os.urandom(SESSION_BYTES)  # this endpoint's id: messages for it name it
        self.seq = 0  # counter of the messages this endpoint sent
        self.peer_session: bytes | None = None  # client: the server's session id, from its address
        self._last_seq: OrderedDict[bytes, int] = OrderedDict()  # sender session -> highest counter accepted
        self._sessions: OrderedDict[bytes, bytes] = OrderedDict()  # server: peer identity -> its session id
        self._scratch = bytearray(256)  # drained frames land here (no allocation per frame)

    @classmethod
    def server(cls, ctx: zmq.Context, cfg: TransportConfig, name: str) -> Endpoint:
        limit = raise_fd_limit()
        ep = cls(ctx, zmq.ROUTER, cfg)
        address = bind_address(cfg, name)
        try:
            ep.sock.bind(address)
        except zmq.ZMQError as exc:
            ep.sock.close(linger=0)
            raise BindError(f"attention server {name} cannot bind {address}: {exc} (descriptor limit {limit}; "
                            f"{'check transport.host' if cfg.transport == 'tcp' else 'check the socket directory'})"
                            ) from None
        ep.endpoint = ep.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        ep.address = f"{ep.endpoint}#{ep.session.hex()}"  # clients bind their messages to this server's session
        ep.peer = name
        return ep

    @classmethod
    def client(cls, ctx: zmq.Context, cfg: TransportConfig, address: str, name: str = "") -> Endpoint:
        ep = cls(ctx, zmq.DEALER, cfg)
        ep.endpoint, ep.peer_session = split_address(address)
        if name:
            ep.sock.setsockopt(zmq.IDENTITY, name.encode())
        ep.sock.connect(ep.endpoint)
        ep.address, ep.peer = address, address
        return ep

    # -- sending -------------------------------------------------------------------------------
    def _key(self, kind: Kind) -> bytes | None:
        """The MAC key a message of ``kind`` is sent with (a SHUTDOWN under the owner's key, if we hold one)."""
        return self.cfg.owner_secret if kind == Kind.SHUTDOWN and self.cfg.owner_secret else self.cfg.secret

    def frames(self, kind: Kind, tensors: list[tuple[str, torch.Tensor]] | None = None, *, to: bytes | None = None,
               request_id: int = 0, plan_id: int = 0, extra: dict[str, Any] | None = None) -> list[Any]:
        """The frames ``send`` would send (bound to the peer's session, next counter), without the identity."""
        key = self._key(kind)
        dst = self._sessions.get(to, NO_SESSION) if self.router else (self.peer_session or NO_SESSION)
        if key is not None and not self.router and self.peer_session is None:
            raise WireError(f"address {self.address[:200]!r} names no server session ('#<hex>'): an authenticated "
                            "message needs one (use the address the server published)")
        self.seq += 1
        return encode(kind, tensors, request_id=request_id, plan_id=plan_id, extra=extra, secret=key,
                      checksum=self.cfg.checksum, src=self.session, dst=dst, seq=self.seq)

    def send(self, kind: Kind, tensors: list[tuple[str, torch.Tensor]] | None = None, *, to: bytes | None = None,
             request_id: int = 0, plan_id: int = 0, extra: dict[str, Any] | None = None) -> None:
        frames = self.frames(kind, tensors, to=to, request_id=request_id, plan_id=plan_id, extra=extra)
        if self.router:
            frames = [to, *frames]
        # Small frames are copied by ZeroMQ anyway; large ones go zero-copy (the caller keeps them alive
        # until the send completes: tensors are held by the caller for the whole round).
        self.sock.send_multipart(frames, copy=False)

    # -- receiving -----------------------------------------------------------------------------
    def recv(self, into: Into | None = None, timeout_s: float | None = None) -> tuple[bytes | None, Message,
                                                                                        list[torch.Tensor]]:
        """Receive one message: ``(sender identity or None, header, tensors)``.

        Raises ``TransportTimeout`` naming the peer if nothing arrives in time, and ``WireError``
        (after draining the message) if it is malformed, unauthenticated, replayed, meant for another
        session or over a limit -- nothing else, whatever the bytes.
        """
        timeout = self.cfg.timeout_s if timeout_s is None else timeout_s
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise TransportTimeout(f"no message from {self.peer} within {timeout:.1f} s")
        ident = self.sock.recv() if self.router else None
        self.last_identity = ident
        frames = 1
        try:
            if not self.sock.getsockopt(zmq.RCVMORE) and self.router:
                raise WireError("message has an identity but no header frame")
            msg, flags = decode_header(self.sock.recv(), self.cfg.secret,
                                       self.cfg.owner_secret if self.router else None)
            self._check_binding(ident, msg)
            total = sum(spec.nbytes for spec in msg.tensors)
            if total > self.cfg.max_message_bytes:
                raise WireError(f"message announces {total} tensor bytes, over transport.max_message_mb "
                                f"({self.cfg.max_message_bytes >> 20} MB)")
            tensors = []
            for spec in msg.tensors:
                if not self.sock.getsockopt(zmq.RCVMORE):
                    raise WireError(f"truncated message: tensor frame {spec.name!r} is missing")
                frames += 1
                tensors.append(self._recv_tensor(msg, spec, flags, into))
            if self.sock.getsockopt(zmq.RCVMORE):
                raise WireError("message has more frames than its header announces")
        except WireError as exc:
            extra = self.drain()
            if frames + extra > self.cfg.max_frames:
                raise WireError(f"message of {frames + extra} frames refused: over transport.max_frames "
                                f"({self.cfg.max_frames})") from None
            raise exc from None
        except zmq.ZMQError:
            raise
        except Exception as exc:
            self.drain()
            raise WireError(f"message could not be received: {type(exc).__name__}: {exc}"[:300]) from None
        return ident, msg, tensors

    def _check_binding(self, ident: bytes | None, msg: Message) -> None:
        """Replay protection: an authenticated message must name this endpoint's session and carry a counter
        above the last one accepted from its sender. Accepted counters are remembered only here, after the
        header passed every check (a rejected message changes nothing)."""
        shutdown_owned = msg.kind == Kind.SHUTDOWN and self.cfg.owner_secret is not None and self.router
        if self.cfg.secret is None and not shutdown_owned:
            return  # no key: nothing is authenticated, so nothing can be bound
        # A server's ERROR about a message it could not tie to a session (garbage from a fresh connection) names
        # no session; a client takes it from its own server (src) as a diagnosis: at worst a replay fails a round.
        unbound_error = not self.router and msg.kind == Kind.ERROR and msg.dst == NO_SESSION
        if msg.dst != self.session and not unbound_error:
            raise AuthError("message is not bound to this endpoint's session: replayed from another connection or "
                            "meant for another server")
        elif not self.router and msg.src != self.peer_session:
            raise AuthError("message comes from another session than this connection's server")
        last = self._last_seq.get(msg.src, 0)
        if msg.seq <= last:
            raise AuthError(f"replayed message refused: counter {msg.seq} is not above {last}, the last accepted "
                            "from that sender")
        self._last_seq[msg.src] = msg.seq
        self._last_seq.move_to_end(msg.src)
        if len(self._last_seq) > MAX_PEERS:
            self._last_seq.popitem(last=False)
        if self.router and ident is not None:
            self._sessions[ident] = msg.src
            self._sessions.move_to_end(ident)
            if len(self._sessions) > MAX_PEERS:
                self._sessions.popitem(last=False)

    def _recv_tensor(self, msg: Message, spec: TensorSpec, flags: int, into: Into | None) -> torch.Tensor:
        dest = into(msg, spec) if into is not None else None
        if dest is not None:
            if dest.dtype != spec.dtype or dest.numel() * dest.element_size() != spec.nbytes:
                self.sock.recv()  # consume the frame we cannot take
                raise WireError(f"tensor {spec.name}: got {spec.dtype} {list(spec.shape)}, the receive buffer "
                                f"expects {dest.dtype} {list(dest.shape)}")
            view = memoryview(dest.view(torch.uint8).numpy()) if spec.nbytes else memoryview(bytearray(0))
            n = self.sock.recv_into(view)
            check_frame(spec, n, flags, view)
            return dest
        frame = self.sock.recv(copy=False)
        check_frame(spec, len(frame.buffer), flags, frame.buffer)
        return frame_tensor(spec, frame.buffer)

    def drain(self) -> int:
        """Discard the rest of a multipart message without copying it; returns how many frames it had left."""
        n = 0
        while self.sock.getsockopt(zmq.RCVMORE):
            self.sock.recv_into(self._scratch)
            n += 1
        return n

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.router and self.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint[len("ipc://"):])
