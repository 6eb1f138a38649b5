"""``distca`` command line: ``train``, ``launch``, ``demo``, ``config``, ``serve`` (a YAML config and dotted
overrides), ``plan``, ``export`` and ``simulate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

import torch

from distca.config import AttentionConfig, SchedulerSection, load_config
from distca.errors import DistCAError, InputError
from distca.limits import MAX_DOC_TOKENS, MAX_RANKS, check_float, check_int, check_shape

# Tolerances for the demo's own exactness check, per dtype (see tests for the property versions).
_DEMO_TOL = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``distca plan: error: argument --servers: ...``, exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: object, limit: int = 500) -> str:
    """``text`` on one line of at most ``limit`` characters (a message may quote a user's multi-line value)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _fail(prog: str, exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr; return the bad-input exit code, 2."""
    print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distca", description="Core attention disaggregation for LLM training.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (("train", "train on a simulated cluster on this machine (local Ray, attention servers, "
                                 "one process per trainer rank)"),
                       ("launch", "train through a cluster engine: 'ray' runs the trainers as Ray Train workers and "
                                  "the servers as actors (for torchrun see launch/torchrun.sh)"),
                       ("demo", "plan and run CAD attention over simulated servers and check exactness"),
                       ("config", "print the resolved configuration as JSON"),
                       ("serve", "start an attention-server pool on Ray and print its addresses")):
        s = sub.add_parser(name, help=text, description=text + ". Extra --section.key VALUE pairs override the config.")
        s.add_argument("--config", help="YAML config file (defaults apply where absent)")
        if name == "launch":
            s.add_argument("engine", choices=["ray"], help="ray: Ray Train TorchTrainer + server actors")
        if name in ("train", "launch"):
            s.add_argument("--run-steps", type=int, default=0,
                           help="stop after this many steps in this invocation (0: run to train.steps); "
                                "with --train.resume true a later call continues")
            s.add_argument("--verbose", action="store_true",
                           help="let the libraries (DeepSpeed, torch.distributed, Ray) log and print to the console")
        if name == "serve":
            s.add_argument("--hold-s", type=float, default=-1.0,
                           help="keep the pool up this many seconds (-1: until interrupted)")
    s = sub.add_parser("plan", help="plan one batch of document lengths over attention servers",
                       description="Plan one batch and print balance, bytes moved and planning time.")
    s.add_argument("--lengths", required=True,
                   help='JSON: per-rank lists of document lengths, or {"ranks": [[...]], "continues": [...]}')
    s.add_argument("--servers", type=int, required=True, help="number of attention servers")
    # Defaults are the run config's (scheduler.eps, attention.window, attention.shard_tokens): one home each.
    sched, attn = SchedulerSection(), AttentionConfig()
    s.add_argument("--eps", type=float, default=sched.eps,
                   help=f"balance tolerance: max <= (1+eps) * mean ({sched.eps})")
    s.add_argument("--window", type=int, default=attn.window,
                   help=f"sliding window in keys incl. self (-1: full causal; default {attn.window})")
    s.add_argument("--mask", default="",
                   help="a mask family instead of --window: causal | window:W | chunked:C | sink_window:S:W | "
                        "prefix_lm:P | bidirectional")
    s.add_argument("--granularity", type=int, default=attn.shard_tokens,
                   help=f"preferred shard multiple in tokens ({attn.shard_tokens})")
    s.add_argument("--placement", choices=["colocated", "dedicated"], default="colocated",
                   help="colocated: server i shares trainer i's device; dedicated: no server is local")
    s.add_argument("--heads", type=int, default=32, help="query heads (Llama-3-8B: 32)")
    s.add_argument("--kv-heads", type=int, default=8, help="key/value heads (Llama-3-8B: 8)")
    s.add_argument("--head-dim", type=int, default=128, help="head dimension (128)")
    s.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element (bf16: 2)")
    s.add_argument("--devices-per-node", type=int, default=0,
                   help="devices per node (colocated, one server per trainer: the in-place data plane): also report "
                        "the key/value bytes that cross nodes, sent directly and relayed once per node (0: off)")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    s = sub.add_parser("export", help="write a training checkpoint as a Hugging Face folder",
                       description="Turn a training checkpoint (DeepSpeed pipeline stages, any PP x DP) into a "
                                   "Hugging Face folder (config.json + safetensors) that transformers loads. "
                                   "The folder is written atomically.")
    s.add_argument("--checkpoint", required=True,
                   help="the run's checkpoint folder (its latest tag is used) or one step folder in it")
    s.add_argument("--out", required=True, help="the Hugging Face folder to write (replaced atomically)")
    s.add_argument("--tag", help="a tag (step folder) other than the latest, e.g. step00000100")
    s.add_argument("--config", help="the run's YAML, for a checkpoint without distca_model.json")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: as stored: the module's dtype in training)")
    s.add_argument("--max-shard-mb", type=float, default=0,
                   help="split the weights into shards of at most this many MB (0: one file)")
    from distca.sim.cli import add_parser as add_simulate

    add_simulate(sub)
    return p


def _plan(args) -> int:
    from distca.attention.cost import AttentionShape
    from distca.masks import Mask
    from distca.scheduler import SchedulerConfig
    from distca.scheduler.summary import load_batch, plan_summary

    try:
        # Flags first, each by its own name; then the lengths file (errors start with "--lengths PATH:").
        servers = check_int(args.servers, "--servers", 1, MAX_RANKS)
        check_float(args.eps, "--eps", 0.0)
        check_int(args.granularity, "--granularity", 1, MAX_DOC_TOKENS)
        check_int(args.window, "--window", 1, MAX_DOC_TOKENS, allow=(-1,))
        check_shape(args.heads, args.kv_heads, args.head_dim, args.dtype_bytes,
                    ("--heads", "--kv-heads", "--head-dim", "--dtype-bytes"))
        batch = load_batch(args.lengths, name="--lengths")
        shape = AttentionShape(args.heads, args.kv_heads, args.head_dim, args.dtype_bytes)
        if args.mask:
            if args.window != AttentionConfig().window:
                raise InputError("give --mask or --window, not both")
            try:
                mask = Mask.parse(args.mask)
            except InputError as exc:
                raise InputError(f"--mask: {exc}") from None
            cfg = SchedulerConfig(eps=args.eps, granularity=args.granularity, mask=mask)
        else:
            cfg = SchedulerConfig(eps=args.eps, granularity=args.granularity, window=args.window)
        dpn = check_int(args.devices_per_node, "--devices-per-node", 0, MAX_RANKS)
        summary = plan_summary(batch, servers, cfg, args.placement, shape, devices_per_node=dpn)
    except ValueError as exc:  # InputError, and a planner's own refusal
        return _fail("distca plan", exc)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>27}: {value:.4f}" if isinstance(value, float) else f"{key:>27}: {value}")
    return 0


def _export(args) -> int:
    from distca.train.export import export_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        written = export_checkpoint(args.checkpoint, args.out, tag=args.tag, config=args.config,
                                    dtype=getattr(torch, args.dtype) if args.dtype else None,
                                    max_shard_bytes=int(args.max_shard_mb * 2**20) or None)
    except (DistCAError, OSError, ValueError) as exc:
        return _fail("distca export", exc)
    print(json.dumps({"out": args.out, "files": [str(p) for p in written]}))
    return 0


def _serve(cfg, hold_s: float) -> int:
    import time

    from distca.parts import pool_settings
    from distca.server.pool import AttentionServerPool, local_ray_on_loopback

    if not cfg.cluster.ray_address:
        local_ray_on_loopback()
    with AttentionServerPool(pool_settings(cfg)) as pool:
        print(json.dumps({"servers": pool.addresses, "healthy": pool.health()}), flush=True)
        try:
            deadline = None if hold_s < 0 else time.monotonic() + hold_s
            while deadline is None or time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())) if deadline else 1.0)
                if deadline is None:
                    pool.restart_dead()
        except KeyboardInterrupt:
            pass
    return 0


def _train(cfg, run_steps: int, verbose: bool) -> int:
    from distca.train.launch import train
    from distca.train.metrics import run_header, summary_table

    print(run_header(cfg), flush=True)
    result = train(cfg, run_steps=run_steps, verbose=verbose)
    print(summary_table(cfg, result), flush=True)
    return 0


def _launch(cfg, engine: str, run_steps: int, verbose: bool) -> int:
    from distca.train.metrics import run_header, summary_table
    from distca.train.ray_launch import train_on_ray

    print(run_header(cfg), flush=True)
    result = train_on_ray(cfg, run_steps=run_steps, verbose=verbose)
    print(summary_table(cfg, result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command == "plan":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return _plan(args)
    if args.command == "export":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return _export(args)
    if args.command == "simulate":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        from distca.sim.cli import run as simulate

        return simulate(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("train", "launch"):
            check_int(args.run_steps, "--run-steps", 0)
        if args.command == "serve" and args.hold_s != -1:
            check_float(args.hold_s, "--hold-s (-1 or seconds >= 0)", 0.0)
        cfg = load_config(args.config, overrides)
        from distca.model.hf_config import with_checkpoint_model

        cfg = with_checkpoint_model(cfg)  # train.init_from_hf: the folder's model (the launchers do this too)
        if args.command == "config":
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if args.command == "serve":
            return _serve(cfg, args.hold_s)
        if args.command == "train":
            return _train(cfg, args.run_steps, args.verbose)
        if args.command == "launch":
            return _launch(cfg, args.engine, args.run_steps, args.verbose)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        from distca.demo import format_report, run_demo

        print(json.dumps({"config": cfg.to_dict()}))
        report = run_demo(cfg)
        print(format_report(report))
        tol = _DEMO_TOL[cfg.attention.dtype]
        worst = max(report.max_abs_err.values())
        if worst > tol:
            print(f"FAILED: CAD attention differs from whole-document attention by {worst:.2e} > {tol:.0e}",
                  file=sys.stderr)
            return 1
        print(f"OK: CAD attention equals whole-document attention (max error {worst:.2e} <= {tol:.0e})")
        return 0
    except DistCAError as exc:
        return _fail("distca", exc)


if __name__ == "__main__":
    sys.exit(main())
