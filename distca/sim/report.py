"""The paper's grid run through the simulator, as table rows (markdown)."""

from __future__ import annotations

import numpy as np

from distca.config import load_config
from distca.sim.hardware import Hardware
from distca.sim.predict import PAPER_RANGES, PAPER_RANGES_34B_4D, paper_grid, predict_point

MODEL_CONFIGS = {"8b": "configs/llama3-8b-128k.yaml", "34b": "configs/llama-34b-512k.yaml"}
LABELS = {"1f1b": "1F1B", "pooled": "pooled", "pooled+idle_aware": "idle-aware", "pooled+wgrad": "pooled+W",
          "1f1b+wgrad": "1F1B+W"}


def paper_range(model: str, mode: str, dist: str) -> tuple[float, float]:
    if model == "34b" and mode == "4d":
        return PAPER_RANGES_34B_4D[dist]
    return PAPER_RANGES[(mode, dist)]


def run_grid(hw: Hardware, seeds: int = 2, eps: float = 0.05, pingpong: bool = True, points=None,
             config_dir: str = ".", schedules: tuple[str, ...] = ("1f1b",), idle_aware: bool = False,
             layer_chunks: int = 0, defer_wgrad: bool = False, stage_split: str = "even",
             nano_split: str = "repack", pingpong_order: str = "layer", baseline_docs: str = "trained") -> list[dict]:
    models = {k: load_config(f"{config_dir}/{v}", []).model for k, v in MODEL_CONFIGS.items()}
    out = []
    for pt in points or paper_grid():
        r = predict_point(pt, models[pt.model], hw, seeds=seeds, eps=eps, pingpong=pingpong, schedules=schedules,
                          idle_aware=idle_aware, layer_chunks=layer_chunks, defer_wgrad=defer_wgrad,
                          stage_split=stage_split, nano_split=nano_split, pingpong_order=pingpong_order,
                          baseline_docs=baseline_docs)
        r["paper_range"] = paper_range(pt.model, pt.mode, pt.dist)
        out.append(r)
    return out


def _variants(results: list[dict]) -> list[str]:
    names: list[str] = []
    for r in results:
        for k in r.get("cad", {}):
            if k not in names:
                names.append(k)
    return names


def grid_rows(results: list[dict]) -> list[str]:
    """One row per point: the baseline, then per CAD schedule its step, speedup over WLB and idle share."""
    names = _variants(results)
    sched = [n for n in names if n != "pooled+idle_aware"]
    head = ["model", "mode", "GPUs", "max doc", "dist", "M", "WLB s (CP)", "plain s"]
    head += [f"CAD {LABELS.get(n, n)} s" for n in sched]
    head += [f"CAD/WLB {LABELS.get(n, n)}" for n in sched] + ["paper"]
    head += [f"idle % {LABELS.get(n, n)}" for n in names]
    if "pooled" in names:
        head += ["pooled idle % full / partial ticks", "in flight per stage 1F1B → pooled"]
    head += ["attn max/mean " + " | ".join(LABELS.get(n, n) for n in sched) + " | WLB | plain", "WLB tokens max/min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        p, s, c = r["point"], r["step_s"], r["cad"]
        lo, hi = r["paper_range"]
        row = [p["model"], p["mode"], str(p["gpus"]), f"{p['max_len'] // 1024}K", p["dist"], str(r["micro_batches"]),
               f"{s['wlb']:.2f} ({r['wlb_cp']})", f"{s['colocated']:.2f}"]
        row += [f"{c[n]['step_s']:.2f}" for n in sched]
        row += [f"{c[n]['speedup_vs_wlb']:.2f}x" for n in sched] + [f"{lo:.2f}-{hi:.2f}x"]
        row += [f"{100 * c[n]['idle_fraction']:.0f}" if n in c else "—" for n in names]
        if "pooled" in names:
            sp = c["pooled"]["idle_split"]
            row.append(f"{100 * sp['full']:.0f} / {100 * sp['partial']:.0f}")
            fl = c.get("1f1b", c["pooled"])["in_flight"]
            kept = c.get("pooled+wgrad", {}).get("wgrad_kept")
            row.append(f"{','.join(map(str, fl))} → {','.join(map(str, c['pooled']['in_flight']))}"
                       + (f" (+W keeps {','.join(map(str, kept))})" if kept and any(kept) else ""))
        row.append(" / ".join(f"{c[n]['attn_max_over_mean']:.2f}" for n in sched)
                   + f" / {r['wlb_attn_max_over_mean']:.2f} / {r['colocated_attn_max_over_mean']:.2f}")
        row.append(f"{r['wlb_tokens_max_over_min']:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def summary_rows(results: list[dict]) -> list[str]:
    """Per (model, mode): median and range of CAD/WLB per schedule and the median idle share, next to the
    paper's range per distribution."""
    names = _variants(results)
    head = ["model", "mode", "dist", "paper"] + [f"CAD/WLB {LABELS.get(n, n)} median (range)" for n in names
                                                 if n != "pooled+idle_aware"]
    head += [f"idle % {LABELS.get(n, n)} median (range)" for n in names]
    head += ["points below the paper (" + " → ".join(LABELS.get(n, n) for n in names if n != "pooled+idle_aware") + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        p = r["point"]
        groups.setdefault((p["model"], p["mode"], p["dist"]), []).append(r)
    for (model, mode, dist), rs in groups.items():
        lo, hi = rs[0]["paper_range"]
        row = [model, mode, dist, f"{lo:.2f}-{hi:.2f}x"]
        below = []
        for n in names:
            if n == "pooled+idle_aware":
                continue
            v = [r["cad"][n]["speedup_vs_wlb"] for r in rs]
            row.append(f"{np.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})")
            below.append(str(sum(1 for x in v if x < lo)))
        for n in names:
            v = [100 * r["cad"][n]["idle_fraction"] for r in rs if n in r["cad"]]
            row.append(f"{np.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" if v else "—")
        row.append(" → ".join(below) + f" of {len(rs)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines
