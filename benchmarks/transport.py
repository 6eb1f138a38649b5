"""Transport benchmark: ZeroMQ throughput for 64 KB ... 64 MB tensors over ipc and tcp loopback, next to
a plain memory copy of the same bytes, and small-message round-trip time.

A sender process sends one tensor per message (zero-copy frames, the DistCA wire format); the
receiver reads each frame straight into a preallocated buffer (``recv_into``) and acknowledges with
a small message, so a sample is one full transfer. Also checks that the receiver's peak memory stays
flat over 100 rounds (buffers are reused).

    python benchmarks/transport.py [--reps 20]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import attention_run_config, header_lines, markdown_table, out_dir, run_info, write_json

from distca.transport.channel import Endpoint, TransportConfig
from distca.transport.wire import Kind

SIZES = [64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


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
    ep.close()
    ctx.term()


def _memcpy_gbps(size: int, reps: int) -> float:
    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return size / statistics.median(times[2:]) / 1e9


def measure(transport: str, reps: int) -> tuple[list[dict], float, int]:
    ctx = zmq.Context()
    cfg = TransportConfig(transport=transport, host="127.0.0.1", timeout_s=60, secret=None, checksum=False,
                          shm_max_bytes=0)
    srv = Endpoint.server(ctx, cfg, "bench")
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_sender, args=(transport, q, SIZES, reps), daemon=True)
    proc.start()
    q.put(srv.address)
    rows = []
    rss = []
    for size in SIZES:
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
    proc.join(timeout=30)
    srv.close()
    ctx.term()
    return rows, statistics.median(rtts[10:]) * 1e6, max(rss) - min(rss[len(SIZES) * 2:] or rss)


def server_memory(rounds: int) -> dict:
    """Peak RSS and receive-buffer bytes of a server process before and after ``rounds`` forward rounds."""
    import dataclasses

    from distca.parts import scheduler_settings, server_settings
    from distca.runtime.client import CADClient
    from distca.runtime.plan_exec import RankTensors
    from distca.scheduler import BatchLayout, Placement, make_plan
    from distca.server.processes import server_processes

    h, hkv, d = 8, 2, 64
    run = attention_run_config(h, hkv, d, backend="sdpa", timeout_s=120)
    sched = dataclasses.replace(scheduler_settings(run, -1), min_offload_pairs=0)  # every task on the server
    plan, _ = make_plan(BatchLayout.from_ranks([[4096, 2048, 2048]]), Placement(1, 1, "dedicated"), sched)
    t = RankTensors(*(torch.randn(8192, n, d) for n in (h, hkv, hkv)))
    server = server_settings(run)
    with server_processes(1, server) as running:
        a, tcfg = running.addresses, server.transport
        client = CADClient(0, a, tcfg, backend="sdpa")
        for _ in range(5):
            client.forward(plan, t)
        before = client.ping(0)
        for _ in range(rounds):
            client.forward(plan, t)
        after = client.ping(0)
        client.close()
    return {"rounds": rounds, "before": before, "after": after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--memory-rounds", type=int, default=100, help="server rounds for the flat-memory check")
    args = p.parse_args()
    info = run_info(torch.device("cpu"), reps=args.reps)
    table, results = [], {}
    for transport in ("ipc", "tcp"):
        rows, rtt_us, _ = measure(transport, args.reps)
        results[transport] = {"rows": rows, "rtt_us": rtt_us}
        for r in rows:
            table.append([transport, f"{r['bytes'] >> 10} KB" if r["bytes"] < 1 << 20 else f"{r['bytes'] >> 20} MB",
                          f"{r['gbps']:.2f}", f"{r['raw_gbps']:.2f}", f"{r['memcpy_gbps']:.2f}", f"{r['ratio']:.2f}"])
        table.append([transport, "small-message RTT", f"{rtt_us:.0f} µs", "", "", ""])
    mem = server_memory(args.memory_rounds)
    results["server_memory"] = mem
    b, a = mem["before"], mem["after"]
    table.append(["server", f"{mem['rounds']} rounds, 8192 tokens", f"peak RSS {b['peak_rss_kb'] >> 10} -> "
                  f"{a['peak_rss_kb'] >> 10} MB", f"buffers {b['buffer_bytes'] >> 20} -> {a['buffer_bytes'] >> 20} MB",
                  "", ""])
    write_json(out_dir("transport") / "transport.json", {"info": info, "results": results})
    print("\n".join([*header_lines("Transport: ZeroMQ loopback vs memcpy", info),
                     *markdown_table(["transport", "size", "DistCA GB/s", "bare pyzmq GB/s", "memcpy GB/s",
                                     "DistCA / memcpy"], table)]))


if __name__ == "__main__":
    main()
