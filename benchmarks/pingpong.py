"""Ping-pong benchmark: one trainer + one attention server process, long documents, forward and
training (forward + backward) steps of a small transformer-like layer stack with ping-pong on vs off,
side by side in one run.

Each layer: q/k/v projection (pre), core attention on the server, output projection and an MLP
(post). Exposed communication = time the trainer blocks on the server, as a share of step time.
Trainer and server each get one thread (two cores: wall-clock overlap is real here).

    python benchmarks/pingpong.py [--tokens 4096] [--layers 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import attention_run_config, header_lines, markdown_table, out_dir, run_info, write_json

from distca.parts import scheduler_settings, server_settings
from distca.runtime.client import CADClient
from distca.runtime.pingpong import pingpong_layer, sequential_layer, train_backward, train_forward
from distca.scheduler import BatchLayout, Placement, make_plan
from distca.server.processes import server_processes


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
    run = attention_run_config(h, hkv, d, backend="sdpa", timeout_s=120.0, round_tokens=args.tokens)
    sched = dataclasses.replace(scheduler_settings(run, -1), min_offload_pairs=0)  # every task on the server
    batch = BatchLayout.from_ranks([docs])
    plans = [make_plan(batch, Placement(1, 1, "dedicated"), sched)[0]] * 2
    gen = torch.Generator().manual_seed(0)
    layers = [tuple(w.requires_grad_() for w in (
        torch.randn(hidden, (h + 2 * hkv) * d, generator=gen) / hidden**0.5,
        torch.randn(hidden, hidden, generator=gen) / hidden**0.5,
        torch.randn(hidden, 4 * hidden, generator=gen) / hidden**0.5,
        torch.randn(4 * hidden, hidden, generator=gen) / (4 * hidden)**0.5)) for _ in range(args.layers)]
    xs0 = [torch.randn(args.tokens, hidden, generator=gen) for _ in range(2)]
    scfg = server_settings(run)
    info = run_info(torch.device("cpu"), tokens_per_nano=args.tokens, docs=docs, layers=args.layers,
                    heads=f"{h}/{hkv}x{d}", steps=args.steps, trainer_threads=1, server_threads=1)
    results = {}
    with server_processes(1, scfg) as running:
        client = CADClient(0, running.addresses, scfg.transport, backend="sdpa")
        client.register(plans[0])

        def make_fns(wqkv, wo, w1, w2):
            def pre(i, x):
                q, k, v = (x @ wqkv).split([h * d, hkv * d, hkv * d], dim=1)
                return (q.reshape(-1, h, d).contiguous(), k.reshape(-1, hkv, d).contiguous(),
                        v.reshape(-1, hkv, d).contiguous())

            def post(i, x, attn):
                x = x + attn.reshape(x.shape[0], -1) @ wo
                return x + torch.relu(x @ w1) @ w2

            return pre, post

        def run_forward(schedule) -> tuple[float, float]:
            xs = list(xs0)
            b0 = client.blocked_s
            t0 = time.perf_counter()
            with torch.no_grad():
                for w in layers:
                    xs = schedule(xs, plans, client, *make_fns(*w))
            return time.perf_counter() - t0, client.blocked_s - b0

        def run_train(overlap: bool) -> tuple[float, float]:
            xs = list(xs0)
            b0 = client.blocked_s
            t0 = time.perf_counter()
            saved = []
            for w in layers:
                xs, states = train_forward(xs, plans, client, *make_fns(*w), overlap=overlap)
                saved.append(states)
            dys = [torch.ones_like(x) / x.numel() for x in xs]
            for w, states in zip(reversed(layers), reversed(saved), strict=True):
                dys = train_backward(states, dys, plans, client, params=w, overlap=overlap)
            return time.perf_counter() - t0, client.blocked_s - b0

        modes = {
            "forward, sequential": lambda: run_forward(sequential_layer),
            "forward, ping-pong": lambda: run_forward(pingpong_layer),
            "fwd+bwd, sequential": lambda: run_train(False),
            "fwd+bwd, ping-pong": lambda: run_train(True),
        }
        for fn in modes.values():
            fn()  # warm-up
        samples = {name: [] for name in modes}
        for _ in range(args.steps):  # interleaved, so every mode sees the same machine noise
            for name, fn in modes.items():
                samples[name].append(fn())
        client.close()
    rows = []
    for name, ss in samples.items():
        base = statistics.median(s for s, _ in samples[name.split(",")[0] + ", sequential"])
        step = statistics.median(s for s, _ in ss)
        blocked = statistics.median(b for _, b in ss)
        results[name] = {"step_s": step, "blocked_s": blocked}
        rows.append([name, f"{step * 1e3:.0f}", f"{blocked * 1e3:.0f}", f"{100 * blocked / step:.0f}%",
                     f"{base / step:.2f}x"])
    write_json(out_dir("pingpong") / "pingpong.json", {"info": info, "results": results})
    print("\n".join([*header_lines("Ping-pong: one trainer + one attention server", info),
                     *markdown_table(["step, schedule", "step ms", "blocked on server ms", "exposed comm",
                                      "speedup vs sequential"], rows)]))


if __name__ == "__main__":
    main()
