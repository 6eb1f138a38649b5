"""Training on one GPU through the trainer's own path, no Ray: ``python -m distca.train.torchrun`` in a world
of one rank (torchrun's environment set here), with ``configs/llama3-8b-1gpu.yaml`` (the Llama-3-8B shape, 8
layers, 64K tokens per step, bf16), twice — core attention ``local`` and ``cad`` with ``cluster.data_plane:
inplace`` — each run in its own process. Records tokens/s, MFU and peak GPU memory of both runs and the ratio
of CAD's tokens/s to local's:

    python benchmarks/gpu_train.py                     # -> out/gpu_train/gpu_train.json (and $OUT when set)
    python benchmarks/gpu_train.py --cpu               # the same plumbing on the CPU with a tiny model
    python benchmarks/gpu_train.py -- --train.steps 4  # config overrides for both runs after ``--``

A run that fails (the trainer refuses a data plane it does not run yet, say) is recorded with the end of its
log, and the script exits 1; the other run is still measured. Medians leave the first step out (start-up:
kernel selection, allocator growth) when a run has more than two. ``--budget-s`` bounds the whole script:
a run that would start with less than a minute left is skipped, and a run is stopped at the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import distca  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO_ROOT, markdown_table, run_info

CONFIG = REPO_ROOT / "configs" / "llama3-8b-1gpu.yaml"
RUNS = {  # name -> config overrides
    "local": ["--train.core_attention=local"],
    "cad": ["--train.core_attention=cad", "--cluster.data_plane=inplace"],
}
# --cpu: a tiny model of the same config on the CPU, a dry run of the plumbing (a minute on 2 cores)
CPU_OVERRIDES = ["--train.device=cpu", "--train.precision=fp32", "--threads=2", "--model.n_layers=2",
                 "--model.hidden=64", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.ffn_hidden=128",
                 "--model.vocab_size=512", "--train.tokens_per_rank=512", "--data.max_len=512", "--data.n_docs=200",
                 "--train.steps=3", "--train.peak_tflops=0", "--attention.shard_tokens=64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(name: str, config: Path, overrides: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """One ``distca.train.torchrun`` process as rank 0 of 1; its step records summarised."""
    result, log_path = out / f"{name}.result.json", out / f"{name}.log"
    result.unlink(missing_ok=True)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "distca.train.torchrun", "--config", str(config), "--result-json", str(result),
           *overrides, f"--output_dir={out / name}", "--train.progress=false"]
    print(f"--- {name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    run: dict[str, Any] = {"overrides": overrides, "returncode": rc, "wall_s": round(wall, 1), "log": str(log_path)}
    if rc != 0 or not result.exists():
        run.update(status="failed", error=_error_lines(text, rc, timeout_s))
        print(f"--- {name}: FAILED (rc={rc}, {wall:.0f} s)\n" + "\n".join(run["error"]), flush=True)
        return run
    records = json.loads(result.read_text())["records"]
    run.update(status="ok", **summarise(records))
    print(f"--- {name}: ok in {wall:.0f} s: {run['tokens_per_s']:.0f} tokens/s, MFU {100 * run['mfu']:.1f}%, "
          f"peak GPU {_mb(run['peak_gpu_mb'])}", flush=True)
    return run


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the steps (the first left out when there are more than two) and peaks over all of them."""
    steady = records[1:] if len(records) > 2 else records
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    gpu = [r["peak_gpu_mb"] for r in records if r.get("peak_gpu_mb") is not None]
    return {
        "steps": len(records), "tokens_per_step": records[0]["tokens"],
        "tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"), "step_s": med("step_s"),
        "attention_flops_share": med("attention_flops_share"), "exposed_comm_pct": med("exposed_comm_pct"),
        "peak_gpu_mb": max(gpu) if gpu else None, "peak_rss_mb": max(r["peak_rss_mb"] for r in records),
        "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
        "tokens_per_s_per_step": [round(r["tokens_per_s"], 1) for r in records],
    }


def _error_lines(text: str, rc: int, timeout_s: float) -> list[str]:
    """What to show of a failed run's log: its last traceback's last lines, or the log's end."""
    if rc == 124:
        return [f"stopped after {timeout_s:.0f} s (the budget)"]
    lines = [x for x in text.splitlines() if x.strip()]
    last = max((i for i, x in enumerate(lines) if "Traceback (most recent call last)" in x), default=None)
    tail = lines[last:] if last is not None else lines
    return tail[-12:]


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1024:.1f} GiB"


def table(runs: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, r in runs.items():
        if r.get("status") != "ok":
            rows.append([name, r.get("status", "?"), "-", "-", "-", "-", "-"])
            continue
        rows.append([name, "ok", f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.1f}%", f"{r['step_s']:.2f}",
                     _mb(r["peak_gpu_mb"]), f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"])
    return markdown_table(["run", "status", "tokens/s", "MFU", "step s", "peak GPU", "loss"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--cpu", action="store_true", help="tiny model on the CPU (a dry run of the plumbing)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "gpu_train")
    p.add_argument("--budget-s", type=float, default=360.0, help="the whole script's time limit")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs (after --)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    base = [*(CPU_OVERRIDES if args.cpu else []), *args.overrides]
    runs: dict[str, dict[str, Any]] = {}
    for name, over in RUNS.items():
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 60:
            runs[name] = {"status": "skipped", "error": [f"{left:.0f} s of the budget left"]}
            continue
        runs[name] = run_one(name, args.config, [*base, *over], args.out, left)
    local, cad = runs["local"], runs["cad"]
    ratio = (cad["tokens_per_s"] / local["tokens_per_s"]
             if local.get("status") == cad.get("status") == "ok" else None)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    report = {"info": run_info(device, config=str(args.config.relative_to(REPO_ROOT)), overrides=base),
              "runs": runs, "cad_over_local_tokens_per_s": ratio}
    path = args.out / "gpu_train.json"
    path.write_text(json.dumps(report, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_train.json").write_text(json.dumps(report, indent=2))
    print("\n".join(["", *table(runs), ""]))
    print(f"CAD / local tokens/s: {ratio:.3f}" if ratio is not None else
          "CAD / local tokens/s: - (a run did not finish; see its error above)")
    print(f"results: {path}")
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
