"""Attention servers as plain processes on this machine: start ``n`` with spawn (no fork of a
torch-initialised parent), collect their addresses within a timeout, and always shut them down
(SHUTDOWN request, join, kill). Used by the torchrun launcher, the tests and the benchmarks; the
Ray-managed pool (:mod:`distca.server.pool`) is the other way to run servers."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import zmq

from distca.server.control import remove_ipc_socket, request_shutdown
from distca.server.loop import ServerConfig, run_server

# A server process entry point: ``entry(cfg, address_queue)`` publishes ``(cfg.name, address)`` and serves.
Entry = Callable[[ServerConfig, "mp.Queue"], None]


class ServerStartError(RuntimeError):
    """Attention-server processes did not publish their addresses in time, or died while starting."""


@dataclass
class ServerProcesses:
    """Running server processes: ``addresses[i]`` is served by ``processes[i]``, named ``{cfg.name}{i}``."""

    addresses: list[str]
    processes: list[BaseProcess]
    start_s: float  # from the first start to the last address


@contextlib.contextmanager
def server_processes(n: int, cfg: ServerConfig, start_timeout_s: float = 120.0, entry: Entry = run_server,
                     devices: list[str] | None = None) -> Iterator[ServerProcesses]:
    """Start ``n`` server processes named ``{cfg.name}0 .. {cfg.name}{n-1}``; yield them; always stop them.
    ``devices[i]``, when given, is where server ``i`` computes (e.g. the GPU of the trainer it sits beside);
    otherwise every server computes on ``cfg.device``."""
    if devices is not None and len(devices) != n:
        raise ValueError(f"{n} servers but {len(devices)} devices: {devices}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    names = [f"{cfg.name}{i}" for i in range(n)]
    cfgs = [dataclasses.replace(cfg, name=name, **({"device": devices[i]} if devices else {}))
            for i, name in enumerate(names)]
    procs = [ctx.Process(target=entry, args=(c, q), daemon=True) for c in cfgs]
    got: dict[str, str] = {}
    try:
        t0 = time.monotonic()
        for p in procs:
            p.start()
        while len(got) < n:
            try:
                name, address = q.get(timeout=1.0)
                got[name] = address
            except queue.Empty:
                dead = [names[i] for i, p in enumerate(procs) if not p.is_alive()]
                if dead:
                    raise ServerStartError(f"attention server(s) {dead} exited while starting "
                                           f"(exit codes {[p.exitcode for p in procs if not p.is_alive()]})") from None
                if time.monotonic() - t0 > start_timeout_s:
                    raise ServerStartError(f"attention servers {sorted(set(names) - set(got))} did not publish an "
                                           f"address within {start_timeout_s:.0f} s") from None
        yield ServerProcesses([got[name] for name in names], procs, time.monotonic() - t0)
    finally:
        stop_server_processes(cfg, [got.get(name, "") for name in names], procs)


def stop_server_processes(cfg: ServerConfig, addresses: list[str], procs: list[BaseProcess],
                          join_s: float = 10.0) -> None:
    """Ask each live server to stop, wait for its process, kill it if it lingers; clean up its socket file."""
    ctx = zmq.Context()
    try:
        request_shutdown(ctx, cfg.transport, [a for a, p in zip(addresses, procs, strict=True) if a and p.is_alive()])
    finally:
        ctx.term()
    for address, p in zip(addresses, procs, strict=True):
        if p.pid is None:  # never started
            continue
        p.join(timeout=join_s)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
        if p.exitcode != 0 and address:
            remove_ipc_socket(address)
