"""Control requests to running attention servers, shared by every way of starting them (processes,
Ray pool): one request and its reply, asking a set of servers to stop, and removing the ipc socket file
of a server that could not remove it itself."""

from __future__ import annotations

import contextlib
import os

import zmq

from distca.transport.channel import Endpoint, TransportConfig, TransportTimeout
from distca.transport.wire import Kind, Message, WireError


def request(ctx: zmq.Context, transport: TransportConfig, address: str, kind: Kind, timeout_s: float) -> Message:
    """Send ``kind`` (no tensors) to the server at ``address`` and return its reply's header."""
    ep = Endpoint.client(ctx, transport, address)
    try:
        ep.send(kind)
        return ep.recv(timeout_s=timeout_s)[1]
    finally:
        ep.close()


def answers_ping(ctx: zmq.Context, transport: TransportConfig, address: str, timeout_s: float) -> bool:
    """Whether the server at ``address`` answers a PING within ``timeout_s``."""
    try:
        return request(ctx, transport, address, Kind.PING, timeout_s).kind == Kind.PONG
    except (TransportTimeout, WireError):
        return False


def request_shutdown(ctx: zmq.Context, transport: TransportConfig, addresses: list[str],
                     timeout_s: float = 5.0) -> None:
    """Ask each server to stop; a server that is gone or does not answer is left to the caller to kill."""
    for address in addresses:
        # Best effort: the caller kills whatever is still running afterwards.
        with contextlib.suppress(TransportTimeout, WireError, zmq.ZMQError):
            request(ctx, transport, address, Kind.SHUTDOWN, timeout_s)


def remove_ipc_socket(address: str) -> None:
    """Remove the socket file of an ipc address (a killed server cannot remove its own)."""
    endpoint = address.partition("#")[0]  # a published address ends in '#<server session>'
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.unlink(endpoint[len("ipc://"):])
