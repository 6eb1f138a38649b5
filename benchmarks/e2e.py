"""End to end on the simulated cluster: colocated core attention vs CAD over each data plane, on long-tailed documents.

    python benchmarks/e2e.py [--steps 8] [--dists pretrain prolong] [--modes local cad-zmq cad-inplace ...]
                             [--tokens-per-rank 2048] [--upsample-long U] [--max-doc M]
                             [--config configs/tiny-cpu.yaml] [--out-dir out/e2e] [override ...]

What runs is what ``distca train`` runs (``distca.train.launch.train``): 4 DeepSpeed trainer processes
(pipeline parallel 2 × data parallel 2, 1F1B, ZeRO-1, gloo), in one of these modes (``MODES``;
``--modes`` picks them; the five data planes by default):

- ``local``: colocated core attention (``train.core_attention: local``), the baseline;
- ``cad-zmq``: CAD over the Ray pool of 4 attention servers, rows as ZeroMQ frames (``cluster.data_plane: zmq``);
- ``cad-inplace``: CAD with no server processes: the 4 trainers are the attention servers themselves and move
  rows by one torch.distributed all-to-all per round over their stage's data-parallel group (gloo here;
  ``cluster.data_plane: inplace``). On 2 shared cores this also removes the servers' processes competing
  for the cores;
- ``cad-shm``: the pool over shared memory (``cluster.data_plane: shm``);
- ``cad-collective``: the pool joined to a data-plane process group (``cluster.data_plane: collective``, with
  ``cluster.placement: dedicated``);
- ``cad-zmq-serial``, ``cad-inplace-serial``: those planes without ping-pong (``train.pingpong: false``: one
  attention round per block and micro-batch, awaited at once) and with every step's plans made on its critical
  path (``train.prefetch: false``) — the "before" of issue 14, to compare side by side in one invocation;
- ``local-repack``, ``cad-zmq-repack``, ``cad-inplace-repack``: every micro-batch packed as two independent halves
  (``train.nano_split: repack``), so each ping-pong round starts right after its own half's pre-attention work.
  Other data than the modes above (a document cut at the half restarts): the CAD ones compare with
  ``local-repack``.

A mode names the data plane it asks for; the step records say which one ran (``data_plane``), and the
tables show that: a plane not built yet runs as the pool's ZeroMQ plane and reports ``zmq``. Every mode
trains the same model (``--config``, tiny-cpu by default: 4 layers, hidden 256) on the same synthetic
documents with the same seed and the same tokens per step, one after the other in this invocation;
overrides (``--section.key=value``) go to every mode (a mode's own settings win).

Data: ``data.source: synthetic`` with lengths from ``pretrain`` or ``prolong``, documents longer than
16K (before elongation) upsampled ×``--upsample-long`` (``data.upsample_long``), every length scaled
by ``data.elongate = --max-doc / (the family's max length)``. Defaults (``DATA_DEFAULTS``, relative to
``tokens_per_rank`` so that the pattern does not depend on it): pretrain ×16, max 16 × 2048 = 32,768
tokens (elongate 0.26); prolong, whose tail holds 5× fewer documents, ×32, max 32 × 2048 = 65,536
(elongate 0.19). A micro-batch holds ``DP × tokens_per_rank`` tokens (4096 by default); a document
that does not fit continues in the next micro-batch as a new document, so an attention call sees
documents of at most 4K tokens. A long document split at the replicas' boundary leaves the later
half, whose queries see all the earlier keys, three times the attention of the first: the planned
per-replica attention max/mean of these settings is about 1.4-1.5 (seed 0, steps 2-8), where a
milder tail evens out over the step's micro-batches (~1.1-1.25). ``--tokens-per-rank 4096`` doubles
the documents and takes about twice as long (10 minutes for local and CAD on a busy 2-core machine).

Reported per rank (median over steps, the first step left out as warm-up; see the docstring of
``distca/train/trainer.py`` for how each is measured):

- attention: ``local`` — seconds in the core-attention kernel, forward and backward (wall; and CPU of
  the calling thread); CAD over a pool — seconds the trainer blocked on the servers; ``cad-inplace`` —
  seconds in core attention: its local tasks, its own server's work, the copies and the all-to-all waits;
- linear: the process's CPU seconds in the step (``time.process_time``, every thread: gloo's and
  ZeroMQ's I/O threads too) minus the attention kernel's CPU seconds (``local``); all of it (CAD — for
  ``cad-inplace`` that includes the rank's own attention work);
- waiting: step wall − the process's CPU seconds (peers, servers, and here also a free core);
- comm: ``local`` — the k/v all-gather of documents split at a rank boundary and its gradient all-reduce;
  CAD — seconds blocked (on the pool's servers; in-place, on the all-to-all);
- server busy: each attention server's ``busy_s`` delta (in-place: every rank's own server);
- memory: peak of the activations autograd holds for backward (bytes of saved tensors, each storage
  once, parameters excluded — the tokens in flight, free of the process's baseline of several hundred
  MB), and the step's resident-set high-water mark (VmHWM, reset before each step).

Per step: the data plane that ran; tokens/s and exposed communication side by side (% of the step, the
largest over trainers: CAD, the trainer blocked on servers or on the all-to-all; baseline, the k/v
all-gather and its gradient all-reduce — collectives, so this also counts the lighter replica waiting
there for the heavier one, every layer); attention max/mean measured across trainers (baseline: kernel
seconds) or across servers (CAD: their ``busy_s`` deltas), and as planned (pairs); scheduler ms;
activation peak max/min across trainers — over all four, and between the data-parallel replicas of one
stage (the stages differ by design: with 1F1B the first stage holds more micro-batches in flight than
the last). Then, per CAD mode against ``local``: the tokens/s ratio, exposed communication, attention
balance and the largest relative loss difference.

What a 2-core machine can and cannot show. It can show that CAD computes the same step as the
baseline on every data plane, that it evens the attention work over the servers where the baseline
leaves one trainer with most of it, that trainer memory stays equal, what the scheduler costs, and
where each rank's time goes. It cannot show a wall-clock speed-up: that needs one core (one GPU) per
rank, and here 4 trainers and (over a pool) 4 servers share 2 cores, so a rank that waits hands its
core to another (waiting is not idle hardware), every second of attention moved to a server is paid on
the same 2 cores plus the copies, and both the servers' busy seconds and the ranks' waiting include
time spent waiting for a core. In-place CAD has no server processes, so it drops that competition
(and the pool's frames) but still pays the all-to-all copies on the same cores. tokens/s here measures
the system's overhead, not its speed-up; the cluster simulator (``distca/sim``) replays the recorded
micro-batches at scale.

Output: a markdown table (machine, date, commit), ``out/e2e/e2e.json`` —
``{"info", "notes", "runs": {"<dist>/<mode>": {"config", "summary", "records", "wall_s"}}}``, where each record
is one step as ``distca.train.metrics.combine_ranks`` builds it, with ``micro_batches`` (every micro-batch's
``ranks`` and ``continues``) for the simulator — and ``out/e2e/e2e.png`` (a row per distribution, a column
per mode).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_lines, markdown_table, out_dir, run_info, write_json

from distca.config import DistCAConfig, load_config
from distca.data.distributions import LengthDistribution
from distca.train.flops import measure_peak_flops
from distca.train.launch import train

# each mode's own settings, applied after the command line's overrides
MODES: dict[str, tuple[str, ...]] = {
    "local": ("--train.core_attention=local",),
    "cad-zmq": ("--train.core_attention=cad", "--cluster.data_plane=zmq"),
    "cad-inplace": ("--train.core_attention=cad", "--cluster.data_plane=inplace", "--cluster.placement=colocated"),
    "cad-shm": ("--train.core_attention=cad", "--cluster.data_plane=shm"),
    "cad-collective": ("--train.core_attention=cad", "--cluster.data_plane=collective",
                       "--cluster.placement=dedicated"),
    # the same planes without ping-pong nano-batches and with each step's plans made on its critical path
    "cad-zmq-serial": ("--train.core_attention=cad", "--cluster.data_plane=zmq", "--train.pingpong=false",
                       "--train.prefetch=false"),
    "cad-inplace-serial": ("--train.core_attention=cad", "--cluster.data_plane=inplace",
                           "--cluster.placement=colocated", "--train.pingpong=false", "--train.prefetch=false"),
    # every micro-batch packed as two independent halves (train.nano_split: repack): ping-pong's rounds start right
    # after their own half's pre-attention work; other data than the modes above, so compared with local-repack
    "local-repack": ("--train.core_attention=local", "--train.nano_split=repack"),
    "cad-zmq-repack": ("--train.core_attention=cad", "--cluster.data_plane=zmq", "--train.nano_split=repack"),
    "cad-inplace-repack": ("--train.core_attention=cad", "--cluster.data_plane=inplace",
                           "--cluster.placement=colocated", "--train.nano_split=repack"),
}
# upsample_long, and the longest document in multiples of train.tokens_per_rank
DATA_DEFAULTS = {"pretrain": (16.0, 16), "prolong": (32.0, 32)}
CAN_AND_CANNOT = [
    "2-core machine: 4 trainers (+ 4 attention-server processes for CAD over a pool; none in-place) share 2 "
    "cores. This shows exactness on every data plane, where each rank's time goes, attention balance (planned "
    "and measured), memory balance and scheduler cost.",
    "It cannot show a wall-clock speed-up (that needs one core/GPU per rank): a waiting rank hands its core "
    "to another, attention moved to a server is paid on the same cores plus copies, and busy/waiting times "
    "include waiting for a core. In-place CAD removes the servers' processes from that competition, not the "
    "copies. tokens/s here is overhead, not speed-up.",
]


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def build_config(args: argparse.Namespace, dist: str, mode: str, dest: Path, peak_tflops: float,
                 overrides: list[str]) -> DistCAConfig:
    """The run's config: ``--config`` + the data and size flags + overrides + this mode's settings."""
    upsample, max_doc = data_settings(args, dist)
    elongate = LengthDistribution(dist).elongate_to(max_doc)
    return load_config(args.config, [
        f"--train.peak_tflops={peak_tflops}", "--data.source=synthetic", f"--data.distribution={dist}",
        f"--data.upsample_long={upsample}", f"--data.elongate={elongate}",
        f"--train.tokens_per_rank={args.tokens_per_rank}", *overrides, f"--train.steps={args.steps}",
        *MODES[mode], f"--output_dir={dest / dist / mode}", "--train.progress=false",
        "--train.log_every=1000000", "--train.tensorboard=false"])


def data_settings(args: argparse.Namespace, dist: str) -> tuple[float, int]:
    """``(upsample_long, max document tokens)`` for ``dist``: the flags where given, else ``DATA_DEFAULTS``."""
    upsample, ratio = DATA_DEFAULTS.get(dist, (16.0, 16))
    return (args.upsample_long or upsample, args.max_doc or ratio * args.tokens_per_rank)


def summarise(records: list[dict[str, Any]], skip: int, mode: str) -> dict[str, Any]:
    """Medians over the steps after ``skip``: per step, per rank and per server."""
    recs = records[skip:] if len(records) > skip else records
    n_ranks = len(recs[0]["attn_s_per_rank"])
    stages = recs[0]["stage_per_rank"]
    planes = sorted({r.get("data_plane", "local") for r in records})

    def per_rank(key: str) -> list[float]:
        return [statistics.median(r[key][i] for r in recs) for i in range(n_ranks)]

    def within_stage(r: dict[str, Any]) -> float:
        act = r["act_peak_mb_per_rank"]
        ratios = []
        for s in sorted(set(stages)):
            mine = [a for a, st in zip(act, stages, strict=True) if st == s]
            ratios.append(max(mine) / min(mine) if min(mine) > 0 else float("inf"))
        return max(ratios)

    cad = not mode.startswith("local")
    servers = len(recs[0]["server_busy_s"])
    return {
        "mode": mode,
        "data_plane": ", ".join(planes),  # what ran (the records' data_plane), not what the mode asked for
        "steps_used": [r["step"] for r in recs],
        "step_s": _median(r["step_s"] for r in recs),
        "tokens_per_s": _median(r["tokens_per_s"] for r in recs),
        "tokens_per_step": recs[0]["tokens"],
        "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
        # attention balance: measured over trainers (baseline) or servers (CAD), and as planned
        "attn_max_over_mean_measured": _median(
            (r["attn_load_max_over_mean_measured"] if cad else r["attn_max_over_mean_trainers"]) for r in recs),
        "attn_measured_over": ("trainers (kernel wall s)" if not cad else
                               "in-place servers (busy_s)" if planes == ["inplace"] else "servers (busy_s)"),
        "attn_max_over_mean_planned": _median(r["attn_load_max_over_mean_planned"] for r in recs),
        "trainer_attn_max_over_mean": _median(r["attn_max_over_mean_trainers"] for r in recs),
        "trainer_attn_cpu_max_over_mean": _median(r["attn_cpu_max_over_mean_trainers"] for r in recs),
        "exposed_comm_pct": _median(
            (r["exposed_comm_pct"] if cad else
             100 * max(e / s for e, s in zip(r["exchange_s_per_rank"], r["step_s_per_rank"], strict=True)))
            for r in recs),
        # pooled ticks: without the rounds a rank waits in while its stage has no micro-batch (bubble time)
        "exposed_comm_active_pct": _median(r.get("exposed_comm_active_pct") for r in recs) if cad else None,
        "plan_ms": _median(r["plan_ms"] for r in recs),
        "act_peak_max_over_min": _median(r["act_peak_max_over_min"] for r in recs),
        "act_peak_max_over_min_within_stage": _median(within_stage(r) for r in recs),
        "rss_peak_max_over_min": _median(max(r["rss_peak_mb_per_rank"]) / min(r["rss_peak_mb_per_rank"])
                                         for r in recs),
        "stage_per_rank": stages,
        "dp_rank_per_rank": recs[0]["dp_rank_per_rank"],
        "per_rank": {k: per_rank(f"{k}_per_rank") for k in
                     ("step_s", "attn_s", "attn_cpu_s", "linear_s", "wait_s", "compute_s", "blocked_s",
                      "exchange_s", "act_peak_mb", "rss_peak_mb")},
        "server_busy_s": [statistics.median(r["server_busy_s"][i] for r in recs) for i in range(servers)],
    }


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _inplace(s: dict[str, Any]) -> bool:
    return s["data_plane"] == "inplace"


def step_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, s in summaries.items():
        local = s["mode"].startswith("local")
        over = (f" trainers (CPU {_f(s['trainer_attn_cpu_max_over_mean'], '.2f')})" if local else
                " in-place servers" if _inplace(s) else " servers")
        rows.append([name, s["data_plane"], _f(s["step_s"], ".2f"), _f(s["tokens_per_s"], ".0f"),
                     _f(s["exposed_comm_pct"], ".1f"), _f(s.get("exposed_comm_active_pct"), ".1f"),
                     _f(s["attn_max_over_mean_measured"], ".2f") + over,
                     _f(s["attn_max_over_mean_planned"], ".2f"), _f(s["plan_ms"], ".1f"),
                     _f(max(s["per_rank"]["act_peak_mb"]), ".0f"), _f(s["act_peak_max_over_min"], ".2f"),
                     _f(s["act_peak_max_over_min_within_stage"], ".3f"), _f(s["rss_peak_max_over_min"], ".3f")])
    return markdown_table(["run", "data plane (ran)", "step s", "tokens/s", "exposed comm %",
                           "exposed comm % (active ticks)", "attn max/mean measured", "attn max/mean planned",
                           "plan ms", "act peak MB (max)",
                           "act max/min all", "act max/min in stage", "RSS HWM max/min"], rows)


def rank_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, s in summaries.items():
        pr = s["per_rank"]
        for i, (stage, dp) in enumerate(zip(s["stage_per_rank"], s["dp_rank_per_rank"], strict=True)):
            rows.append([name, f"{i} (pp{stage} dp{dp})", f"{pr['step_s'][i]:.2f}", f"{pr['attn_s'][i]:.2f}",
                         f"{pr['attn_cpu_s'][i]:.2f}", f"{pr['linear_s'][i]:.2f}", f"{pr['wait_s'][i]:.2f}",
                         f"{pr['exchange_s'][i]:.3f}" if s["mode"].startswith("local") else f"{pr['blocked_s'][i]:.2f}",
                         f"{pr['act_peak_mb'][i]:.1f}", f"{pr['rss_peak_mb'][i]:.0f}"])
        for i, busy in enumerate(s["server_busy_s"]):
            label = f"{i}: own server" if _inplace(s) else f"server {i}"
            rows.append([name, label, "—", f"{busy:.2f}", "—", "—", "—", "—", "—", "—"])
    return markdown_table(["run", "rank", "step s", "attention s", "attention CPU s", "linear s", "waiting s",
                           "comm s", "act peak MB", "RSS HWM MB"], rows)


def ratio_lines(summaries: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]], dists: list[str],
                modes: list[str]) -> list[str]:
    """Per distribution and CAD mode, against ``local``: tokens/s, exposed comm, balance, loss difference."""
    lines = []
    for dist in dists:
        for mode in modes:
            ref = "local-repack" if mode.endswith("-repack") else "local"  # the same packing
            loc = summaries.get(f"{dist}/{ref}")
            if mode.startswith("local") or loc is None:
                continue
            cad = summaries[f"{dist}/{mode}"]
            dloss = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in
                        zip(runs[f"{dist}/{ref}"]["records"], runs[f"{dist}/{mode}"]["records"], strict=True))
            lines.append(
                f"{dist}: {mode} (ran {cad['data_plane']}) / {ref} tokens/s "
                f"{cad['tokens_per_s'] / loc['tokens_per_s']:.2f}x, exposed comm "
                f"{_f(loc['exposed_comm_pct'], '.1f')}% -> {_f(cad['exposed_comm_pct'], '.1f')}%, attention max/mean "
                f"{_f(loc['attn_max_over_mean_measured'], '.2f')} (trainers) -> "
                f"{_f(cad['attn_max_over_mean_measured'], '.2f')} ({cad['attn_measured_over'].split(' (')[0]}); "
                f"largest relative loss difference {dloss:.1e}")
    return lines


def plot(summaries: dict[str, dict[str, Any]], dists: list[str], modes: list[str], path: Path) -> bool:
    """Per dist, one column per mode: stacked bars per trainer (attention, linear, blocked, waiting), plus
    every server's busy seconds for the CAD modes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(dists), len(modes), figsize=(5.5 * len(modes), 3.4 * len(dists)), squeeze=False)
    for row, dist in zip(axes, dists, strict=True):
        for ax, mode in zip(row, modes, strict=True):
            s = summaries.get(f"{dist}/{mode}")
            if s is None:
                continue
            pr = s["per_rank"]
            n = len(pr["step_s"])
            x = list(range(n))
            local = mode.startswith("local")
            attn = pr["attn_cpu_s"] if local else [0.0] * n
            blocked = [0.0] * n if local else [min(b, w) for b, w in zip(pr["blocked_s"], pr["wait_s"], strict=True)]
            other = [max(w - b, 0.0) for w, b in zip(pr["wait_s"], blocked, strict=True)]
            if local:
                ax.bar(x, attn, label="attention (kernel CPU)", color="tab:red")
            ax.bar(x, pr["linear_s"], bottom=attn, color="tab:blue",
                   label="linear + own attention (CPU)" if _inplace(s) else "linear (CPU)")
            base = [a + b for a, b in zip(attn, pr["linear_s"], strict=True)]
            if not local:
                ax.bar(x, blocked, bottom=base, color="tab:orange",
                       label="blocked on all-to-all" if _inplace(s) else "blocked on servers")
                base = [a + b for a, b in zip(base, blocked, strict=True)]
            ax.bar(x, other, bottom=base, label="waiting", color="lightgray")
            labels = [f"r{i}\npp{st}dp{dp}" for i, (st, dp) in
                      enumerate(zip(s["stage_per_rank"], s["dp_rank_per_rank"], strict=True))]
            if s["server_busy_s"]:
                xs = [n + 0.5 + i for i in range(len(s["server_busy_s"]))]
                ax.bar(xs, s["server_busy_s"], color="tab:green",
                       label="own server busy" if _inplace(s) else "server busy")
                x, labels = x + xs, labels + [f"r{i}\nsrv" if _inplace(s) else f"srv{i}" for i in range(len(xs))]
            ax.set_xticks(x, labels, fontsize=7)
            over = s["attn_measured_over"].split(" (")[0]
            ax.set(ylabel="seconds / step (median)",
                   title=f"{dist} / {mode} (ran {s['data_plane']}): attn max/mean "
                         f"{_f(s['attn_max_over_mean_measured'], '.2f')} ({over})")
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=8, help="steps per run; the first is left out of the medians")
    p.add_argument("--dists", nargs="+", default=["pretrain", "prolong"], help="synthetic length distributions")
    p.add_argument("--modes", nargs="+", choices=list(MODES),
                   default=[m for m in MODES if not m.endswith(("-serial", "-repack"))],
                   help="what to compare (default: all); a mode whose data plane is not built yet runs anyway and "
                        "reports the plane that ran")
    p.add_argument("--tokens-per-rank", type=int, default=2048)
    p.add_argument("--upsample-long", type=float, default=0.0,
                   help="sampling weight of documents > 16K (default: DATA_DEFAULTS per distribution)")
    p.add_argument("--max-doc", type=int, default=0, help="elongate each family so its longest document has "
                   "this many tokens (default: DATA_DEFAULTS per distribution)")
    p.add_argument("--out-dir", default=None, help="where results and the plot go (default out/e2e)")
    args, overrides = p.parse_known_args()
    modes = list(dict.fromkeys(args.modes))  # in the given order, once each
    dest = Path(args.out_dir) if args.out_dir else out_dir("e2e")
    dest.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # one peak for every run, as a one-thread trainer process computes
    peak = measure_peak_flops() / 1e12
    cfgs = {(dist, mode): build_config(args, dist, mode, dest, peak, overrides)
            for dist in args.dists for mode in modes}  # every config checked before the first run starts
    runs: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    skip = 1 if args.steps > 1 else 0  # the first step pays for warm-up (allocation, plan registration)
    for dist in args.dists:
        for mode in modes:
            cfg = cfgs[dist, mode]
            res = train(cfg)
            name = f"{dist}/{mode}"
            summaries[name] = s = summarise(res.records, skip, mode)
            runs[name] = {"config": cfg.to_dict(), "summary": s, "records": res.records,
                          "wall_s": res.wall_s}
            print(f"{name} (ran {s['data_plane']}): median step {s['step_s']:.2f} s, {s['tokens_per_s']:.0f} "
                  f"tokens/s, exposed comm {_f(s['exposed_comm_pct'], '.1f')}%, attention max/mean planned "
                  f"{s['attn_max_over_mean_planned']:.2f}, measured {_f(s['attn_max_over_mean_measured'], '.2f')} "
                  f"over {s['attn_measured_over']} ({res.wall_s:.0f} s)", file=sys.stderr, flush=True)
    cfg0 = cfgs[args.dists[0], modes[0]]
    info = run_info(torch.device("cpu"), config=args.config, steps=args.steps, skipped_steps=skip,
                    dists=" ".join(args.dists), modes=" ".join(modes), tokens_per_rank=args.tokens_per_rank,
                    data=" ".join(f"{d}: upsample_long {u:g}, max_doc {m}" for d in args.dists
                                  for u, m in [data_settings(args, d)]),
                    overrides=" ".join(overrides),
                    parallelism=f"PP={cfg0.train.pipeline_parallel} x DP={cfg0.data_parallel}, "
                                f"{cfg0.train.micro_batches} micro-batches",
                    pool_servers=cfg0.cluster.n_servers, peak_tflops_per_trainer=round(peak, 3),
                    tokens_per_step=next(iter(summaries.values()))["tokens_per_step"])
    lines = [*header_lines("End to end: colocated vs CAD data planes on long-tailed documents", info),
             *[f"- {x}" for x in CAN_AND_CANNOT], "",
             "Per step (medians; data plane: what the records say ran):", "", *step_table(summaries), "",
             "Per rank (medians; attention = kernel seconds for local, blocked on servers for CAD over a pool, "
             "local tasks + own server + waits for in-place; comm = k/v all-gather for local, blocked for CAD; "
             "waiting includes waiting for a core):", "",
             *rank_table(summaries), "", *[f"- {x}" for x in ratio_lines(summaries, runs, args.dists, modes)]]
    print("\n".join(lines))
    write_json(dest / "e2e.json", {"info": info, "notes": CAN_AND_CANNOT, "runs": runs})
    print(f"json: {dest / 'e2e.json'}")
    if plot(summaries, args.dists, modes, dest / "e2e.png"):
        print(f"plot: {dest / 'e2e.png'}")
    else:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
