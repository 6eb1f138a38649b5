"""End-to-end training benchmark on the simulated cluster: the same config trained with colocated core
attention and with CAD, side by side in one invocation (same seed, same data), then a table of medians
and ratios and a plot of loss and throughput per step.

    python benchmarks/train.py [--config configs/tiny-cpu.yaml] [--steps 30] [override ...]

On the 2-core CPU machine this measures the system's overheads (ZeroMQ, planning, servers sharing the
trainers' cores), not the GPU speed-up: 4 trainers and 4 servers share 2 cores. The loss columns show
that both runs train the same model identically.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_lines, markdown_table, out_dir, run_info, write_json

from distca.config import load_config
from distca.train.flops import measure_peak_flops
from distca.train.launch import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out-dir", default=None, help="where results and the plot go (default out/train)")
    args, overrides = p.parse_known_args()
    dest = Path(args.out_dir) if args.out_dir else out_dir("train")
    # one peak for both runs, so their MFU columns compare (a trainer process runs one thread)
    torch.set_num_threads(1)
    peak = measure_peak_flops() / 1e12
    runs = {}
    for mode in ("local", "cad"):
        cfg = load_config(args.config, [f"--train.peak_tflops={peak}", *overrides, f"--train.steps={args.steps}",
                                        f"--train.core_attention={mode}",
                                        f"--output_dir={dest / mode}", "--train.progress=false",
                                        "--train.log_every=1000000"])
        runs[mode] = train(cfg)
    info = run_info(torch.device("cpu"), peak_tflops_per_trainer=round(cfg.train.peak_tflops, 3),
                    config=args.config, steps=args.steps, overrides=" ".join(overrides),
                    parallelism=f"PP={cfg.train.pipeline_parallel} x DP={cfg.data_parallel}",
                    servers=cfg.cluster.n_servers, tokens_per_step=runs["cad"].records[0]["tokens"])
    skip = 1  # the first step pays for warm-up (allocation, plan registration)
    med = {m: {k: statistics.median(r[k] for r in run.records[skip:] if r.get(k) is not None)
               for k in ("step_s", "tokens_per_s", "mfu", "exposed_comm_pct", "plan_ms", "peak_rss_mb",
                         "attn_load_max_over_mean_planned")} for m, run in runs.items()}
    measured = [r["attn_load_max_over_mean_measured"] for r in runs["cad"].records[skip:]
                if r.get("attn_load_max_over_mean_measured")]
    max_dloss = max(abs(a - b) / abs(a) for a, b in zip(runs["local"].losses, runs["cad"].losses, strict=True))
    rows = [[m, f"{med[m]['step_s']:.2f}", f"{med[m]['tokens_per_s']:.0f}", f"{100 * med[m]['mfu']:.1f}",
             f"{med[m]['attn_load_max_over_mean_planned']:.3f}"
             + (f" (measured {statistics.median(measured):.3f})" if m == "cad" and measured else ""),
             f"{med[m]['exposed_comm_pct']:.1f}", f"{med[m]['plan_ms']:.1f}", f"{med[m]['peak_rss_mb']:.0f}",
             f"{run.losses[0]:.4f} -> {run.losses[-1]:.4f}"] for m, run in runs.items()]
    lines = [*header_lines("Training: colocated vs CAD (same seed, same data)", info),
             *markdown_table(["attention", "step s", "tokens/s", "MFU %", "attention max/mean", "exposed comm %",
                              "plan ms", "peak RSS MB", "loss first -> last"], rows),
             "", f"CAD / local tokens/s: {med['cad']['tokens_per_s'] / med['local']['tokens_per_s']:.2f}x; "
                 f"largest relative loss difference over {args.steps} steps: {max_dloss:.1e}"]
    print("\n".join(lines))
    write_json(dest / "train.json", {"info": info, "medians": med,
                                     "records": {m: r.records for m, r in runs.items()}})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        for m, run in runs.items():
            steps = [r["step"] + 1 for r in run.records]
            ax[0].plot(steps, run.losses, label=m, linestyle="-" if m == "local" else "--")
            ax[1].plot(steps, [r["tokens_per_s"] for r in run.records], label=m)
        ax[0].set(xlabel="step", ylabel="loss", title="loss (identical curves)")
        ax[1].set(xlabel="step", ylabel="tokens/s", title="throughput")
        for a in ax:
            a.legend()
        fig.tight_layout()
        fig.savefig(dest / "train.png", dpi=120)
        print(f"plot: {dest / 'train.png'}")
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
