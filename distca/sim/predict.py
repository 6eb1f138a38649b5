"""Predictions at the paper's scales: CAD vs the WLB-LLM-style baseline (and plain colocated packing)
over the paper's grid of models, GPU counts, maximum document lengths and length distributions.

Grid (the DistCA paper, §3, Tables 3 and 4): TP = 8 inside a node, so a node is one simulated
device. 3D runs have no pipeline; 4D runs use PP = 2 (8B) or 4 (34B). Tokens per node and step follow
the paper's batch sizes, which grow with the GPU count (8B 3D: 128K tokens per node; 34B 3D: 64K, 128K
at 512K; 4D: 512K for 8B, 256K for 34B, halved where Table 4 does). Every replica's micro-batch holds
``micro_tokens`` tokens (128K for 8B, 64K for 34B), documents split at replica boundaries.

The baseline searches its context-parallel degree (every power of two whose group holds the longest
document) and keeps the fastest, as the paper's "WLB-ideal" does over DP×CP.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from distca.config import ModelConfig
from distca.scheduler import BatchLayout
from distca.sim.hardware import Hardware
from distca.sim.step import (
    MicroBatch,
    Parallelism,
    SimOptions,
    StepReport,
    _Costs,
    _split_halves,
    peak_in_flight,
    simulate_step,
)
from distca.sim.workload import plain_packing, sample_documents, wlb_packing
from distca.train.flops import block_linear_params

K = 1024
# Published paper ranges (the DistCA paper, §3), for the plot and the table.
PAPER_RANGES = {("3d", "pretrain"): (1.07, 1.20), ("3d", "prolong"): (1.05, 1.12),
                ("4d", "pretrain"): (1.15, 1.30), ("4d", "prolong"): (1.10, 1.35)}
PAPER_RANGES_34B_4D = {"pretrain": (1.0, 1.15), "prolong": (1.0, 1.25)}


@dataclass(frozen=True)
class GridPoint:
    model: str  # "8b" | "34b"
    mode: str  # "3d" | "4d"
    gpus: int
    max_len: int
    dist: str
    tokens_per_node: int
    pp: int
    micro_tokens: int
    tp: int = 8

    @property
    def nodes(self) -> int:
        return self.gpus // self.tp

    @property
    def dp(self) -> int:
        return self.nodes // self.pp

    @property
    def replica_micro_tokens(self) -> int:
        """Tokens per replica per micro-batch: ``micro_tokens``, raised (to a multiple of 1K) when a
        micro-batch over all replicas could not hold one longest document."""
        need = -(-self.max_len // self.dp)
        return max(self.micro_tokens, -(-need // K) * K)

    @property
    def micro_batches(self) -> int:
        per_replica = self.tokens_per_node * self.nodes // self.dp
        return max(1, per_replica // self.replica_micro_tokens)

    @property
    def label(self) -> str:
        return f"{self.model} {self.mode} {self.gpus}g {self.max_len // K}K {self.dist}"


def paper_grid(dists=("pretrain", "prolong")) -> list[GridPoint]:
    pts = []
    for dist in dists:
        for gpus in (64, 128, 256):
            for L in (128 * K, 256 * K, 512 * K):
                pts.append(GridPoint("8b", "3d", gpus, L, dist, 128 * K, 1, 128 * K))
                pts.append(GridPoint("34b", "3d", gpus, L, dist, 128 * K if L == 512 * K else 64 * K, 1, 64 * K))
                t4 = {128 * K: 512 * K, 256 * K: 512 * K if gpus < 256 else 256 * K,
                      512 * K: 512 * K if gpus == 64 else 256 * K}[L]
                pts.append(GridPoint("8b", "4d", gpus, L, dist, t4, 2, 128 * K))
        for gpus in (128, 256, 512):
            for L in (128 * K, 256 * K, 384 * K):
                pts.append(GridPoint("34b", "4d", gpus, L, dist, 256 * K, 4, 64 * K))
    return pts


def idle_fraction(rep: StepReport) -> float:
    """Mean share of the step a device computes nothing: it is busy while it runs linear work, serves
    attention (in-place, or on its server process) or steps the optimizer; pipeline bubbles, waiting on
    peers and on communication are idle (:attr:`StepReport.idle_fraction`)."""
    return rep.idle_fraction


def _doc_cost(cfg: ModelConfig, hw: Hardware, tp: int):
    costs = _Costs(cfg, hw, Parallelism(tp=tp), SimOptions())
    _, per_block = block_linear_params(cfg)

    def cost(n: int) -> float:
        lin = 3 * 2.0 * per_block * n / tp / hw.linear_flops
        att = float(costs.model.time_s(n, n, -1, "fwd")[()] + costs.model.time_s(n, n, -1, "bwd")[()])
        return lin + att

    return cost


def trained_documents(plain: list[MicroBatch], halves: bool) -> list[np.ndarray]:
    """Per micro-batch, the lengths of the documents CAD trains: its packing's (a document cut at a micro-batch
    boundary restarts), and with ``halves`` (ping-pong's ``repack`` split) each micro-batch's two halves'."""
    out = []
    for mb in plain:
        parts = _split_halves(mb) if halves else [mb]
        out.append(np.concatenate([BatchLayout.from_ranks(p.ranks, p.continues).doc_len for p in parts]))
    return out


def _packed(lengths: np.ndarray, replicas: int, tokens_per_replica: int) -> MicroBatch:
    from distca.data.packing import pack_into_ranks

    p = pack_into_ranks(lengths, replicas, tokens_per_replica)
    return MicroBatch(p.ranks, p.continues)


def _wgrad_kept(opt: SimOptions, pp: int, m: int) -> list[int]:
    if not opt.defer_wgrad:
        return [0] * pp
    from distca.train.schedule import weight_grad_plan

    if opt.schedule == "pooled":
        return weight_grad_plan(pp, m).peak_kept()
    return [min(s, m) for s in range(pp)]  # 1F1B: stage s keeps its last s backward passes' until the end


def predict_point(pt: GridPoint, cfg: ModelConfig, hw: Hardware, seeds: int = 2, eps: float = 0.05,
                  pingpong: bool = True, layer_chunks: int = 0, slack: float = 0.1,
                  schedules: tuple[str, ...] = ("1f1b",), idle_aware: bool = False,
                  defer_wgrad: bool = False, stage_split: str = "even", nano_split: str = "repack",
                  pingpong_order: str = "layer", baseline_docs: str = "trained") -> dict:
    """Median step time of CAD (per pipeline schedule), plain colocated and the best WLB-style CP degree
    over ``seeds`` steps. ``layer_chunks=0``: one attention round per layer (ping-pong per layer, forward
    and backward). With ``idle_aware`` the pooled schedule is also run with the idle-aware what-if balance
    (4D only), and with ``defer_wgrad`` each schedule also with deferred weight gradients (``<schedule>+wgrad``).
    Without a pipeline (pp = 1) the pooled schedule and deferral change nothing: the 1F1B result is copied.
    ``stage_split`` (``even`` | ``balanced``, distca.config.stage_blocks) applies to every system, the baselines
    too: a split that evens out the LM head is open to any pipeline, so it is no part of CAD's speedup.
    ``nano_split`` is how CAD cuts a micro-batch into its two ping-pong nano-batches (``SimOptions.nano_split``):
    ``repack``, the paper's driver (documents cut at the half, each half planned alone, so the first round can
    start before the second nano-batch's pre-attention work), ``rows``, this repository's trainer (the halves
    of every rank's rows, each planned with the whole micro-batch's keys: exact, but the first round waits for
    both halves' q/k/v, so it overlaps no linear work), or ``prefix`` (a what-if of an exact split whose first
    round needs none of the second's keys). ``pingpong_order`` ``fused`` is the paper's Fig. 7 order
    (``SimOptions.pingpong_order``), a what-if the trainer does not run.

    ``baseline_docs``: which documents the baselines (plain colocated, WLB-style) attend. ``trained`` (default):
    the documents CAD trains, cut where its packing cuts them — at micro-batch boundaries, and with ping-pong's
    ``repack`` split at the half of each micro-batch too — so every system does the same attention work.
    ``whole``: the sampled documents (the WLB-style baseline keeps them whole; grids before 2026-12-03 13:30 UTC),
    which credits CAD with the attention its cuts remove (:func:`trained_documents`)."""
    if baseline_docs not in ("trained", "whole"):
        raise ValueError(f"baseline_docs must be 'trained' or 'whole', got {baseline_docs!r}")
    if pt.nodes % pt.pp:
        raise ValueError(f"{pt.label}: {pt.nodes} nodes do not split into pp={pt.pp} stages")
    if not schedules:
        raise ValueError("no schedule to predict")
    m = pt.micro_batches
    total = pt.dp * pt.replica_micro_tokens * m
    base = Parallelism(pp=pt.pp, dp=pt.dp, tp=pt.tp, micro_batches=m)
    variants = {sch: SimOptions(system="cad", pingpong=pingpong, eps=eps, layer_chunks=layer_chunks, schedule=sch)
                for sch in schedules}
    if idle_aware and pt.pp > 1:
        variants["pooled+idle_aware"] = SimOptions(system="cad", pingpong=pingpong, eps=eps,
                                                   layer_chunks=layer_chunks, schedule="pooled", idle_aware=True)
    if defer_wgrad:  # one stage: nothing to defer, the result is copied like the pooled schedule's
        for sch in schedules:
            variants[f"{sch}+wgrad"] = SimOptions(system="cad", pingpong=pingpong, eps=eps, layer_chunks=layer_chunks,
                                                  schedule=sch, defer_wgrad=True)
    variants = {k: replace(v, stage_split=stage_split, nano_split=nano_split,
                           pingpong_order=pingpong_order if pingpong else "layer") for k, v in variants.items()}
    col_opt = SimOptions(system="colocated", layer_chunks=layer_chunks, stage_split=stage_split)
    cost = _doc_cost(cfg, hw, pt.tp)
    rows: dict[str, list] = {"colocated": [], "wlb": []}
    cad: dict[str, dict[str, list]] = {v: {"step": [], "attn": [], "idle": [], "full": [], "partial": [], "tail": []}
                                       for v in variants}
    extra: dict = {"col_attn": [], "wlb_cp": [], "wlb_attn": [], "wlb_tokens_max_min": []}
    for seed in range(seeds):
        lengths = sample_documents(pt.dist, pt.max_len, total, seed)
        plain = plain_packing(lengths, pt.dp, pt.replica_micro_tokens, m)
        base_plain, base_lengths = plain, lengths
        if baseline_docs == "trained":
            halves = pingpong and nano_split == "repack"
            per_mb = trained_documents(plain, halves)
            base_lengths = np.concatenate(per_mb)
            if halves:  # the colocated baseline packs the same documents, the halves' side by side
                base_plain = [_packed(d, pt.dp, pt.replica_micro_tokens) for d in per_mb]
        done: dict[str, StepReport] = {}
        for name, opt in variants.items():
            same = next((done[k] for k in ("1f1b", "pooled") if k in done), None)
            if pt.pp == 1 and (opt.schedule == "pooled" or opt.defer_wgrad) and same is not None:
                r = same  # one stage: the same ticks, the same plans, nothing to defer
            else:
                r = simulate_step(cfg, hw, base, opt, plain)
            done[name] = r
            c = cad[name]
            c["step"].append(r.step_s)
            c["attn"].append(r.attention_max_over_mean)
            c["idle"].append(r.idle_fraction)
            for k in ("full", "partial", "tail"):
                c[k].append(r.idle_split_s.get(k, 0.0) / r.step_s)
        r_col = simulate_step(cfg, hw, base, col_opt, base_plain)
        rows["colocated"].append(r_col.step_s)
        extra["col_attn"].append(r_col.attention_max_over_mean)
        best: tuple[float, int, StepReport] | None = None
        cp = 1
        while cp <= pt.dp:
            if pt.dp % cp == 0 and (1 + slack) * cp * pt.replica_micro_tokens >= pt.max_len:
                par = replace(base, cp=cp)
                mbs = wlb_packing(base_lengths, pt.dp // cp, m, cost, slack)
                r = simulate_step(cfg, hw, par, SimOptions(system="wlb", layer_chunks=layer_chunks,
                                                                  stage_split=stage_split), mbs)
                if best is None or r.step_s < best[0]:
                    best = (r.step_s, cp, r)
            cp *= 2
        if best is None:
            raise ValueError(f"{pt.label}: no CP degree holds a {pt.max_len}-token document")
        rows["wlb"].append(best[0])
        extra["wlb_cp"].append(best[1])
        extra["wlb_attn"].append(best[2].attention_max_over_mean)
        extra["wlb_tokens_max_min"].append(best[2].tokens_max_over_min)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    by_schedule = {}
    for name, c in cad.items():
        step = float(np.median(c["step"]))
        sch = variants[name].schedule
        by_schedule[name] = {
            "step_s": step, "speedup_vs_wlb": med["wlb"] / step, "speedup_vs_colocated": med["colocated"] / step,
            "attn_max_over_mean": float(np.mean(c["attn"])), "idle_fraction": float(np.median(c["idle"])),
            "idle_split": {k: float(np.median(c[k])) for k in ("full", "partial", "tail")},
            "in_flight": peak_in_flight(sch, pt.pp, m),
            # deferred weight gradients: per stage, the most micro-batches whose jobs it holds at once (memory)
            "wgrad_kept": _wgrad_kept(variants[name], pt.pp, m)}
    first = by_schedule[schedules[0]]
    med["cad"] = first["step_s"]
    return {"point": pt.__dict__, "label": pt.label, "step_s": med, "micro_batches": m,
            "speedup_vs_wlb": first["speedup_vs_wlb"], "speedup_vs_colocated": first["speedup_vs_colocated"],
            "cad_attn_max_over_mean": first["attn_max_over_mean"],
            "colocated_attn_max_over_mean": float(np.mean(extra["col_attn"])),
            "wlb_cp": int(np.median(extra["wlb_cp"])), "wlb_attn_max_over_mean": float(np.mean(extra["wlb_attn"])),
            "wlb_tokens_max_over_min": float(np.mean(extra["wlb_tokens_max_min"])),
            "cad_idle_fraction": first["idle_fraction"], "tokens_per_step": total, "cad": by_schedule}
