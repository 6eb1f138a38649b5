"""Cost of core-attention tasks: exact pair counts, a tile-aware estimate, and a calibrated model.

Everything here is vectorised over tasks (numpy arrays of ``q_len``, ``kv_len``, ``window``) because
the scheduler evaluates thousands of candidate tasks per plan. A task is described by its own shape
only: with bottom-right causal alignment, query ``j`` of a task sits at key ``kv_len - q_len + j``,
so ``(q_len, kv_len, window)`` determines exactly which (query, key) pairs are computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from distca.errors import CalibrationError
from distca.limits import check_shape
from distca.masks import Mask, Rect

ArrayLike = int | np.ndarray
Pass = Literal["fwd", "bwd"]

BWD_OVER_FWD = 2.5  # backward ≈ 2.5× forward FLOPs (recomputed scores, then dS, dQ, dK, dV)
DEFAULT_TILE = 128  # FlashAttention-2 tile edge on current GPUs


def _as_i64(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def cum_pairs(y: ArrayLike, window: ArrayLike = -1) -> ArrayLike:
    """Pairs attended by queries ``[0, y)`` of one document: ``Σ_{i<y} min(i + 1, w)`` (``w < 0``: full
    causal, ``y(y + 1)/2``) — the one closed form of the pair count.

    Python ints in, a Python int out (the planner calls it a few times per move, where numpy's per-call
    overhead would dominate); numpy arrays in, an array out, elementwise. A query range ``[x, y)``
    attends ``cum_pairs(y) - cum_pairs(x)`` pairs.
    """
    # The first min(y, w) queries see 1, 2, ... keys; each later one sees w.
    if isinstance(window, int):  # one window for all (the planner's Python ints: keep it cheap)
        if window < 0:
            return y * (y + 1) // 2
        later = (y - window) * (y > window)
    else:
        later = (y - window) * ((window >= 0) & (y > window))
    first = y - later
    return first * (first + 1) // 2 + later * window


def pair_count(q_len: ArrayLike, kv_len: ArrayLike, window: ArrayLike = -1) -> np.ndarray:
    """Number of attended (query, key) pairs of a task, exact, elementwise."""
    q, k, w = np.broadcast_arrays(_as_i64(q_len), _as_i64(kv_len), _as_i64(window))
    # Bottom-right alignment: the task's queries are queries [k - q, k) of a document of k keys (those
    # before key 0, when q > k, see nothing).
    return cum_pairs(k, w) - cum_pairs(np.maximum(k - q, 0), w)


def tile_count(
    q_len: ArrayLike, kv_len: ArrayLike, window: ArrayLike = -1, tile_q: int = DEFAULT_TILE,
    tile_k: int = DEFAULT_TILE,
) -> np.ndarray:
    """Number of ``tile_q × tile_k`` score tiles a block-sparse kernel computes for each task."""
    q, k, w = np.broadcast_arrays(_as_i64(q_len), _as_i64(kv_len), _as_i64(window))
    n_qt = (q + tile_q - 1) // tile_q
    task = np.repeat(np.arange(q.size), n_qt.ravel())
    if task.size == 0:
        return np.zeros(q.shape, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(n_qt.ravel())[:-1]])
    t = np.arange(task.size) - first[task]
    qf, kf, wf = q.ravel()[task], k.ravel()[task], w.ravel()[task]
    j0 = t * tile_q
    j1 = np.minimum(j0 + tile_q, qf) - 1
    e = kf - qf
    hi = e + j1  # last key seen by the tile's last query
    lo = np.where(wf > 0, np.maximum(0, e + j0 - wf + 1), 0)
    lo = np.minimum(lo, np.maximum(hi, 0))
    tiles = np.where(hi >= 0, hi // tile_k - lo // tile_k + 1, 0)
    return np.bincount(task, weights=tiles, minlength=q.size).astype(np.int64).reshape(q.shape)


def rect_tiles(rect: Rect, tile_q: int = DEFAULT_TILE, tile_k: int = DEFAULT_TILE) -> int:
    """Score tiles a block-sparse kernel computes for one rectangle: ``full`` every tile of the
    ``ceil(nq/T)·ceil(nk/T)`` grid; ``causal`` (banded by its window) as :func:`tile_count`; ``inv_causal`` as the
    causal rectangle it is on reversed rows and columns."""
    if rect.kind == "full":
        return -(-rect.nq // tile_q) * -(-rect.nk // tile_k)
    return int(tile_count(rect.nq, rect.nk, rect.window, tile_q, tile_k))


def mask_task_cost(mask: Mask, length: int, q0: int, q1: int, tile: int = DEFAULT_TILE) -> tuple[int, int]:
    """``(pairs, tiles)`` of queries ``[q0, q1)`` of a document of ``length`` tokens under ``mask``, summed over the
    rectangles the mask runs as (``mask.rects``). For causal and window masks this is one bottom-right rectangle:
    :func:`pair_count` and :func:`tile_count` of the task's own shape."""
    rects = mask.rects(length, q0, q1)
    return sum(r.pairs for r in rects), sum(rect_tiles(r, tile, tile) for r in rects)


def attention_flops(pairs: ArrayLike, n_heads: int, head_dim: int, which: Pass = "fwd") -> np.ndarray:
    """Model FLOPs for ``pairs`` attended pairs: 4·d·h·N forward, 2.5× that backward."""
    f = 4.0 * head_dim * n_heads * np.asarray(pairs, dtype=np.float64)
    return f * BWD_OVER_FWD if which == "bwd" else f


@dataclass(frozen=True)
class AttentionShape:
    """Head layout and element size of the attention being costed."""

    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        check_shape(self.n_heads, self.n_kv_heads, self.head_dim, self.dtype_bytes)

    def q_bytes(self, tokens: ArrayLike) -> np.ndarray:
        """Bytes of q (or out, or dout) for ``tokens`` query tokens."""
        return _as_i64(tokens) * self.n_heads * self.head_dim * self.dtype_bytes

    def kv_bytes(self, tokens: ArrayLike) -> np.ndarray:
        """Bytes of k and v together for ``tokens`` key tokens."""
        return 2 * _as_i64(tokens) * self.n_kv_heads * self.head_dim * self.dtype_bytes

    def lse_bytes(self, tokens: ArrayLike) -> np.ndarray:
        """Bytes of the fp32 log-sum-exp for ``tokens`` query tokens."""
        return _as_i64(tokens) * self.n_heads * 4


# ----------------------------------------------------------------------------------------------
# Calibration: measured kernel time per task shape, fitted to a small non-negative linear model.
# ----------------------------------------------------------------------------------------------

FEATURES = ("per_task", "tiles", "pairs", "tokens", "window_pairs")


def task_features(
    q_len: ArrayLike, kv_len: ArrayLike, window: ArrayLike, tile: int = DEFAULT_TILE
) -> np.ndarray:
    """Feature matrix ``[n, 5]``: 1 (launch/loop overhead), tile area, pairs, q_len + kv_len (I/O), and
    pairs again for sliding-window tasks only (kernels compute bands with their own efficiency — the CPU
    backend as dense masked blocks, GPU kernels as partially masked tiles)."""
    q, k, w = np.broadcast_arrays(_as_i64(q_len), _as_i64(kv_len), _as_i64(window))
    pairs = pair_count(q, k, w).astype(np.float64)
    return np.stack(
        [
            np.ones(q.shape, dtype=np.float64),
            tile_count(q, k, w, tile, tile).astype(np.float64) * tile * tile,
            pairs,
            (q + k).astype(np.float64),
            np.where((w > 0) & (w < k), pairs, 0.0),
        ],
        axis=-1,
    )


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares by active-set elimination (few features, deterministic)."""
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)
    xs = x / scale
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(xs[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef / scale


@dataclass
class CalibrationTable:
    """Measured kernel times for one backend/device/dtype/head layout (written by benchmarks/kernels.py)."""

    backend: str
    device: str
    dtype: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tile: int = DEFAULT_TILE
    entries: list[dict] = field(default_factory=list)  # {q_len, kv_len, window, fwd_s, bwd_s}

    REQUIRED = ("q_len", "kv_len", "window", "fwd_s", "bwd_s")

    def __post_init__(self) -> None:
        for i, e in enumerate(self.entries):
            missing = [key for key in self.REQUIRED if key not in e]
            if missing:
                raise CalibrationError(f"calibration entry {i} lacks {missing}: {e}")
            if e["q_len"] < 1 or e["kv_len"] < e["q_len"] or e["fwd_s"] <= 0 or e["bwd_s"] <= 0:
                raise CalibrationError(f"calibration entry {i} is not a valid measurement: {e}")

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"cannot read calibration table {path}: {exc}") from exc
        known = {"backend", "device", "dtype", "n_heads", "n_kv_heads", "head_dim", "tile", "entries"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CalibrationError(f"calibration table {path} has unknown keys {unknown}")
        return cls(**raw)


@dataclass
class CostModel:
    """Predicts task time (seconds) forward and backward.

    ``mode="pairs"``: FLOPs from exact pair counts at ``peak_flops`` (the closed form of :func:`cum_pairs`).
    ``mode="tiles"``: FLOPs of every computed tile plus a fixed per-task overhead — short shards and
    short windows cost more than their pairs say. ``mode="calibrated"``: a non-negative linear model
    over (per-task, tile area, pairs, tokens, windowed pairs) fitted to a measured :class:`CalibrationTable`; compute
    terms scale with ``n_heads·head_dim`` when the costed shape differs from the measured one.
    """

    shape: AttentionShape = field(default_factory=AttentionShape)
    mode: Literal["pairs", "tiles", "calibrated"] = "tiles"
    peak_flops: float = 400e12
    per_task_s: float = 5e-6
    tile: int = DEFAULT_TILE
    coef_fwd: np.ndarray | None = None
    coef_bwd: np.ndarray | None = None

    @classmethod
    def from_table(cls, table: CalibrationTable, shape: AttentionShape | None = None) -> CostModel:
        """Fit a calibrated model to ``table``; cost ``shape`` (default: the table's own)."""
        if len(table.entries) < len(FEATURES):
            raise CalibrationError(
                f"calibration table needs >= {len(FEATURES)} entries, has {len(table.entries)}"
            )
        e = table.entries
        x = task_features([r["q_len"] for r in e], [r["kv_len"] for r in e], [r["window"] for r in e],
                          table.tile)
        # Fit relative error, not absolute: small tasks matter as much as large ones.
        fits = []
        for key in ("fwd_s", "bwd_s"):
            y = np.array([r[key] for r in e])
            fits.append(_nnls(x / y[:, None], np.ones_like(y)))
        own = AttentionShape(table.n_heads, table.n_kv_heads, table.head_dim)
        shape = shape or own
        ratio = (shape.n_heads * shape.head_dim) / (own.n_heads * own.head_dim)
        scale = np.array([1.0, ratio, ratio, ratio, ratio])
        return cls(shape=shape, mode="calibrated", tile=table.tile, coef_fwd=fits[0] * scale,
                   coef_bwd=fits[1] * scale)

    def time_s(
        self, q_len: ArrayLike, kv_len: ArrayLike, window: ArrayLike = -1, which: Pass = "fwd"
    ) -> np.ndarray:
        """Predicted kernel time of each task, in seconds (0 for empty tasks)."""
        q = _as_i64(q_len)
        if self.mode == "pairs":
            t = attention_flops(pair_count(q, kv_len, window), self.shape.n_heads, self.shape.head_dim,
                                which) / self.peak_flops
        elif self.mode == "tiles":
            area = tile_count(q, kv_len, window, self.tile, self.tile).astype(np.float64) * self.tile**2
            t = attention_flops(area, self.shape.n_heads, self.shape.head_dim, which) / self.peak_flops
            t = t + self.per_task_s
        elif self.mode == "calibrated":
            coef = self.coef_fwd if which == "fwd" else self.coef_bwd
            if coef is None:
                raise CalibrationError("calibrated cost model has no fitted coefficients")
            t = task_features(q, kv_len, window, self.tile) @ coef
        else:
            raise ValueError(f"unknown cost model mode {self.mode!r}; expected pairs, tiles or calibrated")
        return np.where(q > 0, t, 0.0)

    def rects_time_s(
        self, nq: ArrayLike, nk: ArrayLike, full: ArrayLike, window: ArrayLike = -1, which: Pass = "fwd"
    ) -> np.ndarray:
        """Predicted time of each kernel rectangle of a masked task (:class:`~distca.masks.Rect`:
        ``nq × nk``, ``full`` or causal/inverse-causal banded by ``window``), in seconds. A causal or inverse-causal
        rectangle costs exactly as a task of its shape (inverse-causal is causal on reversed rows and columns);
        a full one by its ``nq·nk`` pairs and its ``ceil(nq/T)·ceil(nk/T)`` tiles (:func:`rect_tiles`)."""
        q, k, w = np.broadcast_arrays(_as_i64(nq), _as_i64(nk), _as_i64(window))
        full = np.broadcast_to(np.asarray(full, dtype=bool), q.shape)
        t = np.array(self.time_s(q, k, np.where(full, -1, w), which), dtype=np.float64)
        if full.any():
            fq, fk = q[full], k[full]
            pairs = (fq * fk).astype(np.float64)
            area = ((fq + self.tile - 1) // self.tile * ((fk + self.tile - 1) // self.tile)).astype(np.float64)
            area *= self.tile**2
            if self.mode == "pairs":
                tf = attention_flops(pairs, self.shape.n_heads, self.shape.head_dim, which) / self.peak_flops
            elif self.mode == "tiles":
                tf = attention_flops(area, self.shape.n_heads, self.shape.head_dim, which) / self.peak_flops
                tf = tf + self.per_task_s
            else:  # calibrated: the task features of a full rectangle (no band)
                coef = self.coef_fwd if which == "fwd" else self.coef_bwd
                if coef is None:
                    raise CalibrationError("calibrated cost model has no fitted coefficients")
                feats = np.stack([np.ones(fq.shape), area, pairs, (fq + fk).astype(np.float64), np.zeros(fq.shape)],
                                 axis=-1)
                tf = feats @ coef
            t[full] = np.where((fq > 0) & (fk > 0), tf, 0.0)
        return t
