"""Ping-pong benchmark: one trainer + one attention server process, long documents, forward steps
of a small transformer-like layer stack with ping-pong on vs off, side by side in one run.

Each layer: q/k/v projection (pre), core attention on the server, output projection and an MLP
(post). Exposed communication = time the trainer blocks on the server, as a share of step time.
Trainer and server each get one thread (two cores: wall-clock overlap is real here). Forward only:
the backward pass is not overlapped yet.

    python benchmarks/pingpong.py [--tokens 4096] [--layers 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cluster_harness import servers
from common import header_lines, markdown_table, out_dir, run_info, write_json

from distca.runtime.client import CADClient
from distca.runtime.pingpong import pingpong_layer, sequential_layer
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.server.loop import ServerConfig
from distca.transport.channel import TransportConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per nano-batch (two nano-batches)")
    p.add_argument("--docs", type=int, nargs="+", default=None, help="document lengths of a nano-batch")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    hidden = h * d
    docs = args.docs or [args.tokens // 2, args.tokens // 4, args.tokens // 4]
    if sum(docs) != args.tokens:
        raise SystemExit(f"--docs must sum to --tokens ({args.tokens}), got {sum(docs)}")
    batch = BatchLayout.from_ranks([docs])
    plans = [make_plan(batch, Placement(1, 1, "dedicated"), SchedulerConfig(min_offload_pairs=0))[0]] * 2
    gen = torch.Generator().manual_seed(0)
    layers = [(torch.randn(hidden, (h + 2 * hkv) * d, generator=gen) / hidden**0.5,
               torch.randn(hidden, hidden, generator=gen) / hidden**0.5,
               torch.randn(hidden, 4 * hidden, generator=gen) / hidden**0.5,
               torch.randn(4 * hidden, hidden, generator=gen) / (4 * hidden)**0.5) for _ in range(args.layers)]
    xs0 = [torch.randn(args.tokens, hidden, generator=gen) for _ in range(2)]
    tcfg = TransportConfig(timeout_s=120.0)
    scfg = ServerConfig(n_heads=h, n_kv_heads=hkv, head_dim=d, dtype="float32", backend="sdpa", transport=tcfg)
    info = run_info(torch.device("cpu"), tokens_per_nano=args.tokens, docs=docs, layers=args.layers,
                    heads=f"{h}/{hkv}x{d}", steps=args.steps, trainer_threads=1, server_threads=1)
    results = {}
    with servers(1, scfg) as (addresses, _):
        client = CADClient(0, addresses, tcfg, backend="sdpa")
        client.register(plans[0])

        def run(schedule) -> tuple[float, float]:
            xs = list(xs0)
            b0 = client.blocked_s
            t0 = time.perf_counter()
            with torch.no_grad():
                for wqkv, wo, w1, w2 in layers:
                    def pre(i, x, wqkv=wqkv):
                        q, k, v = (x @ wqkv).split([h * d, hkv * d, hkv * d], dim=1)
                        return (q.reshape(-1, h, d).contiguous(), k.reshape(-1, hkv, d).contiguous(),
                                v.reshape(-1, hkv, d).contiguous())

                    def post(i, x, attn, wo=wo, w1=w1, w2=w2):
                        x = x + attn.reshape(x.shape[0], -1) @ wo
                        return x + torch.relu(x @ w1) @ w2

                    xs = schedule(xs, plans, client, pre, post)
            return time.perf_counter() - t0, client.blocked_s - b0

        for schedule in (sequential_layer, pingpong_layer):
            run(schedule)  # warm-up
        samples = {"sequential": [], "ping-pong": []}
        for _ in range(args.steps):  # interleaved, so both modes see the same machine noise
            for name, schedule in (("sequential", sequential_layer), ("ping-pong", pingpong_layer)):
                samples[name].append(run(schedule))
        client.close()
    rows = []
    base = statistics.median(s for s, _ in samples["sequential"])
    for name, ss in samples.items():
        step = statistics.median(s for s, _ in ss)
        blocked = statistics.median(b for _, b in ss)
        results[name] = {"step_s": step, "blocked_s": blocked}
        rows.append([name, f"{step * 1e3:.0f}", f"{blocked * 1e3:.0f}", f"{100 * blocked / step:.0f}%",
                     f"{base / step:.2f}x"])
    write_json(out_dir("pingpong") / "pingpong.json", {"info": info, "results": results})
    print("\n".join([*header_lines("Ping-pong: forward step, one trainer + one attention server", info),
                     *markdown_table(["schedule", "step ms", "blocked on server ms", "exposed comm",
                                      "speedup vs sequential"], rows)]))


if __name__ == "__main__":
    main()
