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
    simulated cluster runs them). With ``pingpong`` every micro-batch is two nano-batches, each planned
    on its own, and communication runs on a separate stream (DESIGN §2's overlap; the paper's Fig. 7).
``wlb``
    WLB-LLM-style: workload-balanced variable-length packing over data-parallel groups of ``cp``
    devices, each document split head–tail over its group (per-document context parallelism): equal
    attention inside a group, every layer an all-gather of the group's keys/values and a
    reduce-scatter of their gradients. One device stands for its group (they are in lockstep).

Every quantity is per device; a tensor-parallel group of ``tp`` GPUs is one device with ``1/tp`` of the
heads, FLOPs and bytes plus its NVLink all-reduces per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from distca.attention.cost import AttentionShape, CostModel
from distca.config import ModelConfig
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.sim.engine import SimResult, TaskGraph, simulate
from distca.sim.hardware import Hardware
from distca.train.flops import model_params

System = Literal["colocated", "cad", "wlb"]


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


@dataclass
class MicroBatch:
    """One micro-batch: per replica (or wlb group), its document pieces."""

    ranks: list[list[int]]
    continues: list[bool]

    @classmethod
    def whole(cls, groups: list[list[int]]) -> MicroBatch:
        """Whole documents per replica (no document crosses replicas)."""
        return cls([list(map(int, g)) for g in groups], [False] * len(groups))


@dataclass
class StepReport:
    step_s: float
    tokens: int
    per_device: list[dict[str, float]]  # busy seconds by kind, per device (trainer stream)
    servers: list[dict[str, float]] = field(default_factory=list)
    attention_max_over_mean: float = 1.0  # per pass, over replicas (colocated/wlb) or servers (cad)
    tokens_max_over_min: float = 1.0  # per micro-batch, across devices (activation memory proxy)
    result: SimResult | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


def block_windows(cfg: ModelConfig) -> list[list[int]]:
    """Windows of each block's core-attention calls (-1 full causal)."""
    out = []
    for i in range(cfg.n_layers):
        if cfg.residual == "shortswa" and cfg.shortswa_every == 1:
            out.append([cfg.shortswa_window, -1])
        elif cfg.residual == "shortswa" and i % cfg.shortswa_every == cfg.shortswa_every - 1:
            out.append([cfg.shortswa_window])
        else:
            out.append([-1])
    return out


def block_linear_params(cfg: ModelConfig) -> tuple[int, int]:
    """Matmul weights of one block: ``(before attention: q/k/v projections, total)``."""
    d, hd = cfg.hidden, cfg.head_dim
    qkv = d * hd * (cfg.n_heads + 2 * cfg.n_kv_heads)
    attn = qkv + d * hd * cfg.n_heads
    per = attn + 3 * d * cfg.ffn_hidden
    if cfg.residual == "shortswa" and cfg.shortswa_every == 1:
        per += attn
    if cfg.residual == "ddl":
        per += 4 * d
    return qkv, per


def pipeline_order(stage: int, pp: int, m: int) -> list[tuple[str, int]]:
    """1F1B order of one stage: warm-up forwards, alternating F/B, cool-down backwards."""
    warm = min(pp - stage - 1, m)
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    order += [("B", i) for i in range(m - warm, m)]
    return order


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
        self.windows = block_windows(cfg)
        if cfg.n_layers % par.pp:
            raise ValueError(f"n_layers={cfg.n_layers} must be a multiple of pp={par.pp}")
        per = cfg.n_layers // par.pp
        self.stage_blocks = [list(range(s * per, (s + 1) * per)) for s in range(par.pp)]
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
        if q.size == 0:
            return 0.0
        t = float(self.model.time_s(q, kv, window, which).sum())
        if self.model.mode == "pairs":
            t += self.hw.attention_task_s
        elif self.hw.attention_fused and q.size > 1:  # one launch for the fused call, not one per task
            coef = self.model.coef_fwd if which == "fwd" else self.model.coef_bwd
            t -= (q.size - 1) * float(coef[0])
        return t

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
        self.layouts = [BatchLayout.from_ranks(mb.ranks, mb.continues) for mb in micro]

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
        wins = sorted({w for ws in self.c.windows for w in ws})
        cp = self.par.cp if self.opt.system == "wlb" else 1
        for r in range(self.n_rep):
            sel = lay.piece_rank == r
            q, kv = lay.piece_len[sel], lay.piece_off[sel] + lay.piece_len[sel]
            for which in ("fwd", "bwd"):
                out[(r, which)] = {w: self.c.attention(q, kv, w, which) / cp for w in wins}
        return out

    def _block_attn(self, per_w: dict[int, float], blocks: list[int]) -> float:
        return sum(per_w[w] for b in blocks for w in self.c.windows[b])

    # -- CAD plans -----------------------------------------------------------------------------
    def _plans(self, s: int, m: int) -> list[dict]:
        """Nano-batches of micro-batch ``m`` on stage ``s`` (two with ping-pong), each with its plan per
        window, per-server attention seconds and per-(rank, server) bytes. A stage-local pool gives
        every stage the same plans; a cluster-wide pool plans each stage from its own devices (as
        ``distca.train.trainer`` does), so their home servers differ."""
        key = (s if self.opt.servers == "all" else 0, m)
        if key in self._plan_cache:
            return self._plan_cache[key]
        mb = self.micro[m]
        halves = [mb] if not self.opt.pingpong else _split_halves(mb)
        n_srv = self.par.dp if self.opt.servers == "stage" else self.par.devices
        devices = None if self.opt.servers == "stage" else tuple(s * self.par.dp + r for r in range(self.par.dp))
        placement = Placement(self.par.dp, n_srv, "colocated", devices)
        wins = sorted({w for ws in self.c.windows for w in ws})
        out = []
        for nb in halves:
            lay = BatchLayout.from_ranks(nb.ranks, nb.continues)
            entry = {"tokens": [int(sum(p)) for p in nb.ranks], "srv": {}, "bytes": {}}
            for w in wins:
                sched = SchedulerConfig(eps=self.opt.eps, granularity=self.opt.granularity, window=w)
                plan, _ = make_plan(lay, placement, sched, self.c.shape)
                q = plan.task_q1 - plan.task_q0
                kv = plan.task_k1 - plan.task_k0
                for which in ("fwd", "bwd"):
                    t = np.zeros(n_srv)
                    for j in range(n_srv):
                        sel = plan.task_server == j
                        t[j] = self.c.attention(q[sel], kv[sel], w, which)
                    entry["srv"][(w, which)] = t
                    entry["bytes"][(w, which)] = _plan_bytes(plan, which)
                    self.attn_ratios.append(float(t.max() / t.mean()) if t.mean() > 0 else 1.0)
            out.append(entry)
        self._plan_cache[key] = out
        return out

    # -- the graph -----------------------------------------------------------------------------
    def run(self) -> StepReport:
        par, opt = self.par, self.opt
        if opt.system == "cad" and not opt.server_streams and opt.servers == "all":
            raise ValueError("in-place servers (server_streams=False) serve their own stage: use servers='stage'")
        self.rep_attn = [self._replica_attention(m) for m in range(par.micro_batches)] \
            if opt.system != "cad" else None
        self._plan_cache: dict = {}
        if opt.system == "cad" and opt.server_streams:
            for d in range(par.devices):  # one server process per device
                self.servers[d] = self.g.stream(f"srv{d}", ordered=False)
                self.server_comm[d] = self.g.stream(f"srv{d}.comm", ordered=False)
        # forward/backward passes in 1F1B order; build stage by stage in a global time-consistent order:
        # a stage's pass depends on the previous (forward) or next (backward) stage's transfer.
        orders = {s: pipeline_order(s, par.pp, par.micro_batches) for s in range(par.pp)}
        sent: dict[tuple[str, int, int, int], int] = {}  # (pass, stage, replica, micro) -> transfer task
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
        self._optimizer()
        res = simulate(self.g, self.hw.cores)
        return self._report(res)

    def _pass(self, kind: str, s: int, m: int, sent: dict) -> None:
        par, c = self.par, self.c
        which = "fwd" if kind == "F" else "bwd"
        keys = [(s, r) for r in range(self.n_rep)]
        for r in range(self.n_rep):
            dep = sent.get(("F", s - 1, r, m)) if kind == "F" else sent.get(("B", s + 1, r, m))
            self._on((s, r), self.hw.micro_overhead_s, "overhead", (dep,))
            if kind == "B" and s == par.pp - 1:
                self._on((s, r), c.head(self._tokens(m, r), "fwd") + c.head(self._tokens(m, r), "bwd"), "linear")
        blocks = c.stage_blocks[s] if kind == "F" else list(reversed(c.stage_blocks[s]))
        for chunk in _chunks(blocks, self.opt.layer_chunks):
            if self.opt.system == "cad":
                self._cad_chunk(s, m, chunk, which, keys)
            else:
                self._local_chunk(s, m, chunk, which, keys)
        for r in range(self.n_rep):
            key = (s, r)
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

    def _pre_post(self, m, r, chunk, which):
        c, t = self.c, self._tokens(m, r)
        f = c.qkv_params / c.block_params
        pre, post = c.linear(t, len(chunk), which, f), c.linear(t, len(chunk), which, 1 - f)
        tp = c.tp_comm(t, len(chunk))
        return (pre, post + tp) if which == "fwd" else (post + tp, pre)  # backward runs post first

    def _local_chunk(self, s, m, chunk, which, keys):
        c, par = self.c, self.par
        firsts = {}
        for r in range(self.n_rep):
            firsts[r] = self._on((s, r), self._pre_post(m, r, chunk, which)[0], "linear")
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
            self._on(key, self._pre_post(m, r, chunk, which)[1], "linear")

    def _cad_link(self, s: int):
        """The link CAD traffic of stage ``s`` crosses: inside a node when the whole pool is in one."""
        pool = ([self.dev[(s, r)] for r in range(self.n_rep)] if self.opt.servers == "stage"
                else list(range(self.par.devices)))
        return self.hw.link(self.c.same_node(min(pool), max(pool)))

    def _cad_chunk(self, s, m, chunk, which, keys):
        opt, c = self.opt, self.c
        nanos = self._plans(s, m)
        n_srv = len(next(iter(nanos[0]["srv"].values())))
        link = self._cad_link(s)
        srv_dev = (lambda j: j) if opt.servers == "all" else (lambda j: self.dev[(s, j)])
        wins = sorted({w for b in chunk for w in c.windows[b]})
        count = {w: sum(c.windows[b].count(w) for b in chunk) for w in wins}
        full = {r: self._pre_post(m, r, chunk, which) for r in range(self.n_rep)}
        # program order per device: pre of every nano-batch, its sends, the attention it serves, the
        # returns, then post of every nano-batch (ping-pong: one nano's comm overlaps the other's compute)
        pre, send, rets = {}, {}, {}
        for i, nb in enumerate(nanos):
            for r in range(self.n_rep):
                pre[(i, r)] = self._on((s, r), _scaled(full[r][0], nb["tokens"][r], self._tokens(m, r)), "linear")
        for i, nb in enumerate(nanos):
            for r in range(self.n_rep):
                nbytes = sum(count[w] * nb["bytes"][(w, which)][0].get(r, 0.0) for w in wins)
                send[(i, r)] = self.g.add(self.comm[(s, r)], _send_time(link, nbytes, n_srv), "cad_comm",
                                          (pre[(i, r)],), uses_core=False)
        attn = {}
        for i, nb in enumerate(nanos):
            srv_t = sum(count[w] * nb["srv"][(w, which)] for w in wins)
            deps = tuple(send[(i, r)] for r in range(self.n_rep))
            for j in range(n_srv):
                if opt.server_streams:
                    attn[(i, j)] = self.g.add(self.servers[srv_dev(j)], float(srv_t[j]), "attention", deps)
                else:
                    attn[(i, j)] = self._on((s, j), float(srv_t[j]), "attention", deps)
        for i, nb in enumerate(nanos):
            rets[i] = []
            for j in range(n_srv):
                nbytes = sum(count[w] * nb["bytes"][(w, which)][1].get(j, 0.0) for w in wins)
                stream = self.server_comm[srv_dev(j)] if opt.server_streams else self.comm[(s, j)]
                rets[i].append(self.g.add(stream, _send_time(link, nbytes, self.n_rep), "cad_comm",
                                          (attn[(i, j)],), uses_core=False))
        for i, nb in enumerate(nanos):
            for r in range(self.n_rep):
                self._on((s, r), 0.0, "cad_wait", tuple(rets[i]), core=False)
                self._on((s, r), _scaled(full[r][1], nb["tokens"][r], self._tokens(m, r)), "linear")

    def _optimizer(self) -> None:
        par, hw, c = self.par, self.hw, self.c
        n_blocks = self.cfg.n_layers // par.pp
        for s in range(par.pp):
            keys = [(s, r) for r in range(self.n_rep)]
            params = model_params(self.cfg) * n_blocks / self.cfg.n_layers / par.tp
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
        return StepReport(res.makespan_s, int(tokens), per_dev, servers, float(np.mean(ratios)) if ratios else 1.0,
                          mm, res)


def _scaled(t: float, part: int, whole: int) -> float:
    return t * part / whole if whole else 0.0


def _send_time(link, nbytes: float, peers: int) -> float:
    """Time to push ``nbytes`` to ``peers`` destinations over one NIC (one latency per message)."""
    return 0.0 if nbytes <= 0 else peers * link.latency_s + nbytes / link.bandwidth


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


def _plan_bytes(plan, which: str) -> tuple[dict[int, float], dict[int, float]]:
    """Bytes each rank sends to servers, and each server sends back, in one pass (remote rows only)."""
    to_srv: dict[int, float] = {}
    to_rank: dict[int, float] = {}
    for direction, tensors, x in plan.messages(which):
        rb = sum(plan.row_bytes(t) for t in tensors)
        rem = x.remote
        if direction == "to_server":
            for r, n in zip(x.rank[rem].tolist(), x.n[rem].tolist(), strict=True):
                to_srv[r] = to_srv.get(r, 0.0) + n * rb
        else:
            for s, n in zip(x.server[rem].tolist(), x.n[rem].tolist(), strict=True):
                to_rank[s] = to_rank.get(s, 0.0) + n * rb
    return to_srv, to_rank


__all__ = ["MicroBatch", "Parallelism", "SimOptions", "StepReport", "block_windows", "pipeline_order",
           "simulate_step"]
