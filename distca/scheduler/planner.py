"""The CAD planner: local-first placement, then bounded, byte-aware shedding of excess work.

1. Every piece of a document starts on its trainer's *home* server (its own device when
   colocated), so nothing moves when the batch is already balanced.
2. The capacity is ``U = (1 + ε) · mean`` server work (attended pairs). Each server above ``U``
   (a donor, largest excess first) sheds exactly its excess to servers below ``U`` (receivers):
   every move fits the receiver's spare capacity, so **no server ends above U** — the maximum is
   bounded, not only the deficit of the idle servers.
3. What to move is chosen by marginal bytes per unit of work among a donor's heaviest pieces and
   the pieces closest in size to what it must shed: a *suffix* of a document (the late queries
   carry the most work per query token), a *head* (early queries need few keys), a whole piece, or
   a head–tail pair (an early and a late shard of the same document). Bytes count what the receiver
   does not already hold: q + out + lse for the moved queries and the keys/values the mask needs
   beyond those already sent to (or local to) that receiver, so a receiver that already has a
   document's keys is preferred for more of it.
4. Cuts land on multiples of the shard granularity (kernel tiles) unless only a finer cut keeps
   the bound; documents of any length are allowed and nothing is padded.

Pure Python on small lists: a plan makes O(servers) moves, and numpy's per-call overhead would
dominate. Deterministic: ties break on indices, never on hash or time.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from math import isfinite, isqrt

import numpy as np

from distca.attention.cost import AttentionShape, cum_pairs
from distca.errors import InputError
from distca.limits import MAX_DOC_TOKENS, check_int
from distca.masks import Mask
from distca.scheduler.batch import BatchLayout
from distca.scheduler.placement import Placement
from distca.scheduler.work import first_reaching, key_start, mask_cum, mask_key_ranges, mask_reach, resolve_masks

LOCAL = -1  # task runs on its own trainer, outside the server pool


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Knobs of the CAD planner. ``eps``, ``granularity`` and the layer's attention (``window`` or ``mask``) have
    no default here: a run takes them from its config (``scheduler.eps``, ``attention.shard_tokens``, the layer's
    window; see :mod:`distca.parts`), so each default lives in one place.

    The attention is one mask family for the whole batch (families are per layer): ``window=w`` is
    ``mask=Mask.sliding(w)`` (-1 full causal); give either, or both when they agree. After construction both
    fields are resolved: ``mask`` always holds the family, ``window`` the runtime window (``None`` for a family
    that is not causal or a sliding window). ``slices`` masks are per-document data and are refused here: give
    them (or any per-document masks) with ``BatchLayout.with_masks``, which override ``mask`` document by document."""

    eps: float  # every server's work <= (1 + eps) * mean
    granularity: int  # preferred cut multiple (tokens, document positions)
    window: int | None = None  # -1 full causal; w > 0 sliding window of w keys including self
    mask: Mask | None = None  # the layer's mask family (any but slices); None: from window
    # Family-aware key hulls: a task receives exactly the key ranges its mask lets it see (a sink and a
    # window: two runs). False: one convex hull [first key, last key + 1) per task and per (server,
    # document), as a planner that knows only causal masks would ship (the bytes comparison's control).
    exact_keys: bool = True
    # Heaviest pieces of a donor considered per move (plus the ones closest in size to the need).
    # 0 = auto: 3 under a tight bound (eps < 0.01), where the choice matters most, else 1.
    candidates: int = 0
    # Dedicated placement: a piece with less work than this stays on its trainer (its attention costs
    # less than a kernel launch and a message). -1: one shard's worth, granularity·(granularity+1)/2.
    min_offload_pairs: int = -1

    def __post_init__(self) -> None:
        if not isfinite(self.eps) or self.eps < 0:
            raise InputError(f"eps must be >= 0 and finite, got {self.eps}")
        check_int(self.granularity, "granularity", 1, MAX_DOC_TOKENS)
        if self.window is None and self.mask is None:
            raise InputError("the scheduler needs the layer's attention: window= (-1 full causal, w > 0) or mask=")
        if self.window is not None:
            check_int(self.window, "window", 1, MAX_DOC_TOKENS, allow=(-1,))
        if self.mask is not None:
            if not isinstance(self.mask, Mask):
                raise InputError(f"mask must be a distca.masks.Mask, got {type(self.mask).__name__}")
            if self.mask.family == "slices":
                raise InputError("slices masks are per-document data: give them per document with "
                                 "BatchLayout.with_masks; mask= is one family for the whole batch (causal, window, "
                                 "chunked, sink_window, prefix_lm, bidirectional)")
            if self.window is not None and self.mask.as_window != self.window:
                raise InputError(f"window={self.window} disagrees with mask={self.mask.spec()!r}; give one of them")
            object.__setattr__(self, "window", self.mask.as_window)
        else:
            object.__setattr__(self, "mask", Mask.sliding(self.window))
        if not isinstance(self.exact_keys, bool):
            raise InputError(f"exact_keys must be true or false, got {type(self.exact_keys).__name__}")
        if self.candidates < 0:
            raise ValueError(f"candidates must be >= 0 (0 = auto), got {self.candidates}")
        if self.min_offload_pairs < -1:
            raise ValueError(f"min_offload_pairs must be >= 0 or -1 (auto), got {self.min_offload_pairs}")

    @property
    def mask_(self) -> Mask:
        """The resolved mask family (never ``None``)."""
        assert self.mask is not None
        return self.mask

    @property
    def n_candidates(self) -> int:
        """Resolved ``candidates``."""
        return self.candidates or (3 if self.eps < 0.01 else 1)

    @property
    def offload_threshold(self) -> int:
        """Pairs below which a piece stays on its trainer when no server is local."""
        g = self.granularity
        return cum_pairs(g) if self.min_offload_pairs == -1 else self.min_offload_pairs


@dataclass(frozen=True)
class Assignment:
    """Planned tasks as struct-of-arrays: queries ``[q0, q1)`` of ``doc`` (held by ``rank`` from
    local row ``row``) run on ``server`` (``LOCAL`` = on the trainer itself)."""

    doc: np.ndarray
    q0: np.ndarray
    q1: np.ndarray
    rank: np.ndarray
    row: np.ndarray
    server: np.ndarray
    capacity: int  # the bound U every server respects (in pairs)


DOC, Q0, Q1, RANK, ROW, SERVER, WORK = range(7)  # fields of a live segment


class _Planner:
    """Mutable planning state.

    Pieces live in numpy arrays; only the segments a move can touch — donors' pieces and pieces
    cut off by moves — are mirrored as small Python lists (``self.seg[id]``), because a plan makes
    O(servers) moves and per-element numpy access would dominate. ``finish`` writes them back.
    """

    def __init__(self, batch: BatchLayout, placement: Placement, cfg: SchedulerConfig, shape: AttentionShape,
                 keys: BatchLayout | None = None):
        self.b, self.p, self.cfg = batch, placement, cfg
        # Per-document masks (BatchLayout.with_masks) go through each document's mask; a batch whose documents
        # all attend by one family other than slices plans exactly as that family.
        self.mask, self.doc_masks = resolve_masks(batch.doc_masks, cfg.mask_)
        # Causal and sliding windows keep their closed-form integer paths (plans byte-identical to a planner
        # that knows only them); other families go through the mask (and the document's length).
        self.fast = self.doc_masks is None and self.mask.as_window is not None
        self.w = self.mask.as_window if self.fast else -1
        self.exact = cfg.exact_keys
        # Head–tail moves (ship a middle, keep both ends) pay where a middle needs keys only up to its end.
        self.middle = self.w < 0 if self.fast else self.mask.family == "prefix_lm"
        self.doc_len = batch.doc_len.tolist()
        self.g = cfg.granularity
        self.q_bytes = int(shape.q_bytes(1)) * 2 + int(shape.lse_bytes(1))  # q there, out + lse back
        self.kv_bytes = int(shape.kv_bytes(1))
        self.remote_all = placement.kind == "dedicated"
        # (server, doc) -> keys held there: one hull (lo, hi) for causal/window; for other families the exact
        # union, a sorted list of disjoint (lo, hi) runs.
        self.have: dict[tuple[int, int], tuple[int, int] | list[tuple[int, int]]] = {}
        self.by_doc: dict[int, list[int]] = {}  # doc -> servers holding a key hull for it
        self.seg: dict[int, list[int]] = {}  # live segments: id -> [doc, q0, q1, rank, row, server, work]
        self.dirty: set[int] = set()  # base pieces changed by a move
        self.n_base = batch.n_pieces
        # Topology (colocated, node size given): a byte costs its link's weight — 0 on the device itself, 1 inside
        # a node, ``inter_node_cost`` across nodes — and the keys a move needs cost by the node of the rank holding
        # them (``keys``: the whole batch when ``batch`` is one nano-batch of it).
        self.topo = placement.topology
        if self.topo:
            dpn = placement.devices_per_node
            self.t_dev = placement._device().tolist()
            self.t_node = [d // dpn for d in self.t_dev]
            self.node_servers = {}
            for s in range(placement.n_servers):
                self.node_servers.setdefault(s // dpn, []).append(s)
            self.dpn, self.xw = dpn, float(placement.inter_node_cost)
            kb = keys if keys is not None else batch
            order = np.lexsort((kb.piece_off, kb.piece_doc))
            self.k_doc, self.k_off = kb.piece_doc[order], kb.piece_off[order]
            self.k_end, self.k_rank = (kb.piece_off + kb.piece_len)[order], kb.piece_rank[order]
            self.k_bounds = np.searchsorted(self.k_doc, np.arange(kb.n_docs + 1))
            self.holders: dict[int, dict[int, list[tuple[int, int]]]] = {}
        # Receivers inside the node of the rank holding a move's queries are tried too (more than one node only:
        # inside a single node the flat planner's choices stand, and its plans are unchanged).
        self.near = self.topo and len(self.node_servers) > 1

    # -- bookkeeping -------------------------------------------------------------------------
    def _mask(self, doc) -> Mask:
        """Document ``doc``'s mask."""
        return self.mask if self.doc_masks is None else self.doc_masks[doc]

    def _middle(self, doc) -> bool:
        """Whether a head–tail move pays for ``doc`` (see ``self.middle``)."""
        return self.middle if self.doc_masks is None else self.doc_masks[doc].family in ("causal", "prefix_lm")

    def _work(self, doc, q0, q1) -> int:
        """Pairs of queries ``[q0, q1)`` of ``doc``."""
        if self.fast:
            return cum_pairs(q1, self.w) - cum_pairs(q0, self.w)
        n, m = self.doc_len[doc], self._mask(doc)
        return m.cum(n, q1) - m.cum(n, q0)

    def _keys(self, doc, x, y) -> list[tuple[int, int]]:
        """The key ranges queries ``[x, y)`` of ``doc`` need (one convex hull when exact hulls are off)."""
        if self.fast:
            return [(key_start(x, self.w), y)]
        ranges = self._mask(doc).key_ranges(self.doc_len[doc], x, y)
        if not self.exact and len(ranges) > 1:
            return [(ranges[0][0], ranges[-1][1])]
        return ranges

    def _curve(self, doc):
        """``(cum, reach)`` of ``doc``: pairs of queries ``[0, y)``, and the smallest ``y`` with ``cum(y) >= t``."""
        if self.fast:
            w = self.w
            return (lambda y: cum_pairs(y, w)), (lambda t: first_reaching(t, w))
        m, n = self._mask(doc), self.doc_len[doc]
        return (lambda y: m.cum(n, y)), (lambda t: mask_reach(m, n, t))

    def _token_work(self, seg) -> int:
        """At most one query token's work in segment ``seg`` (the keys its last query may see)."""
        f = self._get(seg)
        return self.doc_len[f[DOC]] if self._mask(f[DOC]).length_dependent else f[Q1]

    def _add(self, doc, q0, q1, rank, row, server) -> int:
        w = self._work(doc, q0, q1)
        sid = self.n_base + len(self.new)
        self.seg[sid] = [doc, q0, q1, rank, row, server, w]
        self.new.append(sid)
        self.load[server] += w
        self._hold(server, doc, self._keys(doc, q0, q1))
        return sid

    def _hold(self, server, doc, ranges) -> None:
        key = (server, doc)
        old = self.have.get(key)
        if not self.fast:  # the exact union of what the server holds
            if old is None:
                self.have[key] = list(ranges)
                self.by_doc.setdefault(doc, []).append(server)
            else:
                self.have[key] = _union(old, ranges)
            return
        lo, hi = ranges[0]
        if old is None:
            self.have[key] = (lo, hi)
            self.by_doc.setdefault(doc, []).append(server)
        elif lo <= old[1] and old[0] <= hi:  # overlapping or adjacent: keep the hull
            self.have[key] = (min(lo, old[0]), max(hi, old[1]))
        elif hi - lo > old[1] - old[0]:
            self.have[key] = (lo, hi)

    def _new_kv(self, server, doc, ranges) -> int:
        """Key tokens of ``ranges`` the server does not hold yet."""
        held = self.have.get((server, doc))
        if self.fast:
            lo, hi = ranges[0]
            if held is None:
                return hi - lo
            return hi - lo - max(0, min(hi, held[1]) - max(lo, held[0]))
        n = sum(hi - lo for lo, hi in ranges)
        if held is None:
            return n
        return n - sum(max(0, min(hi, b) - max(lo, a)) for lo, hi in ranges for a, b in held)

    def _link(self, rank: int, server: int) -> float:
        """Weight of a byte from trainer ``rank``'s device to ``server`` (topology only): 1 inside a node (as
        the flat planner counts them, keys already on the device included), ``inter_node_cost`` across."""
        return 1.0 if self.t_node[rank] == server // self.dpn else self.xw

    def _holders(self, doc: int) -> dict[int, list[tuple[int, int]]]:
        """Key positions of ``doc`` per node: sorted, disjoint runs held by that node's ranks."""
        h = self.holders.get(doc)
        if h is None:
            a, b = self.k_bounds[doc], self.k_bounds[doc + 1]
            h = self.holders[doc] = {}
            for lo, hi, r in zip(self.k_off[a:b].tolist(), self.k_end[a:b].tolist(), self.k_rank[a:b].tolist(),
                                 strict=True):
                runs = h.setdefault(self.t_node[r], [])
                if runs and runs[-1][1] == lo:
                    runs[-1] = (runs[-1][0], hi)
                else:
                    runs.append((lo, hi))
        return h

    def _kv_cost(self, server, doc, ranges) -> float:
        """Key tokens of ``ranges`` the server does not hold yet, each weighted by the link from its holder."""
        held = self.have.get((server, doc))
        runs = list(ranges) if held is None else _minus(ranges, [held] if self.fast else held)
        if not runs:
            return 0.0
        # Every key costs xw, except those held in the receiver's node, which cost 1.
        near = self._holders(doc).get(server // self.dpn, ())
        total = sum(hi - lo for lo, hi in runs)
        inside = sum(max(0, min(hi, b) - max(lo, a)) for lo, hi in runs for a, b in near)
        return self.xw * total - (self.xw - 1.0) * inside

    # -- initial placement -------------------------------------------------------------------
    def place_home(self) -> None:
        b, w = self.b, self.w
        self.q1_arr = b.piece_off + b.piece_len
        if self.fast:
            work = cum_pairs(self.q1_arr, w) - cum_pairs(b.piece_off, w)
        elif self.doc_masks is not None:  # per-document masks: each piece by its document's (scalar)
            spans = list(zip(b.piece_doc.tolist(), b.piece_off.tolist(), self.q1_arr.tolist(), strict=True))
            work = np.array([self._work(d, x, y) for d, x, y in spans], dtype=np.int64).reshape(-1)
        else:
            length = b.doc_len[b.piece_doc]
            work = mask_cum(self.mask, length, self.q1_arr) - mask_cum(self.mask, length, b.piece_off)
        server = self.p.home_servers()[b.piece_rank]
        threshold = self.cfg.offload_threshold
        has_local = self.p.has_local_server()
        if threshold and not has_local.all():
            # A tiny piece stays on its trainer when all the keys it needs are there too.
            no_local = ~has_local[b.piece_rank]
            if self.fast:
                own_keys = b.piece_off == 0 if w < 0 else b.piece_off - w + 1 >= b.piece_off
            elif self.doc_masks is not None:
                ranges = [self._keys(d, x, y) for d, x, y in spans]
                own_keys = np.array([not r or (r[0][0] >= x and r[-1][1] <= y)
                                     for r, (_, x, y) in zip(ranges, spans, strict=True)], dtype=bool).reshape(-1)
            else:  # a family whose queries see later keys (prefix-LM, bidirectional) needs them in the piece too
                a0, a1, _, b1 = mask_key_ranges(self.mask, length, b.piece_off, self.q1_arr)
                own_keys = (a0 >= b.piece_off) & (np.maximum(a1, b1) <= self.q1_arr)
            server = np.where(no_local & own_keys & (work < threshold), LOCAL, server)
        on = server >= 0
        self.server_arr, self.work_arr = server, work
        self.load = np.bincount(server[on], weights=work[on], minlength=self.p.n_servers).astype(np.int64).tolist()
        self.new: list[int] = []
        # Key hulls matter only where a receiver could already hold a document's keys: documents
        # split over several ranks (a single-piece document lives on its donor alone).
        multi = np.bincount(b.piece_doc, minlength=b.n_docs) > 1
        idx = np.flatnonzero(multi[b.piece_doc] & on)
        if not self.fast:
            for s, d, x, y in zip(server[idx].tolist(), b.piece_doc[idx].tolist(), b.piece_off[idx].tolist(),
                                  self.q1_arr[idx].tolist(), strict=True):
                self._hold(s, d, self._keys(d, x, y))
            return
        starts = np.zeros_like(idx) if w < 0 else np.maximum(0, b.piece_off[idx] - w + 1)
        for s, d, lo, hi in zip(server[idx].tolist(), b.piece_doc[idx].tolist(), starts.tolist(),
                                self.q1_arr[idx].tolist(), strict=True):
            self._hold(s, d, [(lo, hi)])

    def _index_servers(self) -> None:
        """Pieces grouped by server (one stable sort), so a donor's pieces are a slice."""
        self.by_server = np.argsort(self.server_arr, kind="stable")
        self.server_bounds = np.searchsorted(self.server_arr[self.by_server], np.arange(self.p.n_servers + 1))

    def _donor_segments(self, donor: int) -> list[int]:
        """A donor's piece ids, heaviest first (mirrored as live segments lazily, by ``_get``)."""
        idx = self.by_server[self.server_bounds[donor]:self.server_bounds[donor + 1]]
        return idx[np.lexsort((idx, -self.work_arr[idx]))].tolist()

    def _get(self, sid: int) -> list[int]:
        """The live segment ``sid``, mirrored from the piece arrays on first use."""
        f = self.seg.get(sid)
        if f is None:
            b = self.b
            f = self.seg[sid] = [int(b.piece_doc[sid]), int(b.piece_off[sid]), int(self.q1_arr[sid]),
                                 int(b.piece_rank[sid]), int(b.piece_row[sid]), int(self.server_arr[sid]),
                                 int(self.work_arr[sid])]
        return f

    def finish(self, capacity: int) -> Assignment:
        """Base arrays with the live segments written back, plus the new segments."""
        b = self.b
        cols = [b.piece_doc.copy(), b.piece_off.copy(), self.q1_arr.copy(), b.piece_rank.copy(),
                b.piece_row.copy(), self.server_arr.copy()]
        touched = sorted(self.dirty)
        if touched:
            vals = np.array([self.seg[sid][:6] for sid in touched], dtype=np.int64)
            for c in range(6):
                cols[c][touched] = vals[:, c]
        if self.new:
            extra = np.array([self.seg[sid][:6] for sid in self.new], dtype=np.int64)
            cols = [np.concatenate([col, extra[:, c]]) for c, col in enumerate(cols)]
        order = np.lexsort((cols[Q0], cols[DOC], cols[SERVER]))  # by server, doc, q0
        return Assignment(*(col[order] for col in cols), capacity=capacity)

    # -- cutting -----------------------------------------------------------------------------
    def _cut_ending(self, doc: int, start: int, end: int, target: int, at_least: bool, lo: int, hi: int):
        """``(x, m)``: queries ``[x, end)`` (``start < x < end``) carry ``m`` pairs, ``lo <= m <= hi``, ``m``
        as close to ``target`` as the cut allows (at least it, or at most it); tile-aligned if possible."""
        g = self.g
        cum, reach = self._curve(doc)
        ce = cum(end)
        if at_least:
            x = reach(ce - target + 1) - 1
            xa = x // g * g
        else:
            x = reach(ce - target)
            xa = -(-x // g) * g
        for c in (xa, x):
            if start < c < end:
                m = ce - cum(c)
                if lo <= m <= hi:
                    return c, m
        return None

    def _cut_starting(self, doc: int, start: int, end: int, target: int, at_least: bool, lo: int, hi: int):
        """``(y, m)``: queries ``[start, y)`` (``start < y < end``) carry ``m`` pairs; as ``_cut_ending``."""
        g = self.g
        cum, reach = self._curve(doc)
        cs = cum(start)
        if at_least:
            y = reach(cs + target)
            ya = -(-y // g) * g
        else:
            y = reach(cs + target + 1) - 1
            ya = y // g * g
        for c in (ya, y):
            if start < c < end:
                m = cum(c) - cs
                if lo <= m <= hi:
                    return c, m
        return None

    def _options(self, seg: int, receiver: int, lo_ok: int, hi_ok: int, slack: int = 0):
        """Feasible moves of part of ``seg`` to ``receiver`` moving work in [lo_ok, hi_ok + slack]:
        tuples ``(bytes per pair, -pairs, kind, a, b, pairs)``."""
        doc, q0, q1, rank, _, _, total = self._get(seg)
        keys = self._keys
        kvb = self.kv_bytes
        if self.topo:  # bytes weighted by the link they cross
            remote_q = self.q_bytes * self._link(rank, receiver) if self.t_dev[rank] != receiver else 0
            new_kv = self._kv_cost
        else:
            remote_q = self.q_bytes if self.remote_all or rank != receiver else 0
            new_kv = self._new_kv
        hi = hi_ok + slack
        lo = max(lo_ok, 1)
        out = []
        if 0 < total <= hi:
            cost = (q1 - q0) * remote_q + new_kv(receiver, doc, keys(doc, q0, q1)) * kvb
            out.append((cost / total, -total, 0, q0, q1, total))
            if total >= lo_ok:
                return out
        if q1 - q0 < 2:
            return out
        # Final move: at least the need. Fill: at most the spare — or, relaxed, at least the spare
        # (overshooting by under one query token's work, <= slack).
        at_least = lo_ok > 0 or slack > 0
        target = lo_ok if lo_ok > 0 else max(hi_ok, 1)
        # Suffix [x, q1): the late queries carry the most work per query token.
        got = self._cut_ending(doc, q0, q1, target, at_least, lo, hi)
        if got:
            x, m = got
            cost = (q1 - x) * remote_q + new_kv(receiver, doc, keys(doc, x, q1)) * kvb
            out.append((cost / m, -m, 1, x, q1, m))
        # Head [q0, y): early queries need few keys.
        got = self._cut_starting(doc, q0, q1, target, at_least, lo, hi)
        if got:
            y, m = got
            cost = (y - q0) * remote_q + new_kv(receiver, doc, keys(doc, q0, y)) * kvb
            out.append((cost / m, -m, 2, q0, y, m))
        g = self.g
        if self._middle(doc) and remote_q and q1 - q0 >= 2 * g:
            # Middle [x, y): for a small move, the donor keeps a head–tail pair and ships the middle,
            # which needs keys only up to y (causal; prefix-LM: up to y or the prefix's end). A chunk of c
            # queries ending at y carries ~c·(y - c/2) pairs and costs c·q + y·kv bytes; for work m that is
            # least at c = sqrt(m·kv / (q + kv/2)).
            c = max(1, isqrt(target * kvb // (int(remote_q) + kvb // 2)))
            y = -(-(target // c + c // 2) // g) * g
            if q0 + 1 < y < q1:
                got = self._cut_ending(doc, q0, y, target, at_least, lo, hi)
                if got:
                    x, m = got
                    cost = (y - x) * remote_q + new_kv(receiver, doc, keys(doc, x, y)) * kvb
                    out.append((cost / m, -m, 3, x, y, m))
        return out

    # -- moves -------------------------------------------------------------------------------
    def _apply(self, seg: int, kind: int, a: int, b: int, receiver: int, donor_segs: list[int]) -> None:
        f = self._get(seg)
        doc, q0, q1, rank, row, donor, work = f
        self.load[donor] -= work
        donor_segs.remove(seg)
        if seg < self.n_base:
            self.dirty.add(seg)
        if kind == 0:  # whole segment
            f[SERVER] = receiver
            self.load[receiver] += work
            self._hold(receiver, doc, self._keys(doc, q0, q1))
            return
        if kind == 1:  # suffix: donor keeps [q0, a), receiver gets [a, q1)
            keep, moved, also_keep = (q0, a), (a, q1), None
        elif kind == 2:  # head: receiver gets [q0, b), donor keeps [b, q1)
            keep, moved, also_keep = (b, q1), (q0, b), None
        else:  # middle: receiver gets [a, b), donor keeps the head–tail pair [q0, a) and [b, q1)
            keep, moved, also_keep = (q0, a), (a, b), (b, q1)
        f[Q0], f[Q1] = keep
        f[ROW] = row + (keep[0] - q0)
        f[WORK] = self._work(doc, keep[0], keep[1])
        self.load[donor] += f[WORK]
        self._add(doc, moved[0], moved[1], rank, row + (moved[0] - q0), receiver)
        get = self._get
        order = lambda s: (-get(s)[WORK], s)  # noqa: E731
        if also_keep is not None:
            bisect.insort(donor_segs, self._add(doc, also_keep[0], also_keep[1], rank, row + (also_keep[0] - q0),
                                                donor), key=order)
        # Re-insert the shrunk segment in (work desc, id) order.
        bisect.insort(donor_segs, seg, key=order)

    def shed(self, capacity: int) -> None:
        n = self.p.n_servers
        donors = sorted((t for t in range(n) if self.load[t] > capacity), key=lambda t: (-self.load[t], t))
        receivers = _Receivers([(capacity - self.load[t], t) for t in range(n) if self.load[t] < capacity])
        # Shedding more than its excess lowers a donor below the cap and spends receivers' spare
        # that later donors need: each donor may overshoot by its share of the free room only.
        self.overshoot = max(0, n * capacity - sum(self.load)) // max(1, len(donors))
        self._index_servers()
        for donor in donors:
            mine = self._donor_segments(donor)
            while self.load[donor] > capacity and mine:
                need = self.load[donor] - capacity
                # Best fit: the smallest spare that takes the whole need keeps large spares for
                # large needs (fewer splits, fewer duplicated keys); else the largest spare.
                fit = receivers.best_fit(need)
                target = fit if fit is not None else receivers.largest()
                if target is None:
                    break
                # A move that fits a spare (best fit, then the largest) before one that overshoots by a token:
                # the capacity holds a token's work above the mean, so some receiver always has room for one
                # and the relaxed pass is a last resort, never a shortcut.
                tops = [target] if fit is None or receivers.largest() == fit else [target, receivers.largest()]
                move = None
                for relax in (False, True):
                    for top in tops:
                        move = self._best_move(donor, mine, top, capacity, relax)
                        if move is not None:
                            break
                    if move is not None:
                        break
                if move is None:  # nothing of this donor fits even the largest spare
                    break
                seg, t, kind, a, b = move
                self._apply(seg, kind, a, b, t, mine)
                receivers.update(t, capacity - self.load[t])
            if self.load[donor] < capacity:  # it can take work from the donors after it
                receivers.update(donor, capacity - self.load[donor])

    def _candidates(self, mine: list[int], need: int, final: bool) -> list[int]:
        """The donor's heaviest segments, plus (for a final move) the one closest in size above the need."""
        picks = mine[: self.cfg.n_candidates]
        if final:
            lo, hi = 0, len(mine)  # binary search: last segment with work >= need
            while lo < hi:
                mid = (lo + hi) // 2
                if self._get(mine[mid])[WORK] >= need:
                    lo = mid + 1
                else:
                    hi = mid
            i = lo - 1  # the lightest piece that still covers the whole need
            if i >= 0 and mine[i] not in picks:
                picks.append(mine[i])
        return picks

    def _best_move(self, donor, mine, top, capacity, relax: bool):
        """Cheapest (bytes per unit of work) feasible move of the donor's work to ``top`` or a server that holds
        the document's keys; ``relax``: a cut may overshoot the receiver's spare by one query token's work."""
        need = self.load[donor] - capacity
        final = need <= capacity - self.load[top]
        best = None
        for seg in self._candidates(mine, need, final):
            receivers = [top]
            # Servers already holding this document's keys take more of it for q bytes only.
            for t in self.by_doc.get(self._get(seg)[DOC], ()):
                if t != donor and t != top and self.load[t] < capacity and len(receivers) < 3:
                    receivers.append(t)
            if self.near:  # the servers with the most spare in the node of the rank holding the queries
                near = [t for t in self.node_servers.get(self.t_node[self._get(seg)[RANK]], ())
                        if t != donor and t not in receivers and self.load[t] < capacity]
                near.sort(key=lambda t: (self.load[t], t))
                receivers.extend(near[:2])
            # Relaxed pass: when no cut fits (tiny spares, eps ~ 0) allow one query token's
            # work of overshoot — the last token of a segment sees at most q1 keys.
            slack = self._token_work(seg) if relax else 0
            for t in receivers:
                spare = capacity - self.load[t]
                opts = None
                if need <= spare + slack:
                    # A final cut may overshoot the need by the donor's share of the free room,
                    # or by one query token's work (a token-granular cut cannot do better).
                    top_up = min(spare, need + max(self.overshoot, self._token_work(seg)))
                    opts = self._options(seg, t, need, top_up, slack)
                if not opts:  # fill the receiver instead (the donor continues with the next one)
                    opts = self._options(seg, t, 0, spare, slack)
                for opt in opts:
                    key = (opt[0], opt[1], seg, t, opt[2])
                    if best is None or key < best[0]:
                        best = (key, (seg, t, opt[2], opt[3], opt[4]))
        return None if best is None else best[1]


def _minus(ranges, held) -> list[tuple[int, int]]:
    """The parts of ``ranges`` outside the sorted, disjoint runs ``held``."""
    out = []
    for lo, hi in ranges:
        for a, b in held:
            if b <= lo or a >= hi:
                continue
            if a > lo:
                out.append((lo, a))
            lo = max(lo, b)
            if lo >= hi:
                break
        if lo < hi:
            out.append((lo, hi))
    return out


def _union(held: list[tuple[int, int]], ranges) -> list[tuple[int, int]]:
    """Sorted, disjoint union of two lists of half-open ranges (touching ones joined)."""
    out: list[list[int]] = []
    for a, b in sorted([*held, *ranges]):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class _Receivers:
    """Servers below the cap, ordered by spare capacity (a sorted list: a plan has <= servers of them)."""

    def __init__(self, spares: list[tuple[int, int]]):
        self.items = sorted(spares)
        self.spare = {t: sp for sp, t in spares}

    def largest(self) -> int | None:
        return self.items[-1][1] if self.items else None

    def best_fit(self, need: int) -> int | None:
        i = bisect.bisect_left(self.items, (need, -1))
        return self.items[i][1] if i < len(self.items) else None

    def update(self, t: int, spare: int) -> None:
        old = self.spare.pop(t, None)
        if old is not None:
            del self.items[bisect.bisect_left(self.items, (old, t))]
        if spare > 0:
            self.spare[t] = spare
            bisect.insort(self.items, (spare, t))


def plan_assignment(
    batch: BatchLayout, placement: Placement, cfg: SchedulerConfig, shape: AttentionShape | None = None,
    keys: BatchLayout | None = None,
) -> Assignment:
    """Assign every query token of the batch to exactly one server with max work <= (1+ε)·mean. ``keys``: the
    whole batch when ``batch`` is one nano-batch of it (where the keys sit, for a topology-aware placement)."""
    if placement.n_trainers != batch.n_ranks:
        raise ValueError(f"placement has {placement.n_trainers} trainers but the batch has {batch.n_ranks} ranks")
    planner = _Planner(batch, placement, cfg, shape or AttentionShape(), keys)
    planner.place_home()
    total = sum(planner.load)
    n = placement.n_servers
    # Cuts are token-granular, so no plan can promise better than one query token's work (at most
    # the longest document's length in pairs) above the mean: that is the floor of the slack.
    # A bound above the total is no bound: cap it there (a huge finite eps makes it inf, or too big for int64).
    bound = (1.0 + cfg.eps) * total / n
    capacity = max(-(-total // n) + int(batch.doc_len.max(initial=0)), int(bound) if bound < total else total)
    planner.shed(capacity)
    return planner.finish(capacity)
