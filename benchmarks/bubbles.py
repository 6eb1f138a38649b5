"""Pipeline bubbles on the CPU cluster: per-stage busy/idle timelines of one step, DeepSpeed's 1F1B vs the pooled,
tick-aligned schedule (issue 14), without and with deferred weight gradients, side by side in one invocation.

    python benchmarks/bubbles.py [--steps 4] [--pp 2 4] [--micro-batches 4] [--config configs/tiny-cpu.yaml]
                                 [--out docs/figures/bubbles.png] [--long] [override ...]

``--long``: long documents, where attention outweighs the linear work (what pooling is for): synthetic ProLong
lengths up to 64K (elongated), upsampled ×32, 4096 tokens per rank.

Each setting trains ``--steps`` steps of CAD with in-place attention servers (every trainer serves; rows by
all-to-all over gloo), ping-pong on, with ``train.pipeline_schedule`` 1f1b, then pooled, then pooled with deferred
weight gradients (``train.defer_weight_grads``, "pooled+W"), on the same data.
The last step of each run is shown: every rank's instruction spans (``spans_per_rank`` of the step record,
:mod:`distca.train.schedule`): forward and backward passes (their attention rounds included), the attention an
idle stage served for the others, transfers between stages (waiting for a neighbour shows there) and the
optimizer. Per stage the table gives:

- idle % of the step: time in none of forward, backward, the optimizer or serving (transfers and gaps: the
  bubbles). Serving counts only the seconds the rank's own server computed (its ``busy_s``), not the time an idle
  stage waits inside a tick's rounds for the others;
- warm-up/cool-down idle %: the idle time outside the stage's steady state — before its first backward and
  after its last forward (1F1B's warm-up and cool-down) — as % of the step;
- served s: seconds the rank's own server computed attention for other stages while it had no micro-batch.

On 2 shared cores the ranks also wait for a core; both schedules pay that alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import header_lines, markdown_table, out_dir, run_info, write_json

from distca.config import load_config
from distca.train.launch import train

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"F": "#4c72b0", "B": "#55a868", "serve": "#dd8452", "W": "#c44e52", "p2p": "#c8c8c8", "optimizer": "#8172b3"}
VARIANTS = {"1f1b": ["--train.pipeline_schedule=1f1b"], "pooled": ["--train.pipeline_schedule=pooled"],
            "pooled+W": ["--train.pipeline_schedule=pooled", "--train.defer_weight_grads=true"],
            "pooled+split": ["--train.pipeline_schedule=pooled", "--train.stage_split=balanced"]}
DEFAULT_VARIANTS = ("1f1b", "pooled", "pooled+W")


def stage_stats(spans: list[list], timeline: list[list], step_s: float) -> dict[str, float]:
    """One rank's busy/idle split of a step from its spans (and its timeline's served seconds)."""
    served = sum(e[5] for e in timeline if e[2] == "serve")  # attention computed for the others while idle
    busy = sum(t1 - t0 for what, t0, t1 in spans if what in ("F", "B", "W", "optimizer")) + served
    first_b = min((t0 for what, t0, _ in spans if what == "B"), default=0.0)
    last_f = max((t1 for what, _, t1 in spans if what == "F"), default=step_s)
    # idle outside the steady state: the gaps before the first backward and after the last forward that no
    # F, B or optimizer span covers, less what the rank's server computed for the others there
    covered = sorted((t0, t1) for what, t0, t1 in spans if what in ("F", "B", "W", "optimizer"))

    def idle_in(lo: float, hi: float) -> float:
        free, at = 0.0, lo
        for t0, t1 in covered:
            if t1 <= at or t0 >= hi:
                continue
            free += max(0.0, min(t0, hi) - at)
            at = max(at, t1)
        return free + max(0.0, hi - at)

    edge = max(0.0, idle_in(0.0, min(first_b, last_f)) + idle_in(max(first_b, last_f), step_s) - served)
    return {"idle_pct": 100 * max(0.0, step_s - busy) / step_s, "edge_idle_pct": 100 * edge / step_s,
            "served_s": served, "busy_s": busy}


def run(cfg_path: str, pp: int, micro: int, schedule: str, steps: int, overrides: list[str], tmp: Path) -> dict:
    over = [f"--output_dir={tmp / f'pp{pp}-{schedule}'}", f"--train.pipeline_parallel={pp}",
            f"--train.micro_batches={micro}", f"--train.steps={steps}", "--train.core_attention=cad",
            "--cluster.data_plane=inplace", "--cluster.placement=colocated", *VARIANTS[schedule],
            "--train.progress=false", "--train.tensorboard=false", "--train.checkpoint_at_end=false", *overrides]
    cfg = load_config(cfg_path, over)
    res = train(cfg)
    last = res.records[-1]
    step_s = max(max(s[2] for s in spans) for spans in last["spans_per_rank"])
    stats = [stage_stats(sp, tl, step_s) for sp, tl in zip(last["spans_per_rank"], last["timeline_per_rank"],
                                                             strict=True)]
    return {"pp": pp, "schedule": schedule, "step_s": step_s, "losses": res.losses, "stage": last["stage_per_rank"],
            "spans": last["spans_per_rank"], "stats": stats}


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 1.2 + 0.45 * sum(len(r["spans"]) for r in results)),
                             squeeze=False, gridspec_kw={"height_ratios": [len(r["spans"]) for r in results]})
    for ax, r in zip(axes[:, 0], results, strict=True):
        for rank, spans in enumerate(r["spans"]):
            for what, t0, t1 in sorted(spans, key=lambda sp: sp[0] == "W"):  # W runs inside serve ticks: on top
                ax.barh(rank, t1 - t0, left=t0, color=COLORS[what], height=0.8, linewidth=0)
        ax.set_yticks(range(len(r["spans"])),
                      [f"rank {i} (stage {s})" for i, s in enumerate(r["stage"])], fontsize=8)
        ax.invert_yaxis()
        idle = sum(s["idle_pct"] for s in r["stats"]) / len(r["stats"])
        served = sum(s["served_s"] for s in r["stats"])
        ax.set_title(f"PP={r['pp']}, {r['schedule']}: step {r['step_s']:.2f} s, mean idle {idle:.0f}% "
                     f"(servers computed {served:.2f} s in serve ticks)", fontsize=9)
        ax.set_xlim(0, max(x["step_s"] for x in results))
    axes[-1, 0].set_xlabel("seconds into the step")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, ["forward (its attention rounds included)", "backward (likewise)",
                         "serve tick: an idle stage's rounds (its server's share, and waiting for the others)",
                         "deferred weight gradients (pooled+W)", "p2p transfer / wait", "optimizer"],
               loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/tiny-cpu.yaml"))
    p.add_argument("--steps", type=int, default=4, help="steps per run; the last is shown")
    p.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline degrees (4 trainers: DP = 4 / PP)")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "docs/figures/bubbles.png"))
    p.add_argument("--long", action="store_true", help="long documents (see above)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                   help="runs per pipeline degree, the first the reference (pooled+split: train.stage_split "
                        "balanced, fewer blocks on the LM head's stage: give the model a large --model.vocab_size)")
    args, overrides = p.parse_known_args()
    if args.long:
        from distca.data.distributions import LengthDistribution

        elongate = LengthDistribution("prolong").elongate_to(65536)
        overrides = ["--data.source=synthetic", "--data.distribution=prolong", "--data.upsample_long=32",
                     f"--data.elongate={elongate}", "--train.tokens_per_rank=4096", *overrides]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pp in args.pp:
            for schedule in args.variants:
                r = run(args.config, pp, args.micro_batches, schedule, args.steps, overrides, Path(tmp))
                results.append(r)
                print(f"PP={pp} {schedule}: step {r['step_s']:.2f} s", flush=True)
    info = run_info(torch.device("cpu"), config=args.config, steps=args.steps, micro_batches=args.micro_batches,
                    overrides=" ".join(overrides))
    rows = []
    for r in results:
        for rank, (stage, s) in enumerate(zip(r["stage"], r["stats"], strict=True)):
            rows.append([f"PP={r['pp']}", r["schedule"], f"{rank} (stage {stage})", f"{r['step_s']:.2f}",
                         f"{s['idle_pct']:.1f}", f"{s['edge_idle_pct']:.1f}", f"{s['served_s']:.3f}"])
    lines = [*header_lines("Pipeline bubbles: 1F1B vs pooled ticks (CPU simulated cluster)", info), "",
             *markdown_table(["setting", "schedule", "rank", "step s", "idle % of step",
                              "warm-up/cool-down idle %", "served s (idle stage)"], rows), ""]
    mean = lambda r, k: sum(s[k] for s in r["stats"]) / len(r["stats"])  # noqa: E731
    for pp in args.pp:
        runs = [next(r for r in results if r["pp"] == pp and r["schedule"] == s) for s in args.variants]
        same = max((abs(x - y) / abs(x) for r in runs[1:] for x, y in zip(runs[0]["losses"], r["losses"],
                                                                        strict=True)), default=0.0)
        idle = " vs ".join(f"{mean(r, 'idle_pct'):.1f}%" for r in runs)
        edge = " vs ".join(f"{mean(r, 'edge_idle_pct'):.1f}%" for r in runs)
        step = " vs ".join(f"{r['step_s']:.2f} s" for r in runs)
        lines.append(f"- PP={pp} ({' vs '.join(args.variants)}): mean idle {idle}; warm-up/cool-down idle {edge}; "
                     f"step {step}; losses equal within {same:.1e} relative")
    print("\n".join(lines))
    dest = out_dir("bubbles")
    write_json(dest / "bubbles.json", {"info": info, "results": results})
    if plot(results, Path(args.out)):
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
