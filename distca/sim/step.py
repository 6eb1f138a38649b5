"""One training step of a cluster as a task graph: 1F1B pipeline stages × data-parallel replicas, per
layer linear work and core attention, pipeline sends, the gradient all-reduce and the optimizer.

Three ways to run core attention (``SimOptions.system``):

``colocated``
    Each replica attends its own documents (plain packing: equal tokens per replica, documents split at
    replica boundaries). A document split across replicas makes the stage's replicas gather each
    other's keys every layer (``distca.train.colocated_attention``): a barrier across the stage.
``cad``
    The real scheduler (``distca.scheduler.make_plan``) places every micro-batch's attention tasks on
    the attention servers; each layer is an all-to-all round: replicas send q/k/v rows, servers run
    their tasks, results come back. Servers are the stage's own devices time-shared with the trainers
    (in-place, ``servers="stage"``), or separate processes (``server_streams=True``, how the CPU
    simulated cluster runs them). Separate server processes on the ZeroMQ pool also pay, per round and
    nano-batch, the pool's work beyond the kernels (``Hardware.pool_*``: fixed + per row, forward and
    backward): on the server's stream with its attention, and on each trainer's compute stream before it
    sends (``pool_rounds``; 0 unless a calibration measured them). With ``pingpong`` every micro-batch
    is two nano-batches, each planned
    on its own, and communication runs on a separate stream (DESIGN §2's overlap; the paper's Fig. 7).
    How the two are cut is ``nano_split``: the paper's driver re-packs two halves of the documents
    (``repack``), this repository's trainer splits every rank's rows and plans each half's queries with
    the whole micro-batch's keys (``rows``, what the validation replays; its first round waits for both
    halves' pre-attention work), and ``prefix`` is a what-if of an exact split whose first round needs none
    of the second's keys. ``pingpong_order`` is the order of
    a device's compute: the trainer's per layer (both pre-attention parts, the rounds, both post-attention
    parts), or the paper's ``fused`` order (a what-if: nano-batch i's post-attention work of layer l runs with
    its pre-attention work of layer l + 1). The trainer's ping-pong runner
    also costs processor time of its own per block (``Hardware.pingpong_*_row_s``, calibrated on a CPU
    host; 0 in GPU figures).
``wlb``
    WLB-LLM-style: workload-balanced variable-length packing over data-parallel groups of ``cp``
    devices, each document split head–tail over its group (per-document context parallelism): equal
    attention inside a group, every layer an all-gather of the group's keys/values and a
    reduce-scatter of their gradients. One device stands for its group (they are in lockstep).

Two pipeline schedules (``SimOptions.schedule``):

``1f1b``
    DeepSpeed's order per stage (warm-up forwards, alternating forward/backward, cool-down backwards);
    with CAD each stage plans its own micro-batches over its servers.
``pooled`` (CAD only)
    Tick-aligned: pairs of ticks k = 0..K-1, an F tick then a B tick, K = M + 2P - 2. Stage s runs the
    forward of micro-batch m in pair m + s and its backward in pair m + 2(P-1) - s, so every stage
    runs the same phase in a tick (:func:`pooled_ticks`). In each tick the attention tasks of all
    active stages at the same layer position form one plan over every device (``make_plan`` over
    P x DP trainer rows, idle stages' rows empty, ``Placement(P*DP, P*DP, "colocated")``): devices
    of stages idle in that tick only serve attention. A tick with no active stage costs nothing.
    ``idle_aware`` is a what-if the trainer does not implement: per round, the plan's attention is
    re-spread by water-filling so that every server finishes together, given that a trainer's device
    starts serving nano-batch i only after its pre-attention work of the later nano-batches while an
    idle device starts as soon as rows arrive (the plan's relative per-server deviations are kept;
    return bytes scale with each server's share). Without ping-pong there is no such head start: a
    round needs every trainer's q/k/v before any server starts, so re-spreading cannot fill the
    linear phases in which idle devices wait.

Planning (``plan_s`` seconds of scheduler CPU per trainer and step) is either on the critical path at
the start of the step (``prefetch_plans=False``) or on a background thread of each trainer
(``prefetch_plans=True``, the trainer's ``train.prefetch``): there it delays nothing on a GPU cluster,
and on a CPU host it only takes its share of the cores (a ``uses_core`` task on a stream of its own).

Every quantity is per device; a tensor-parallel group of ``tp`` GPUs is one device with ``1/tp`` of the
heads, FLOPs and bytes plus its NVLink all-reduces per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from distca.attention.cost import AttentionShape, CostModel
from distca.config import ModelConfig, stage_blocks, stage_ranges
from distca.masks import key_mask, key_order
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.scheduler.calls import server_rects
from distca.sim.engine import SimResult, TaskGraph, simulate
from distca.sim.hardware import Hardware
from distca.train.flops import block_linear_params, model_params
from distca.train.schedule import tick_micro, weight_grad_plan

System = Literal["colocated", "cad", "wlb"]
Schedule = Literal["1f1b", "pooled"]
BUSY_KINDS = ("linear", "attention", "optimizer")  # a device computes (idle share: everything else)


@dataclass(frozen=True)
class Parallelism:
    pp: int = 1
    dp: int = 1  # data-parallel replicas (for wlb: devices per stage = dp, in groups of cp)
    tp: int = 1
    cp: int = 1  # wlb only: per-document context-parallel group size
    micro_batches: int = 1

    def __post_init__(self) -> None:
        for k in ("pp", "dp", "tp", "cp", "micro_batches"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.dp % self.cp:
            raise ValueError(f"dp ({self.dp}) must be a multiple of cp ({self.cp})")

    @property
    def devices(self) -> int:
        return self.pp * self.dp


@dataclass(frozen=True)
class SimOptions:
    system: System = "cad"
    pingpong: bool = False
    server_streams: bool = False  # servers are separate processes with their own streams (CPU cluster)
    servers: Literal["stage", "all"] = "stage"  # CAD pool: the stage's devices, or every device
    eps: float = 0.05
    granularity: int = 128
    layer_chunks: int = 0  # barrier rounds per stage and pass; 0: one per layer
    dtype_bytes: int = 2
    grad_bytes: int = 4
    p2p_async: bool = True
    schedule: Schedule = "1f1b"
    idle_aware: bool = False  # pooled only: what-if balance that gives idle devices more attention
    prefetch_plans: bool = True  # planning on a background thread (off the critical path)
    plan_s: float = 0.0  # scheduler CPU seconds per trainer and step (0: not charged)
    # with server_streams: charge the hardware's pool per-round costs (ZeroMQ frames; Hardware.pool_*)
    pool_rounds: bool = True
    # ping-pong's two nano-batches: "repack" cuts the micro-batch's documents at half of its tokens and packs
    # each half on its own (the paper's driver; a document cut there loses its cross-half attention);
    # "rows" is this repository's trainer (distca.runtime.nano.nano_batches): the queries of the first and
    # of the second half of every rank's rows, each planned with the whole micro-batch's keys, so a
    # document keeps all its attention and each round sends every key row its tasks need (no round starts before
    # the last nano-batch's pre-attention work); "prefix" is a what-if, not built: exact nano-batches whose first
    # holds only documents' prefixes, so its round needs none of the second's keys (_prefix_halves)
    nano_split: Literal["repack", "rows", "prefix"] = "repack"
    # deferred weight gradients (distca.train.wgrad, train.defer_weight_grads): the deferred backward passes run
    # their linear layers' input gradients only (half the backward linear work, the head's too). Pooled: the B
    # ticks distca.train.schedule.weight_grad_plan names, the other half in a later tick the stage only serves in,
    # spread over the gaps before that tick's rounds. 1F1B: stage s's last s backward passes, the other half after
    # its last backward, before the optimizer (one_f_one_b_weight_grad_plan)
    defer_wgrad: bool = False
    # blocks per stage (distca.config.stage_blocks, train.stage_split): "even", or "balanced" (the last stage has fewer
    # blocks for its LM head). Pooled: block position j's rounds are over the stages that have a block j; the last
    # stage computes its head's forward and backward between the rounds of the positions it has no block at
    stage_split: Literal["even", "balanced"] = "even"
    stage_blocks: tuple[int, ...] = ()  # explicit blocks per stage (train.stage_blocks), overriding stage_split
    # the order of a device's compute with ping-pong: "layer" (this repository's trainer, distca.runtime.nano: per
    # block, both nano-batches' pre-attention work, the rounds, then both post-attention parts, so the first round
    # hides behind the second's pre-attention work at most) or "fused" (the paper's Fig. 7: nano-batch i's
    # post-attention work of layer l is fused with its pre-attention work of layer l + 1, so each round hides
    # behind the other nano-batch's whole post + pre; NOT BUILT in the trainer: a what-if that needs a first
    # nano-batch whose round needs none of the second's keys, "repack" or "prefix")
    pingpong_order: Literal["layer", "fused"] = "layer"

    def __post_init__(self) -> None:
        if self.stage_split not in ("even", "balanced"):
            raise ValueError(f"stage_split must be 'even' or 'balanced', got {self.stage_split!r}")
        if self.schedule not in ("1f1b", "pooled"):
            raise ValueError(f"schedule must be '1f1b' or 'pooled', got {self.schedule!r}")
        if self.schedule == "pooled" and self.system != "cad":
            raise ValueError("the pooled schedule pools CAD's attention tasks: it needs system='cad'")
        if self.idle_aware and self.schedule != "pooled":
            raise ValueError("idle_aware balancing is modelled for the pooled schedule only")
        if not self.plan_s >= 0:
            raise ValueError(f"plan_s must be >= 0, got {self.plan_s!r}")
        if self.nano_split not in ("repack", "rows", "prefix"):
            raise ValueError(f"nano_split must be 'repack', 'rows' or 'prefix', got {self.nano_split!r}")
        if self.pingpong_order not in ("layer", "fused"):
            raise ValueError(f"pingpong_order must be 'layer' or 'fused', got {self.pingpong_order!r}")
        if self.pingpong_order == "fused" and self.nano_split == "rows":
            raise ValueError("the fused ping-pong order needs a first nano-batch whose round needs none of the "
                             "second's keys (nano_split 'repack' or 'prefix'): with 'rows' it waits for them")


@dataclass
class MicroBatch:
    """One micro-batch: per replica (or wlb group), its document pieces."""

    ranks: list[list[int]]
    continues: list[bool]
    # packed as independent halves (the trainer's train.nano_split: repack): each part's pieces per replica; then
    # ``ranks`` lists every part's pieces per replica in order and ``continues`` whether any part's first one
    # continues (:meth:`of_parts`)
    parts: tuple[MicroBatch, ...] = ()

    @classmethod
    def whole(cls, groups: list[list[int]]) -> MicroBatch:
        """Whole documents per replica (no document crosses replicas)."""
        return cls([list(map(int, g)) for g in groups], [False] * len(groups))

    @classmethod
    def of_parts(cls, parts: list[MicroBatch]) -> MicroBatch:
        """A micro-batch packed as independent parts, as the trainer lays it out: replica r holds its pieces of part
        0, then of part 1 (no document spans two parts)."""
        n = len(parts[0].ranks)
        return cls([[x for p in parts for x in p.ranks[r]] for r in range(n)],
                   [any(p.continues[r] for p in parts) for r in range(n)], tuple(parts))

    def layout(self) -> BatchLayout:
        """Its pieces for per-replica attention: a part's document continues only inside the part."""
        if not self.parts:
            return BatchLayout.from_ranks(self.ranks, self.continues)
        lays = [BatchLayout.from_ranks(p.ranks, p.continues) for p in self.parts]
        rows = np.zeros(lays[0].n_ranks, dtype=np.int64)
        docs, fields = 0, [[] for _ in range(5)]
        for lay in lays:
            for f, x in zip(fields, (lay.piece_rank, lay.piece_doc + docs, lay.piece_off, lay.piece_len,
                                     lay.piece_row + rows[lay.piece_rank]), strict=True):
                f.append(x)
            rows += lay.rank_tokens
            docs += lay.n_docs
        return BatchLayout(lays[0].n_ranks, *(np.concatenate(f) for f in fields),
                           np.concatenate([lay.doc_len for lay in lays]))


@dataclass
class StepReport:
    step_s: float
    tokens: int
    per_device: list[dict[str, float]]  # busy seconds by kind, per device (trainer stream)
    servers: list[dict[str, float]] = field(default_factory=list)
    attention_max_over_mean: float = 1.0  # per pass, over replicas (colocated/wlb) or servers (cad)
    tokens_max_over_min: float = 1.0  # per micro-batch, across devices (activation memory proxy)
    result: SimResult | None = None
    busy_union_s: list[float] = field(default_factory=list)  # per device: time computing (BUSY_KINDS)
    in_flight: list[int] = field(default_factory=list)  # per stage: peak micro-batches held for backward
    # pooled: device-mean idle seconds in ticks where every stage has work ("full"), in warm-up and
    # cool-down ticks where some stages have none ("partial"), and after the last tick ("tail": the
    # gradient all-reduce and optimizer); 1F1B: all under "tail"
    idle_split_s: dict[str, float] = field(default_factory=dict)

    @property
    def idle_fraction(self) -> float:
        """Mean share of the step a device computes nothing: no linear work, no attention it serves
        (in-place or on its server process), no optimizer. Pipeline bubbles, waiting on peers and on
        communication count as idle."""
        if not self.busy_union_s or self.step_s <= 0:
            return 0.0
        return float(1.0 - np.mean(self.busy_union_s) / self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


def pipeline_order(stage: int, pp: int, m: int) -> list[tuple[str, int]]:
    """1F1B order of one stage: warm-up forwards, alternating F/B, cool-down backwards."""
    warm = min(pp - stage - 1, m)
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    order += [("B", i) for i in range(m - warm, m)]
    return order


def pooled_ticks(pp: int, m: int) -> list[tuple[str, dict[int, int]]]:
    """The pooled schedule's ticks in order: ``2K`` of them (K = m + 2pp - 2 pairs, an F tick then a B
    tick each), each ``(phase, {stage: micro-batch})`` for the stages with work; the others are idle."""
    if pp < 1 or m < 1:
        raise ValueError(f"need pp >= 1 and m >= 1, got {pp} and {m}")
    ticks = []
    for k in range(m + 2 * pp - 2):
        ticks.append(("F", {s: k - s for s in range(pp) if 0 <= k - s < m}))
        ticks.append(("B", {s: k - 2 * (pp - 1) + s for s in range(pp) if 0 <= k - 2 * (pp - 1) + s < m}))
    return ticks


def peak_in_flight(schedule: str, pp: int, m: int) -> list[int]:
    """Per stage, the most micro-batches whose forward has run and backward has not (activation memory)."""
    if schedule == "1f1b":
        orders = [pipeline_order(s, pp, m) for s in range(pp)]
    else:
        orders = [[] for _ in range(pp)]
        for phase, active in pooled_ticks(pp, m):
            for s, mb in active.items():
                orders[s].append((phase, mb))
    out = []
    for order in orders:
        n = peak = 0
        for phase, _ in order:
            n += 1 if phase == "F" else -1
            peak = max(peak, n)
        out.append(peak)
    return out


class _Costs:
    """Per-device costs of a micro-batch on the simulated hardware."""

    def __init__(self, cfg: ModelConfig, hw: Hardware, par: Parallelism, opt: SimOptions):
        self.cfg, self.hw, self.par, self.opt = cfg, hw, par, opt
        tp = par.tp
        if cfg.n_heads % tp or cfg.n_kv_heads % tp:
            raise ValueError(f"tp={tp} must divide n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads}")
        self.shape = AttentionShape(cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.head_dim, opt.dtype_bytes)
        self.model: CostModel = hw.attention_model(self.shape)
        self.qkv_params, self.block_params = block_linear_params(cfg)
        self.windows = cfg.block_windows()
        self.stage_blocks = [list(r) for r in stage_ranges(stage_blocks(cfg, par.pp, opt.stage_split,
                                                                        opt.stage_blocks))]
        self.positions = max(len(b) for b in self.stage_blocks)
        self.units_per_node = max(1, hw.devices_per_node // tp)  # simulated devices (TP groups) per node

    def same_node(self, a: int, b: int) -> bool:
        return a // self.units_per_node == b // self.units_per_node

    def linear(self, tokens: int, blocks: int, which: str, part: float) -> float:
        flops = 2.0 * self.block_params * part * tokens * blocks / self.par.tp
        return self.hw.linear_s(flops, which, calls=blocks * part)  # overhead shared in proportion

    def head(self, tokens: int, which: str) -> float:
        flops = 2.0 * self.cfg.hidden * self.cfg.vocab_size * tokens / self.par.tp
        return self.hw.linear_s(flops, which)

    def tp_comm(self, tokens: int, blocks: int) -> float:
        """Tensor parallelism's per-block activation all-reduces (two per pass) on NVLink."""
        if self.par.tp == 1:
            return 0.0
        nbytes = tokens * self.cfg.hidden * self.opt.dtype_bytes
        return blocks * 2 * self.hw.allreduce_s(nbytes, self.par.tp, same_node=True)

    def attention(self, q: np.ndarray, kv: np.ndarray, window: int, which: str) -> float:
        return self.hw.attention_call_s(self.model, q, kv, window, which)

    def attention_rects(self, rects: tuple[np.ndarray, ...], which: str) -> float:
        """One call over kernel rectangles ``(nq, nk, full, window)`` (a mask family's tasks), in seconds."""
        return self.hw.attention_rects_s(self.model, *rects, which)

    def pieces_rects(self, lay: BatchLayout, sel: np.ndarray, key) -> tuple[np.ndarray, ...]:
        """The rectangles of the pieces ``sel`` of ``lay`` under mask key ``key``, as ``(nq, nk, full, window)``."""
        mask = key_mask(key)
        rects = [rc for d, o, n in zip(lay.piece_doc[sel].tolist(), lay.piece_off[sel].tolist(),
                                       lay.piece_len[sel].tolist(), strict=True)
                 for rc in mask.rects(int(lay.doc_len[d]), o, o + n)]
        return _rect_arrays([rc.nq for rc in rects], [rc.nk for rc in rects], [rc.kind for rc in rects],
                            [rc.window for rc in rects])

    def act_bytes(self, tokens: int) -> float:
        return tokens * self.cfg.hidden * self.opt.dtype_bytes / self.par.tp


def _chunks(blocks: list[int], n: int) -> list[list[int]]:
    n = len(blocks) if n <= 0 else max(1, min(n, len(blocks)))
    return [list(c) for c in np.array_split(np.asarray(blocks), n) if len(c)]


def simulate_step(cfg: ModelConfig, hw: Hardware, par: Parallelism, opt: SimOptions,
                  micro: list[MicroBatch]) -> StepReport:
    """Simulate one step whose ``micro`` batches (``par.micro_batches`` of them) are given."""
    if len(micro) != par.micro_batches:
        raise ValueError(f"{len(micro)} micro-batches given for micro_batches={par.micro_batches}")
    groups = par.dp // par.cp if opt.system == "wlb" else par.dp
    for i, mb in enumerate(micro):
        if len(mb.ranks) != groups:
            raise ValueError(f"micro-batch {i} has {len(mb.ranks)} replicas; expected {groups}")
    if opt.system == "wlb" and any(mb.continues[r] for mb in micro for r in range(groups)):
        raise ValueError("wlb micro-batches hold whole documents per group (no continues)")
    return _Builder(cfg, hw, par, opt, micro).run()


class _Builder:
    def __init__(self, cfg, hw, par, opt, micro):
        self.cfg, self.hw, self.par, self.opt, self.micro = cfg, hw, par, opt, micro
        self.c = _Costs(cfg, hw, par, opt)
        self.g = TaskGraph()
        self.n_rep = par.dp // par.cp if opt.system == "wlb" else par.dp
        self.dev = {(s, r): s * self.n_rep + r for s in range(par.pp) for r in range(self.n_rep)}
        self.comp = {k: self.g.stream(f"dev{d}") for k, d in self.dev.items()}
        self.comm = {k: self.g.stream(f"dev{d}.comm") for k, d in self.dev.items()}
        self.last: dict[tuple[int, int], int | None] = {k: None for k in self.dev}
        self.servers: dict[int, int] = {}
        self.server_comm: dict[int, int] = {}
        self.attn_ratios: list[float] = []
        self.layouts = [mb.layout() for mb in micro]
        self.key_of = {d: k for k, d in self.dev.items()}
        self.tick_spans: list[tuple[int, int, bool]] = []  # pooled: task id range and "every stage active"
        # pingpong_order "fused": per (device key, nano-batch), the last round's wait and post-attention work, issued
        # just before that nano-batch's next pre-attention work (or at the end of the pass)
        self.held_post: dict[tuple[tuple[int, int], int], tuple[tuple[int, ...], float]] = {}

    # -- helpers -------------------------------------------------------------------------------
    def _on(self, key, work, kind, deps=(), core=True):
        """A task on device ``key``'s compute stream after its previous one."""
        tid = self.g.add(self.comp[key], work, kind, (*deps, self.last[key]), core)
        self.last[key] = tid
        return tid

    def _barrier(self, keys, deps, work, kind):
        """Every device of ``keys`` waits for ``deps`` then spends ``work`` (a collective)."""
        return {k: self._on(k, work, kind, deps, core=False) for k in keys}

    def _tokens(self, m: int, r: int) -> int:
        """Tokens one device of replica ``r`` holds in micro-batch ``m`` (a wlb group splits its own)."""
        return int(sum(self.micro[m].ranks[r])) // self.cp

    @property
    def cp(self) -> int:
        return self.par.cp if self.opt.system == "wlb" else 1

    # -- per-replica attention (colocated, wlb) -------------------------------------------------
    def _replica_attention(self, m: int) -> dict[tuple[int, str], float]:
        """Attention seconds per block, per (replica, pass), summed over the block's windows."""
        lay, out = self.layouts[m], {}
        wins = sorted({w for ws in self.c.windows for w in ws}, key=key_order)
        cp = self.par.cp if self.opt.system == "wlb" else 1
        for r in range(self.n_rep):
            sel = lay.piece_rank == r
            q, kv = lay.piece_len[sel], lay.piece_off[sel] + lay.piece_len[sel]
            # causal and windows: one task per piece; other families: the piece's rectangles
            rects = {w: self.c.pieces_rects(lay, sel, w) for w in wins if key_mask(w).as_window is None}
            for which in ("fwd", "bwd"):
                out[(r, which)] = {w: (self.c.attention(q, kv, w, which) if w not in rects
                                       else self.c.attention_rects(rects[w], which)) / cp for w in wins}
        return out

    def _block_attn(self, per_w: dict[int, float], blocks: list[int]) -> float:
        return sum(per_w[w] for b in blocks for w in self.c.windows[b])

    # -- CAD plans -----------------------------------------------------------------------------
    def _halves(self, m: int) -> list[MicroBatch]:
        if m not in self._halves_cache:
            mb = self.micro[m]
            if mb.parts:  # the trainer's own halves
                if not self.opt.pingpong:
                    raise ValueError("CAD without ping-pong over a micro-batch packed as halves (one round per half, "
                                     "in sequence) is not modelled")
                self._halves_cache[m] = list(mb.parts)
            else:
                self._halves_cache[m] = [mb] if not self.opt.pingpong else _split_halves(mb)
        return self._halves_cache[m]

    def _plan_nanos(self, layouts: list[BatchLayout], placement: Placement, n_srv: int, whiches,
                    keys: BatchLayout | None = None) -> list[dict]:
        """One entry per nano-batch layout: per window and pass, per-server attention seconds, and the
        bytes and peers per rank (to servers) and per server (back to ranks). ``keys``: the whole batch
        when the layouts hold only some of its queries (``nano_split="rows"``)."""
        wins = sorted({w for ws in self.c.windows for w in ws}, key=key_order)
        out = []
        for lay in layouts:
            entry = {"tokens": [int(t) for t in lay.rank_tokens], "srv": {}, "bytes": {}, "rows": {}}
            for w in wins:
                sched = SchedulerConfig(eps=self.opt.eps, granularity=self.opt.granularity, mask=key_mask(w))
                plan, _ = make_plan(lay, placement, sched, self.c.shape, keys=keys)
                # rows each trainer sends and each server receives in one round (pool per-round costs)
                sent = np.zeros(len(entry["tokens"]))
                for x in (plan.q_xfer, plan.kv_xfer):
                    np.add.at(sent, x.rank, x.n)
                entry["rows"][w] = (sent, (plan.server_q_rows + plan.server_kv_rows).astype(float))
                q = plan.task_q1 - plan.task_q0
                kv = plan.task_k1 - plan.task_k0
                # A masked plan's tasks run as rectangles over their exact key ranges: cost those (a full
                # rectangle by its pairs and tiles), not the hull; causal and window tasks are one each.
                rects = None
                if plan.masked:
                    rects = []
                    for j in range(n_srv):
                        rr = server_rects(plan, j)
                        rects.append(_rect_arrays(rr.q1 - rr.q0, rr.k1 - rr.k0, rr.kind, rr.window))
                for which in whiches:
                    t = np.zeros(n_srv)
                    for j in range(n_srv):
                        if rects is not None:
                            t[j] = self.c.attention_rects(rects[j], which)
                            continue
                        sel = plan.task_server == j
                        t[j] = self.c.attention(q[sel], kv[sel], w, which)
                    entry["srv"][(w, which)] = t
                    entry["bytes"][(w, which)] = _plan_bytes(plan, which)
                    self.attn_ratios.append(float(t.max() / t.mean()) if t.mean() > 0 else 1.0)
            out.append(entry)
        return out

    def _plans(self, s: int, m: int) -> list[dict]:
        """Nano-batches of micro-batch ``m`` on stage ``s`` (two with ping-pong), each with its plan per
        window, per-server attention seconds and per-(rank, server) bytes. A stage-local pool gives
        every stage the same plans; a cluster-wide pool plans each stage from its own devices (as
        ``distca.train.trainer`` does), so their home servers differ."""
        key = (s if self.opt.servers == "all" else 0, m)
        if key in self._plan_cache:
            return self._plan_cache[key]
        n_srv = self.par.dp if self.opt.servers == "stage" else self.par.devices
        devices = None if self.opt.servers == "stage" else tuple(s * self.par.dp + r for r in range(self.par.dp))
        placement = Placement(self.par.dp, n_srv, "colocated", devices)
        if self.opt.pingpong and self.opt.nano_split in ("rows", "prefix") and not self.micro[m].parts:
            whole = self.layouts[m]
            halves = _query_halves(whole) if self.opt.nano_split == "rows" else _prefix_halves(whole)
            out = self._plan_nanos(halves, placement, n_srv, ("fwd", "bwd"), keys=whole)
        else:
            layouts = [BatchLayout.from_ranks(nb.ranks, nb.continues) for nb in self._halves(m)]
            out = self._plan_nanos(layouts, placement, n_srv, ("fwd", "bwd"))
        self._plan_cache[key] = out
        return out

    def _pooled_plans(self, phase: str, active: dict[int, int]) -> list[dict]:
        """A tick's plans: nano-batch i of every active stage's micro-batch in one layout whose rows are
        the P x DP (stage, replica) trainers (idle stages' rows empty), over every device as a server."""
        key = (phase, tuple(sorted(active.items())))
        if key in self._plan_cache:
            return self._plan_cache[key]
        par = self.par
        n = par.devices
        which = "fwd" if phase == "F" else "bwd"
        if self.opt.pingpong and self.opt.nano_split in ("rows", "prefix") and \
                not any(self.micro[m].parts for m in active.values()):
            # the tick's batch as distca.train.pooled.tick_batch builds it (trainer s * DP + r holds stage s's
            # rows; a document never continues across stages), its nano-batches by query rows
            ranks, cont = [], []
            for s in range(par.pp):
                mb = self.micro[active[s]] if s in active else None
                for r in range(par.dp):
                    ranks.append(list(mb.ranks[r]) if mb is not None else [])
                    cont.append(bool(mb.continues[r]) and r > 0 if mb is not None else False)
            whole = BatchLayout.from_ranks(ranks, cont)
            halves = _query_halves(whole) if self.opt.nano_split == "rows" else _prefix_halves(whole)
            out = self._plan_nanos(halves, Placement(n, n, "colocated"), n, (which,), keys=whole)
            self._plan_cache[key] = out
            return out
        halves = {s: self._halves(m) for s, m in active.items()}
        n_nano = max(len(h) for h in halves.values())
        layouts = []
        for i in range(n_nano):
            ranks: list[list[int]] = []
            cont: list[bool] = []
            for s in range(par.pp):
                nb = halves[s][i] if s in halves and i < len(halves[s]) else None
                for r in range(par.dp):
                    ranks.append(list(nb.ranks[r]) if nb is not None else [])
                    cont.append(bool(nb.continues[r]) and r > 0 if nb is not None else False)
            layouts.append(BatchLayout.from_ranks(ranks, cont))
        out = self._plan_nanos(layouts, Placement(n, n, "colocated"), n, (which,))
        self._plan_cache[key] = out
        return out

    # -- the graph -----------------------------------------------------------------------------
    def run(self) -> StepReport:
        par, opt = self.par, self.opt
        if opt.system == "cad" and not opt.server_streams and opt.servers == "all" and opt.schedule == "1f1b":
            raise ValueError("in-place servers (server_streams=False) serve their own stage: use servers='stage'")
        self.rep_attn = [self._replica_attention(m) for m in range(par.micro_batches)] \
            if opt.system != "cad" else None
        self._plan_cache: dict = {}
        self._halves_cache: dict = {}
        if opt.system == "cad" and opt.server_streams:
            for d in range(par.devices):  # one server process per device
                self.servers[d] = self.g.stream(f"srv{d}", ordered=False)
                self.server_comm[d] = self.g.stream(f"srv{d}.comm", ordered=False)
        if opt.system == "cad" and opt.plan_s > 0:
            for key, d in self.dev.items():
                if opt.prefetch_plans:  # the next step's plans, on a background thread during this step
                    self.g.add(self.g.stream(f"dev{d}.plan"), opt.plan_s, "plan")
                else:  # the step's plans before its first pass
                    self._on(key, opt.plan_s, "plan")
        sent: dict[tuple[str, int, int, int], int] = {}  # (pass, stage, replica, micro) -> transfer task
        self.wplan = weight_grad_plan(par.pp, par.micro_batches) if opt.defer_wgrad else None
        self.deferring: set[int] = set()  # stages whose backward in this tick leaves its weight gradients
        self.kept_w: dict[tuple[int, int], float] = {}  # 1F1B: per device, weight-gradient work left for the end
        if opt.schedule == "pooled":
            for t, (phase, active) in enumerate(pooled_ticks(par.pp, par.micro_batches)):
                if active:  # a tick where no stage has work has no round and costs nothing
                    lo = len(self.g.tasks)
                    self._tick(t, phase, active, sent)
                    self.tick_spans.append((lo, len(self.g.tasks), len(active) == par.pp))
        else:
            self._one_f_one_b(sent)
        self._optimizer()
        res = simulate(self.g, self.hw.cores)
        return self._report(res)

    def _one_f_one_b(self, sent: dict) -> None:
        # forward/backward passes in 1F1B order; build stage by stage in a global time-consistent order:
        # a stage's pass depends on the previous (forward) or next (backward) stage's transfer.
        par = self.par
        orders = {s: pipeline_order(s, par.pp, par.micro_batches) for s in range(par.pp)}
        pending = {s: list(orders[s]) for s in range(par.pp)}
        progress = True
        while any(pending.values()) and progress:
            progress = False
            for s in range(par.pp):
                while pending[s]:
                    kind, m = pending[s][0]
                    need = (("F", s - 1, 0, m) if kind == "F" and s > 0 else
                            ("B", s + 1, 0, m) if kind == "B" and s < par.pp - 1 else None)
                    if need is not None and need not in sent:
                        break
                    pending[s].pop(0)
                    self._pass(kind, s, m, sent)
                    progress = True
        if any(pending.values()):
            raise RuntimeError("pipeline order could not be built (internal error)")

    def _pass(self, kind: str, s: int, m: int, sent: dict) -> None:
        which = "fwd" if kind == "F" else "bwd"
        keys = [(s, r) for r in range(self.n_rep)]
        # 1F1B with deferred weight gradients: stage s's last s backward passes (one_f_one_b_weight_grad_plan)
        self.deferring = {s} if self.opt.defer_wgrad and kind == "B" and m >= self.par.micro_batches - s else set()
        for key in keys if self.deferring else ():
            self.kept_w[key] = self.kept_w.get(key, 0.0) + self._weight_grads_of(s, m, key[1])
        self._pass_start(kind, s, m, sent)
        blocks = self.c.stage_blocks[s] if kind == "F" else list(reversed(self.c.stage_blocks[s]))
        for chunk in _chunks(blocks, self.opt.layer_chunks):
            if self.opt.system == "cad":
                self._cad_chunk(s, m, chunk, which, keys)
            else:
                self._local_chunk(s, m, chunk, which, keys)
        self._pass_end(kind, s, m, sent)
        self.deferring = set()

    def _tick(self, t: int, phase: str, active: dict[int, int], sent: dict) -> None:
        """One tick of the pooled schedule: every active stage runs ``phase`` of its micro-batch; per
        chunk of layer positions (stages have equal layer counts), one round over every device. With deferred
        weight gradients, an idle stage computes those the plan puts in this tick before the rounds."""
        c, wp = self.c, self.wplan
        which = "fwd" if phase == "F" else "bwd"
        self.deferring = {s for s in active if wp is not None and t in wp.defer[s]}
        for s, m in active.items():
            self._pass_start(phase, s, m, sent)
        positions = list(range(c.positions)) if phase == "F" else list(reversed(range(c.positions)))
        link = self.hw.link(c.same_node(0, self.par.devices - 1))
        # rounds: chunks of positions, cut where the stages that have a block there change (unequal stages)
        runs: list[tuple[tuple[int, ...], list[int]]] = []
        for pos in _chunks(positions, self.opt.layer_chunks):
            start = len(runs)
            for p in pos:
                here = tuple(s for s in sorted(active) if len(c.stage_blocks[s]) > p)
                if len(runs) > start and runs[-1][0] == here:
                    runs[-1][1].append(p)
                else:
                    runs.append((here, [p]))
        runs = [(here, pos) for here, pos in runs if here]
        wgrad = {} if wp is None else {(s, r): self._weight_grads(s, r, wp.run_in(s, t)) / len(runs)
                                       for s in range(self.par.pp) if s not in active for r in range(self.n_rep)}
        head = {s: sum(1 for here, _ in runs if s not in here) for s in active if self._head_in_gaps(s)}
        alone = [s for s, parts in head.items() if parts == 0]  # no round to share the gaps with: in one piece
        for s in alone if phase == "B" else ():
            for r in range(self.n_rep):
                self._on((s, r), self._head_share(s, active[s], r, phase, 1), "linear")
        for here, pos in runs:
            for key, w in wgrad.items():
                if w > 0:
                    self._on(key, w, "linear")
            for s, parts in head.items():  # the short last stage's head, between the rounds it has no block in
                if s not in here:
                    for r in range(self.n_rep):
                        self._on((s, r), self._head_share(s, active[s], r, phase, parts), "linear")
            nanos = self._pooled_plans(phase, {s: active[s] for s in here})
            members = [((s, r), s * self.par.dp + r, active[s]) for s in here for r in range(self.n_rep)]
            blocks = {s: [c.stage_blocks[s][p] for p in pos] for s in here}
            self._cad_round(members, nanos, blocks, which, link, lambda j: j)
        for s in alone if phase == "F" else ():
            for r in range(self.n_rep):
                self._on((s, r), self._head_share(s, active[s], r, phase, 1), "linear")
        for s, m in active.items():
            self._pass_end(phase, s, m, sent)
        self.deferring = set()

    def _weight_grads(self, s: int, r: int, ticks: tuple[int, ...]) -> float:
        """The weight-gradient half of stage ``s``'s backward linear work (its head's too) for the micro-batches it
        deferred in ``ticks``, on replica ``r``'s device."""
        return sum(self._weight_grads_of(s, tick_micro(u, s, self.par.pp, self.par.micro_batches), r) for u in ticks)

    def _weight_grads_of(self, s: int, m: int, r: int) -> float:
        t = self._tokens(m, r)
        w = self.c.linear(t, len(self.c.stage_blocks[s]), "bwd", 1.0) / 2
        return w + (self.c.head(t, "bwd") / 2 if s == self.par.pp - 1 else 0.0)

    def _pass_start(self, kind: str, s: int, m: int, sent: dict) -> None:
        for r in range(self.n_rep):
            dep = sent.get(("F", s - 1, r, m)) if kind == "F" else sent.get(("B", s + 1, r, m))
            self._on((s, r), self.hw.micro_overhead_s, "overhead", (dep,))
            if kind == "B" and s == self.par.pp - 1 and not self._head_in_gaps(s):
                t = self._tokens(m, r)
                bwd = self.c.head(t, "bwd") / (2 if s in self.deferring else 1)
                self._on((s, r), self.c.head(t, "fwd") + bwd, "linear")

    def _head_in_gaps(self, s: int) -> bool:
        """The pooled schedule's last stage with fewer blocks than others: its head runs between the rounds of the
        positions it has no block at (forward in the F tick, backward in the B tick), not before its blocks."""
        return (self.opt.schedule == "pooled" and s == self.par.pp - 1
                and len(self.c.stage_blocks[s]) < self.c.positions)

    def _head_share(self, s: int, m: int, r: int, phase: str, parts: int) -> float:
        t = self._tokens(m, r)
        if phase == "F":
            return self.c.head(t, "fwd") / parts
        return self.c.head(t, "bwd") / (2 if s in self.deferring else 1) / parts

    def _flush_post(self, key, nano: int) -> None:
        held = self.held_post.pop((key, nano), None)
        if held is not None:
            self._on(key, 0.0, "cad_wait", held[0], core=False)
            self._on(key, held[1], "linear")

    def _pass_end(self, kind: str, s: int, m: int, sent: dict) -> None:
        par, c = self.par, self.c
        for r in range(self.n_rep):
            key = (s, r)
            for nano in sorted(i for k, i in self.held_post if k == key):
                self._flush_post(key, nano)
            to = s + 1 if kind == "F" else s - 1
            if 0 <= to < par.pp:
                link = self.hw.p2p or self.hw.link(c.same_node(self.dev[key], self.dev[(to, r)]))
                nbytes = c.act_bytes(self._tokens(m, r))
                x = self.g.add(self.comm[key], link.time_s(nbytes), "p2p", (self.last[key],), uses_core=False)
                if not self.opt.p2p_async:
                    self._on(key, 0.0, "p2p", (x,), core=False)
                sent[(kind, s, r, m)] = x
            else:
                sent[(kind, s, r, m)] = self.last[key]

    def _pre_post(self, m, r, chunk, which, dgrad_only=False):
        c, t = self.c, self._tokens(m, r)
        f = c.qkv_params / c.block_params
        pre, post = c.linear(t, len(chunk), which, f), c.linear(t, len(chunk), which, 1 - f)
        if dgrad_only:  # deferred weight gradients: the backward's input-gradient half now
            pre, post = pre / 2, post / 2
        tp = c.tp_comm(t, len(chunk))
        return (pre, post + tp) if which == "fwd" else (post + tp, pre)  # backward runs post first

    def _local_chunk(self, s, m, chunk, which, keys):
        c, par = self.c, self.par
        firsts = {}
        dgrad = which == "bwd" and s in self.deferring
        for r in range(self.n_rep):
            firsts[r] = self._on((s, r), self._pre_post(m, r, chunk, which, dgrad)[0], "linear")
        # the stage's keys gather (colocated: split documents) or the CP group's gather (wlb)
        if self.opt.system == "colocated" and any(self.micro[m].continues):
            nbytes = self._tokens(m, 0) * 2 * c.shape.n_kv_heads * c.shape.head_dim * self.opt.dtype_bytes
            same = c.same_node(self.dev[keys[0]], self.dev[keys[-1]])
            t = len(chunk) * self.hw.allgather_s(nbytes, self.n_rep, same)
            self._barrier(keys, list(firsts.values()), t * (1 if which == "fwd" else 2), "gather")
        for r in range(self.n_rep):
            key = (s, r)
            if self.opt.system == "wlb" and par.cp > 1:
                # every layer: all-gather the group's k/v (forward), and also reduce-scatter dk/dv (backward)
                nbytes = self._tokens(m, r) * 2 * c.shape.n_kv_heads * c.shape.head_dim * self.opt.dtype_bytes
                same = par.cp * par.tp <= self.hw.devices_per_node
                t = len(chunk) * self.hw.allgather_s(nbytes, par.cp, same) * (1 if which == "fwd" else 2)
                self._on(key, t, "cp_comm", core=False)
            self._on(key, self._block_attn(self.rep_attn[m][(r, which)], chunk), "attention")
            self._on(key, self._pre_post(m, r, chunk, which, dgrad)[1], "linear")

    def _cad_link(self, s: int):
        """The link CAD traffic of stage ``s`` crosses: inside a node when the whole pool is in one."""
        pool = ([self.dev[(s, r)] for r in range(self.n_rep)] if self.opt.servers == "stage"
                else list(range(self.par.devices)))
        return self.hw.link(self.c.same_node(min(pool), max(pool)))

    def _cad_chunk(self, s, m, chunk, which, keys):
        srv_dev = (lambda j: j) if self.opt.servers == "all" else (lambda j: self.dev[(s, j)])
        members = [((s, r), r, m) for r in range(self.n_rep)]
        self._cad_round(members, self._plans(s, m), {s: chunk}, which, self._cad_link(s), srv_dev)

    def _cad_round(self, members, nanos, blocks, which, link, srv_dev):
        """One attention round per nano-batch over ``blocks`` (stage -> its blocks of this chunk; equal
        window patterns), for ``members`` ``[(device key, plan rank, micro-batch)]``. Program order per
        device: the pre-attention linear work of every nano-batch, the attention it serves, then the
        post-attention work of every nano-batch (ping-pong: one nano-batch's round overlaps the other's
        linear work, forward and backward alike)."""
        opt, c = self.opt, self.c
        n_srv = len(next(iter(nanos[0]["srv"].values())))
        chunk = next(iter(blocks.values()))
        wins = sorted({w for b in chunk for w in c.windows[b]}, key=key_order)
        count = {w: sum(c.windows[b].count(w) for b in chunk) for w in wins}
        if any(sorted((w for b in bl for w in c.windows[b]), key=key_order)
               != sorted((w for b in chunk for w in c.windows[b]), key=key_order) for bl in blocks.values()):
                raise ValueError("the pooled schedule needs the same attention windows at every stage's layer j")
        lin = {}  # (nano, key) -> (pre, post)
        # ping-pong's own work on the trainer (Hardware.pingpong_*_row_s, calibrated; 0 on GPU figures): per block
        # and row of the micro-batch, shared equally by the nano-batches, half before and half after the round
        pp_row = getattr(self.hw, f"pingpong_{which}_row_s") if len(nanos) > 1 else 0.0
        for key, t, m in members:
            full = self._pre_post(m, key[1], chunk, which, which == "bwd" and key[0] in self.deferring)
            whole = self._tokens(m, key[1])
            extra = pp_row * whole * len(chunk) / len(nanos) / 2
            for i, nb in enumerate(nanos):
                lin[(i, key)] = (_scaled(full[0], nb["tokens"][t], whole) + extra,
                                 _scaled(full[1], nb["tokens"][t], whole) + extra)
        srv_t, ret_scale = [], []
        for i, nb in enumerate(nanos):
            t = sum(count[w] * nb["srv"][(w, which)] for w in wins)
            scale = np.ones(n_srv)
            if opt.idle_aware:
                # how much later a server can start nano-batch i's attention: on a trainer's device it
                # queues behind the pre-attention work of the later nano-batches; an idle device starts
                # as soon as the rows arrive. Equal finish = more attention where it can start earlier.
                work = np.zeros(n_srv)
                for key, _, _ in members:
                    work[self.dev[key]] += sum(lin[(k, key)][0] for k in range(i + 1, len(nanos)))
                new = _idle_aware(t, work)
                scale = np.where(t > 0, new / np.where(t > 0, t, 1.0), 0.0)
                t = new
            if opt.server_streams and opt.pool_rounds:  # pool work beyond the kernels, per round of the chunk
                t = t + sum(count[w] * np.array([self.hw.pool_round_s("server", which, x)
                                                 for x in nb["rows"][w][1]]) for w in wins)
            srv_t.append(t)
            ret_scale.append(scale)
        pre, send, rets, attn = {}, {}, {}, {}
        fused = opt.pingpong_order == "fused" and len(nanos) > 1
        for i in range(len(nanos)):
            for key, _, _ in members:
                self._flush_post(key, i)  # fused: this nano-batch's post-attention work of the previous round
                pre[(i, key)] = self._on(key, lin[(i, key)][0], "linear")
        for i, nb in enumerate(nanos):
            for key, t, _ in members:
                # rows: a round's tasks need keys of every nano-batch's rows, so no round starts before the last
                # nano-batch's pre-attention work (the trainer's order, distca.runtime.nano)
                dep = pre[(len(nanos) - 1 if opt.nano_split == "rows" else i, key)]
                if opt.server_streams and opt.pool_rounds:  # the trainer packs and sends rows, unpacks replies
                    work = sum(count[w] * self.hw.pool_round_s("trainer", which, nb["rows"][w][0][t]) for w in wins)
                    if work > 0:
                        dep = self._on(key, work, "cad_round")
                nbytes = sum(count[w] * nb["bytes"][(w, which)][0].get(t, 0.0) for w in wins)
                peers = max(nb["bytes"][(w, which)][2].get(t, 0) for w in wins)
                send[(i, key)] = self.g.add(self.comm[key], _send_time(link, nbytes, peers), "cad_comm",
                                            (dep,), uses_core=False)
        for i in range(len(nanos)):
            deps = tuple(send[(i, key)] for key, _, _ in members)
            for j in range(n_srv):
                if opt.server_streams:
                    attn[(i, j)] = self.g.add(self.servers[srv_dev(j)], float(srv_t[i][j]), "attention", deps)
                else:
                    attn[(i, j)] = self._on(self.key_of[srv_dev(j)], float(srv_t[i][j]), "attention", deps)
        for i, nb in enumerate(nanos):
            rets[i] = []
            for j in range(n_srv):
                nbytes = ret_scale[i][j] * sum(count[w] * nb["bytes"][(w, which)][1].get(j, 0.0) for w in wins)
                peers = max(nb["bytes"][(w, which)][3].get(j, 0) for w in wins)
                stream = self.server_comm[srv_dev(j)] if opt.server_streams else self.comm[self.key_of[srv_dev(j)]]
                rets[i].append(self.g.add(stream, _send_time(link, nbytes, peers), "cad_comm",
                                          (attn[(i, j)],), uses_core=False))
        for i in range(len(nanos)):
            for key, _, _ in members:
                if fused:
                    self.held_post[(key, i)] = (tuple(rets[i]), lin[(i, key)][1])
                    continue
                self._on(key, 0.0, "cad_wait", tuple(rets[i]), core=False)
                self._on(key, lin[(i, key)][1], "linear")

    def _optimizer(self) -> None:
        par, hw, c = self.par, self.hw, self.c
        for key, w in self.kept_w.items():  # 1F1B: deferred weight gradients, after the stage's last backward
            self._on(key, w, "linear")
        for s in range(par.pp):
            keys = [(s, r) for r in range(self.n_rep)]
            params = model_params(self.cfg) * len(c.stage_blocks[s]) / self.cfg.n_layers / par.tp
            nbytes = params * self.opt.grad_bytes
            n = par.dp  # every device of the stage holds a replica of its parameters (wlb: dp x cp)
            same = c.same_node(self.dev[keys[0]], self.dev[keys[-1]]) and n * par.tp <= hw.devices_per_node
            self._barrier(keys, [self.last[k] for k in keys], hw.allreduce_s(nbytes, n, same), "allreduce")
            for k in keys:
                self._on(k, hw.optimizer_s_per_param * params + hw.step_overhead_s, "optimizer")

    def _report(self, res: SimResult) -> StepReport:
        per_dev = [res.busy_s.get(f"dev{self.dev[k]}", {}) for k in sorted(self.dev, key=self.dev.get)]
        servers = [res.busy_s.get(f"srv{j}", {}) for j in sorted(self.servers)]
        tokens = sum(sum(sum(p) for p in mb.ranks) for mb in self.micro)
        if self.opt.system != "cad":
            ratios = []
            for m in range(self.par.micro_batches):
                for which in ("fwd", "bwd"):
                    t = np.array([sum(self.rep_attn[m][(r, which)].values()) for r in range(self.n_rep)])
                    ratios.append(float(t.max() / t.mean()) if t.mean() > 0 else 1.0)
        else:
            ratios = self.attn_ratios
        tok = [np.array([sum(p) for p in mb.ranks], dtype=float) for mb in self.micro]
        mm = max(float(t.max() / t.min()) for t in tok)
        # busy: the union of a device's compute intervals, on its own stream and its server process's
        owner = {}
        for key, d in self.dev.items():
            owner[self.comp[key]] = d
        for d, st in self.servers.items():
            owner[st] = d
        spans: dict[int, list[tuple[float, float, int]]] = {d: [] for d in self.dev.values()}
        for tid, t in enumerate(res.tasks):
            d = owner.get(t.stream)
            if d is not None and t.kind in BUSY_KINDS and t.end > t.start:
                spans[d].append((t.start, t.end, tid))
        busy = [_union_length([(a, b) for a, b, _ in spans[d]]) for d in sorted(spans)]
        full = np.zeros(len(res.tasks), dtype=np.int8)  # 0: after the ticks, 1: full tick, 2: partial tick
        for lo, hi, every in self.tick_spans:
            full[lo:hi] = 1 if every else 2
        split = {"full": 0.0, "partial": 0.0, "tail": 0.0}
        names = {0: "tail", 1: "full", 2: "partial"}
        for d in spans:
            end = 0.0
            for a, b, tid in sorted(spans[d]):
                if a > end:  # the gap before a busy interval belongs to the tick of the task that ends it
                    split[names[int(full[tid])]] += a - end
                end = max(end, b)
            split["tail"] += max(0.0, res.makespan_s - end)
        split = {k: v / max(1, len(spans)) for k, v in split.items()}
        return StepReport(res.makespan_s, int(tokens), per_dev, servers, float(np.mean(ratios)) if ratios else 1.0,
                          mm, res, busy, peak_in_flight(self.opt.schedule, self.par.pp, self.par.micro_batches),
                          split)


def _rect_arrays(nq, nk, kind, window) -> tuple[np.ndarray, ...]:
    """Rectangles as the cost model's ``(nq, nk, full, window)`` arrays."""
    as64 = lambda x: np.asarray(x, dtype=np.int64).reshape(-1)  # noqa: E731
    return as64(nq), as64(nk), np.asarray(kind, dtype=str).reshape(-1) == "full", as64(window)


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, -np.inf
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _idle_aware(attn: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """Water-filling: spread ``attn.sum()`` so that ``linear`` (work ahead of the attention on each device)
    plus attention is as even as it can be, keeping the plan's relative per-server deviations."""
    total = float(attn.sum())
    if total <= 0 or np.allclose(linear, linear[0]):
        return attn
    lo, hi = float(linear.min()), float(linear.max()) + total
    for _ in range(100):  # bisection on the water level
        h = 0.5 * (lo + hi)
        if np.maximum(0.0, h - linear).sum() > total:
            hi = h
        else:
            lo = h
    ideal = np.maximum(0.0, 0.5 * (lo + hi) - linear)
    dev = attn / attn.mean()
    out = ideal * dev
    return out * (total / out.sum()) if out.sum() > 0 else ideal


def _scaled(t: float, part: int, whole: int) -> float:
    return t * part / whole if whole else 0.0


def _send_time(link, nbytes: float, peers: int) -> float:
    """Time to push ``nbytes`` to ``peers`` destinations over one NIC (one latency per message)."""
    return 0.0 if nbytes <= 0 else max(1, peers) * link.latency_s + nbytes / link.bandwidth


def _split_halves(mb: MicroBatch) -> list[MicroBatch]:
    """Ping and pong: the micro-batch's documents in order, cut at half of the tokens, each half packed
    over the replicas on its own (as the paper's driver packs its two nano-batches); a document may
    still span replicas inside a half, and the one at the cut is split in two."""
    from distca.data.packing import pack_into_ranks

    docs = BatchLayout.from_ranks(mb.ranks, mb.continues).doc_len
    n, per = len(mb.ranks), int(sum(mb.ranks[0]))
    first = per // 2
    if first == 0:
        return [mb]
    csum = np.cumsum(docs)
    cut = n * first
    k = int(np.searchsorted(csum, cut))
    before = int(csum[k - 1]) if k else 0
    a = [*docs[:k].tolist(), cut - before]
    b = [int(csum[k]) - cut, *docs[k + 1:].tolist()]
    out = []
    for lengths, tpr in ((a, first), ([x for x in b if x > 0], per - first)):
        p = pack_into_ranks(np.asarray(lengths, dtype=np.int64), n, tpr)
        out.append(MicroBatch(p.ranks, p.continues))
    return out


def _query_halves(batch: BatchLayout) -> list[BatchLayout]:
    """A batch's two nano-batches as the trainer cuts them (``distca.runtime.nano.nano_batches``): the queries
    of the first and of the second half of every rank's rows (plan each with ``keys=batch``)."""
    tokens = batch.rank_tokens
    return [batch.query_rows(0 * tokens, tokens // 2), batch.query_rows(tokens // 2, tokens)]


def _prefix_halves(batch: BatchLayout) -> list[BatchLayout]:
    """Exact nano-batches whose first round needs none of the second's keys (``nano_split="prefix"``, NOT BUILT in
    the trainer): on rank r, nano-batch A holds the queries of rows ``[s_r, s_r + T/2)`` (``s_r``: the rows of the
    document continued from rank r - 1, 0 if none), B the rest. A's rows belong to documents that start on rank r
    at or after ``s_r``, so every key a causal or windowed A query sees is an earlier row of A; B's queries see A's
    and B's keys of the same layer. Plan each with ``keys=batch``."""
    T = batch.rank_tokens
    s = np.zeros(batch.n_ranks, dtype=np.int64)
    cont = (batch.piece_row == 0) & (batch.piece_off > 0)
    s[batch.piece_rank[cont]] = batch.piece_len[cont]
    e = np.minimum(T, s + T // 2)
    a = batch.query_rows(s, e)
    b1, b2 = batch.query_rows(0 * T, s), batch.query_rows(e, T)
    cat = lambda f: np.concatenate([getattr(b1, f), getattr(b2, f)])  # noqa: E731
    order = np.lexsort((cat("piece_row"), cat("piece_rank")))
    b = BatchLayout(batch.n_ranks, *(cat(f)[order] for f in ("piece_rank", "piece_doc", "piece_off", "piece_len",
                                                             "piece_row")), batch.doc_len, batch.doc_masks)
    return [a, b]


def _plan_bytes(plan, which: str):
    """Bytes each rank sends to servers and each server sends back in one pass (remote rows only), and
    how many distinct peers each of them sends to (one message, one latency, per peer)."""
    to_srv: dict[int, float] = {}
    to_rank: dict[int, float] = {}
    peers_srv: dict[int, set] = {}
    peers_rank: dict[int, set] = {}
    for direction, tensors, x in plan.messages(which):
        rb = sum(plan.row_bytes(t) for t in tensors)
        rem = x.remote
        ranks, servers, ns = x.rank[rem].tolist(), x.server[rem].tolist(), x.n[rem].tolist()
        if direction == "to_server":
            for r, j, n in zip(ranks, servers, ns, strict=True):
                to_srv[r] = to_srv.get(r, 0.0) + n * rb
                peers_srv.setdefault(r, set()).add(j)
        else:
            for r, j, n in zip(ranks, servers, ns, strict=True):
                to_rank[j] = to_rank.get(j, 0.0) + n * rb
                peers_rank.setdefault(j, set()).add(r)
    return (to_srv, to_rank, {r: len(v) for r, v in peers_srv.items()},
            {j: len(v) for j, v in peers_rank.items()})


__all__ = ["BUSY_KINDS", "MicroBatch", "Parallelism", "SimOptions", "StepReport", "peak_in_flight",
           "pipeline_order", "pooled_ticks", "simulate_step"]
