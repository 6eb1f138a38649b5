"""Fuzzing real attention-server processes (issue 16): a seeded few thousand garbage, mutated, insider, replayed
and flooding messages (:mod:`distca.server.fuzz`) to a server with a secret and to one without. Afterwards each
server answers, its resident memory is within ``RSS_BOUND_MB`` of where it was before the fuzz, and a valid round
still returns exactly what local attention computes, forward and backward.

Random garbage is never accepted. Under a key, no tampered header, tampered frame or replayed message is either
(every tamper case changes at least one byte); without a key those are accepted by design, so there the other
outcomes are only counted. ``benchmarks/fuzz.py`` runs the same fuzzer longer and prints the counts."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

from distca.runtime.client import CADClient
from distca.runtime.plan_exec import RankTensors
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.server.fuzz import CLASSES, run_fuzz
from distca.server.loop import ServerConfig
from distca.server.processes import server_processes
from distca.transport.channel import Endpoint, TransportConfig
from distca.transport.wire import Kind

pytestmark = pytest.mark.cluster  # spawns server processes (left out of `make test-fast`)

CASES = 420  # per server: ~60 per class; with the floods' bursts about 7,000 messages per server
SEED = 16
RSS_BOUND_MB = 64  # a server's resident memory after the fuzz, over its resident memory before
TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=2.0, secret=b"fuzz-secret", checksum=False,
                       shm_max_bytes=1 << 20)
SCFG = ServerConfig(n_heads=2, n_kv_heads=1, head_dim=4, dtype="float32", backend="sdpa", max_plans=16,
                    max_rows=4096, max_open_rounds=8, transport=TCFG)
DOCS = [64, 32]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _local_attention(t: RankTensors, dout: torch.Tensor) -> dict[str, torch.Tensor]:
    """Causal attention per document, computed here with autograd (the colocated reference)."""
    q, k, v = (x.clone().requires_grad_() for x in (t.q, t.k, t.v))
    outs, start = [], 0
    for n in DOCS:
        s = slice(start, start + n)
        rep = q.shape[1] // k.shape[1]
        qh, kh, vh = (x[s].transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        outs.append(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(0, 1))
        start += n
    out = torch.cat(outs)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _exact_round(address: str, tcfg: TransportConfig, seed: int) -> None:
    plan, _ = make_plan(BatchLayout.from_ranks([DOCS]), Placement(1, 1, "dedicated"),
                        SchedulerConfig(eps=0.0, granularity=128, window=-1, min_offload_pairs=0))
    gen = torch.Generator().manual_seed(seed)
    t = RankTensors(*(torch.randn(sum(DOCS), h, 4, generator=gen) for h in (2, 1, 1)))
    dout = torch.randn(t.q.shape, generator=gen)
    client = CADClient(0, [address], tcfg, backend="sdpa")
    try:
        out, lse = client.forward(plan, t)
        dq, dk, dv = client.backward(plan, t, out, lse, dout)
    finally:
        client.close()
    want = _local_attention(t, dout)
    for name, got in dict(out=out, dq=dq, dk=dk, dv=dv).items():
        torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("secret", [b"fuzz-secret", None], ids=["secret", "no-secret"])
def test_a_fuzzed_server_stays_up_bounded_and_exact(secret):
    tcfg = dataclasses.replace(TCFG, secret=secret)
    t0 = time.perf_counter()
    with server_processes(1, dataclasses.replace(SCFG, transport=tcfg)) as running:
        address, pid = running.addresses[0], running.processes[0].pid
        _exact_round(address, tcfg, seed=0)  # warm: kernels loaded, buffers at their working size
        before = _rss_mb(pid)
        report = run_fuzz(address, tcfg, CASES, SEED + (secret is None))
        after = _rss_mb(pid)
        total = report.total()
        print(f"\nfuzz ({'secret' if secret else 'no secret'}): {report.sent} messages in {report.wall_s:.1f} s, "
              f"RSS {before:.0f} -> {after:.0f} MB, outcomes {dict(total)}")
        for cls in CLASSES:
            print(f"  {cls:8s} {dict(report.counts[cls])}")
        assert report.alive, "the server stopped answering during the fuzz"
        assert running.processes[0].is_alive()
        assert report.sent >= 2000 and sum(total.values()) > 0
        assert after <= before + RSS_BOUND_MB, f"RSS grew from {before:.0f} to {after:.0f} MB"
        assert report.counts["garbage"]["accepted"] == 0
        if secret:  # under the key, a changed byte anywhere (header or payload) or a re-sent message is refused
            for cls in ("header", "frames", "replay"):
                assert report.counts[cls]["accepted"] == 0, (cls, dict(report.counts[cls]))
        _exact_round(address, tcfg, seed=1)
        import zmq

        ctx = zmq.Context()
        ep = Endpoint.client(ctx, tcfg, address)
        try:
            ep.send(Kind.PING)
            pong = ep.recv()[1].extra
        finally:
            ep.close()
            ctx.term()
        assert pong["rounds_open"] <= SCFG.max_open_rounds
        assert pong["buffer_bytes"] <= 64 << 20
    print(f"  wall {time.perf_counter() - t0:.1f} s")
