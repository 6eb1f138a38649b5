"""Cluster simulator benchmarks: validation against measured steps, and the paper's grid.

``validate``
    Calibrates the simulator on this machine (one block's linear work, single attention tasks, the
    optimizer step and ZeroMQ ipc, with the threads a trainer uses), replays every step that
    ``benchmarks/e2e.py`` measured — same model, parallelism, scheduler settings and the exact packed
    documents — and compares the median predicted step time with the measured one, per run.
``grid``
    Predicts CAD vs the WLB-LLM-style baseline (and plain colocated packing) over the paper's grid
    (8B/34B; 64-512 GPUs; 128K-512K maximum document length; pretrain/prolong; 3D and 4D), with a
    table and a plot next to the paper's published ranges.

    python benchmarks/simulate.py validate --run-e2e     # calibrate, run e2e.py, calibrate, compare
    python benchmarks/simulate.py validate [--e2e out/e2e/e2e.json]   # replay an existing e2e.json
    python benchmarks/simulate.py grid [--hardware distca/sim/data/h200-measured.json] [--seeds 3]

Results go to out/sim/ (JSON and PNG); the printed tables paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_lines, markdown_table, out_dir, run_info, write_json

from distca.config import ModelConfig
from distca.sim.cli import load_hardware
from distca.sim.report import grid_rows, run_grid


def _calibrate(config: dict):
    from distca.sim.calibrate import calibrate_host

    model = ModelConfig(**config["model"])
    dtype = torch.bfloat16 if config["train"]["precision"] == "bf16" else torch.float32
    tokens = int(config["train"]["tokens_per_rank"])
    hw, _ = calibrate_host(model, tokens=(max(tokens // 4, 256), max(tokens // 2, 512), tokens), dtype=dtype,
                           threads=int(config.get("threads") or 1), name="this host (calibrated)",
                           ranks=int(config["cluster"]["n_trainers"]))
    return hw


def validate(args) -> None:
    import subprocess

    from distca.sim.calibrate import average_hardware
    from distca.sim.validate import validate_file

    dest = out_dir("sim")
    if args.run_e2e:
        # calibrate, measure, calibrate: the machine drifts, so the model gets the mean of both sides
        from distca.config import load_config

        before = _calibrate(load_config(args.config, []).to_dict())
        # the modes the simulator models: colocated, and CAD servers as separate processes (the ZeroMQ pool)
        subprocess.run([sys.executable, str(Path(__file__).parent / "e2e.py"), "--config", args.config, "--steps",
                        str(args.steps), "--modes", "local", "cad-zmq", "--out-dir", str(Path(args.e2e).parent)],
                       check=True)
        after = _calibrate(json.loads(Path(args.e2e).read_text())["runs"].popitem()[1]["config"])
        parts = [before, after]
    else:
        parts = [_calibrate(next(iter(json.loads(Path(args.e2e).read_text())["runs"].values()))["config"])]
    hw = average_hardware(parts, name="this host (calibrated)")
    hw.save(dest / "host.json")
    spread = {f"calibration_{i}": validate_file(args.e2e, p) for i, p in enumerate(parts)}
    res = validate_file(args.e2e, hw)
    nominal = validate_file(args.e2e, dataclasses.replace(hw, cores=float(os.cpu_count() or 1)))
    info = run_info(torch.device("cpu"), e2e=args.e2e, effective_cores=round(hw.cores, 2),
                    linear_gflops=round(hw.linear_flops / 1e9, 2),
                    linear_overhead_ms=round(1e3 * hw.linear_overhead_s, 3),
                    ipc_gbps=round(hw.intra.bandwidth / 1e9, 2), ipc_latency_us=round(1e6 * hw.intra.latency_s, 1))
    rows = [[name, r["system"], r["steps"], f"{r['measured_s']:.3f}", f"{r['predicted_s']:.3f}",
             f"{100 * r['error']:+.1f}%", "yes" if abs(r["error"]) <= 0.20 else "NO",
             f"{nominal[name]['predicted_s']:.3f} ({100 * nominal[name]['error']:+.1f}%)"] for name, r in res.items()]
    lines = [*header_lines("Simulator validation: predicted vs measured step time (CPU simulated cluster)", info),
             *markdown_table(["run", "attention", "steps", "measured s (median)", "predicted s (median)", "error",
                              "within 20%", f"predicted with {os.cpu_count()} nominal cores"], rows)]
    lines += ["", "Each calibration alone (the machine drifts between them): " + "; ".join(
        f"#{i}: cores {p.cores:.2f}, linear {p.linear_flops / 1e9:.1f} GFLOP/s -> errors "
        + ", ".join(f"{n} {100 * r['error']:+.0f}%" for n, r in spread[f'calibration_{i}'].items())
        for i, p in enumerate(parts))]
    print("\n".join(lines))
    write_json(dest / "validate.json", {"info": info, "results": res, "nominal_cores": nominal,
                                        "per_calibration": spread, "hardware": json.loads(hw.to_json())})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4.5))
        top = 0.0
        for name, r in res.items():
            m, p = zip(*r["per_step"], strict=True)
            ax.scatter(m, p, label=name, s=18)
            top = max(top, *m, *p)
        ax.plot([0, top], [0, top], "k-", lw=0.8)
        ax.fill_between([0, top], [0, 0.8 * top], [0, 1.2 * top], color="grey", alpha=0.15, label="±20%")
        ax.set(xlabel="measured step s", ylabel="predicted step s", title="simulator vs measured (per step)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(dest / "validate.png", dpi=120)
        print(f"plot: {dest / 'validate.png'}")
    except ImportError:
        print("matplotlib not installed: no plot")


def grid(args) -> None:
    hw = load_hardware(args.hardware)
    results = run_grid(hw, seeds=args.seeds, eps=args.eps, pingpong=not args.no_pingpong)
    info = run_info(torch.device("cpu"), hardware=hw.name, seeds=args.seeds, eps=args.eps,
                    pingpong=not args.no_pingpong, tp=8)
    lines = [*header_lines(f"Simulated speedup at the paper's scales ({hw.name})", info), *grid_rows(results)]
    sp = [r["speedup_vs_wlb"] for r in results]
    inside = sum(1 for r in results if r["paper_range"][0] <= r["speedup_vs_wlb"] <= r["paper_range"][1])
    lines += ["", f"CAD / WLB-style: median {sorted(sp)[len(sp) // 2]:.2f}x, range {min(sp):.2f}-{max(sp):.2f}x; "
                  f"{inside} of {len(sp)} points inside the paper's range for their setting"]
    for line in lines:
        print(line)
    dest = out_dir("sim")
    stem = Path(args.hardware).stem
    write_json(dest / f"grid-{stem}.json", {"info": info, "sources": hw.sources, "results": results})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("3d", "pretrain"), ("3d", "prolong"), ("4d", "pretrain"), ("4d", "prolong")]
        fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
        marks = {"8b": "o", "34b": "s"}
        colors = {128 * 1024: "tab:blue", 256 * 1024: "tab:orange", 384 * 1024: "tab:purple", 512 * 1024: "tab:red"}
        for ax, (mode, dist) in zip(axes, panels, strict=True):
            pts = [r for r in results if r["point"]["mode"] == mode and r["point"]["dist"] == dist]
            for r in pts:
                p = r["point"]
                ax.scatter(p["gpus"] * (1.06 if p["model"] == "34b" else 0.94), r["speedup_vs_wlb"],
                           marker=marks[p["model"]], color=colors.get(p["max_len"], "k"), s=30)
            for model, ls in (("8b", "-"), ("34b", "--")):
                rr = [r["paper_range"] for r in pts if r["point"]["model"] == model]
                if rr:
                    lo, hi = rr[0]
                    ax.axhspan(lo, hi, color="green" if model == "8b" else "olive", alpha=0.12)
                    ax.axhline(hi, color="green" if model == "8b" else "olive", ls=ls, lw=0.8)
            ax.axhline(1.0, color="k", lw=0.6)
            ax.set_xscale("log", base=2)
            ax.set(title=f"{mode.upper()} {dist}", xlabel="GPUs")
        axes[0].set_ylabel("CAD / WLB-style step time")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker=m, ls="", color="grey", label=k) for k, m in marks.items()]
        handles += [Line2D([], [], marker="o", ls="", color=c, label=f"{L // 1024}K") for L, c in colors.items()]
        axes[-1].legend(handles=handles, fontsize=7, loc="upper left")
        fig.suptitle(f"Predicted CAD speedup over WLB-style packing + per-document CP ({hw.name}); "
                     "shaded: the paper's published range (green 8B, olive 34B)", fontsize=9)
        fig.tight_layout()
        fig.savefig(dest / f"grid-{stem}.png", dpi=110)
        print(f"plot: {dest / f'grid-{stem}.png'}")
    except ImportError:
        print("matplotlib not installed: no plot")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("--e2e", default="out/e2e/e2e.json")
    v.add_argument("--run-e2e", action="store_true",
                   help="run benchmarks/e2e.py now, between a calibration before and one after it")
    v.add_argument("--config", default="configs/tiny-cpu.yaml")
    v.add_argument("--steps", type=int, default=10)
    g = sub.add_parser("grid")
    g.add_argument("--hardware", default="distca/sim/data/h200-measured.json")
    g.add_argument("--seeds", type=int, default=3)
    g.add_argument("--eps", type=float, default=0.05)
    g.add_argument("--no-pingpong", action="store_true")
    args = p.parse_args()
    validate(args) if args.cmd == "validate" else grid(args)


if __name__ == "__main__":
    main()
