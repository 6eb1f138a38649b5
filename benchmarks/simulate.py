"""Cluster simulator benchmarks: validation against measured steps, and the paper's grid.

``validate``
    Calibrates the simulator on this machine (one block's linear work, single attention tasks, the
    optimizer step and ZeroMQ ipc, with the threads a trainer uses), replays every step that
    ``benchmarks/e2e.py`` measured — same model, parallelism, scheduler settings and the exact packed
    documents — and compares the median predicted step time with the measured one, per run. With
    ``--run-e2e`` it measures ``--repeats`` times, calibrating before the first repeat and after each
    one; every run is replayed on the two calibrations around it, each component (linear rate, attention
    table, links, pool costs, cores) at the faster of the two (a slow moment only slows a calibration; the
    cores other tenants took from the run itself are measured apart), and the table gives each repeat's
    error and the spread.
``grid``
    Predicts CAD vs the WLB-LLM-style baseline (and plain colocated packing) over the paper's grid
    (8B/34B; 64-512 GPUs; 128K-512K maximum document length; pretrain/prolong; 3D and 4D), with a
    table and a plot next to the paper's published ranges.

    python benchmarks/simulate.py validate --run-e2e [--repeats 3] [--steps 6] [--set train.pingpong=true]
                                           # calibrate, then per repeat: run e2e.py, calibrate; compare
    python benchmarks/simulate.py validate [--e2e out/e2e/e2e.json ...]   # replay existing e2e.json files
    python benchmarks/simulate.py grid [--hardware distca/sim/data/h200-measured.json] [--seeds 3]
                                       [--schedule 1f1b|pooled|both] [--mode 3d|4d|all] [--no-wgrad]

Results go to out/sim/ (JSON and PNG); the printed tables paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_lines, markdown_table, out_dir, run_info, write_json

from distca.config import ModelConfig
from distca.sim.cli import load_hardware
from distca.sim.predict import paper_grid
from distca.sim.report import grid_rows, run_grid, summary_rows


def _calibrate(config: dict):
    from distca.sim.calibrate import calibrate_host

    model = ModelConfig(**config["model"])
    dtype = torch.bfloat16 if config["train"]["precision"] == "bf16" else torch.float32
    tokens = int(config["train"]["tokens_per_rank"])
    hw, _ = calibrate_host(model, tokens=(max(tokens // 4, 256), max(tokens // 2, 512), tokens), dtype=dtype,
                           threads=int(config.get("threads") or 1), name="this host (calibrated)",
                           ranks=int(config["cluster"]["n_trainers"]))
    return hw


def _run_e2e(args, out_dir: Path) -> float:
    import subprocess
    import time

    t0 = time.time()
    overrides = [f"--{kv}" for kv in args.set]
    subprocess.run([sys.executable, str(Path(__file__).parent / "e2e.py"), "--config", args.config, "--steps",
                    str(args.steps), "--modes", "local", "cad-zmq", "--out-dir", str(out_dir), *overrides], check=True)
    return time.time() - t0


def _run_spans(e2e: dict, t0: float, t1: float) -> dict[str, tuple[float, float, float]]:
    """Per run of one e2e invocation that ran from ``t0`` to ``t1``: its start and end (its share of the
    invocation's wall time, in order) and its midpoint as a fraction of the invocation (0: at the
    calibration before it, 1: at the one after)."""
    walls = {name: float(r.get("wall_s") or 1.0) for name, r in e2e["runs"].items()}
    total, done, out = sum(walls.values()), 0.0, {}
    for name, w in walls.items():
        a, b = done / total, (done + w) / total
        out[name] = (t0 + a * (t1 - t0), t0 + b * (t1 - t0), (a + b) / 2)
        done += w
    return out


def validate(args) -> None:
    import dataclasses
    import os
    import time

    from distca.sim.calibrate import average_hardware, fastest_hardware
    from distca.sim.hostload import HostLoad
    from distca.sim.validate import replay

    dest = out_dir("sim")
    load = HostLoad().start() if HostLoad.available() else None
    ncpu = float(os.cpu_count() or 1)

    def calibrate(config):
        a = time.time()
        hw = _calibrate(config)
        b = time.time()
        return {"t": (a, b), "hw": hw, "foreign": load.foreign_cores(a, b) if load else 0.0}

    if args.run_e2e:
        # calibrations interleaved with the measured runs: before the first repeat, then after each one;
        # each run is replayed on the two calibrations around it, weighted by how near in time it is
        from distca.config import load_config

        cals = [calibrate(load_config(args.config, []).to_dict())]
        files, windows = [], []
        for i in range(args.repeats):
            path = dest / f"e2e-r{i}" / "e2e.json"
            t0 = time.time()
            wall = _run_e2e(args, path.parent)
            windows.append((t0, time.time()))
            print(f"repeat {i}: e2e {wall:.0f} s, others took "
                  f"{load.foreign_cores(t0, time.time()) if load else float('nan'):.2f} cores", file=sys.stderr,
                  flush=True)
            files.append(path)
            cals.append(calibrate(json.loads(path.read_text())["runs"].popitem()[1]["config"]))
    else:
        files = [Path(p) for p in args.e2e]
        cfg = next(iter(json.loads(files[0].read_text())["runs"].values()))["config"]
        cals = [calibrate(cfg)] * (len(files) + 1)
        windows = [None] * len(files)
    if load:
        load.stop()
    results: list[dict] = []  # one per repeat: run -> replay (+ other calibrations' errors)
    for i, path in enumerate(files):
        e2e = json.loads(path.read_text())
        before, after = cals[i], cals[i + 1]
        spans = _run_spans(e2e, *(windows[i] or (0.0, 1.0)))
        rep = {}
        for name, run in e2e["runs"].items():
            a, b, f = spans[name]
            # each component at the faster of the two calibrations around the run (fastest_hardware: a slow
            # moment only slows a calibration down); the interpolation in time is kept for comparison
            hw = fastest_hardware([before["hw"], after["hw"]], name="this host (calibrated)")
            lerp = average_hardware([before["hw"], after["hw"]], name="this host (calibrated)", weights=[1 - f, f])
            r_raw = replay(run, hw)
            # the calibrated cores (throughput of our processes relative to one alone) on the part of the
            # host that other tenants left to the run
            f_cal = (1 - f) * before["foreign"] + f * after["foreign"]
            f_run = load.foreign_cores(a, b) if load and windows[i] else 0.0
            share = max(0.0, ncpu - f_run) / ncpu
            cores = max(0.25, hw.cores * share)
            r = replay(run, dataclasses.replace(hw, cores=cores))
            r.update(weight_after=f, foreign_cal=f_cal, foreign_run=f_run, cores=cores,
                     error_uncorrected=r_raw["error"], predicted_uncorrected_s=r_raw["predicted_s"],
                     error_interpolated=replay(run, dataclasses.replace(lerp, cores=max(0.25, lerp.cores * share)))[
                         "error"],
                     error_before_only=replay(run, before["hw"])["error"],
                     error_after_only=replay(run, after["hw"])["error"])
            rep[name] = r
        results.append(rep)
    cals_hw = [c["hw"] for c in cals]
    hw_all = average_hardware(cals_hw, name="this host (calibrated)")
    hw_all.save(dest / "host.json")
    info = run_info(torch.device("cpu"), e2e=" ".join(str(f) for f in files), repeats=len(files), steps=args.steps,
                    overrides=" ".join(args.set) or "none",
                    effective_cores=" ".join(f"{c['hw'].cores:.2f}" for c in cals),
                    foreign_cores_at_calibrations=" ".join(f"{c['foreign']:.2f}" for c in cals),
                    linear_gflops=" ".join(f"{c['hw'].linear_flops / 1e9:.1f}" for c in cals),
                    ipc_gbps=round(hw_all.intra.bandwidth / 1e9, 2),
                    ipc_latency_us=round(1e6 * hw_all.intra.latency_s, 1))
    names = list(results[0])
    rows = []
    for name in names:
        errs = [rep[name]["error"] for rep in results if name in rep]
        cells = [f"{rep[name]['measured_s']:.3f} / {rep[name]['predicted_s']:.3f} ({100 * rep[name]['error']:+.1f}%)"
                 if name in rep else "—" for rep in results]
        rows.append([name, results[0][name]["system"], *cells,
                     f"{100 * min(errs):+.1f}% to {100 * max(errs):+.1f}%",
                     f"{sum(1 for e in errs if abs(e) <= 0.20)} of {len(errs)}"])
    lines = [*header_lines("Simulator validation: predicted vs measured step time (CPU simulated cluster)", info),
             *markdown_table(["run", "attention", *[f"repeat {i + 1}: measured / predicted s (error)"
                                                    for i in range(len(results))], "error spread", "within 20%"],
                             rows)]
    drift = [[f"{i + 1}", name, f"{r['foreign_cal']:.2f}", f"{r['foreign_run']:.2f}", f"{r['cores']:.2f}",
              f"{100 * r['error']:+.1f}%", f"{100 * r['error_uncorrected']:+.1f}%",
              f"{100 * r['error_interpolated']:+.1f}%",
              f"{100 * r['error_before_only']:+.0f}% / {100 * r['error_after_only']:+.0f}%"]
             for i, rep in enumerate(results) for name, r in rep.items()]
    lines += ["", "Per run: cores other tenants took around the calibrations (interpolated) and during the run, "
                  "the cores the replay gives our processes, and the error with that correction (each component "
                  "at the faster of the two calibrations around the run), without it, with the two calibrations "
                  "interpolated in time instead (the estimator before 2026-12-02 18:00 UTC), and on the "
                  "calibration before / after alone:", "",
              *markdown_table(["repeat", "run", "others' cores at calibration", "others' cores in run",
                               "our cores", "error", "error without load correction", "error, interpolated",
                               "before / after alone"], drift)]
    print("\n".join(lines))
    cal_json = [{"t": c["t"], "foreign_cores": c["foreign"], "hardware": json.loads(c["hw"].to_json())}
                for c in cals]
    write_json(dest / "validate.json", {"info": info, "repeats": results, "calibrations": cal_json})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4.5))
        top = 0.0
        for name in names:
            pts = [xy for rep in results if name in rep for xy in rep[name]["per_step"]]
            m, p = zip(*pts, strict=True)
            ax.scatter(m, p, label=name, s=14)
            top = max(top, *m, *p)
        ax.plot([0, top], [0, top], "k-", lw=0.8)
        ax.fill_between([0, top], [0, 0.8 * top], [0, 1.2 * top], color="grey", alpha=0.15, label="±20%")
        ax.set(xlabel="measured step s", ylabel="predicted step s",
               title=f"simulator vs measured (per step, {len(results)} repeats)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(dest / "validate.png", dpi=120)
        print(f"plot: {dest / 'validate.png'}")
    except ImportError:
        print("matplotlib not installed: no plot")


def _schedules(arg: str) -> tuple[str, ...]:
    return ("1f1b", "pooled") if arg == "both" else (arg,)


def grid(args) -> None:
    hw = load_hardware(args.hardware)
    schedules = _schedules(args.schedule)
    idle_aware = "pooled" in schedules and not args.no_idle_aware
    wgrad = not args.no_wgrad
    points = [p for p in paper_grid() if args.mode == "all" or p.mode == args.mode]
    results = run_grid(hw, seeds=args.seeds, eps=args.eps, pingpong=not args.no_pingpong, schedules=schedules,
                       idle_aware=idle_aware, layer_chunks=args.layer_chunks, defer_wgrad=wgrad, points=points,
                       stage_split=args.stage_split, nano_split=args.nano_split,
                       pingpong_order=args.pingpong_order, baseline_docs=args.baseline_docs)
    info = run_info(torch.device("cpu"), hardware=hw.name, seeds=args.seeds, eps=args.eps,
                    pingpong=not args.no_pingpong, tp=8, schedules="/".join(schedules), idle_aware=idle_aware,
                    deferred_weight_grads=wgrad, stage_split=args.stage_split, nano_split=args.nano_split,
                    pingpong_order=args.pingpong_order, baseline_docs=args.baseline_docs, mode=args.mode,
                    layer_chunks=args.layer_chunks or "per layer")
    lines = [*header_lines(f"Simulated speedup at the paper's scales ({hw.name})", info), *grid_rows(results)]
    lines += ["", *summary_rows(results), ""]
    for sch in (*schedules, *([f"{x}+wgrad" for x in schedules] if wgrad else [])):
        sp = [r["cad"][sch]["speedup_vs_wlb"] for r in results]
        lows = [r["paper_range"][0] for r in results]
        inside = sum(1 for r, x in zip(results, sp, strict=True) if r["paper_range"][0] <= x <= r["paper_range"][1])
        below = sum(1 for x, lo in zip(sp, lows, strict=True) if x < lo)
        idle4 = [r["cad"][sch]["idle_fraction"] for r in results if r["point"]["mode"] == "4d"]
        lines.append(f"CAD {sch} / WLB-style: median {float(np.median(sp)):.2f}x, "
                     f"range {min(sp):.2f}-{max(sp):.2f}x; "
                     f"{inside} of {len(sp)} points inside the paper's range, {below} below"
                     + (f"; 4D idle share median {100 * float(np.median(idle4)):.1f}% "
                        f"({100 * min(idle4):.1f}-{100 * max(idle4):.1f}%)" if idle4 else ""))
    if idle_aware:
        idle4 = [r["cad"]["pooled+idle_aware"] for r in results if r["point"]["mode"] == "4d"]
        lines.append(f"pooled with the idle-aware what-if balance (4D): idle share median "
                     f"{100 * float(np.median([x['idle_fraction'] for x in idle4])):.1f}%, CAD/WLB median "
                     f"{float(np.median([x['speedup_vs_wlb'] for x in idle4])):.2f}x")
    for line in lines:
        print(line)
    dest = out_dir("sim")
    stem = (Path(args.hardware).stem + ("" if args.nano_split == "repack" else f"-{args.nano_split}")
            + ("" if args.pingpong_order == "layer" else f"-{args.pingpong_order}")
            + ("" if args.baseline_docs == "trained" else f"-{args.baseline_docs}-docs"))
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
    v.add_argument("--e2e", nargs="+", default=["out/e2e/e2e.json"], help="replay these e2e.json files")
    v.add_argument("--run-e2e", action="store_true",
                   help="run benchmarks/e2e.py --repeats times now, calibrating before the first and after each")
    v.add_argument("--repeats", type=int, default=3, help="e2e invocations with --run-e2e (default 3)")
    v.add_argument("--config", default="configs/tiny-cpu.yaml")
    v.add_argument("--steps", type=int, default=6, help="steps per e2e run (the first is left out)")
    v.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every e2e run, e.g. train.pipeline_schedule=pooled or "
                        "train.pingpong=true (the replay reads them back from the run's config)")
    g = sub.add_parser("grid")
    g.add_argument("--hardware", default="distca/sim/data/h200-measured.json")
    g.add_argument("--seeds", type=int, default=3)
    g.add_argument("--eps", type=float, default=0.05)
    g.add_argument("--no-pingpong", action="store_true")
    g.add_argument("--schedule", choices=["1f1b", "pooled", "both"], default="both",
                   help="CAD's pipeline schedule: DeepSpeed's 1F1B with per-stage plans, the pooled tick-aligned "
                        "schedule with one plan per tick over every device, or both side by side")
    g.add_argument("--no-idle-aware", action="store_true",
                   help="skip the pooled schedule's idle-aware what-if balance (4D points)")
    g.add_argument("--no-wgrad", action="store_true",
                   help="leave out the schedules with deferred weight gradients (train.defer_weight_grads)")
    g.add_argument("--mode", choices=["3d", "4d", "all"], default="all",
                   help="only the grid's 3D or 4D points (deferred weight gradients change only 4D)")
    g.add_argument("--stage-split", choices=["even", "balanced"], default="even",
                   help="blocks per pipeline stage for every system (train.stage_split; balanced: fewer on the last "
                        "stage, for its LM head)")
    g.add_argument("--nano-split", choices=["repack", "rows", "prefix"], default="repack",
                   help="CAD's ping-pong nano-batches: repack (independent halves, documents cut at the half: the "
                        "paper's driver and train.nano_split: repack), rows (the halves of every rank's rows, exact: "
                        "train.nano_split: rows) or prefix (exact, the first round needs none of the second's keys; "
                        "a what-if, not built; see SimOptions)")
    g.add_argument("--baseline-docs", choices=["trained", "whole"], default="trained",
                   help="the documents the baselines attend: trained (the ones CAD trains, cut where its packing "
                        "cuts them: micro-batch boundaries, and the half with repack) or whole (the sampled "
                        "documents, as grids before 2026-12-03 13:30 UTC; credits CAD with the attention its cuts "
                        "remove)")
    g.add_argument("--pingpong-order", choices=["layer", "fused"], default="layer",
                   help="layer: the trainer's per-block order; fused: the paper's Fig. 7 order (post of layer l with "
                        "pre of layer l + 1 per nano-batch), a what-if the trainer does not run (not with --nano-split "
                        "rows)")
    g.add_argument("--layer-chunks", type=int, default=0,
                   help="attention rounds per stage and pass (0: one per layer, the default)")
    args = p.parse_args()
    validate(args) if args.cmd == "validate" else grid(args)


if __name__ == "__main__":
    main()
