"""Where a 4D pooled CAD step's idle time comes from, by removing one cause at a time in the simulator (issue 14).

One grid point (default: Llama-3-8B shape, 64 GPUs, TP 8, PP 2, 256K documents, 512K tokens per node, ``pretrain``)
through ``distca.sim.predict.predict_point`` with the pooled schedule, then the same point with what-ifs that no
real cluster has, to size each cause of idle time:

- ``no comm``: every link 1000x faster and without latency (the all-to-alls, pipeline sends and gradient
  all-reduce cost nothing);
- ``eps 0``: the planner balances attention exactly (``scheduler.eps = 0``) instead of within 1 + eps;
- ``no LM head``: a 1024-token vocabulary (the last stage's head costs nearly nothing, so stages are even);
- ``2M``: twice the tokens per step, so twice the micro-batches (M) over the same warm-up and cool-down ticks;
- ``balanced split``: not a what-if but ``train.stage_split: balanced`` (built, distca.config.stage_blocks): the
  last stage holds fewer blocks, and computes its LM head between the rounds of the block positions it has none at;
- ``deferred W``: not a what-if but ``train.defer_weight_grads`` (built, :mod:`distca.train.wgrad`): the weight
  gradients of ``P - 1`` micro-batches per stage move into ticks the stage would only serve attention in.

The idle share is ``StepReport.idle_fraction`` (device time in neither forward, backward, optimizer nor serving
attention), split into ticks where every stage has a micro-batch (``full``), warm-up/cool-down ticks (``partial``)
and after the last tick (``tail``). Numbers are SIMULATED on published H200 figures (``--hardware``).

    python benchmarks/idle_budget.py [--gpus 64] [--pp 2] [--max-len 262144] [--eps 0.05] [--seeds 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_lines, markdown_table, out_dir, run_info, write_json

from distca.config import load_config
from distca.sim.cli import load_hardware
from distca.sim.predict import GridPoint, predict_point

K = 1024


def _no_comm(hw):
    fast = {name: dataclasses.replace(getattr(hw, name), bandwidth=getattr(hw, name).bandwidth * 1000, latency_s=0.0)
            for name in ("intra", "inter")}
    return dataclasses.replace(hw, **fast)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama3-8b-128k.yaml", help="the model shape")
    p.add_argument("--hardware", default="h200", help="h100 | h200 (published figures) | a calibrated JSON file")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--max-len", type=int, default=256 * K)
    p.add_argument("--tokens-per-node", type=int, default=512 * K)
    p.add_argument("--micro-tokens", type=int, default=128 * K)
    p.add_argument("--dist", default="pretrain")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out-dir", default=None, help="default out/idle_budget/")
    args = p.parse_args(argv)
    model = load_config(args.config, []).model
    hw = load_hardware(args.hardware)
    pt = GridPoint("custom", "4d" if args.pp > 1 else "3d", args.gpus, args.max_len, args.dist,
                   args.tokens_per_node, args.pp, args.micro_tokens, args.tp)
    small_vocab = dataclasses.replace(model, vocab_size=1024)
    pt2 = dataclasses.replace(pt, tokens_per_node=2 * pt.tokens_per_node)
    fast = _no_comm(hw)
    cases = [("as modelled", pt, hw, model, args.eps, False), ("no comm", pt, fast, model, args.eps, False),
             ("eps 0", pt, hw, model, 0.0, False), ("no LM head", pt, hw, small_vocab, args.eps, False),
             ("no comm + eps 0", pt, fast, model, 0.0, False),
             ("no comm + eps 0 + no LM head", pt, fast, small_vocab, 0.0, False),
             ("2M", pt2, hw, model, args.eps, False),
             ("2M + no comm + eps 0 + no LM head", pt2, fast, small_vocab, 0.0, False),
             ("deferred W", pt, hw, model, args.eps, True),
             ("deferred W + no comm + eps 0 + no LM head", pt, fast, small_vocab, 0.0, True),
             ("2M + deferred W", pt2, hw, model, args.eps, True),
             ("2M + deferred W + no comm + eps 0 + no LM head", pt2, fast, small_vocab, 0.0, True)]
    cases = [(*c, "even") for c in cases]
    cases += [("balanced split", pt, hw, model, args.eps, False, "balanced"),
              ("balanced split + deferred W", pt, hw, model, args.eps, True, "balanced"),
              ("balanced split + deferred W + no comm + eps 0", pt, fast, model, 0.0, True, "balanced"),
              ("2M + balanced split + deferred W", pt2, hw, model, args.eps, True, "balanced")]
    rows, results = [], []
    for name, point, h, m, eps, wgrad, split in cases:
        r = predict_point(point, m, h, seeds=args.seeds, eps=eps, schedules=("pooled",),
                          defer_wgrad=wgrad, stage_split=split)["cad"]["pooled+wgrad" if wgrad else "pooled"]
        split = r["idle_split"]
        results.append({"case": name, "micro_batches": point.micro_batches, "step_s": r["step_s"],
                        "idle": r["idle_fraction"], **split})
        rows.append([name, point.micro_batches, f"{r['step_s']:.2f}", f"{100 * r['idle_fraction']:.1f}",
                     f"{100 * split['full']:.1f}", f"{100 * split['partial']:.1f}", f"{100 * split['tail']:.1f}"])
    info = run_info(torch.device("cpu"), config=args.config, hardware=args.hardware, gpus=args.gpus, tp=args.tp,
                    pp=args.pp, max_len=args.max_len, tokens_per_node=args.tokens_per_node, dist=args.dist,
                    eps=args.eps, seeds=args.seeds, micro_batches=pt.micro_batches, schedule="pooled")
    lines = [*header_lines("Idle budget of a 4D pooled CAD step (SIMULATED what-ifs)", info),
             *markdown_table(["case", "M", "step s", "idle %", "full ticks %", "partial ticks %", "tail %"], rows)]
    print("\n".join(lines))
    dest = Path(args.out_dir) if args.out_dir else out_dir("idle_budget")
    write_json(dest / "idle_budget.json", {"info": info, "results": results})


if __name__ == "__main__":
    main()
