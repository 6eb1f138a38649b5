"""A real simulated cluster on one machine: attention-server processes on ipc/tcp loopback sockets
and trainer processes, spawned fresh (no fork of a torch-initialised parent)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue as queue_mod

import torch

from distca.server.loop import ServerConfig, run_server
from distca.transport.channel import TransportConfig

CTX = mp.get_context("spawn")


@contextlib.contextmanager
def servers(n: int, cfg: ServerConfig, start_timeout_s: float = 120.0):
    """Start ``n`` server processes; yields ``(addresses, processes)``; always shuts them down."""
    q = CTX.Queue()
    procs = []
    for i in range(n):
        c = ServerConfig(**{**cfg.__dict__, "name": f"server{i}"})
        p = CTX.Process(target=run_server, args=(c, q), daemon=True)
        p.start()
        procs.append(p)
    try:
        got = dict(q.get(timeout=start_timeout_s) for _ in range(n))
        yield [got[f"server{i}"] for i in range(n)], procs
    finally:
        _shutdown(procs, [got.get(f"server{i}") for i in range(n)] if "got" in locals() else [], cfg.transport)


def _shutdown(procs, addresses, tcfg: TransportConfig) -> None:
    import zmq

    from distca.transport.channel import Endpoint, TransportTimeout
    from distca.transport.wire import Kind

    ctx = zmq.Context()
    for p, addr in zip(procs, addresses, strict=False):
        if p.is_alive() and addr:
            ep = Endpoint.client(ctx, tcfg, addr)
            ep.send(Kind.SHUTDOWN)
            with contextlib.suppress(TransportTimeout, Exception):
                ep.recv(timeout_s=5)
            ep.close()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    ctx.term()


def run_trainers(target, args_per_rank: list[tuple], timeout_s: float = 180.0) -> dict[int, object]:
    """Run one process per rank; each calls ``target(*args, queue)`` and puts ``(rank, result)``."""
    q = CTX.Queue()
    procs = [CTX.Process(target=target, args=(*a, q), daemon=True) for a in args_per_rank]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, res = q.get(timeout=timeout_s)
            results[rank] = res
    except queue_mod.Empty:
        raise AssertionError(f"trainers did not finish within {timeout_s} s; got ranks {sorted(results)}") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


def tensors_to_numpy(xs: dict[str, torch.Tensor]) -> dict:
    return {k: v.numpy() for k, v in xs.items()}
