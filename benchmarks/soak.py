"""Soak: train the tiny CAD config for many steps and watch for leaks and drift.

    python benchmarks/soak.py [--steps 300] [--config configs/tiny-cpu.yaml] [override ...]

Per trainer rank: resident memory over time and its growth after warm-up, open file descriptors.
Per attention server: peak RSS. Per step: step time, and the drift of the median step time from the
first to the last tenth of the run. Any error ends the run and is reported. ``analyse`` is what the
test suite's short soak asserts on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

GROWTH_LIMIT_MB = 32.0  # RSS a rank may gain after warm-up before the soak calls it a leak
FD_LIMIT = 8  # open file descriptors a rank may gain after warm-up


def analyse(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth of memory and descriptors per rank after a warm-up tenth, and step-time drift."""
    n = len(records)
    tenth = max(n // 10, 1)
    warm, tail = records[tenth:2 * tenth], records[-tenth:]
    ranks = len(records[0]["rss_mb_per_rank"])
    per_rank = []
    for r in range(ranks):
        base = statistics.median(x["rss_mb_per_rank"][r] for x in warm)
        end = statistics.median(x["rss_mb_per_rank"][r] for x in tail)
        fds0 = max(x["open_fds_per_rank"][r] for x in warm)
        fds1 = max(x["open_fds_per_rank"][r] for x in tail)
        per_rank.append({"rank": r, "rss_after_warmup_mb": base, "rss_end_mb": end, "growth_mb": end - base,
                         "fds_after_warmup": fds0, "fds_end": fds1})
    servers = [x["server_peak_rss_mb"] for x in records if x.get("server_peak_rss_mb")]
    server_growth = ([b - a for a, b in zip(servers[tenth], servers[-1], strict=True)]
                     if len(servers) > tenth else [])
    t0 = statistics.median(x["step_s"] for x in warm)
    t1 = statistics.median(x["step_s"] for x in tail)
    return {"steps": n, "per_rank": per_rank, "server_peak_growth_mb": server_growth,
            "step_s_after_warmup": t0, "step_s_end": t1, "step_time_drift": t1 / t0 - 1,
            "max_growth_mb": max(p["growth_mb"] for p in per_rank),
            "max_fd_growth": max(p["fds_end"] - p["fds_after_warmup"] for p in per_rank),
            "ok": max(p["growth_mb"] for p in per_rank) <= GROWTH_LIMIT_MB
            and max(p["fds_end"] - p["fds_after_warmup"] for p in per_rank) <= FD_LIMIT}


def main() -> None:
    from common import header_lines, markdown_table, out_dir, run_info, write_json

    from distca.config import load_config
    from distca.train.launch import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out-dir", default=None)
    args, overrides = p.parse_known_args()
    dest = Path(args.out_dir) if args.out_dir else out_dir("soak")
    cfg = load_config(args.config, [*overrides, f"--train.steps={args.steps}", f"--output_dir={dest / 'run'}",
                                    "--train.progress=false", "--train.log_every=1000000"])
    import torch

    error = ""
    try:
        res = train(cfg)
        records = res.records
    except Exception as exc:  # the soak reports a failure rather than hiding it
        error = f"{type(exc).__name__}: {exc}"
        records = []
    info = run_info(torch.device("cpu"), config=args.config, steps=args.steps,
                    core_attention=cfg.train.core_attention, overrides=" ".join(overrides))
    lines = header_lines("Soak: memory, descriptors and step time over a long run", info)
    if error:
        lines.append(f"ERROR after {len(records)} steps: {error}")
        print("\n".join(lines))
        raise SystemExit(1)
    a = analyse(records)
    lines += markdown_table(["rank", "RSS after warm-up MB", "RSS at end MB", "growth MB", "fds after warm-up",
                             "fds at end"],
                            [[p["rank"], f"{p['rss_after_warmup_mb']:.0f}", f"{p['rss_end_mb']:.0f}",
                              f"{p['growth_mb']:+.1f}", p["fds_after_warmup"], p["fds_end"]] for p in a["per_rank"]])
    lines += ["", f"step time after warm-up {a['step_s_after_warmup']:.3f} s, at the end {a['step_s_end']:.3f} s "
                  f"(drift {100 * a['step_time_drift']:+.1f}%); server peak RSS growth after warm-up "
                  f"{[round(x, 1) for x in a['server_peak_growth_mb']]} MB; errors: none; "
                  f"verdict: {'OK' if a['ok'] else 'LEAK SUSPECTED'} (limits {GROWTH_LIMIT_MB} MB, {FD_LIMIT} fds)"]
    print("\n".join(lines))
    write_json(dest / "soak.json", {"info": info, "analysis": a, "records": records})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [x["step"] + 1 for x in records]
        for r in range(len(records[0]["rss_mb_per_rank"])):
            ax[0].plot(steps, [x["rss_mb_per_rank"][r] for x in records], label=f"rank {r}")
        ax[0].set(xlabel="step", ylabel="RSS MB", title="trainer memory")
        ax[0].legend()
        ax[1].plot(steps, [x["step_s"] for x in records])
        ax[1].set(xlabel="step", ylabel="s", title="step time")
        fig.tight_layout()
        fig.savefig(dest / "soak.png", dpi=120)
        print(f"plot: {dest / 'soak.png'}")
    except ImportError:
        pass
    if not a["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
