"""``distca`` command line: ``distca demo --config configs/tiny-cpu.yaml [--section.key VALUE ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from distca.config import load_config
from distca.errors import DistCAError

# Tolerances for the demo's own exactness check, per dtype (see tests for the property versions).
_DEMO_TOL = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distca", description="Core attention disaggregation for LLM training.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("demo", "shard documents over simulated attention servers and check exactness"),
                       ("config", "print the resolved configuration as JSON")):
        s = sub.add_parser(name, help=text, description=text + ". Extra --section.key VALUE pairs override the config.")
        s.add_argument("--config", help="YAML config file (defaults apply where absent)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args, overrides = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        if args.command == "config":
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        from distca.demo import format_report, run_demo

        print(json.dumps({"config": cfg.to_dict()}))
        report = run_demo(cfg)
        print(format_report(report))
        tol = _DEMO_TOL[cfg.attention.dtype]
        worst = max(report.max_abs_err.values())
        if worst > tol:
            print(f"FAILED: sharded attention differs from colocated by {worst:.2e} > {tol:.0e}", file=sys.stderr)
            return 1
        print(f"OK: sharded attention equals colocated attention (max error {worst:.2e} <= {tol:.0e})")
        return 0
    except DistCAError as exc:
        print(f"distca: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
