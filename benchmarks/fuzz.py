"""Fuzz: many malformed, mutated, insider, replayed and flooding messages against real attention-server processes.

    python benchmarks/fuzz.py [--cases 5000] [--seed 16] [--secret both|on|off] [--out-dir DIR]

The fuzzer is :mod:`distca.server.fuzz` (the suite's ``tests/test_server_fuzz.py`` runs it short). Per server (one
with a secret, one without): outcome counts per mutation class (ERROR reply, dropped, accepted), messages sent,
the server's RSS before and after, whether it still answers, and whether a forward and backward round afterwards
equals the in-process execution of its plan. Writes ``fuzz.json`` and ``fuzz.png`` (outcomes per class).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _exact_round(address: str, tcfg, seed: int) -> bool:
    """One forward and backward round through a trainer client, compared with the in-process execution."""
    import torch

    from distca.runtime.client import CADClient
    from distca.runtime.plan_exec import RankTensors, execute_plan
    from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan

    plan, _ = make_plan(BatchLayout.from_ranks([[64, 32]]), Placement(1, 1, "dedicated"),
                        SchedulerConfig(eps=0.0, granularity=128, window=-1, min_offload_pairs=0))
    gen = torch.Generator().manual_seed(seed)
    t = RankTensors(*(torch.randn(96, h, 4, generator=gen) for h in (2, 1, 1)))
    dout = torch.randn(t.q.shape, generator=gen)
    client = CADClient(0, [address], tcfg, backend="sdpa")
    try:
        out, lse = client.forward(plan, t)
        dq, dk, dv = client.backward(plan, t, out, lse, dout)
    finally:
        client.close()
    want = execute_plan(plan, [t], [dout], backend="sdpa")
    got = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    return all(torch.allclose(got[k], want[k][0], rtol=1e-5, atol=1e-5) for k in got)


def main() -> None:
    import torch
    from common import header_lines, markdown_table, out_dir, run_info, write_json

    from distca.server.fuzz import CLASSES, OUTCOMES, run_fuzz
    from distca.server.loop import ServerConfig
    from distca.server.processes import server_processes
    from distca.transport.channel import TransportConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=5000, help="fuzz cases per server (a flood case is a burst)")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--secret", choices=["both", "on", "off"], default="both")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args()
    dest = Path(args.out_dir) if args.out_dir else out_dir("fuzz")
    base = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=2.0, secret=None, checksum=False,
                           shm_max_bytes=1 << 20)
    scfg = ServerConfig(n_heads=2, n_kv_heads=1, head_dim=4, dtype="float32", backend="sdpa", max_plans=16,
                        max_rows=4096, max_open_rounds=8, transport=base)
    modes = {"both": ["secret", "no secret"], "on": ["secret"], "off": ["no secret"]}[args.secret]
    results = []
    for i, mode in enumerate(modes):
        tcfg = dataclasses.replace(base, secret=b"fuzz-bench-secret" if mode == "secret" else None)
        with server_processes(1, dataclasses.replace(scfg, transport=tcfg)) as running:
            address, proc = running.addresses[0], running.processes[0]
            exact_before = _exact_round(address, tcfg, seed=0)
            before = _rss_mb(proc.pid)
            rep = run_fuzz(address, tcfg, args.cases, args.seed + i)
            after = _rss_mb(proc.pid) if proc.is_alive() else float("nan")
            exact_after = rep.alive and _exact_round(address, tcfg, seed=1)
        results.append({"mode": mode, "sent": rep.sent, "wall_s": rep.wall_s, "alive": rep.alive,
                        "late_timeouts": rep.late_timeouts, "rss_before_mb": before, "rss_after_mb": after,
                        "exact_before": exact_before, "exact_after": exact_after,
                        "counts": {c: {o: rep.counts[c][o] for o in OUTCOMES} for c in CLASSES}})
    info = run_info(torch.device("cpu"), cases=args.cases, seed=args.seed, secret=args.secret)
    lines = header_lines("Fuzz: malformed, mutated, replayed and flood messages against attention servers", info)
    rows = []
    for r in results:
        for c in CLASSES:
            n = r["counts"][c]
            rows.append([r["mode"], c, sum(n.values()), n["error"], n["drop"], n["accepted"]])
        tot = {o: sum(r["counts"][c][o] for c in CLASSES) for o in OUTCOMES}
        rows.append([r["mode"], "all", sum(tot.values()), tot["error"], tot["drop"], tot["accepted"]])
    lines += markdown_table(["server", "class", "messages", "error reply", "dropped", "accepted"], rows)
    lines.append("")
    lines += markdown_table(
        ["server", "sent", "wall s", "msgs/s", "RSS before MB", "RSS after MB", "alive", "exact after",
         "late timeouts"],
        [[r["mode"], r["sent"], f"{r['wall_s']:.1f}", f"{r['sent'] / r['wall_s']:.0f}", f"{r['rss_before_mb']:.0f}",
          f"{r['rss_after_mb']:.0f}", "yes" if r["alive"] else "NO", "yes" if r["exact_after"] else "NO",
          r["late_timeouts"]] for r in results])
    print("\n".join(lines))
    write_json(dest / "fuzz.json", {"info": info, "results": results})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
        for ax, r in zip(axes[0], results, strict=True):
            bottom = [0.0] * len(CLASSES)
            totals = [max(sum(r["counts"][c].values()), 1) for c in CLASSES]
            for o in OUTCOMES:
                vals = [100 * r["counts"][c][o] / n for c, n in zip(CLASSES, totals, strict=True)]
                ax.bar(CLASSES, vals, bottom=bottom, label=o)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            ax.set(ylabel="% of the class's messages", ylim=(0, 100), title=f"server with {r['mode']}")
            ax.tick_params(axis="x", rotation=30)
            ax.legend()
        fig.tight_layout()
        fig.savefig(dest / "fuzz.png", dpi=120)
        print(f"plot: {dest / 'fuzz.png'}")
    except ImportError:
        pass
    if not all(r["alive"] and r["exact_after"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
