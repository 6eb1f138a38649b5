"""Core attention under the pooled, tick-aligned pipeline schedule: the plan of each pass comes from the tick.

In a pooled schedule every stage runs the same phase in each tick and one CAD plan per (tick, window) covers the
rows of every stage's micro-batch of that tick (:mod:`distca.train.pooled` builds the plans, one step at a time).
A micro-batch's forward rounds on a stage therefore use its forward tick's plan and its backward rounds its
backward tick's plan — a different plan, shared with other stages' micro-batches. So the plan is not fixed at
forward for the backward (:func:`~distca.runtime.cad_attention.cad_attention` takes a ``plan_of(backward)``): each
pass looks it up in the step's :class:`TickTable` under the tick the pipeline is in (the schedule sets
``TickTable.tick`` as each tick starts). A forward run in the backward tick is activation checkpointing's
recomputation and takes the backward tick's plan, as every other rank in that tick does.

The client's trainer index in the plans is the rank's place among all stages' trainers (``stage * dp + replica``),
fixed when the client is made.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from distca.runtime.cad_attention import cad_attention, cad_attention_parts
from distca.scheduler import Plan


class TickTable:
    """One step's CAD plans, ``plans[tick][window]``, and the tick the pipeline is in now (``None`` outside a
    step's schedule).

    When stages hold unequal numbers of blocks, the block positions only some stages have get plans of their own,
    over those stages' rows: ``later[tick][(window, group)]`` for position group ``group >= 1`` (group 0, the
    positions every stage has, is ``plans``); ``block_group`` maps this rank's blocks to their group."""

    def __init__(self, plans: dict[int, dict[int, Plan]], later: dict[int, dict[tuple[int, int], Plan]] | None = None,
                 block_group: dict[int, int] | None = None):
        self.plans, self.tick = plans, None
        self.later, self.block_group = later or {}, block_group or {}
        # called before each round of this rank's own rows: a stage serving other positions' rounds on a thread
        # of its own (distca.train.pooled) finishes them first, so every rank issues its rounds in one order
        self.before_round: Callable[[], None] | None = None

    def wait_turn(self) -> None:
        hook = self.before_round
        if hook is not None:
            hook()

    def group_of(self, block: int | None) -> int:
        return 0 if block is None else self.block_group.get(block, 0)

    def has(self, tick: int, window: int, group: int = 0) -> bool:
        if group == 0:
            return window in self.plans.get(tick, {})
        return (window, group) in self.later.get(tick, {})

    def plan(self, tick: int, window: int, group: int = 0) -> Plan:
        got = (self.plans.get(tick, {}).get(window) if group == 0
               else self.later.get(tick, {}).get((window, group)))
        if got is None:
            raise KeyError(f"no pooled CAD plan for tick {tick}, window {window}, position group {group}; planned "
                           f"ticks: {sorted(self.plans)}")
        return got


class TickNanoPlans:
    """Ping-pong under the pooled schedule: one micro-batch's nano-batch rows on this rank, and each call's plan
    from the tick the pipeline is in (``table.plans[tick][window]`` holds one plan per nano-batch). With
    ping-pong a recomputed forward sends nothing (:mod:`distca.runtime.nano`), so a forward is in the F tick.
    ``independent``: the nano-batches are the micro-batch's independent halves, each planned over its own rows."""

    def __init__(self, rows: tuple[slice, ...], table: TickTable, forward_tick: int, backward_tick: int,
                 group: int = 0, independent: bool = False):
        self.rows, self.table, self.independent = rows, table, independent
        self.forward_tick, self.backward_tick, self.group = forward_tick, backward_tick, group

    def at(self, block: int | None) -> TickNanoPlans:
        """The same micro-batch's plans for the calls of ``block`` (its position group's)."""
        return TickNanoPlans(self.rows, self.table, self.forward_tick, self.backward_tick, self.table.group_of(block),
                             self.independent)

    def plan(self, window: int, nano: int, backward: bool = False) -> Plan:
        now, want = self.table.tick, (self.backward_tick if backward else self.forward_tick)
        if now != want:
            raise RuntimeError(f"pooled ping-pong: a {'backward' if backward else 'forward'} round in tick {now}, but "
                               f"this micro-batch runs forward in tick {self.forward_tick} and backward in tick "
                               f"{self.backward_tick}")
        self.table.wait_turn()
        return self.table.plan(now, window, self.group)[nano]


class PooledCoreAttention:
    """The model's core-attention interface for one micro-batch on this rank under the pooled schedule: forward
    in tick ``forward_tick`` (or, recomputed, in ``backward_tick``), backward in ``backward_tick``."""

    def __init__(self, client, table: TickTable, forward_tick: int, backward_tick: int, group: int = 0,
                 rows: tuple[slice, ...] | None = None):
        """``rows``: the micro-batch is independent parts at these rows (``train.nano_split: repack``), and each
        tick's plan of a window is one plan per part."""
        self.client, self.table, self.rows = client, table, rows
        self.forward_tick, self.backward_tick, self.group = forward_tick, backward_tick, group

    def at(self, block: int | None) -> PooledCoreAttention:
        """The same micro-batch's core attention for the calls of ``block`` (its position group's plans)."""
        return PooledCoreAttention(self.client, self.table, self.forward_tick, self.backward_tick,
                                   self.table.group_of(block), self.rows)

    def plan(self, window: int, backward: bool) -> Plan:
        """The plan of a pass now: the pipeline must be in this micro-batch's tick for it (never a stale plan)."""
        now = self.table.tick
        allowed = (self.backward_tick,) if backward else (self.forward_tick, self.backward_tick)
        if now not in allowed:
            raise RuntimeError(f"pooled core attention: a {'backward' if backward else 'forward'} pass in tick {now}, "
                               f"but this micro-batch runs forward in tick {self.forward_tick} and backward in tick "
                               f"{self.backward_tick}")
        self.table.wait_turn()
        return self.table.plan(now, window, self.group)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
        plan_of = functools.partial(self.plan, window)
        if self.rows is not None:
            return cad_attention_parts(q, k, v, plan_of, self.client, self.rows)[0]
        return cad_attention(q, k, v, plan_of, self.client)[0]
