"""Plan one batch from a lengths file and summarise it (what ``distca plan`` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distca.attention.cost import AttentionShape
from distca.errors import InputError
from distca.limits import parse_json, read_json_text, short_repr
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.scheduler.relay import kv_relay, nodes_of


def load_batch(path: str | Path, name: str = "lengths file") -> BatchLayout:
    """Read a JSON list of per-rank lists of whole-document lengths, or
    ``{"ranks": [[...], ...], "continues": [bool, ...]}``. Any problem is one :class:`InputError` that starts
    with ``name`` and the path."""
    where = f"{name} {path}"
    raw = parse_json(read_json_text(path, name, kind="lengths file"), where)
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"ranks", "continues"})
        if unknown or "ranks" not in raw:
            keys = ", ".join(short_repr(k, 20) for k in sorted(raw)[:5]) + (", ..." if len(raw) > 5 else "")
            raise InputError(f"{where}: expected keys 'ranks' and optional 'continues', got {keys}")
        ranks, continues = raw["ranks"], raw.get("continues")
    elif isinstance(raw, list):
        ranks, continues = raw, None
    else:
        raise InputError(f"{where}: expected a list of per-rank lists or an object, got {type(raw).__name__}")
    try:
        return BatchLayout.from_ranks(ranks, continues)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def plan_summary(batch: BatchLayout, n_servers: int, cfg: SchedulerConfig, placement: str = "colocated",
                 shape: AttentionShape | None = None, devices_per_node: int = 0) -> dict[str, Any]:
    """Plan ``batch`` and report balance, bytes and timings; with ``devices_per_node`` (colocated, one server per
    trainer: the in-place data plane), also what the key/value relay between nodes does to the plan
    (:mod:`distca.scheduler.relay`)."""
    shape = shape or AttentionShape()
    if devices_per_node and (placement != "colocated" or n_servers != batch.n_ranks):
        raise InputError(f"--devices-per-node describes the in-place data plane: colocated placement with one server "
                         f"per trainer ({batch.n_ranks}), got {placement} with {n_servers} servers")
    plan, timing = make_plan(batch, Placement(batch.n_ranks, n_servers, placement), cfg, shape)
    tokens = int(batch.rank_tokens.sum())
    relay = _relay_summary(plan, devices_per_node) if devices_per_node else {}
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
        **relay,
    }


def _relay_summary(plan, devices_per_node: int) -> dict[str, Any]:
    """Key/value bytes of one pass direction that cross nodes, sent directly and relayed, and the relay's routes
    (none where it would not cut the busiest device's inter-node key rows enough)."""
    nodes = nodes_of(plan.n_ranks, devices_per_node)
    relay = kv_relay(plan, nodes, nodes)
    x = plan.kv_xfer
    node = np.asarray(nodes)
    kv_row = plan.row_bytes("k") + plan.row_bytes("v")
    direct = int(x.n[node[x.rank] != node[x.server]].sum()) * kv_row
    return {"devices_per_node": devices_per_node, "relay_routes": len(relay.routes),
            "inter_node_kv_bytes_direct": direct,
            "inter_node_kv_bytes_relayed": direct - relay.bytes_saved(kv_row)}
