"""Transport benchmark: ZeroMQ throughput for 64 KB ... 64 MB tensors over ipc and tcp loopback, and the
same-host shared-memory data plane, next to a plain memory copy of the same bytes, and small-message
round-trip time.

ZeroMQ: a sender process sends one tensor per message (zero-copy frames, the DistCA wire format); the
receiver reads each frame straight into a preallocated buffer (``recv_into``) and acknowledges with
a small message, so a sample is one full transfer. Shared memory: the sender's payload lives in a
segment it created (a trainer gathers its rows there instead of into a staging tensor), a DistCA header
over ipc names the region, the receiver maps the segment once (checked, as a server does), copies the
region into its own buffer and acknowledges; ``shm+write`` also counts the sender writing the payload
into the segment before each message. The ``stream`` rows keep 4 messages in flight (the sender waits for
an acknowledgement only when 4 are outstanding; shared memory: one region per message in flight), so they
measure a path's bandwidth, where the other rows measure one message's whole round trip, whose fixed cost
(the header's round trip over the socket, ~100-150 µs on a busy VM) dominates at 1 MB. Last, one server
process takes 100 forward rounds (8192 tokens) from a client on each data plane: the mean round time, and
peak memory staying flat (buffers and segments are reused).

    python benchmarks/transport.py [--reps 20]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import attention_run_config, header_lines, markdown_table, out_dir, run_info, write_json

from distca.transport.channel import Endpoint, TransportConfig
from distca.transport.shm import PREFIX, Segment, SegmentCache
from distca.transport.wire import Kind

SIZES = [64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
WINDOW = 4  # streamed rows: messages in flight before the sender waits for an acknowledgement


def _sender(transport: str, address_q, sizes: list[int], reps: int) -> None:
    torch.set_num_threads(1)
    ctx = zmq.Context()
    cfg = TransportConfig(transport=transport, host="127.0.0.1", timeout_s=60, secret=None, checksum=False,
                          shm_max_bytes=0)
    ep = Endpoint.client(ctx, cfg, address_q.get())
    for size in sizes:
        x = torch.ones(size, dtype=torch.uint8)
        for _ in range(reps + 2):
            ep.send(Kind.FWD, [("x", x)])
            ep.recv()
    for _ in range(reps * 10 + 10):  # round trips of a small message
        ep.send(Kind.PING)
        ep.recv()
    for size in sizes:  # the same transfers as bare pyzmq frames: the cost of the wire format itself
        x = torch.ones(size, dtype=torch.uint8)
        for _ in range(reps + 2):
            ep.sock.send_multipart([b"raw", memoryview(x.numpy())], copy=False)
            ep.sock.recv()
    if transport == "ipc":  # then the same sizes through shared memory, headers on this socket
        _send_shm(ep, sizes, reps)
        _send_streams(ep, sizes, reps)
    ep.close()
    ctx.term()


def _send_shm(ep: Endpoint, sizes: list[int], reps: int) -> None:
    """The sender's side of the shared-memory rows: a payload in its segment, a header naming it, the ack."""
    seg = Segment.create(f"{PREFIX}bench-{uuid.uuid4().hex[:8]}", max(sizes))
    try:
        for write in (False, True):
            for size in sizes:
                x = torch.ones(size, dtype=torch.uint8)
                region = seg.view(0, torch.uint8, (size,))
                region.copy_(x)
                for _ in range(reps + 2):
                    if write:
                        region.copy_(x)
                    ep.send(Kind.FWD, extra={"shm": {"seg": seg.name, "in": [["x", "uint8", [size], 0]]}})
                    ep.recv()
                    seg.unlink()  # the receiver has mapped it
    finally:
        seg.unlink()
        seg.close()


def _stream_count(reps: int) -> int:
    return 4 * reps + 8


def _send_streams(ep: Endpoint, sizes: list[int], reps: int) -> None:
    """Streamed rows: ``WINDOW`` messages in flight (the sender waits for an acknowledgement only when the window
    is full), first as ZeroMQ frames, then through shared memory (one region per message in flight)."""
    seg = Segment.create(f"{PREFIX}bench-{uuid.uuid4().hex[:8]}", WINDOW * max(sizes))
    try:
        for plane in ("ipc", "shm"):
            for size in sizes:
                x = torch.ones(size, dtype=torch.uint8)
                for w in range(WINDOW):
                    seg.view(w * size, torch.uint8, (size,)).copy_(x)
                inflight = 0
                for i in range(_stream_count(reps)):
                    if inflight == WINDOW:
                        ep.recv()
                        inflight -= 1
                    if plane == "ipc":
                        ep.send(Kind.FWD, [("x", x)])
                    else:
                        off = (i % WINDOW) * size
                        ep.send(Kind.FWD, extra={"shm": {"seg": seg.name, "in": [["x", "uint8", [size], off]]}})
                    inflight += 1
                for _ in range(inflight):
                    ep.recv()
                if plane == "shm":
                    seg.unlink()  # the receiver has mapped it
    finally:
        seg.unlink()
        seg.close()


def _receive_streams(srv: Endpoint, reps: int, sizes: list[int]) -> dict[str, list[dict]]:
    """The receiver's side of ``_send_streams``: bytes per second over a stream of messages (after two)."""
    cache = SegmentCache(max_bytes=WINDOW * max(sizes), max_segments=4)
    out = {}
    for plane in ("ipc stream", "shm stream"):
        rows = out[plane] = []
        for size in sizes:
            buf = torch.empty(size, dtype=torch.uint8)
            n = _stream_count(reps)
            for i in range(n):
                if i == 2:
                    t0 = time.perf_counter()
                if plane == "ipc stream":
                    ident, _, _ = srv.recv(into=lambda m, s, b=buf: b)
                else:
                    ident, msg, _ = srv.recv()
                    (_, dtype, shape, offset), = msg.extra["shm"]["in"]
                    seg = cache.get(msg.extra["shm"]["seg"])
                    buf.copy_(seg.view(offset, getattr(torch, dtype), tuple(shape)))
                srv.send(Kind.ACK, to=ident)
            gbps = size * (n - 2) / (time.perf_counter() - t0) / 1e9
            mem = _memcpy_gbps(size, reps)
            rows.append({"bytes": size, "gbps": gbps, "memcpy_gbps": mem, "ratio": gbps / mem})
    cache.close()
    return out


def _receive_shm(srv: Endpoint, reps: int, sizes: list[int]) -> dict[str, list[dict]]:
    """Shared memory: header over ipc, payload copied out of the sender's segment into a buffer, ack back;
    rows for ``shm`` (the payload already in the segment) and ``shm+write`` (the sender writes it first)."""
    cache = SegmentCache(max_bytes=max(sizes), max_segments=4)
    out = {}
    for variant in ("shm", "shm+write"):
        rows = out[variant] = []
        for size in sizes:
            buf = torch.empty(size, dtype=torch.uint8)
            times = []
            for i in range(reps + 2):
                t0 = time.perf_counter()
                ident, msg, _ = srv.recv()
                (_, dtype, shape, offset), = msg.extra["shm"]["in"]
                seg = cache.get(msg.extra["shm"]["seg"])  # checked and mapped once, as a server does
                buf.copy_(seg.view(offset, getattr(torch, dtype), tuple(shape)))
                srv.send(Kind.ACK, to=ident)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            gbps = size / statistics.median(times) / 1e9
            mem = _memcpy_gbps(size, reps)
            rows.append({"bytes": size, "gbps": gbps, "memcpy_gbps": mem, "ratio": gbps / mem})
    cache.close()
    return out


def _memcpy_gbps(size: int, reps: int) -> float:
    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return size / statistics.median(times[2:]) / 1e9


def measure(transport: str, reps: int,
            sizes: list[int] = SIZES) -> tuple[list[dict], float, int, dict[str, list[dict]]]:
    """ZeroMQ rows, small-message RTT (µs), receiver RSS growth, and (ipc) the shared-memory rows."""
    ctx = zmq.Context()
    cfg = TransportConfig(transport=transport, host="127.0.0.1", timeout_s=60, secret=None, checksum=False,
                          shm_max_bytes=0)
    srv = Endpoint.server(ctx, cfg, "bench")
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_sender, args=(transport, q, sizes, reps), daemon=True)
    proc.start()
    q.put(srv.address)
    rows = []
    rss = []
    for size in sizes:
        buf = torch.empty(size, dtype=torch.uint8)
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            ident, _, _ = srv.recv(into=lambda m, s, b=buf: b)
            srv.send(Kind.ACK, to=ident)
            if i >= 2:
                times.append(time.perf_counter() - t0)
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        gbps = size / statistics.median(times) / 1e9
        mem = _memcpy_gbps(size, reps)
        rows.append({"bytes": size, "gbps": gbps, "memcpy_gbps": mem, "ratio": gbps / mem})
    rtts = []
    for _ in range(reps * 10 + 10):
        t0 = time.perf_counter()
        ident, _, _ = srv.recv()
        srv.send(Kind.PONG, to=ident)
        rtts.append(time.perf_counter() - t0)
    for row in rows:  # bare pyzmq: identity, one small frame, the payload straight into the buffer
        buf = torch.empty(row["bytes"], dtype=torch.uint8)
        view = memoryview(buf.numpy())
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            ident = srv.sock.recv()
            srv.sock.recv()
            srv.sock.recv_into(view)
            srv.sock.send_multipart([ident, b"ok"])
            if i >= 2:
                times.append(time.perf_counter() - t0)
        row["raw_gbps"] = row["bytes"] / statistics.median(times) / 1e9
    shm = {**_receive_shm(srv, reps, sizes), **_receive_streams(srv, reps, sizes)} if transport == "ipc" else {}
    proc.join(timeout=30)
    srv.close()
    ctx.term()
    return rows, statistics.median(rtts[10:]) * 1e6, max(rss) - min(rss[len(sizes) * 2:] or rss), shm


def server_memory(rounds: int) -> dict[str, dict]:
    """Peak RSS, receive-buffer bytes and mapped segments of one server process before and after ``rounds``
    forward rounds, from a client on each data plane in turn (ZeroMQ frames, then shared memory), and the
    mean time of a round (the trainer's wall time: rows out, attention on the server, results back)."""
    import dataclasses

    from distca.parts import scheduler_settings, server_settings
    from distca.runtime.client import CADClient
    from distca.runtime.plan_exec import RankTensors
    from distca.scheduler import BatchLayout, Placement, make_plan
    from distca.server.processes import server_processes

    h, hkv, d = 8, 2, 64
    run = attention_run_config(h, hkv, d, backend="sdpa", timeout_s=120, round_tokens=8192)
    sched = dataclasses.replace(scheduler_settings(run, -1), min_offload_pairs=0)  # every task on the server
    plan, _ = make_plan(BatchLayout.from_ranks([[4096, 2048, 2048]]), Placement(1, 1, "dedicated"), sched)
    t = RankTensors(*(torch.randn(8192, n, d) for n in (h, hkv, hkv)))
    server = server_settings(run)
    out = {}
    with server_processes(1, server) as running:
        for shm in (False, True):
            client = CADClient(0, running.addresses, server.transport, backend="sdpa", shm=shm)
            for _ in range(min(5, rounds)):  # warm-up
                client.forward(plan, t)
            before = client.ping(0)
            t0 = time.perf_counter()
            for _ in range(rounds):
                client.forward(plan, t)
            round_ms = (time.perf_counter() - t0) / max(rounds, 1) * 1e3
            after = client.ping(0)
            out[client.data_plane] = {"rounds": rounds, "round_ms": round_ms, "before": before, "after": after}
            client.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--memory-rounds", type=int, default=100, help="server rounds for the flat-memory check")
    p.add_argument("--max-mb", type=int, default=64, help="largest message measured (MB; smaller ones: a quick run)")
    args = p.parse_args()
    # One thread, as a server runs: a copy split over two threads waits for the second thread's wake-up,
    # a scheduler tick on a busy machine, which would swamp the copies measured here.
    torch.set_num_threads(1)
    info = run_info(torch.device("cpu"), reps=args.reps, max_mb=args.max_mb)
    table, results = [], {}
    size_name = lambda n: f"{n >> 10} KB" if n < 1 << 20 else f"{n >> 20} MB"  # noqa: E731
    for transport in ("ipc", "tcp"):
        rows, rtt_us, _, shm = measure(transport, args.reps, [n for n in SIZES if n <= args.max_mb << 20])
        results[transport] = {"rows": rows, "rtt_us": rtt_us}
        results.update({variant: {"rows": shm_rows} for variant, shm_rows in shm.items()})
    for transport, res in results.items():
        for r in res["rows"]:
            table.append([transport, size_name(r["bytes"]), f"{r['gbps']:.2f}",
                          f"{r['raw_gbps']:.2f}" if "raw_gbps" in r else "", f"{r['memcpy_gbps']:.2f}",
                          f"{r['ratio']:.2f}"])
        if "rtt_us" in res:
            table.append([transport, "small-message RTT", f"{res['rtt_us']:.0f} µs", "", "", ""])
    for plane, mem in server_memory(args.memory_rounds).items():
        results[f"server_memory_{plane}"] = mem
        b, a = mem["before"], mem["after"]
        table.append([f"server ({plane})", f"{mem['rounds']} rounds, 8192 tokens, {mem['round_ms']:.0f} ms each",
                      f"peak RSS {b['peak_rss_kb'] >> 10} -> {a['peak_rss_kb'] >> 10} MB",
                      f"buffers {b['buffer_bytes'] >> 20} -> {a['buffer_bytes'] >> 20} MB",
                      f"segments {b['shm_segments']} -> {a['shm_segments']}", ""])
    write_json(out_dir("transport") / "transport.json", {"info": info, "results": results})
    print("\n".join([*header_lines("Transport: ZeroMQ loopback and shared memory vs memcpy", info),
                     *markdown_table(["transport", "size", "DistCA GB/s", "bare pyzmq GB/s", "memcpy GB/s",
                                     "DistCA / memcpy"], table)]))


if __name__ == "__main__":
    main()
