"""Plan one batch from a lengths file and summarise it (what ``distca plan`` prints)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distca.attention.cost import AttentionShape
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan


def load_batch(path: str | Path) -> BatchLayout:
    """Read a JSON list of per-rank lists of whole-document lengths, or
    ``{"ranks": [[...], ...], "continues": [bool, ...]}``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read lengths file {path}: {exc}") from exc
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"ranks", "continues"})
        if unknown or "ranks" not in raw:
            raise ValueError(f"lengths file {path}: expected keys 'ranks' and optional 'continues', got {sorted(raw)}")
        return BatchLayout.from_ranks(raw["ranks"], raw.get("continues"))
    if isinstance(raw, list):
        return BatchLayout.from_ranks(raw)
    raise ValueError(f"lengths file {path}: expected a list of per-rank lists or an object, got {type(raw).__name__}")


def plan_summary(batch: BatchLayout, n_servers: int, cfg: SchedulerConfig, placement: str = "colocated",
                 shape: AttentionShape | None = None) -> dict[str, Any]:
    """Plan ``batch`` and report balance, bytes and timings."""
    shape = shape or AttentionShape()
    plan, timing = make_plan(batch, Placement(batch.n_ranks, n_servers, placement), cfg, shape)
    tokens = int(batch.rank_tokens.sum())
    return {
        "max_over_mean": plan.max_over_mean,
        "bytes_moved": plan.bytes_moved,
        "bytes_returned": plan.bytes_returned,
        "bytes_total": tokens * (plan.row_bytes("q") + plan.row_bytes("k") + plan.row_bytes("v")),
        "plan_ms": timing.plan_ms,
        "compile_ms": timing.compile_ms,
        "n_tasks": plan.n_tasks,
        "n_docs": batch.n_docs,
        "n_ranks": batch.n_ranks,
        "n_servers": n_servers,
        "tokens": tokens,
        "eps": cfg.eps,
        "window": cfg.window,
        "placement": placement,
        "capacity_pairs": plan.capacity,
        "max_server_pairs": int(plan.server_pairs.max()),
        "mean_server_pairs": float(plan.server_pairs.mean()),
    }
