"""The paper's grid run through the simulator, as table rows (markdown)."""

from __future__ import annotations

from distca.config import load_config
from distca.sim.hardware import Hardware
from distca.sim.predict import PAPER_RANGES, PAPER_RANGES_34B_4D, paper_grid, predict_point

MODEL_CONFIGS = {"8b": "configs/llama3-8b-128k.yaml", "34b": "configs/llama-34b-512k.yaml"}


def paper_range(model: str, mode: str, dist: str) -> tuple[float, float]:
    if model == "34b" and mode == "4d":
        return PAPER_RANGES_34B_4D[dist]
    return PAPER_RANGES[(mode, dist)]


def run_grid(hw: Hardware, seeds: int = 2, eps: float = 0.05, pingpong: bool = True, points=None,
             config_dir: str = ".") -> list[dict]:
    models = {k: load_config(f"{config_dir}/{v}", []).model for k, v in MODEL_CONFIGS.items()}
    out = []
    for pt in points or paper_grid():
        r = predict_point(pt, models[pt.model], hw, seeds=seeds, eps=eps, pingpong=pingpong)
        r["paper_range"] = paper_range(pt.model, pt.mode, pt.dist)
        out.append(r)
    return out


def grid_rows(results: list[dict]) -> list[str]:
    head = ["model", "mode", "GPUs", "max doc", "dist", "CAD s", "WLB s (CP)", "plain s", "CAD/WLB", "paper",
            "CAD/plain", "attn max/mean CAD | WLB | plain", "WLB tokens max/min", "CAD idle %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        p, s = r["point"], r["step_s"]
        lo, hi = r["paper_range"]
        lines.append("| " + " | ".join([
            p["model"], p["mode"], str(p["gpus"]), f"{p['max_len'] // 1024}K", p["dist"], f"{s['cad']:.2f}",
            f"{s['wlb']:.2f} ({r['wlb_cp']})", f"{s['colocated']:.2f}", f"{r['speedup_vs_wlb']:.2f}x",
            f"{lo:.2f}-{hi:.2f}x", f"{r['speedup_vs_colocated']:.2f}x",
            f"{r['cad_attn_max_over_mean']:.2f} / {r['wlb_attn_max_over_mean']:.2f} / "
            f"{r['colocated_attn_max_over_mean']:.2f}", f"{r['wlb_tokens_max_over_min']:.2f}",
            f"{100 * r['cad_idle_fraction']:.0f}"]) + " |")
    return lines
