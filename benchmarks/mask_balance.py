"""Mask families in the CAD planner: balance, planning time and bytes with exact vs convex key hulls.

For each mask family (one family per layer, the whole batch), each length distribution and each server count,
plan one packed batch with the CAD planner and report the busiest server's attention work over the mean (the
bound is ``1 + eps``), planning and compile time, and the bytes dispatched across devices (q + k + v rows sent
to a server on another device, as a fraction of all q/k/v bytes of the batch) with **exact** family-aware key
hulls (a task receives exactly the key ranges its mask lets it see: a sink plus a window is two runs) against
the same planner with hulls **convex** (``SchedulerConfig(exact_keys=False)``: one range [first key, last
key + 1) per task and per (server, document), what a causal-only planner would ship).

Settings (those of ``benchmarks/scheduler.py``): 128K tokens per rank (the maximum document length), colocated
placement (server i on trainer i's device), eps 0.02 and 128-token shards (the default run's scheduler
settings), Llama-3-8B shape (32 q heads, 8 kv heads, head dim 128, bf16). Family parameters, chosen after
models that use them:

- ``causal``
- ``window:4096``          sliding window of 4096 keys (Mistral-7B; Gemma 3's local layers use 1024)
- ``chunked:8192``         chunked attention, 8192-token chunks (Llama 4's local layers)
- ``sink_window:4:4096``   4 attention-sink tokens plus a 4096-key window (StreamingLLM)
- ``prefix_lm:2048``       bidirectional over a 2048-token prefix (an instruction/prompt), causal after
- ``bidirectional``        every key of the document (an encoder)

    python benchmarks/mask_balance.py               # 2 distributions x 64 and 512 servers x 6 families
    python benchmarks/mask_balance.py --seeds 3     # more batches per cell
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, header_lines, markdown_table, out_dir, run_info, write_json

from distca.attention.cost import AttentionShape
from distca.config import DistCAConfig
from distca.data.distributions import LengthDistribution
from distca.data.packing import pack_into_ranks
from distca.masks import Mask
from distca.parts import scheduler_settings
from distca.scheduler import BatchLayout, Placement, make_plan

K = 1024
FAMILIES = ["causal", "window:4096", "chunked:8192", "sink_window:4:4096", "prefix_lm:2048", "bidirectional"]


def _batch(dist: str, n_ranks: int, ctx: int, seed: int) -> BatchLayout:
    d = LengthDistribution(dist).scaled_to(ctx)
    lengths = d.sample(total_tokens=n_ranks * ctx, seed=seed)
    packed = pack_into_ranks(lengths, n_ranks, ctx)
    return BatchLayout.from_ranks(packed.ranks, packed.continues)


def _measure(batch: BatchLayout, n: int, mask: Mask, exact: bool, eps: float, shape: AttentionShape) -> dict:
    cfg = dataclasses.replace(scheduler_settings(DistCAConfig(), -1), eps=eps, window=None, mask=mask,
                              exact_keys=exact)
    t0 = time.perf_counter()
    plan, timing = make_plan(batch, Placement(n, n), cfg, shape)
    wall = time.perf_counter() - t0
    kv_row = plan.row_bytes("k") + plan.row_bytes("v")
    total = int(batch.rank_tokens.sum()) * (plan.row_bytes("q") + kv_row)
    kv = int(plan.kv_xfer.n[plan.kv_xfer.remote].sum()) * kv_row
    return {"max_over_mean": plan.max_over_mean, "bytes_frac": plan.bytes_moved / total, "kv_frac": kv / total,
            "bytes": plan.bytes_moved, "plan_ms": timing.plan_ms, "compile_ms": timing.compile_ms,
            "wall_ms": wall * 1e3, "n_tasks": plan.n_tasks}


def run(families, dists, servers, ctx, eps, seeds) -> list[dict]:
    shape = AttentionShape()
    rows = []
    for dist in dists:
        for n in servers:
            batches = [_batch(dist, n, ctx, s) for s in range(seeds)]
            for spec in families:
                mask = Mask.parse(spec)
                res = {k: [_measure(b, n, mask, k == "exact", eps, shape) for b in batches] for k in ("exact", "hull")}
                row = {"family": spec, "dist": dist, "servers": n, "ctx": ctx, "eps": eps,
                       "docs": statistics.fmean(b.n_docs for b in batches)}
                for k, rs in res.items():
                    row[k] = {"max_over_mean_worst": max(r["max_over_mean"] for r in rs),
                              "bytes_frac": statistics.fmean(r["bytes_frac"] for r in rs),
                              "kv_frac": statistics.fmean(r["kv_frac"] for r in rs),
                              "bytes": statistics.fmean(r["bytes"] for r in rs),
                              "plan_ms": statistics.median(r["plan_ms"] for r in rs),
                              "compile_ms": statistics.median(r["compile_ms"] for r in rs),
                              "n_tasks": statistics.median(r["n_tasks"] for r in rs)}
                rows.append(row)
                e, h = row["exact"], row["hull"]
                print(f"  {spec} {dist} S={n}: max/mean {e['max_over_mean_worst']:.4f} bytes {e['bytes_frac']:.3f} "
                      f"(convex {h['bytes_frac']:.3f}) plan {e['plan_ms']:.0f} ms", file=sys.stderr, flush=True)
    return rows


def table(rows) -> list[str]:
    cols = ["family", "dist", "S", "max/mean exact (worst)", "max/mean convex", "plan ms", "compile ms",
            "bytes exact", "bytes convex", "kv exact", "kv convex", "saved"]
    out = []
    for r in rows:
        e, h = r["exact"], r["hull"]
        saved = 1 - e["bytes"] / h["bytes"] if h["bytes"] else 0.0
        out.append([r["family"], r["dist"], r["servers"], f"{e['max_over_mean_worst']:.4f}",
                    f"{h['max_over_mean_worst']:.4f}", f"{e['plan_ms']:.0f}", f"{e['compile_ms']:.0f}",
                    f"{e['bytes_frac']:.4f}", f"{h['bytes_frac']:.4f}", f"{e['kv_frac']:.4f}", f"{h['kv_frac']:.4f}",
                    f"{100 * saved:.1f}%"])
    return markdown_table(cols, out)


def verdict(rows) -> list[str]:
    tol = 1e-3  # as benchmarks/scheduler.py: token-granular cuts keep the bound up to one query token's work
    over = [r for r in rows for k in ("exact", "hull") if r[k]["max_over_mean_worst"] > 1 + r["eps"] + tol]
    more = [r for r in rows if r["exact"]["bytes"] > r["hull"]["bytes"]]
    lines = [f"- cells: {len(rows)}; max/mean above 1+eps (+{tol}) in {len(over)} (exact or convex hulls); exact "
             f"hulls moved more bytes than convex ones in {len(more)}"]
    for r in over:
        lines.append(f"  - over the bound: {r['family']} {r['dist']} S={r['servers']}")
    for r in more:
        lines.append(f"  - more bytes with exact hulls: {r['family']} {r['dist']} S={r['servers']}: "
                     f"{r['exact']['bytes_frac']:.4f} vs {r['hull']['bytes_frac']:.4f}")
    return lines


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["dist"], r["servers"]) for r in rows})
    fams = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / len(cells)
    x = np.arange(len(fams))
    for i, (dist, n) in enumerate(cells):
        sel = {r["family"]: r for r in rows if r["dist"] == dist and r["servers"] == n}
        off = x - 0.4 + width * (i + 0.5)
        axes[0].bar(off, [sel[f]["exact"]["max_over_mean_worst"] - 1 for f in fams], width, label=f"{dist}, {n}")
        axes[1].bar(off, [sel[f]["exact"]["bytes_frac"] for f in fams], width, label=f"{dist}, {n} exact")
        axes[1].bar(off, [sel[f]["hull"]["bytes_frac"] - sel[f]["exact"]["bytes_frac"] for f in fams], width,
                    bottom=[sel[f]["exact"]["bytes_frac"] for f in fams], color="none", edgecolor="k", hatch="//",
                    linewidth=0.5)
    eps = rows[0]["eps"]
    axes[0].axhline(eps, color="k", ls="--", lw=1, label=f"eps = {eps}")
    axes[0].set_ylabel("max/mean - 1 (worst seed)")
    axes[0].set_title("balance per mask family (bound: eps)")
    axes[1].set_ylabel("bytes moved / all q,k,v bytes")
    axes[1].set_title("bytes: exact key hulls (solid) vs convex (hatched extra)")
    for ax in axes:
        ax.set_xticks(x, fams, rotation=20, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, title="dist, servers", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=FAMILIES, help="mask specs (Mask.parse)")
    p.add_argument("--dists", nargs="+", default=["pretrain", "prolong"])
    p.add_argument("--servers", nargs="+", type=int, default=[64, 512])
    p.add_argument("--context", type=int, default=128 * K, help="tokens per rank")
    p.add_argument("--eps", type=float, default=DistCAConfig().scheduler.eps)
    p.add_argument("--seeds", type=int, default=1, help="batches per cell")
    p.add_argument("--out-dir", default=None, help="folder for the JSON (default out/mask_balance)")
    p.add_argument("--plot", default=str(REPO_ROOT / "docs/figures/mask_balance.png"))
    args = p.parse_args()
    torch.set_num_threads(1)
    info = run_info(torch.device("cpu"), seeds=args.seeds, placement="colocated", shape="32q/8kv/128/bf16",
                    context=args.context, eps=args.eps)
    rows = run(args.families, args.dists, args.servers, args.context, args.eps, args.seeds)
    folder = Path(args.out_dir) if args.out_dir else out_dir("mask_balance")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "mask_balance.json", {"info": info, "rows": rows})
    plot(rows, Path(args.plot))
    print("\n".join([*header_lines("Mask families: balance and bytes (exact vs convex key hulls)", info),
                     *table(rows), "", *verdict(rows), "", f"plot: {args.plot}"]))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
