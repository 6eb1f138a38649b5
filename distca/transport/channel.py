"""ZeroMQ sockets that speak the wire format, with timeouts on every receive.

Servers bind a ROUTER (loopback by default; another interface only by explicit config), trainers
connect DEALERs. ZeroMQ delivers a multipart message all at once, so after the header has been
read and checked, each tensor frame is read either straight into a caller-provided buffer
(``recv_into``: no copy, no allocation — buffers sized from the plan and reused) or as a zero-copy
frame. A malformed message is drained completely, so the socket stays in step for the next one.

These sockets carry the whole message on the ZeroMQ data plane. On the shared-memory data plane
(:mod:`distca.transport.shm`, trainer and server on one host) they carry only the headers: a request
names the regions of a segment its rows are in and where the reply goes, and tensor frames are absent.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import zmq

from distca.errors import DistCAError
from distca.transport.wire import Kind, Message, TensorSpec, WireError, check_frame, decode_header, encode, frame_tensor


class TransportTimeout(DistCAError, TimeoutError):
    """No (complete) message arrived from a peer within the timeout."""


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """How attention servers and trainers talk. No field has a default here: a run's ``transport``
    section holds them (:mod:`distca.parts` translates it)."""

    transport: Literal["ipc", "tcp"]
    host: str  # servers bind here; binding another interface is an explicit choice
    timeout_s: float
    secret: bytes | None  # shared HMAC key: unauthenticated peers are refused; None: no authentication
    checksum: bool  # CRC32 of every tensor payload
    # Largest shared-memory segment a trainer creates or a server maps (same-host data plane); 0: none.
    shm_max_bytes: int

    def __post_init__(self) -> None:
        if self.transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {self.transport!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.shm_max_bytes < 0:
            raise ValueError(f"shm_max_bytes must be >= 0, got {self.shm_max_bytes}")


def bind_address(cfg: TransportConfig, name: str) -> str:
    """An address for a server to bind: a fresh ipc path, or tcp on ``cfg.host`` with an OS-chosen port."""
    if cfg.transport == "ipc":
        return f"ipc://{tempfile.gettempdir()}/distca-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    return f"tcp://{cfg.host}:*"


# Receive-target callback: given the message and a tensor spec, a destination tensor of exactly
# spec.nbytes bytes, or None to receive the frame as a fresh zero-copy tensor.
Into = Callable[[Message, TensorSpec], torch.Tensor | None]


class Endpoint:
    """A ZeroMQ socket speaking the wire format (ROUTER on servers, DEALER on trainers)."""

    def __init__(self, ctx: zmq.Context, kind: int, cfg: TransportConfig):
        self.cfg = cfg
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.router = kind == zmq.ROUTER
        self.peer = "?"
        self.last_identity: bytes | None = None  # sender of the last message (ROUTER), even a malformed one

    @classmethod
    def server(cls, ctx: zmq.Context, cfg: TransportConfig, name: str) -> Endpoint:
        ep = cls(ctx, zmq.ROUTER, cfg)
        ep.sock.bind(bind_address(cfg, name))
        ep.address = ep.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        ep.peer = name
        return ep

    @classmethod
    def client(cls, ctx: zmq.Context, cfg: TransportConfig, address: str, name: str = "") -> Endpoint:
        ep = cls(ctx, zmq.DEALER, cfg)
        if name:
            ep.sock.setsockopt(zmq.IDENTITY, name.encode())
        ep.sock.connect(address)
        ep.address, ep.peer = address, address
        return ep

    def send(self, kind: Kind, tensors: list[tuple[str, torch.Tensor]] | None = None, *, to: bytes | None = None,
             request_id: int = 0, plan_id: int = 0, extra: dict[str, Any] | None = None) -> None:
        frames = encode(kind, tensors, request_id=request_id, plan_id=plan_id, extra=extra, secret=self.cfg.secret,
                        checksum=self.cfg.checksum)
        if self.router:
            frames = [to, *frames]
        # Small frames are copied by ZeroMQ anyway; large ones go zero-copy (the caller keeps them alive
        # until the send completes: tensors are held by the caller for the whole round).
        self.sock.send_multipart(frames, copy=False)

    def recv(self, into: Into | None = None, timeout_s: float | None = None) -> tuple[bytes | None, Message,
                                                                                        list[torch.Tensor]]:
        """Receive one message: ``(sender identity or None, header, tensors)``.

        Raises ``TransportTimeout`` naming the peer if nothing arrives in time, and ``WireError``
        (after draining the message) if it is malformed.
        """
        timeout = self.cfg.timeout_s if timeout_s is None else timeout_s
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise TransportTimeout(f"no message from {self.peer} within {timeout:.1f} s")
        ident = self.sock.recv() if self.router else None
        self.last_identity = ident
        try:
            if not self.sock.getsockopt(zmq.RCVMORE) and self.router:
                raise WireError("message has an identity but no header frame")
            msg, flags = decode_header(self.sock.recv(), self.cfg.secret)
            tensors = []
            for spec in msg.tensors:
                if not self.sock.getsockopt(zmq.RCVMORE):
                    raise WireError(f"truncated message: tensor frame {spec.name!r} is missing")
                tensors.append(self._recv_tensor(msg, spec, flags, into))
            if self.sock.getsockopt(zmq.RCVMORE):
                raise WireError("message has more frames than its header announces")
        except WireError:
            self.drain()
            raise
        return ident, msg, tensors

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

    def drain(self) -> None:
        """Discard the rest of a multipart message."""
        while self.sock.getsockopt(zmq.RCVMORE):
            self.sock.recv()

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.router and self.address.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.address[len("ipc://"):])
