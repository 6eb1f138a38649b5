"""CAD scheduler: plan = f(document lengths, servers, cost model). Pure, deterministic, fast.

No torch.distributed, sockets or Ray here: inputs are lengths, outputs are numpy arrays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from distca.attention.cost import AttentionShape
from distca.scheduler.batch import BatchLayout
from distca.scheduler.placement import Placement
from distca.scheduler.plan import Plan, Transfers, compile_plan
from distca.scheduler.planner import LOCAL, Assignment, SchedulerConfig, plan_assignment


@dataclass(frozen=True)
class PlanTiming:
    plan_ms: float
    compile_ms: float


def make_plan(
    batch: BatchLayout, placement: Placement, cfg: SchedulerConfig, shape: AttentionShape | None = None,
    keys: BatchLayout | None = None,
) -> tuple[Plan, PlanTiming]:
    """Plan and compile one batch; returns the plan and how long each phase took. ``keys``: the whole batch
    when ``batch`` holds only some of its queries (:meth:`BatchLayout.query_rows`); key rows come from it."""
    shape = shape or AttentionShape()
    t0 = time.perf_counter()
    assignment = plan_assignment(batch, placement, cfg, shape, keys)
    t1 = time.perf_counter()
    plan = compile_plan(assignment, batch, placement, cfg.mask_, shape, keys=keys, exact_keys=cfg.exact_keys)
    t2 = time.perf_counter()
    return plan, PlanTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3)


__all__ = ["LOCAL", "Assignment", "BatchLayout", "Placement", "Plan", "PlanTiming", "SchedulerConfig",
           "Transfers", "compile_plan", "make_plan", "plan_assignment"]
