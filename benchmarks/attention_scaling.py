"""Attention-only weak scaling of CAD: the real scheduler on a simulated H100 cluster, next to
MagiAttention's published numbers.

Default (simulated): for each GPU count (8, 16, 32, 64), ``--tokens-per-gpu`` tokens per GPU (8K: weak
scaling, total = 8K x GPUs) of variable-length documents, each at most a quarter of the total
(``--doc-cap``), drawn from the repository's ``pretrain`` length distribution elongated to that cap
(``distca.sim.workload.sample_documents``, the simulator's convention; longer draws are cut at the cap)
and packed in order, 8K per GPU, split at GPU boundaries. Attention shape: 64 query / 8 kv heads, head
dim 128, bf16 (MagiAttention's distributed benchmark). Every GPU is a trainer and an attention server
(colocated). The real planner (``distca.scheduler.make_plan``) places the attention tasks; time per pass:

- **compute**: each server's tasks as one fused varlen call, costed by the simulator's kernel model
  (``Hardware.attention_call_s``). Two kernel models: the calibrated table measured on an H200
  (``torch_varlen``, FlashAttention-2 class) reused for the H100 (``distca.sim.hardware.h100_with_h200_kernels``
  says why), and the published-figure fallback, pairs at 0.5 x the 989 TFLOP/s peak (assumed; the
  FlashAttention-3 class MagiAttention's FFA kernel is in);
- **dispatch**: the plan's actual rows (``Plan.messages``: q/k/v out and out/lse back forward; q, out,
  dout, lse, k, v out and dq, dk, dv back backward), remote rows only, through the simulator's
  ``Link`` model: NVLink (450 GB/s per direction) to GPUs of the same 8-GPU node, InfiniBand (50 GB/s
  per GPU) to others. A device's phase time is, per link, one latency per peer plus
  ``max(bytes out, bytes in) / bandwidth`` (full-duplex links; NVLink and the NIC work concurrently);
- **key/value relay** (default; ``--no-relay``: every key row sent directly, and a side-by-side table of both on
  the same plans): key rows that several servers of one node need from a GPU of another node cross InfiniBand
  once, to a gateway server of that node, and are forwarded over NVLink in a second all-to-all; their gradients
  come back the same way, summed at the gateway (``distca.scheduler.relay``: the same routes the in-place data
  plane runs, ``RowExchange(nodes=...)``, ``cluster.devices_per_node``). Each hop is a collective: the forward hop
  starts after the whole first round; the gradients' hop after every server's kernels, holding its device;
- **timeline** (the simulator's event engine, ``distca.sim.engine``): per GPU a compute stream and a
  communication stream. With ping-pong (default, as DistCA trains) each GPU's queries are two
  nano-batches (rows ``[0, T/2)`` and ``[T/2, T)``, planned separately, keys from the whole batch): the
  second one's dispatch overlaps the first one's kernels, and the first one's return the second one's
  kernels. A server starts a nano-batch when every GPU's dispatch of it has arrived (an all-to-all, as
  ``distca.sim.step`` models a round); a pass ends when every return has. ``--no-pingpong``: one round.

TFLOP/s per GPU counts the *useful* FLOPs of the mask, ``4 * head_dim * heads * pairs`` forward and 2.5x
that backward (``distca.attention.cost``), pairs being the (query, key) pairs the family's mask keeps
(``Mask.pairs(L, 0, L)`` per document): how MagiAttention counts them. Mask families (``--families``, specs as
``Mask.parse`` takes them: ``causal``, ``window:4096``, ``chunked:8192``, ``sink_window:4:4096``,
``prefix_lm:2048``, ``bidirectional``; default ``causal`` and ``window:W`` of ``--window``) are planned by their
mask (``SchedulerConfig(mask=...)``); a family other than causal or a window runs as kernel rectangles over
exact key ranges, each costed by its kind (``Hardware.attention_rects_s``). Numbers are SIMULATED;
MagiAttention's and Megatron's are PUBLISHED, measured on H100s.

``--cpu``: no simulated hardware; the real scheduler at sizes this machine plans quickly (2-16 servers,
small token budgets): its balance (max/mean pairs per server), the bytes it moves per GPU and its
planning time, per mask family (default every family — causal, window, chunked, sink + window, prefix-LM —
scaled to the token budget; ``--families`` as given).

    python benchmarks/attention_scaling.py [--gpus 8 16 32 64] [--seeds 8] [--window 4096] [--no-pingpong]
    python benchmarks/attention_scaling.py --families causal window:4096 chunked:8192 sink_window:4:4096 prefix_lm:2048
    python benchmarks/attention_scaling.py --cpu [--servers 2 4 8 16] [--tokens-per-gpu 2048]

Results go to out/attention_scaling/ (JSON, PNG) and the plot to docs/figures/attention_scaling.png
(``--plot``); the printed tables paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, header_lines, markdown_table, out_dir, run_info, write_json

from distca.attention.cost import AttentionShape, attention_flops
from distca.data.packing import pack_into_ranks
from distca.masks import Mask
from distca.scheduler import LOCAL, BatchLayout, Placement, SchedulerConfig, make_plan
from distca.scheduler.calls import local_rects, server_rects
from distca.scheduler.relay import KvRelay, kv_relay, nodes_of
from distca.sim.engine import TaskGraph, simulate
from distca.sim.hardware import Hardware, h100_with_h200_kernels, published
from distca.sim.workload import sample_documents

K = 1024
# MagiAttention's published distributed benchmark (H100, varlen-causal, 8K tokens per GPU; TFLOP/s per GPU).
PUBLISHED = {
    "MagiAttention": {8: (459.0, 360.0), 64: (237.0, 264.0)},
    "Megatron hybrid CP": {8: (277.0, 226.0), 64: (160.0, 163.0)},
}
GOAL = 0.80  # at 64 GPUs, >= 80% of the 8-GPU per-GPU throughput (varlen-causal)


@dataclass(frozen=True)
class Family:
    """A mask family the benchmark plans (the planner takes its mask: ``SchedulerConfig(mask=...)``)."""

    name: str
    mask: Mask = field(default_factory=Mask.causal)

    @property
    def window(self) -> int:
        """The runtime window of a causal (-1) or sliding-window family; -1 for the others (see ``mask``)."""
        w = self.mask.as_window
        return -1 if w is None else w


def _tokens(n: int) -> str:
    return f"{n // K}K" if n % K == 0 else str(n)


def family(spec: str | Mask) -> Family:
    """The family of a mask spec (``Mask.parse``): ``varlen-causal``, ``varlen-window 4K``, ``varlen-chunked 8K``..."""
    m = spec if isinstance(spec, Mask) else Mask.parse(spec)
    name = {"causal": "varlen-causal", "window": f"varlen-window {_tokens(m.window)}",
            "chunked": f"varlen-chunked {_tokens(m.chunk)}",
            "sink_window": f"varlen-sink {m.sink} + window {_tokens(m.window)}",
            "prefix_lm": f"varlen-prefix-LM {_tokens(m.prefix)}", "bidirectional": "varlen-bidirectional"}
    return Family(name.get(m.family, m.spec()), m)


def families(window: int, specs: list[str] | None = None) -> list[Family]:
    """``specs`` (``--families``) or the default pair: varlen-causal and a window of ``window`` keys."""
    return [family(s) for s in (specs or ["causal", f"window:{window}"])]


def all_families(window: int) -> list[Family]:
    """Every family, scaled to a window of ``window`` keys: causal, window, chunked (2 windows), sink + window,
    prefix-LM (half a window)."""
    return families(window, ["causal", f"window:{window}", f"chunked:{2 * window}", f"sink_window:4:{window}",
                             f"prefix_lm:{max(1, window // 2)}"])


def _sched(family: Family, eps: float, granularity: int) -> SchedulerConfig:
    return SchedulerConfig(eps=eps, granularity=granularity, mask=family.mask)


def sample_layout(gpus: int, tokens_per_gpu: int, doc_cap: float, seed: int, dist: str = "pretrain") -> BatchLayout:
    """One step: documents <= ``doc_cap`` x total tokens, packed in order ``tokens_per_gpu`` per GPU."""
    total = gpus * tokens_per_gpu
    lengths = sample_documents(dist, max(1, int(doc_cap * total)), total, seed)
    p = pack_into_ranks(lengths, gpus, tokens_per_gpu)
    return BatchLayout.from_ranks(p.ranks, p.continues)


def useful_flops(layout: BatchLayout, family: Family, shape: AttentionShape, which: str) -> float:
    """FLOPs of the pairs the family's mask keeps, ``mask.pairs(L, 0, L)`` per document."""
    pairs = sum(family.mask.pairs(n, 0, n) for n in layout.doc_len.tolist())
    return float(attention_flops(pairs, shape.n_heads, shape.head_dim, which))


def plan_nanos(layout: BatchLayout, family: Family, shape: AttentionShape, eps: float, granularity: int,
               pingpong: bool, hw: Hardware | None = None):
    """The plans of one step: two nano-batches (query rows split in half on every GPU) or one. ``hw``: plan
    node-aware on its nodes (``Placement.devices_per_node``, a byte between nodes weighing the bandwidth ratio of
    its two links); ``None``: the node-blind planner (every remote byte the same)."""
    n = layout.n_ranks
    if hw is None:
        placement = Placement(n, n, "colocated")
    else:
        placement = Placement(n, n, "colocated", devices_per_node=hw.devices_per_node,
                              inter_node_cost=hw.intra.bandwidth / hw.inter.bandwidth)
    cfg = _sched(family, eps, granularity)
    if not pingpong:
        plan, t = make_plan(layout, placement, cfg, shape)
        return [plan], t.plan_ms + t.compile_ms
    tok = layout.rank_tokens
    half = tok // 2
    plans, ms = [], 0.0
    for lo, hi in ((np.zeros(n, dtype=np.int64), half), (half, tok)):
        plan, t = make_plan(layout.query_rows(lo, hi), placement, cfg, shape, keys=layout)
        plans.append(plan)
        ms += t.plan_ms + t.compile_ms
    return plans, ms


def _pair_bytes(plan, which: str, direction: str, relay: KvRelay | None) -> dict[tuple[int, int], float]:
    """Bytes per (sending device, receiving device) of one all-to-all phase, remote rows only; with ``relay``, each
    relayed (trainer, server) pair's key rows replaced by the route's union to its gateway (none to the others)."""
    out: dict[tuple[int, int], float] = {}
    for d, tensors, x in plan.messages(which):
        if d != direction:
            continue
        rb = sum(plan.row_bytes(t) for t in tensors)
        kv = tensors[0] in ("k", "dk")
        rem = x.remote
        for r, s, n in zip(x.rank[rem].tolist(), x.server[rem].tolist(), x.n[rem].tolist(), strict=True):
            if kv and relay is not None and relay.route(r, s) is not None:
                continue  # counted per route below
            key = (r, s) if direction == "to_server" else (s, r)
            out[key] = out.get(key, 0.0) + n * rb
        if kv and relay is not None:
            for rt in relay.routes:
                key = (rt.src, rt.gateway) if direction == "to_server" else (rt.gateway, rt.src)
                out[key] = out.get(key, 0.0) + rt.n_rows * rb
    return out


def _relay_hop_bytes(plan, which: str, direction: str, relay: KvRelay | None) -> dict[tuple[int, int], float]:
    """The relay's intra-node hop of a phase with key rows: gateway -> members (``to_server``: forwarding k, v) or
    members -> gateway (``to_trainer``: dk, dv to be summed); empty when the phase has no key rows or no route."""
    out: dict[tuple[int, int], float] = {}
    if relay is None:
        return out
    for d, tensors, _x in plan.messages(which):
        if d != direction or tensors[0] not in ("k", "dk"):
            continue
        rb = sum(plan.row_bytes(t) for t in tensors)
        for rt in relay.routes:
            for s in rt.members:
                if s != rt.gateway:
                    key = (rt.gateway, s) if direction == "to_server" else (s, rt.gateway)
                    out[key] = out.get(key, 0.0) + rt.size(s) * rb
    return out


def phase_bytes(pairs: dict[tuple[int, int], float], n: int, per_node: int):
    """Per device and link (0 intra-node, 1 inter-node): bytes out, bytes in, peers sent to."""
    out = np.zeros((n, 2))
    inn = np.zeros((n, 2))
    peers = [[set(), set()] for _ in range(n)]
    for (src, dst), b in pairs.items():
        inter = int(src // per_node != dst // per_node)
        out[src, inter] += b
        inn[dst, inter] += b
        peers[src][inter].add(dst)
    return out, inn, [[len(p[0]), len(p[1])] for p in peers]


def phase_time(hw: Hardware, out: np.ndarray, inn: np.ndarray, peers) -> np.ndarray:
    """Seconds per device for one all-to-all phase: per link one latency per peer plus the larger of
    bytes out and bytes in over its bandwidth; the two links run concurrently."""
    t = np.zeros(out.shape[0])
    for dev in range(out.shape[0]):
        for i, link in enumerate((hw.intra, hw.inter)):
            nbytes = max(out[dev, i], inn[dev, i])
            if nbytes > 0:
                t[dev] = max(t[dev], peers[dev][i] * link.latency_s + nbytes / link.bandwidth)
    return t


def _rects_s(hw: Hardware, model, r, which: str) -> float:
    """One call over a plan's kernel rectangles (``server_rects`` / ``local_rects``), each costed by its kind."""
    return hw.attention_rects_s(model, r.q1 - r.q0, r.k1 - r.k0, r.kind == "full", r.window, which)


def pass_time(plans, hw: Hardware, shape: AttentionShape, window: int, which: str, relay: bool = True) -> dict:
    """Simulated time of one pass over ``plans`` (the nano-batches in order) on ``hw``. ``window``: the causal /
    window plans' runtime window (a masked plan's tasks are costed as its rectangles instead). ``relay``: key/value
    rows between nodes go through the node relay the in-place data plane runs (``distca.scheduler.relay``;
    ``RowExchange(nodes=...)``): once per node to a gateway, then a second all-to-all inside the node; gradients
    back the same way, summed at the gateway."""
    n = plans[0].n_servers
    model = hw.attention_model(shape)
    per_node = hw.devices_per_node
    nodes = nodes_of(n, per_node)
    g = TaskGraph()
    gpu = [g.stream(f"gpu{d}") for d in range(n)]
    comm = [g.stream(f"comm{d}") for d in range(n)]
    compute = np.zeros((len(plans), n))
    link_bytes = np.zeros(n)
    phases = []  # per nano-batch: {(direction, hop): per-device seconds}
    for i, plan in enumerate(plans):
        q, kv = plan.task_q1 - plan.task_q0, plan.task_k1 - plan.task_k0
        for j in range(n):
            sel = plan.task_server == j
            if plan.masked:
                compute[i, j] = _rects_s(hw, model, server_rects(plan, j), which)
            else:
                compute[i, j] = hw.attention_call_s(model, q[sel], kv[sel], window, which)
        local = plan.task_server == LOCAL  # LOCAL tasks (none under colocated placement) run on their trainer
        for r in np.unique(plan.task_rank[local]).tolist():
            sel = local & (plan.task_rank == r)
            if plan.masked:
                compute[i, r] += _rects_s(hw, model, local_rects(plan, r), which)
            else:
                compute[i, r] += hw.attention_call_s(model, q[sel], kv[sel], window, which)
        rel = kv_relay(plan, nodes, nodes) if relay else None
        times = {}
        for direction in ("to_server", "to_trainer"):
            for hop, pairs in (("main", _pair_bytes(plan, which, direction, rel)),
                               ("relay", _relay_hop_bytes(plan, which, direction, rel))):
                if hop == "relay" and not pairs:
                    continue
                out, inn, peers = phase_bytes(pairs, n, per_node)
                link_bytes += out.sum(axis=1)
                times[(direction, hop)] = phase_time(hw, out, inn, peers)
        phases.append(times)
    # An all-to-all ends for everyone when every member's part has (the runtime's collectives): a relay hop starts
    # after the whole first round, a server after the whole dispatch. The gradients' relay hop starts after every
    # server's kernels and holds its device until it ends (RowExchange runs it inside the return's start, before the
    # device's next nano-batch), then the return goes out on the communication stream.
    attn, ready, send_t, ret_t = [], [], [], []
    for i, times in enumerate(phases):
        sends = [g.add(comm[d], float(times[("to_server", "main")][d]), "dispatch", uses_core=False) for d in range(n)]
        if ("to_server", "relay") in times:
            sends = [g.add(comm[d], float(times[("to_server", "relay")][d]), "relay", tuple(sends), uses_core=False)
                     for d in range(n)]
        attn.append([g.add(gpu[j], float(compute[i, j]), "attention", tuple(sends)) for j in range(n)])
        ready.append(attn[i])
        if ("to_trainer", "relay") in times:
            ready[i] = [g.add(gpu[d], float(times[("to_trainer", "relay")][d]), "relay", tuple(attn[i]),
                              uses_core=False) for d in range(n)]
        send_t.append(sum(t for (dr, _), t in times.items() if dr == "to_server"))
        ret_t.append(sum(t for (dr, _), t in times.items() if dr == "to_trainer"))
    for i, times in enumerate(phases):
        for d in range(n):
            g.add(comm[d], float(times[("to_trainer", "main")][d]), "return", (ready[i][d],), uses_core=False)
    res = simulate(g)
    slowest = float(compute.sum(axis=0).max())
    return {"time_s": res.makespan_s, "compute_max_s": slowest, "compute_mean_s": float(compute.sum(axis=0).mean()),
            "exposed_comm_s": res.makespan_s - slowest,
            "comm_s": float(sum(s.max() + r.max() for s, r in zip(send_t, ret_t, strict=True))),
            "bytes_per_gpu": float(link_bytes.mean()), "bytes_max_gpu": float(link_bytes.max())}


def balance(plans) -> float:
    """max/mean attended pairs per server over the step (the nano-batches together)."""
    pairs = sum(p.server_pairs for p in plans)
    return float(pairs.max() / pairs.mean()) if pairs.mean() > 0 else 1.0


def diagnose(plans, granularity: int) -> dict:
    """Where a step's bytes come from: the share that is k/v, the busiest GPU against the mean, and the moved
    tasks thinner than one shard (``q_len < granularity``: a cut that fills a receiver's spare capacity)."""
    kv = q = 0
    moved = thin = thin_keys = moved_keys = 0
    per_dev = np.zeros(plans[0].n_servers)
    for p in plans:
        kv += int(p.kv_xfer.n[p.kv_xfer.remote].sum()) * (p.row_bytes("k") + p.row_bytes("v"))
        q += int(p.q_xfer.n[p.q_xfer.remote].sum()) * (p.row_bytes("q") + p.row_bytes("out") + p.row_bytes("lse"))
        for x, rb in ((p.kv_xfer, p.row_bytes("k") + p.row_bytes("v")), (p.q_xfer, p.row_bytes("q"))):
            np.add.at(per_dev, x.rank[x.remote], x.n[x.remote] * rb)
        away = (p.task_server >= 0) & (p.task_server != p.task_rank)
        ql, kl = (p.task_q1 - p.task_q0)[away], (p.task_k1 - p.task_k0)[away]
        moved += int(away.sum())
        moved_keys += int(kl.sum())
        thin += int((ql < granularity).sum())
        thin_keys += int(kl[ql < granularity].sum())
    return {"kv_share": kv / max(1, kv + q), "dispatch_max_over_mean": float(per_dev.max() / per_dev.mean()),
            "moved_tasks": moved, "thin_tasks": thin, "thin_key_share": thin_keys / max(1, moved_keys)}


def kernels() -> dict[str, Hardware]:
    return {"H200-measured table (FA2-class)": h100_with_h200_kernels(),
            "0.5 x peak (FA3-class, assumed)": published("h100")}


def simulated(args) -> None:
    shape = AttentionShape(args.heads, args.kv_heads, args.head_dim, 2)
    hws = kernels()
    hw0 = next(iter(hws.values()))  # the links and node size the node-aware planner sees (the same H100 cluster)
    fams = families(args.window, args.families)
    results = []  # one per (gpus, family, kernel)
    sbs = []  # node-blind vs node-aware, first kernel model, same seeds
    t_start = time.time()
    for gpus in args.gpus:
        for fam in fams:
            acc = {name: [] for name in hws}
            bal, plan_ms, diags, blind = [], [], [], []
            for seed in range(args.seeds):
                layout = sample_layout(gpus, args.tokens_per_gpu, args.doc_cap, seed)
                if not args.node_blind:  # the same seeds through the node-blind planner, for the side-by-side
                    flat, ms_flat = plan_nanos(layout, fam, shape, args.eps, args.granularity, not args.no_pingpong)
                    blind.append([ms_flat] + [useful_flops(layout, fam, shape, w) / gpus / pass_time(
                        flat, hw0, shape, fam.window, w, relay=not args.no_relay)["time_s"] / 1e12
                                              for w in ("fwd", "bwd")])
                plans, ms = plan_nanos(layout, fam, shape, args.eps, args.granularity, not args.no_pingpong,
                                       None if args.node_blind else hw0)
                bal.append(balance(plans))
                plan_ms.append(ms)
                diags.append(diagnose(plans, args.granularity))
                for name, hw in hws.items():
                    row = {"flops_fwd": useful_flops(layout, fam, shape, "fwd"),
                           "flops_bwd": useful_flops(layout, fam, shape, "bwd"),
                           "n_docs": layout.n_docs, "max_doc": int(layout.doc_len.max())}
                    for which in ("fwd", "bwd"):
                        row[which] = pass_time(plans, hw, shape, fam.window, which, relay=not args.no_relay)
                        if not args.no_relay:  # the same plans with every key row sent directly, side by side
                            row[f"direct_{which}"] = pass_time(plans, hw, shape, fam.window, which, relay=False)
                    acc[name].append(row)
            for name, rows in acc.items():
                r = {"gpus": gpus, "family": fam.name, "mask": fam.mask.spec(), "window": fam.window, "kernel": name,
                     "balance": float(np.mean(bal)), "balance_max": float(np.max(bal)),
                     "plan_ms": float(np.mean(plan_ms)), "n_docs": float(np.mean([x["n_docs"] for x in rows])),
                     "max_doc": int(max(x["max_doc"] for x in rows)),
                     **{k: float(np.mean([d[k] for d in diags])) for k in diags[0]}}
                for which in ("fwd", "bwd"):
                    r[f"tflops_{which}"] = float(np.mean([x[f"flops_{which}"] / gpus / x[which]["time_s"] / 1e12
                                                          for x in rows]))
                    if not args.no_relay:
                        r[f"direct_tflops_{which}"] = float(np.mean([
                            x[f"flops_{which}"] / gpus / x[f"direct_{which}"]["time_s"] / 1e12 for x in rows]))
                        r[f"direct_{which}_bytes_max_gpu"] = float(np.mean([x[f"direct_{which}"]["bytes_max_gpu"]
                                                                            for x in rows]))
                    for key in ("time_s", "compute_max_s", "compute_mean_s", "exposed_comm_s", "comm_s",
                                "bytes_per_gpu", "bytes_max_gpu"):
                        r[f"{which}_{key}"] = float(np.mean([x[which][key] for x in rows]))
                results.append(r)
            if blind:
                b = np.mean(blind, axis=0)
                r0 = next(x for x in results if x["gpus"] == gpus and x["family"] == fam.name)
                sbs.append({"gpus": gpus, "family": fam.name, "blind_plan_ms": float(b[0]), "blind_tflops_fwd":
                            float(b[1]), "blind_tflops_bwd": float(b[2]), "aware_plan_ms": r0["plan_ms"],
                            "aware_tflops_fwd": r0["tflops_fwd"], "aware_tflops_bwd": r0["tflops_bwd"]})
            print(f"{gpus} GPUs, {fam.name}: planned in {np.mean(plan_ms):.0f} ms per step "
                  f"({time.time() - t_start:.0f} s so far)", file=sys.stderr, flush=True)
    info = run_info(torch.device("cpu"), gpus=" ".join(map(str, args.gpus)), tokens_per_gpu=args.tokens_per_gpu,
                    doc_cap=f"{args.doc_cap} of total", dist="pretrain (elongated to the cap)", seeds=args.seeds,
                    heads=f"{args.heads}/{args.kv_heads}x{args.head_dim} bf16", eps=args.eps,
                    granularity=args.granularity, pingpong=not args.no_pingpong, window=args.window,
                    families=" ".join(f.mask.spec() for f in fams),
                    placement="colocated (every GPU a trainer and a server)",
                    planner="node-blind" if args.node_blind else "node-aware (devices_per_node=8, inter_node_cost=9)",
                    kv_relay="off (every key row sent directly)" if args.no_relay else
                    "on (key rows once per node to a gateway, forwarded over NVLink; distca.scheduler.relay)",
                    links="NVLink 450 GB/s/dir in 8-GPU nodes, IB 50 GB/s/GPU across")
    lines = [*header_lines("Attention-only weak scaling, SIMULATED H100 cluster (real CAD scheduler)", info)]
    lines += [f"Goal: at 64 GPUs >= {GOAL:.0%} of the 8-GPU per-GPU throughput for varlen-causal "
              "(MagiAttention keeps 52% fwd, 73% bwd; published, H100).", ""]
    rows = []
    base = {(r["family"], r["kernel"]): r for r in results if r["gpus"] == min(args.gpus)}
    for r in results:
        b = base[(r["family"], r["kernel"])]
        fr, br = r["tflops_fwd"] / b["tflops_fwd"], r["tflops_bwd"] / b["tflops_bwd"]
        rows.append([r["gpus"], r["family"], r["kernel"], f"{r['tflops_fwd']:.0f}", f"{r['tflops_bwd']:.0f}",
                     f"{100 * fr:.0f}%", f"{100 * br:.0f}%", f"{r['balance']:.3f}",
                     f"{r['fwd_bytes_per_gpu'] / 1e6:.0f} ({r['fwd_bytes_max_gpu'] / 1e6:.0f})",
                     f"{r['bwd_bytes_per_gpu'] / 1e6:.0f} ({r['bwd_bytes_max_gpu'] / 1e6:.0f})",
                     f"{1e3 * r['fwd_compute_max_s']:.2f} / {1e3 * r['fwd_exposed_comm_s']:.2f}",
                     f"{1e3 * r['bwd_compute_max_s']:.2f} / {1e3 * r['bwd_exposed_comm_s']:.2f}"])
    lines += markdown_table(["GPUs", "family", "kernel model", "fwd TFLOP/s/GPU (sim)", "bwd TFLOP/s/GPU (sim)",
                             f"fwd vs {min(args.gpus)}", f"bwd vs {min(args.gpus)}", "max/mean pairs",
                             "fwd MB/GPU (max)", "bwd MB/GPU (max)", "fwd ms: slowest compute / exposed comm",
                             "bwd ms: slowest compute / exposed comm"], rows)
    if sbs:
        lo = min(args.gpus)
        first = {x["family"]: x for x in sbs if x["gpus"] == lo}
        lines += ["", f"Planner side by side, same seeds, {next(iter(hws))}: node-blind (every remote byte the same) "
                  "vs node-aware (bytes weighted by the link they cross, in-node receivers tried first):", ""]
        lines += markdown_table(
            ["GPUs", "family", "node-blind fwd / bwd TFLOP/s", f"vs {lo}", "node-aware fwd / bwd TFLOP/s", f"vs {lo}",
             "plan ms blind / aware (step)"],
            [[x["gpus"], x["family"], f"{x['blind_tflops_fwd']:.1f} / {x['blind_tflops_bwd']:.1f}",
              f"{100 * x['blind_tflops_fwd'] / first[x['family']]['blind_tflops_fwd']:.0f}% / "
              f"{100 * x['blind_tflops_bwd'] / first[x['family']]['blind_tflops_bwd']:.0f}%",
              f"{x['aware_tflops_fwd']:.1f} / {x['aware_tflops_bwd']:.1f}",
              f"{100 * x['aware_tflops_fwd'] / first[x['family']]['aware_tflops_fwd']:.0f}% / "
              f"{100 * x['aware_tflops_bwd'] / first[x['family']]['aware_tflops_bwd']:.0f}%",
              f"{x['blind_plan_ms']:.0f} / {x['aware_plan_ms']:.0f}"] for x in sbs])
    if not args.no_relay:
        lo = min(args.gpus)
        kname = next(iter(hws))
        mine = [r for r in results if r["kernel"] == kname]
        first = {r["family"]: r for r in mine if r["gpus"] == lo}
        lines += ["", f"Key/value relay side by side, same plans, {kname}: direct (every key row to every server that "
                  "needs it) vs relayed (once per node to a gateway, forwarded inside the node; gradients summed "
                  "there):", ""]
        lines += markdown_table(
            ["GPUs", "family", "direct fwd / bwd TFLOP/s", f"vs {lo}", "busiest GPU MB sent fwd / bwd, direct",
             "relayed fwd / bwd TFLOP/s", f"vs {lo}", "busiest GPU MB sent fwd / bwd, relayed (both hops)"],
            [[r["gpus"], r["family"], f"{r['direct_tflops_fwd']:.1f} / {r['direct_tflops_bwd']:.1f}",
              f"{100 * r['direct_tflops_fwd'] / first[r['family']]['direct_tflops_fwd']:.0f}% / "
              f"{100 * r['direct_tflops_bwd'] / first[r['family']]['direct_tflops_bwd']:.0f}%",
              f"{r['direct_fwd_bytes_max_gpu'] / 1e6:.0f} / {r['direct_bwd_bytes_max_gpu'] / 1e6:.0f}",
              f"{r['tflops_fwd']:.1f} / {r['tflops_bwd']:.1f}",
              f"{100 * r['tflops_fwd'] / first[r['family']]['tflops_fwd']:.0f}% / "
              f"{100 * r['tflops_bwd'] / first[r['family']]['tflops_bwd']:.0f}%",
              f"{r['fwd_bytes_max_gpu'] / 1e6:.0f} / {r['bwd_bytes_max_gpu'] / 1e6:.0f}"] for r in mine])
    lines += ["", "Published (H100, measured by MagiAttention; varlen-causal, 8K tokens per GPU):", ""]
    lines += markdown_table(["system", "8 GPUs fwd / bwd", "64 GPUs fwd / bwd", "64 vs 8 fwd / bwd"],
                            [[k, f"{v[8][0]:.0f} / {v[8][1]:.0f}", f"{v[64][0]:.0f} / {v[64][1]:.0f}",
                              f"{100 * v[64][0] / v[8][0]:.0f}% / {100 * v[64][1] / v[8][1]:.0f}%"]
                             for k, v in PUBLISHED.items()])
    lines.append("")
    big = max(args.gpus)
    for r in results:
        if r["family"] != "varlen-causal" or r["gpus"] != big:
            continue
        b = base[(r["family"], r["kernel"])]
        fr, br = r["tflops_fwd"] / b["tflops_fwd"], r["tflops_bwd"] / b["tflops_bwd"]
        verdict = "meets" if min(fr, br) >= GOAL else "misses"
        lines.append(f"varlen-causal, {r['kernel']}: {big} vs {min(args.gpus)} GPUs keeps {100 * fr:.0f}% fwd, "
                     f"{100 * br:.0f}% bwd (SIMULATED) -> {verdict} the {GOAL:.0%} goal; at {big} GPUs exposed comm "
                     f"is {100 * r['fwd_exposed_comm_s'] / r['fwd_time_s']:.0f}% of fwd and "
                     f"{100 * r['bwd_exposed_comm_s'] / r['bwd_time_s']:.0f}% of bwd time, slowest server "
                     f"{100 * (r['fwd_compute_max_s'] / r['fwd_compute_mean_s'] - 1):.1f}% above the mean (fwd)")
    for r in results:
        if r["family"] == "varlen-causal" and r["gpus"] == big and r["kernel"] == next(iter(hws)):
            lines.append(f"what limits varlen-causal at {big} GPUs: {100 * r['kv_share']:.0f}% of the dispatched bytes "
                         f"are k/v (key hulls of documents spanning GPUs), the busiest GPU sends "
                         f"{r['dispatch_max_over_mean']:.1f}x the mean (it holds keys many servers need), and "
                         f"{r['thin_tasks']:.0f} of {r['moved_tasks']:.0f} moved tasks are thinner than one "
                         f"{args.granularity}-token shard yet carry {100 * r['thin_key_share']:.0f}% of the moved "
                         f"tasks' keys (cuts that fill a receiver's spare capacity to the 1+eps bound); the planner "
                         "balances pairs, while a thin task costs whole 128-row kernel tiles, hence the slowest "
                         "server's time above the mean at max/mean pairs 1.02")
    if not args.no_pingpong and len(args.gpus) > 1:
        lo, hi = min(args.gpus), big
        kname, hw = next(iter(hws.items()))
        fam = fams[0]
        tf = {}
        for g in (lo, hi):
            vals = []
            for seed in range(args.seeds):
                layout = sample_layout(g, args.tokens_per_gpu, args.doc_cap, seed)
                plans, _ = plan_nanos(layout, fam, shape, args.eps, args.granularity, False,
                                      None if args.node_blind else hw0)
                vals.append([useful_flops(layout, fam, shape, w) / g / pass_time(
                    plans, hw, shape, fam.window, w, relay=not args.no_relay)["time_s"] / 1e12 for w in ("fwd", "bwd")])
            tf[g] = np.mean(vals, axis=0)
        lines.append(f"without ping-pong (one round per pass, {kname}): varlen-causal {tf[lo][0]:.0f} / "
                     f"{tf[lo][1]:.0f} TFLOP/s fwd / bwd at {lo} GPUs, {tf[hi][0]:.0f} / {tf[hi][1]:.0f} at {hi}: "
                     f"keeps {100 * tf[hi][0] / tf[lo][0]:.0f}% fwd, {100 * tf[hi][1] / tf[lo][1]:.0f}% bwd "
                     "(each nano-batch ships its own key hulls, so ping-pong doubles the k/v bytes it hides)")
    print("\n".join(lines))
    dest = Path(args.out_dir) if args.out_dir else out_dir("attention_scaling")
    write_json(dest / "attention_scaling.json", {"info": info, "published_h100": PUBLISHED, "results": results,
                                                  "node_blind_vs_aware": sbs,
                                                  "sources": {k: hw.sources for k, hw in hws.items()}})
    paths = [dest / "attention_scaling.png"]
    if args.plot:
        paths.append(REPO_ROOT / "docs" / "figures" / "attention_scaling.png")
    _plot(results, args.gpus, paths)


def _plot(results: list[dict], gpus: list[int], paths: list[Path]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    styles = {"MagiAttention": ("tab:red", "*"), "Megatron hybrid CP": ("tab:gray", "X")}
    kstyle = ["o", "s"]
    palette = ["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
    fcolor = {f: palette[i % len(palette)] for i, f in enumerate(dict.fromkeys(r["family"] for r in results))}
    for ax, (k, which) in zip(axes, enumerate(("fwd", "bwd")), strict=True):
        for name, pub in PUBLISHED.items():
            c, m = styles[name]
            xs = sorted(pub)
            ax.plot(xs, [pub[x][k] for x in xs], ls="none", color=c, marker=m, ms=12,
                    label=f"{name} (published, H100)")
        for ki, kernel in enumerate(dict.fromkeys(r["kernel"] for r in results)):
            for fam in dict.fromkeys(r["family"] for r in results):
                pts = sorted((r["gpus"], r[f"tflops_{which}"]) for r in results
                             if r["kernel"] == kernel and r["family"] == fam)
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, ls="-" if ki == 0 else "--", marker=kstyle[ki % 2],
                        color=fcolor.get(fam, "tab:green"), mfc="none" if ki else None,
                        label=f"CAD {fam}, {kernel} (SIMULATED)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.set(title=f"{which}: TFLOP/s per GPU (useful FLOPs)", xlabel="GPUs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s per GPU")
    axes[0].set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.suptitle("Attention-only weak scaling, 8K tokens/GPU, 64/8 heads x 128: CAD SIMULATED on H100 figures "
                 "vs MagiAttention / Megatron PUBLISHED (H100)", fontsize=9)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=110)
        print(f"plot: {p}")


def cpu(args) -> None:
    """The real scheduler at small sizes: balance, bytes and planning time per mask family."""
    shape = AttentionShape(args.heads, args.kv_heads, args.head_dim, 2)
    window = min(args.window, args.tokens_per_gpu // 2)
    fams = families(window, args.families) if args.families else all_families(window)
    rows, results = [], []
    for n in args.servers:
        for fam in fams:
            bal, fwd_b, bwd_b, ms = [], [], [], []
            for seed in range(args.seeds):
                layout = sample_layout(n, args.tokens_per_gpu, args.doc_cap, seed)
                plans, t = plan_nanos(layout, fam, shape, args.eps, args.granularity, not args.no_pingpong)
                bal.append(balance(plans))
                ms.append(t)
                fwd_b.append(sum(p.link_bytes("fwd") for p in plans) / n)
                bwd_b.append(sum(p.link_bytes("bwd") for p in plans) / n)
            r = {"servers": n, "family": fam.name, "mask": fam.mask.spec(),
                 "balance": float(np.mean(bal)), "balance_max": float(np.max(bal)),
                 "fwd_bytes_per_gpu": float(np.mean(fwd_b)), "bwd_bytes_per_gpu": float(np.mean(bwd_b)),
                 "plan_ms": float(np.mean(ms))}
            results.append(r)
            rows.append([n, fam.name, f"{r['balance']:.3f}", f"{r['balance_max']:.3f}",
                         f"{r['fwd_bytes_per_gpu'] / 1e6:.2f}", f"{r['bwd_bytes_per_gpu'] / 1e6:.2f}",
                         f"{r['plan_ms']:.1f}"])
    info = run_info(torch.device("cpu"), servers=" ".join(map(str, args.servers)), tokens_per_gpu=args.tokens_per_gpu,
                    doc_cap=f"{args.doc_cap} of total", seeds=args.seeds, eps=args.eps, granularity=args.granularity,
                    pingpong=not args.no_pingpong, window=window, families=" ".join(f.mask.spec() for f in fams),
                    heads=f"{args.heads}/{args.kv_heads}x{args.head_dim} bf16")
    lines = [*header_lines("Real CAD scheduler at CPU-sized clusters: balance and bytes per mask family", info),
             *markdown_table(["servers", "family", "max/mean pairs (mean)", "max/mean pairs (worst)", "fwd MB/GPU",
                              "bwd MB/GPU", "plan ms (step)"], rows)]
    print("\n".join(lines))
    dest = Path(args.out_dir) if args.out_dir else out_dir("attention_scaling")
    write_json(dest / "attention_scaling_cpu.json", {"info": info, "results": results})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the real scheduler only, at CPU-sized clusters")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--servers", type=int, nargs="+", default=[2, 4, 8, 16], help="--cpu: cluster sizes")
    p.add_argument("--tokens-per-gpu", type=int, default=None, help="default 8192 (simulated), 2048 (--cpu)")
    p.add_argument("--doc-cap", type=float, default=0.25, help="longest document, as a fraction of the total tokens")
    p.add_argument("--window", type=int, default=4 * K, help="the windowed family's keys per query")
    p.add_argument("--families", nargs="+", default=None, metavar="SPEC",
                   help="mask families to run (Mask.parse specs: causal, window:4096, chunked:8192, "
                        "sink_window:4:4096, prefix_lm:2048, bidirectional); default causal and window:--window "
                        "(simulated), every family scaled to the token budget (--cpu)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--eps", type=float, default=0.02, help="scheduler.eps (the config default)")
    p.add_argument("--granularity", type=int, default=128, help="attention.shard_tokens (the config default)")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-pingpong", action="store_true", help="one round per pass, no communication overlap")
    p.add_argument("--no-relay", action="store_true",
                   help="send every key row directly (no node relay), and skip the relay side-by-side")
    p.add_argument("--node-blind", action="store_true",
                   help="plan without the node map (every remote byte the same), and skip the side-by-side")
    p.add_argument("--plot", action="store_true", help="also write docs/figures/attention_scaling.png")
    p.add_argument("--out-dir", default=None, help="default out/attention_scaling/")
    args = p.parse_args(argv)
    if args.families:
        try:
            args.families = [Mask.parse(f).spec() for f in args.families]
        except Exception as e:  # an unknown family or bad parameter: a usage error, not a traceback
            p.error(str(e))
    if args.tokens_per_gpu is None:
        args.tokens_per_gpu = 2048 if args.cpu else 8 * K
    cpu(args) if args.cpu else simulated(args)


if __name__ == "__main__":
    main()
