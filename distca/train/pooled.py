"""CAD under the pooled, tick-aligned pipeline schedule (:mod:`distca.train.schedule`): one plan per (tick,
window) over every stage's trainers, the step's micro-batch contexts whose core attention follows the ticks, and
the attention rounds a stage idle in a tick serves.

**Tick plans.** A tick's trainers are all ``P × DP`` ranks, trainer ``s * DP + d`` being stage ``s``'s replica
``d`` (DeepSpeed's topology rank of ``(pipe=s, data=d)``, checked at start). Stage ``s``'s rows in a tick are the
packed rows of the micro-batch it runs then (none when idle: ``BatchLayout.from_ranks`` takes empty rows), so one
plan balances the attention of every stage's micro-batch of the tick over all servers: every rank's own server on
the in-place data plane (``Placement(P·DP, P·DP, colocated)``), the pool's servers otherwise. Every rank computes
every tick's plans from the same seeded micro-batches (DESIGN §3), on the prefetch thread with the rest of the
next step (:class:`~distca.train.prefetch.StepPrefetch`): the plans travel with their step's micro-batches, so a
stop or a resume never meets a stale plan. Ticks in which nobody computes get no plan.

**Rounds.** In every tick each rank issues the same sequence of core-attention rounds as every active rank (the
in-place data plane's rounds are all-to-alls of all ranks). F tick: the stage's blocks in order, each block's
attention calls in order (``ModelConfig.block_windows``), one forward round each. B tick: the blocks in reverse,
each block's calls in reverse, one backward round each — with activation checkpointing each block first
recomputes its forward, so per block: its forward rounds, then its backward rounds. Stages hold equal blocks with
equal windows (``DistCAConfig.pooled_obstacle``). An idle stage runs those rounds with zero rows of its own: on the
in-place plane its server serves its share of every round; on the pool planes servers wait only for trainers that
send them rows, so an idle rank has nothing to do and stays idle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from distca.attention import lse_dtype
from distca.config import DistCAConfig, stage_ranges
from distca.masks import key_order
from distca.model.core import DocLayout
from distca.parts import attention_shape, client_settings, scheduler_settings, server_dtype
from distca.runtime.nano import PingPongBlocks, nano_batches, nano_rows
from distca.runtime.plan_exec import RankTensors
from distca.runtime.pooled_attention import PooledCoreAttention, TickNanoPlans, TickTable
from distca.scheduler import BatchLayout, Placement, Plan, make_plan
from distca.train.pipe import MicroContext, runner_only
from distca.train.schedule import B, F, active_ticks, backward_tick, forward_tick, tick_micros, tick_phase
from distca.train.wgrad import spread

log = logging.getLogger(__name__)

Round = tuple[str, int, int, int]  # (F or B, window, block position in the stage, nano-batch)


def tick_batch(micro_batches: list, micros: tuple[int | None, ...], part: int = 0) -> BatchLayout:
    """The tick's trainers' rows: stage ``s``'s replicas hold micro-batch ``micros[s]``'s packed rows (no rows when
    None), trainer ``s * DP + d``. A document never continues across stages: each stage's first row starts one.
    ``part``: which packed part of each micro-batch (``train.nano_split: repack``: two, each planned on its own,
    rows counted from the part's first)."""
    dp = micro_batches[0].parts[0].n_ranks
    idle = BatchLayout.from_ranks([[] for _ in range(dp)])
    stages = []
    for m in micros:
        if m is None:
            stages.append(idle)
        else:
            p = micro_batches[m].parts[part]
            stages.append(BatchLayout.from_ranks(p.ranks, p.continues))
    return BatchLayout.stacked(stages)


def tick_rounds(block_windows: list[tuple[int, ...]], checkpointing: bool, nanos: int = 1,
                pingpong: bool | None = None) -> dict[str, list[Round]]:
    """The rounds of an F and of a B tick over block positions whose attention calls have ``block_windows``
    (position ``j``: block ``j`` of every stage that has one), as ``(phase, window, position, nano-batch)``; with
    two nano-batches (``nanos`` = 2: ping-pong, or a micro-batch packed as two independent halves) each call is one
    round per nano-batch, in nano-batch order. Under ping-pong (default: ``nanos`` = 2) a recomputed forward sends
    nothing (:mod:`distca.runtime.nano` keeps the attention outputs), so checkpointing adds no rounds; otherwise it
    repeats the block's forward rounds before its backward ones."""
    if pingpong is None:
        pingpong = nanos > 1
    fwd = [(F, w, j, i) for j, block in enumerate(block_windows) for w in block for i in range(nanos)]
    bwd: list[Round] = []
    for j in reversed(range(len(block_windows))):
        block = block_windows[j]
        if checkpointing and not pingpong:  # the block's forward is recomputed before its backward
            bwd += [(F, w, j, i) for w in block for i in range(nanos)]
        bwd += [(B, w, j, i) for w in reversed(block) for i in range(nanos)]
    return {F: fwd, B: bwd}


def position_groups(blocks: tuple[int, ...]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Stages that have a block at each position, for ``blocks`` blocks per stage: ``(groups, group_of)`` with
    ``groups[g]`` the stages of group ``g`` (group 0: every stage) and ``group_of[j]`` position ``j``'s group."""
    groups: list[tuple[int, ...]] = []
    group_of = []
    for j in range(max(blocks)):
        here = tuple(s for s, b in enumerate(blocks) if b > j)
        if not groups or groups[-1] != here:
            groups.append(here)
        group_of.append(len(groups) - 1)
    return groups, group_of


def pooled_placement(cfg: DistCAConfig, plane: str) -> Placement:
    """Where a tick plan's servers are: every rank's own (in-place), else the pool's, trainer ``t`` on device ``t``."""
    n = cfg.cluster.n_trainers
    if plane == "inplace":
        return Placement(n, n, "colocated")
    return Placement(n, cfg.cluster.n_servers, cfg.cluster.placement, tuple(range(n)))


def check_topology(topo, stages: int, dp: int) -> None:
    """The tick plans' trainer index ``s * DP + d`` must be DeepSpeed's global rank of ``(pipe=s, data=d)``."""
    for s in range(stages):
        for d in range(dp):
            if topo.get_rank(pipe=s, data=d) != s * dp + d:
                raise RuntimeError(f"DeepSpeed's topology puts (pipe={s}, data={d}) on rank "
                                   f"{topo.get_rank(pipe=s, data=d)}, not {s * dp + d}: the pooled schedule's tick "
                                   "plans number trainers stage-major")


def replica_nodes(cfg: DistCAConfig, topo, stage: int) -> tuple[int, ...] | None:
    """The node of each data-parallel replica of ``stage`` (by DeepSpeed's global rank of ``(pipe=stage, data=d)``
    and ``cluster.devices_per_node``): the node map of a 1F1B in-place group. None without a node size."""
    if not cfg.cluster.devices_per_node:
        return None
    return tuple(cfg.cluster.node_of(topo.get_rank(pipe=stage, data=d)) for d in range(cfg.data_parallel))


def pooled_client(cfg: DistCAConfig, plane: str, rank: int, device: torch.device, addresses: list[str]):
    """This rank's CAD client for tick plans over all stages: in place, with rows by all-to-all over a group of
    every rank (created here: every rank must call this, in the same order); else a pool client whose trainer
    index is its global rank, in one plan-id namespace shared by all stages (``group=0``)."""
    settings = client_settings(cfg, device.type)
    if plane == "inplace":
        import torch.distributed as dist

        from distca.runtime.inplace import InPlaceClient
        from distca.server.exchange import GroupRoles, RowExchange, RowFormat

        world = dist.get_world_size()
        group = dist.new_group(list(range(world)))
        m = cfg.model
        fmt = RowFormat(m.n_heads, m.n_kv_heads, m.head_dim, getattr(torch, server_dtype(cfg)))
        # plan rank r is global rank r (pipe-major: stage * dp + replica), so its node is the global rank's
        nodes = None if not cfg.cluster.devices_per_node else tuple(cfg.cluster.node_of(r) for r in range(world))
        return InPlaceClient(RowExchange(group, GroupRoles.inplace(world, rank), fmt, device, nodes=nodes),
                             backend=settings.backend)
    if plane == "collective":
        raise ValueError("the collective data plane cannot run the pooled schedule (DistCAConfig.pooled_obstacle)")
    from distca.runtime.client import CADClient

    return CADClient(rank, addresses, settings.transport, backend=settings.backend, group=0, shm=settings.shm)


class PooledCAD:
    """One rank's CAD under the pooled schedule: plans a step's ticks, makes its micro-batch contexts, follows the
    ticks (``enter``) and serves the rounds of ticks it is idle in (``serve``)."""

    def __init__(self, cfg: DistCAConfig, stage: int, client, placement: Placement, device: torch.device,
                 serves: bool, pingpong: bool = False):
        """``serves``: this rank hosts an attention server (in place), so it takes part in every round.
        ``pingpong``: blocks run as two nano-batches (:mod:`distca.runtime.nano`), each tick plan is one per
        nano-batch: the queries of the first and of the second half of every trainer's rows."""
        self.cfg, self.stage, self.client, self.placement, self.device = cfg, stage, client, placement, device
        self.serves, self.pingpong = serves, pingpong
        self.idle_blocked_s = 0.0  # of the client's blocked time, what it spent in rounds of ticks this rank idled in
        self.stages, self.micro_batches = cfg.train.pipeline_parallel, cfg.train.micro_batches
        self.windows = sorted(set(cfg.model.attention_windows()), key=key_order)
        self.shape = attention_shape(cfg)
        # unequal stages (train.stage_split / stage_blocks): block position j's rounds are over the stages that
        # have a block j, with plans of their own; a stage without serves them (in place) after its blocks' forward
        # and before its blocks' backward, beside its other work (the LM head)
        self.blocks = cfg.stage_blocks()
        self.groups, self.group_of = position_groups(self.blocks)
        ranges = stage_ranges(self.blocks)
        longest = max(range(self.stages), key=lambda x: self.blocks[x])
        windows = cfg.model.block_windows()
        self.parts = 2 if cfg.train.nano_split == "repack" else 1  # independent halves: one round per half
        self.rounds = tick_rounds([windows[b] for b in ranges[longest]], cfg.train.activation_checkpointing,
                                  2 if pingpong or self.parts > 1 else 1, pingpong)
        self.own = self.blocks[stage]  # positions below this are the stage's own blocks'
        self.block_group = {b: self.group_of[b - ranges[stage].start] for b in ranges[stage]}
        self.last_block = ranges[stage].stop - 1
        self.dtype = getattr(torch, server_dtype(cfg))
        self.table = TickTable({})
        self._trailing: threading.Thread | None = None
        self._trailing_error: BaseException | None = None

    # -- the prefetch thread ------------------------------------------------------------------------------------
    def plan_step(self, micro_batches: list) -> dict[int, dict[int, Plan]]:
        """Every active tick's plans by window (the same on every rank). Ticks holding the same micro-batches on
        the same stages share their plans."""
        return self.plan_ticks(micro_batches)[0]

    def plan_ticks(self, micro_batches: list) -> tuple[dict[int, dict[int, Plan]], dict[int, dict[tuple, Plan]]]:
        """``(plans, later)``: every active tick's plans by window for the block positions every stage has, and
        by ``(window, group)`` for the position groups only some stages have (unequal stages; none when even).
        A tick's group with no micro-batch on its stages gets no plan (nobody computes those positions)."""
        made: dict[tuple, dict[int, Plan]] = {}
        out, later = {}, {}
        for t in active_ticks(self.stages, len(micro_batches)):
            micros = tick_micros(t, self.stages, len(micro_batches))
            for g, stages in enumerate(self.groups):
                here = tuple(m if s in stages else None for s, m in enumerate(micros))
                if all(m is None for m in here):
                    continue
                if here not in made:
                    made[here] = self._plan_tick(micro_batches, here)
                if g == 0:
                    out[t] = made[here]
                else:
                    later.setdefault(t, {}).update({(w, g): p for w, p in made[here].items()})
        return out, later

    def _plan_tick(self, micro_batches: list, micros: tuple[int | None, ...]) -> dict[int, Plan]:
        if len(micro_batches[0].parts) > 1:  # independent halves: each planned on its own, ping-pong or not
            halves = [tick_batch(micro_batches, micros, i) for i in range(len(micro_batches[0].parts))]
            return {w: tuple(make_plan(h, self.placement, scheduler_settings(self.cfg, w), self.shape)[0].tagged(i)
                             for i, h in enumerate(halves)) for w in self.windows}  # tagged: equal halves differ
        batch = tick_batch(micro_batches, micros)
        if self.pingpong:
            return {w: tuple(make_plan(h, self.placement, scheduler_settings(self.cfg, w), self.shape,
                                       keys=batch)[0] for h in nano_batches(batch))
                    for w in self.windows}
        return {w: make_plan(batch, self.placement, scheduler_settings(self.cfg, w), self.shape)[0]
                for w in self.windows}

    # -- the step -----------------------------------------------------------------------------------------------
    def contexts(self, layouts: list[DocLayout], plans) -> list[MicroContext]:
        """The step's micro-batch contexts on this stage: micro-batch ``m``'s core attention takes the plans of
        its forward and backward ticks from this step's table. ``plans``: :meth:`plan_step`'s (even stages) or
        :meth:`plan_ticks`' pair.
        With ``train.nano_split: repack`` each rank's rows are the first half's, then the second's, each half
        planned on its own."""
        plans, later = plans if isinstance(plans, tuple) else (plans, {})
        self.table = TickTable(plans, later, self.block_group)
        P, s = self.stages, self.stage
        after = self._after_block if self.serves and self.own < len(self.group_of) else None
        independent = self.parts > 1
        if self.pingpong:
            out = []
            for m, layout in enumerate(layouts):
                nano = TickNanoPlans(nano_rows(int(layout.cu_seqlens[-1])), self.table, forward_tick(m, s, P),
                                     backward_tick(m, s, P),  # the rows plan_step's halves planned
                                     independent=independent)
                run = PingPongBlocks(self.client, nano, checkpoint=self.cfg.train.activation_checkpointing)
                out.append(MicroContext(layout, runner_only, run_block=run, after_block=after))
            return out
        return [MicroContext(layout, PooledCoreAttention(
            self.client, self.table, forward_tick(m, s, P), backward_tick(m, s, P),
            rows=nano_rows(int(layout.cu_seqlens[-1])) if independent else None), after_block=after)
            for m, layout in enumerate(layouts)]

    def enter(self, tick: int | None) -> None:
        """The schedule starts ``tick`` (None: the step's schedule is over)."""
        self.join_trailing()
        self.table.tick = tick

    def before_pass(self, tick: int) -> None:
        """``tick``'s transfers are done and this stage's pass starts. A stage with fewer blocks than others, in a
        B tick, starts serving the later positions' backward rounds now, beside its own first backward work (the
        LM head's on the last stage); they end before its first round of its own. (Not before the transfers: on
        a GPU the rounds' collectives and the transfers must reach the device in the same order on every rank.)"""
        if self.serves and tick_phase(tick) == B and self.own < len(self.group_of):
            self._start_trailing(tick, B)

    # -- a stage with fewer blocks: the positions it has no block at -------------------------------------------
    def _after_block(self, block: int) -> None:
        """After its last block's forward in an F tick, the stage serves the later positions' forward rounds
        (beside the rest of its forward: the final norm, the LM head and the loss on the last stage)."""
        tick = self.table.tick
        if block == self.last_block and tick is not None and tick_phase(tick) == F:
            self._start_trailing(tick, F)

    def _trailing_rounds(self, phase: str) -> list[Round]:
        return [r for r in self.rounds[phase] if r[2] >= self.own]

    def _start_trailing(self, tick: int, phase: str) -> None:
        rounds = self._trailing_rounds(phase)
        if not rounds:
            return

        def serve() -> None:
            try:
                if self.device is not None and self.device.type == "cuda":  # a thread starts on device 0
                    torch.cuda.set_device(self.device)
                with torch.no_grad():
                    self._issue(tick, rounds)
            except BaseException as e:
                self._trailing_error = e

        self._trailing = threading.Thread(target=serve, name=f"distca-trailing-{tick}", daemon=True)
        self._trailing.start()
        self.table.before_round = self.join_trailing

    def join_trailing(self) -> None:
        """Wait for the later positions' rounds this stage serves (before any round of its own, and at a tick's
        end); a failure there is raised here."""
        thread, self._trailing = self._trailing, None
        if thread is None:
            return
        thread.join()
        self.table.before_round = None
        err, self._trailing_error = self._trailing_error, None
        if err is not None:
            raise err

    def forward_plans(self) -> list[dict[int, Plan]]:
        """The step's F-tick plans (what the step meter counts the planned attention load from). With unequal
        stages each position group's plans come once per block position of the group, so the load adds up as
        the rounds do."""
        ticks = [t for t in sorted(self.table.plans) if tick_phase(t) == F]
        if len(self.groups) == 1:
            return [self.table.plans[t] for t in ticks]
        out = []
        for t in ticks:
            for g in self.group_of:
                per = self.table.plans[t] if g == 0 else {w: p for (w, gg), p in self.table.later.get(t, {}).items()
                                                          if gg == g}
                if per:
                    out.append(per)
        return out

    def serve(self, tick: int, phase: str, work: Sequence = (), run: Callable[[list], None] | None = None) -> bool:
        """Issue ``tick``'s rounds with no rows of this rank's own (a stage idle while others compute); True when
        this rank served them. ``work`` (deferred weight-gradient jobs, :mod:`distca.train.wgrad`) is spread over
        the gaps before the rounds, where the active stages run their linear work, in shares of equal FLOPs
        (:func:`~distca.train.wgrad.spread`), by ``run(jobs)``; a rank that serves no rounds runs it at once."""
        work = list(work)
        if not self.serves:
            if work and run is not None:
                run(work)
            return False
        blocked0 = float(getattr(self.client, "blocked_s", 0.0))
        try:
            self._serve(tick, phase, work, run)
        finally:  # a rank idle in the tick waits in its rounds for the active stages: bubble time, not communication
            self.idle_blocked_s += float(getattr(self.client, "blocked_s", 0.0)) - blocked0
        return True

    def _serve(self, tick: int, phase: str, work: list, run: Callable[[list], None] | None) -> None:
        if self.table.tick != tick or tick_phase(tick) != phase:
            raise RuntimeError(f"serving tick {tick} ({phase}) while the schedule is in tick {self.table.tick}")
        with torch.no_grad():
            served = self._issue(tick, self.rounds[phase], work, run)
        if run is not None and not served and work:
            run(work)

    def _issue(self, tick: int, rounds: list[Round], work: Sequence = (), run: Callable[[list], None] | None = None
               ) -> int:
        """Take part in ``rounds`` of ``tick`` with no rows of this rank's own (rounds whose position group has no
        plan in the tick are nobody's and skipped), running ``work`` spread over the gaps before them; returns
        how many rounds it took part in."""
        rounds = [r for r in rounds if self.table.has(tick, r[1], self.group_of[r[2]])]
        groups = spread(list(work), len(rounds)) if rounds and work else []
        m, dev, dt = self.cfg.model, self.device, self.dtype
        q = torch.empty((0, m.n_heads, m.head_dim), dtype=dt, device=dev)
        kv = torch.empty((0, m.n_kv_heads, m.head_dim), dtype=dt, device=dev)
        t = RankTensors(q, kv, kv)
        lse = torch.empty((0, m.n_heads), dtype=lse_dtype(dt), device=dev)
        for i, (kind, w, pos, nano) in enumerate(rounds):
            if run is not None and groups and groups[i]:
                with torch.enable_grad():  # weight gradients go to autograd for their parameters
                    run(groups[i])
            plan = self.table.plan(tick, w, self.group_of[pos])
            if isinstance(plan, tuple):  # ping-pong: the rounds of a call go nano-batch by nano-batch
                plan = plan[nano]
            if kind == F:
                self.client.forward(plan, t)
            else:
                self.client.backward(plan, t, q, lse, q)
        return len(rounds)

    def probe(self) -> tuple[float, int]:
        """This rank's own server's busy seconds and rounds so far (the timeline's server columns)."""
        return float(getattr(self.client, "busy_s", 0.0)), int(getattr(self.client, "served", 0))


def describe(plans) -> dict[str, Any]:
    """A step's tick plans in brief, for its record: how many trainers a plan spans and how many ticks have one.
    ``plans``: :meth:`PooledCAD.plan_step`'s, or :meth:`PooledCAD.plan_ticks`' pair."""
    plans = plans[0] if isinstance(plans, tuple) else plans
    first = next((p[0] if isinstance(p, tuple) else p for per in plans.values() for p in per.values()), None)
    return {"plan_trainers": first.n_ranks if first is not None else 0, "planned_ticks": len(plans)}
