"""``distca simulate``: predict a configuration, the paper's grid, or replay measured steps.

    distca simulate point --config configs/llama3-8b-128k.yaml --gpus 64 --max-len 131072 --dist pretrain
    distca simulate grid [--hardware h200|h100|FILE.json] [--seeds 2] [--schedule 1f1b|pooled|both]
    distca simulate calibrate --config configs/tiny-cpu.yaml --out out/sim/cpu.json
    distca simulate validate out/e2e/e2e.json [--hardware out/sim/cpu.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

K = 1024


def add_parser(sub) -> None:
    s = sub.add_parser("simulate", help="cluster simulator: predict scales beyond this machine, or replay measured "
                                        "steps", description=__doc__.split("\n\n")[0])
    s.add_argument("action", choices=["point", "grid", "calibrate", "validate"])
    s.add_argument("e2e", nargs="?", help="validate: the e2e.json that benchmarks/e2e.py wrote")
    s.add_argument("--config", help="YAML config (model shape; calibrate: the model to time)")
    s.add_argument("--hardware", default="h200",
                   help="h100 | h200 (published figures) | a JSON file from calibrate or benchmarks/gpu_step.py")
    s.add_argument("--gpus", type=int, default=64)
    s.add_argument("--tp", type=int, default=8)
    s.add_argument("--pp", type=int, default=1)
    s.add_argument("--max-len", type=int, default=128 * K, help="maximum document length (tokens)")
    s.add_argument("--dist", default="pretrain", choices=["pretrain", "prolong"])
    s.add_argument("--tokens-per-node", type=int, default=128 * K, help="tokens per TP group per step")
    s.add_argument("--micro-tokens", type=int, default=128 * K, help="tokens per replica per micro-batch")
    s.add_argument("--seeds", type=int, default=2, help="steps sampled per point (median reported)")
    s.add_argument("--eps", type=float, default=0.05, help="CAD balance tolerance")
    s.add_argument("--no-pingpong", action="store_true", help="CAD without ping-pong overlap")
    s.add_argument("--schedule", choices=["1f1b", "pooled", "both"], default="1f1b",
                   help="CAD's pipeline schedule (point, grid): 1F1B with per-stage plans, or the pooled ticks")
    s.add_argument("--defer-wgrad", action="store_true",
                   help="point/grid: also pooled ticks with deferred weight gradients (train.defer_weight_grads)")
    s.add_argument("--stage-split", choices=["even", "balanced"], default="even",
                   help="point/grid: blocks per pipeline stage (train.stage_split), for every system")
    s.add_argument("--nano-split", choices=["repack", "rows", "prefix"], default="repack",
                   help="point/grid: CAD's nano-batches: the paper's (repack), the trainer's (rows), prefix (what-if)")
    s.add_argument("--pingpong-order", choices=["layer", "fused"], default="layer",
                   help="point/grid: the trainer's per-block order, or the paper's fused one (what-if; not rows)")
    s.add_argument("--baseline-docs", choices=["trained", "whole"], default="trained",
                   help="point/grid: the baselines attend CAD's trained documents (cut like its packing) or the "
                        "sampled whole ones")
    s.add_argument("--out", help="calibrate: where the hardware JSON goes")
    s.add_argument("--json", help="grid/validate: also write the results here")


def load_hardware(spec: str):
    from distca.sim.hardware import Hardware, published

    if spec in ("h100", "h200"):
        return published(spec)
    return Hardware.load(spec)


def _schedules(arg: str) -> tuple[str, ...]:
    return ("1f1b", "pooled") if arg == "both" else (arg,)


def _point(args) -> int:
    from distca.config import load_config
    from distca.sim.predict import GridPoint, predict_point

    if not args.config:
        raise ValueError("simulate point needs --config (the model shape)")
    cfg = load_config(args.config, []).model
    pt = GridPoint("custom", "4d" if args.pp > 1 else "3d", args.gpus, args.max_len, args.dist,
                   args.tokens_per_node, args.pp, args.micro_tokens, args.tp)
    r = predict_point(pt, cfg, load_hardware(args.hardware), seeds=args.seeds, eps=args.eps,
                      pingpong=not args.no_pingpong, schedules=_schedules(args.schedule),
                      defer_wgrad=args.defer_wgrad, stage_split=args.stage_split,
                      nano_split=args.nano_split, pingpong_order=args.pingpong_order,
                      baseline_docs=args.baseline_docs)
    print(json.dumps(r, indent=1))
    return 0


def _grid(args) -> int:
    from distca.sim.report import grid_rows, run_grid

    results = run_grid(load_hardware(args.hardware), seeds=args.seeds, eps=args.eps, pingpong=not args.no_pingpong,
                       schedules=_schedules(args.schedule), defer_wgrad=args.defer_wgrad,
                       stage_split=args.stage_split, nano_split=args.nano_split,
                       pingpong_order=args.pingpong_order, baseline_docs=args.baseline_docs)
    for line in grid_rows(results):
        print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _calibrate(args) -> int:
    from distca.config import load_config
    from distca.sim.calibrate import calibrate_host

    cfg = load_config(args.config, [])
    hw, raw = calibrate_host(cfg.model, threads=cfg.threads or 1)
    out = Path(args.out or "out/sim/host.json")
    hw.save(out)
    print(json.dumps(raw, indent=1, default=str))
    print(f"wrote {out}")
    return 0


def _validate(args) -> int:
    from distca.sim.validate import validate_file

    if not args.e2e:
        raise ValueError("simulate validate needs the e2e.json path")
    if not Path(args.e2e).is_file():
        raise ValueError(f"{args.e2e} does not exist (write it with benchmarks/e2e.py)")
    if args.hardware in ("h100", "h200"):
        raise ValueError("validate replays steps measured on this host: give --hardware FILE from "
                         "`distca simulate calibrate` (or run benchmarks/simulate.py validate --run-e2e)")
    res = validate_file(args.e2e, load_hardware(args.hardware))
    print("| run | system | steps | measured s | predicted s | error |")
    print("|---|---|--:|--:|--:|--:|")
    for name, r in res.items():
        print(f"| {name} | {r['system']} | {r['steps']} | {r['measured_s']:.3f} | {r['predicted_s']:.3f} | "
              f"{100 * r['error']:+.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def run(args) -> int:
    try:
        return {"point": _point, "grid": _grid, "calibrate": _calibrate, "validate": _validate}[args.action](args)
    except (ValueError, OSError) as exc:
        print(f"distca simulate: error: {exc}", file=sys.stderr)
        return 2
