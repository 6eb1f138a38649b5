"""Mask families: what a query may see inside its document, as exact pair counts, key hulls and rectangles.

A :class:`Mask` describes one document's attention pattern. Every family reduces, for any query shard
``[x, y)`` of a document of ``length`` tokens, to

- an exact **pair count** (``pairs``; ``cum`` is the count of the prefix ``[0, y)``),
- the exact **key hull**: the sorted, disjoint key ranges the shard's queries see (``key_ranges``) — what a
  server must receive, nothing more,
- **rectangles** (:class:`Rect`) an off-the-shelf varlen kernel runs: ``full``, ``causal`` (bottom-right
  aligned, optionally banded by a window) or ``inv_causal`` (top-left aligned; run as ``causal`` on
  reversed rows). Rectangles of one shard never share a (query, key) pair; those sharing queries are
  merged by their log-sum-exp.

Families (positions are document positions; query ``p`` sees key ``j``):

======================  ==================================================================================
``causal``              ``j <= p``
``window`` (w)          ``p - w < j <= p``: w keys, itself included (the project's one window convention)
``chunked`` (C)         causal inside fixed chunks of C tokens: ``C·⌊p/C⌋ <= j <= p`` (Llama 4)
``sink_window`` (S, W)  ``j <= p`` and (``j < S`` or ``p - W < j``): the first S tokens plus the last W keys
``prefix_lm`` (P)       bidirectional over the first ``P' = min(P, length)`` tokens, causal after:
                        ``j < P'`` for ``p < P'``, else ``j <= p``
``bidirectional``       every key of the document (an encoder)
``slices``              a list of :class:`Slice` (q range × k range × full | causal | inv_causal | bi_causal),
                        MagiAttention's form; slices may share query rows or key columns, never both
======================  ==================================================================================

``dense`` builds the boolean mask from these definitions directly (not from the rectangles): the ground
truth the executor and the scheduler are tested against. Pure Python on ints (the planner calls these a
few times per move); numpy only for the dense reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from distca.errors import InputError
from distca.limits import MAX_DOC_TOKENS, check_int

Family = Literal["causal", "window", "chunked", "sink_window", "prefix_lm", "bidirectional", "slices"]
FAMILIES: tuple[str, ...] = ("causal", "window", "chunked", "sink_window", "prefix_lm", "bidirectional", "slices")
RectKind = Literal["full", "causal", "inv_causal"]
SliceType = Literal["full", "causal", "inv_causal", "bi_causal"]
SLICE_TYPES: tuple[str, ...] = ("full", "causal", "inv_causal", "bi_causal")


def _causal_cum(y: int, w: int = -1) -> int:
    """Pairs of queries ``[0, y)`` under causal attention (window ``w`` keys; -1 none)."""
    if y <= 0:
        return 0
    if w < 0 or y <= w:
        return y * (y + 1) // 2
    return w * (w + 1) // 2 + (y - w) * w


def _band_pairs(nq: int, nk: int, w: int) -> int:
    """Pairs of a bottom-right aligned causal ``nq × nk`` rectangle, each query seeing at most ``w`` keys."""
    return _causal_cum(nk, w) - _causal_cum(max(nk - nq, 0), w)


@dataclass(frozen=True, slots=True)
class Rect:
    """A rectangle of one document's (query, key) pairs that one kernel call computes.

    ``causal``: bottom-right aligned, query ``q1 - 1 - i`` sees keys up to ``k1 - 1 - i`` (and, with
    ``window = w > 0``, at most ``w`` of them); ``inv_causal``: top-left aligned, query ``q0 + i`` sees keys
    from ``k0 + i`` on; ``full``: every pair.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    kind: RectKind = "causal"
    window: int = -1

    @property
    def nq(self) -> int:
        return self.q1 - self.q0

    @property
    def nk(self) -> int:
        return self.k1 - self.k0

    @property
    def pairs(self) -> int:
        if self.kind == "full":
            return self.nq * self.nk
        return _band_pairs(self.nq, self.nk, self.window)

    def visible(self) -> np.ndarray:
        """Bool ``[nq, nk]`` of the pairs this rectangle computes (tests and the dense reference's check)."""
        i = np.arange(self.nq)[:, None]
        j = np.arange(self.nk)[None, :]
        if self.kind == "full":
            return np.ones((self.nq, self.nk), dtype=bool)
        if self.kind == "inv_causal":
            return j >= i
        last = i + (self.nk - self.nq)  # bottom-right: the last key query i sees
        ok = j <= last
        if self.window > 0:
            ok &= j > last - self.window
        return ok


@dataclass(frozen=True, slots=True)
class Slice:
    """One (query range × key range × type) piece of a general mask, in document positions.

    ``causal`` is bottom-right aligned within the slice (its last query sees its last key), ``inv_causal``
    top-left aligned (its first query sees its first key onward), ``bi_causal`` both (a band).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    type: SliceType = "full"

    def __post_init__(self) -> None:
        if self.type not in SLICE_TYPES:
            raise InputError(f"slice type must be one of {SLICE_TYPES}, got {self.type!r}")
        for name in ("q0", "q1", "k0", "k1"):
            check_int(getattr(self, name), f"slice {name}", 0, MAX_DOC_TOKENS)
        if self.q0 > self.q1 or self.k0 > self.k1:
            raise InputError(f"slice ranges must satisfy q0 <= q1 and k0 <= k1, got q [{self.q0}, {self.q1}) "
                             f"k [{self.k0}, {self.k1})")

    def clip(self, x: int, y: int) -> Rect | None:
        """The rectangle of this slice's pairs whose queries lie in ``[x, y)``; ``None`` when empty."""
        a, b = max(x, self.q0), min(y, self.q1)
        if a >= b or self.k0 >= self.k1:
            return None
        t = self.type
        if t == "full":
            return Rect(a, b, self.k0, self.k1, "full")
        up = self.k1 - self.q1  # causal edge: query p sees keys <= p + up
        lo = self.k0 - self.q0  # inverse-causal edge: query p sees keys >= p + lo
        if t == "causal":
            a = max(a, self.k0 - up)  # queries before it see no key of the slice
            k1 = min(self.k1, b + up)
            return Rect(a, b, self.k0, k1, "causal") if a < b and self.k0 < k1 else None
        if t == "inv_causal":
            b = min(b, self.k1 - lo)  # queries from there on see none
            k0 = max(self.k0, a + lo)
            return Rect(a, b, k0, self.k1, "inv_causal") if a < b and k0 < self.k1 else None
        # bi_causal: p + lo <= j <= p + up, inside [k0, k1): a band of up - lo + 1 keys.
        w = up - lo + 1
        a, b = max(a, self.k0 - up), min(b, self.k1 - lo)
        if w < 1 or a >= b:
            return None
        k0, k1 = max(self.k0, a + lo), min(self.k1, b - 1 + up + 1)
        return Rect(a, b, k0, k1, "causal", w) if k0 < k1 else None

    def visible(self, length: int) -> np.ndarray:
        """Bool ``[length, length]`` of this slice's pairs, from its definition."""
        p = np.arange(length)[:, None]
        j = np.arange(length)[None, :]
        inside = (p >= self.q0) & (p < self.q1) & (j >= self.k0) & (j < self.k1)
        up, lo = self.k1 - self.q1, self.k0 - self.q0
        if self.type in ("causal", "bi_causal"):
            inside &= j <= p + up
        if self.type in ("inv_causal", "bi_causal"):
            inside &= j >= p + lo
        return inside


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint union of half-open ranges (touching ones joined); empty ones dropped."""
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


@dataclass(frozen=True)
class Mask:
    """One document's attention mask (a family and its parameters). Hashable: plans are keyed by it."""

    family: Family = "causal"
    window: int = -1  # window: keys per query (itself included); sink_window: the window part W
    chunk: int = 0  # chunked: tokens per chunk
    sink: int = 0  # sink_window: the first S tokens every query sees
    prefix: int = 0  # prefix_lm: bidirectional prefix length
    slices: tuple[Slice, ...] = field(default=())  # slices: the pieces (one document's)

    def __post_init__(self) -> None:
        f = self.family
        if f not in FAMILIES:
            raise InputError(f"mask family must be one of {FAMILIES}, got {f!r}")
        if f == "window":
            check_int(self.window, "mask window", 1, MAX_DOC_TOKENS)
        if f == "chunked":
            check_int(self.chunk, "mask chunk", 1, MAX_DOC_TOKENS)
        if f == "sink_window":
            check_int(self.sink, "mask sink", 1, MAX_DOC_TOKENS)
            check_int(self.window, "mask window", 1, MAX_DOC_TOKENS)
        if f == "prefix_lm":
            check_int(self.prefix, "mask prefix", 0, MAX_DOC_TOKENS)
        if f == "slices":
            _check_slices(self.slices)
        elif self.slices:
            raise InputError(f"mask family {f!r} takes no slices")

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def causal(cls) -> Mask:
        return cls("causal")

    @classmethod
    def sliding(cls, window: int) -> Mask:
        """``window`` keys per query; -1 is full causal (the runtime's window convention)."""
        return cls("causal") if window == -1 else cls("window", window=window)

    @classmethod
    def chunked(cls, chunk: int) -> Mask:
        return cls("chunked", chunk=chunk)

    @classmethod
    def sink_window(cls, sink: int, window: int) -> Mask:
        return cls("sink_window", window=window, sink=sink)

    @classmethod
    def prefix_lm(cls, prefix: int) -> Mask:
        return cls("prefix_lm", prefix=prefix)

    @classmethod
    def bidirectional(cls) -> Mask:
        return cls("bidirectional")

    @classmethod
    def from_slices(cls, slices: Iterable[Slice | tuple]) -> Mask:
        return cls("slices", slices=tuple(s if isinstance(s, Slice) else Slice(*s) for s in slices))

    @classmethod
    def parse(cls, spec: str | int) -> Mask:
        """``"causal"``, ``"window:W"``, ``"chunked:C"``, ``"sink_window:S:W"``, ``"prefix_lm:P"``,
        ``"bidirectional"``; an int is a window (-1: causal). The form configs and the CLI use."""
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls.sliding(spec)
        if not isinstance(spec, str):
            raise InputError(f"a mask is a string like 'window:128' or an int window, got {type(spec).__name__}")
        name, *args = spec.strip().split(":")
        arity = {"causal": 0, "bidirectional": 0, "window": 1, "chunked": 1, "prefix_lm": 1, "sink_window": 2}
        if name not in arity:
            raise InputError(f"unknown mask {spec!r}; expected one of causal, window:W, chunked:C, sink_window:S:W, "
                             "prefix_lm:P, bidirectional")
        if len(args) != arity[name]:
            raise InputError(f"mask {name!r} takes {arity[name]} ':'-separated integer(s), got {spec!r}")
        try:
            vals = [int(a) for a in args]
        except ValueError:
            raise InputError(f"mask {spec!r}: parameters must be integers") from None
        if name == "window":
            return cls("window", window=vals[0])
        if name == "chunked":
            return cls.chunked(vals[0])
        if name == "sink_window":
            return cls.sink_window(vals[0], vals[1])
        if name == "prefix_lm":
            return cls.prefix_lm(vals[0])
        return cls(name)  # type: ignore[arg-type]

    def spec(self) -> str:
        """The inverse of :meth:`parse` (``slices`` masks: a summary, they are data, not config)."""
        f = self.family
        return {"causal": "causal", "bidirectional": "bidirectional", "window": f"window:{self.window}",
                "chunked": f"chunked:{self.chunk}", "sink_window": f"sink_window:{self.sink}:{self.window}",
                "prefix_lm": f"prefix_lm:{self.prefix}", "slices": f"slices[{len(self.slices)}]"}[f]

    @property
    def as_window(self) -> int | None:
        """The runtime window (-1 causal, w) when this mask is one, else ``None``."""
        if self.family == "causal":
            return -1
        if self.family == "window":
            return self.window
        return None

    @property
    def length_dependent(self) -> bool:
        """Whether a query's keys depend on the document's length (a query may see later keys)."""
        return self.family in ("prefix_lm", "bidirectional", "slices")

    # -- counts --------------------------------------------------------------------------------------
    def cum(self, length: int, y: int) -> int:
        """Pairs attended by queries ``[0, y)`` of a document of ``length`` tokens."""
        y = min(max(y, 0), length)
        f = self.family
        if f == "causal":
            return _causal_cum(y)
        if f == "window":
            return _causal_cum(y, self.window)
        if f == "sink_window":
            return _causal_cum(y, self.sink + self.window)  # query p sees min(p + 1, S + W) keys
        if f == "chunked":
            c = self.chunk
            n, r = divmod(y, c)
            return n * (c * (c + 1) // 2) + r * (r + 1) // 2
        if f == "prefix_lm":
            p = min(self.prefix, length)
            if y <= p:
                return y * p
            return p * p + _causal_cum(y) - _causal_cum(p)
        if f == "bidirectional":
            return y * length
        return sum(r.pairs for r in self.rects(length, 0, y))

    def pairs(self, length: int, x: int, y: int) -> int:
        """Pairs attended by queries ``[x, y)``."""
        if self.family == "slices":
            return sum(r.pairs for r in self.rects(length, x, y))
        return self.cum(length, y) - self.cum(length, x)

    def first_reaching(self, length: int, x: int, target: int) -> int:
        """Smallest ``y`` in ``[x, length]`` with ``pairs(x, y) >= target`` (``length`` if none reaches it)."""
        if target <= 0:
            return x
        base = self.cum(length, x) if self.family != "slices" else 0
        lo, hi = x, length
        if self.pairs(length, x, hi) < target:
            return length
        while lo < hi:  # pairs(x, ·) is non-decreasing
            mid = (lo + hi) // 2
            got = (self.cum(length, mid) - base) if self.family != "slices" else self.pairs(length, x, mid)
            if got >= target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # -- shapes --------------------------------------------------------------------------------------
    def rects(self, length: int, x: int, y: int) -> list[Rect]:
        """Rectangles that compute exactly the pairs of queries ``[x, y)`` (none shared between them)."""
        x, y = max(x, 0), min(y, length)
        if x >= y:
            return []
        f = self.family
        if f == "causal":
            return [Rect(x, y, 0, y)]
        if f == "window":
            return [Rect(x, y, max(0, x - self.window + 1), y, "causal", self.window)]
        if f == "chunked":
            out, c = [], self.chunk
            a = x
            while a < y:
                start = a - a % c
                b = min(y, start + c)
                out.append(Rect(a, b, start, b))
                a = b
            return out
        if f == "sink_window":
            s, w = self.sink, self.window
            out = [Rect(x, y, max(0, x - w + 1), y, "causal", w)]
            # Sink keys the window does not reach: query p sees keys [0, min(S, p - W + 1)).
            a, b = max(x, w), min(y, s + w - 1)
            if a < b:  # p - W + 1 in (0, S): a causal triangle, query p sees keys <= p - W
                out.append(Rect(a, b, 0, b - w))
            a = max(x, s + w - 1)
            if a < y:  # p - W + 1 >= S: every sink key
                out.append(Rect(a, y, 0, s, "full"))
            return out
        if f == "prefix_lm":
            p = min(self.prefix, length)
            out = []
            if x < p:
                out.append(Rect(x, min(y, p), 0, p, "full"))
            if y > p:
                a = max(x, p)
                out.append(Rect(a, y, 0, y))
            return out
        if f == "bidirectional":
            return [Rect(x, y, 0, length, "full")]
        return [r for s in self.slices if (r := s.clip(x, y)) is not None]

    def key_ranges(self, length: int, x: int, y: int) -> list[tuple[int, int]]:
        """The keys queries ``[x, y)`` see, exactly: sorted, disjoint ``[k0, k1)`` ranges."""
        return _merge((r.k0, r.k1) for r in self.rects(length, x, y))

    def key_tokens(self, length: int, x: int, y: int) -> int:
        return sum(b - a for a, b in self.key_ranges(length, x, y))

    def dense(self, length: int) -> np.ndarray:
        """Bool ``[length, length]``: query ``p`` (row) may see key ``j`` — from the family's definition."""
        p = np.arange(length)[:, None]
        j = np.arange(length)[None, :]
        f = self.family
        if f == "causal":
            return j <= p
        if f == "window":
            return (j <= p) & (j > p - self.window)
        if f == "chunked":
            return (j <= p) & (j >= p - p % self.chunk)
        if f == "sink_window":
            return (j <= p) & ((j < self.sink) | (j > p - self.window))
        if f == "prefix_lm":
            pp = min(self.prefix, length)
            return np.where(p < pp, j < pp, j <= p)
        if f == "bidirectional":
            return np.ones((length, length), dtype=bool)
        out = np.zeros((length, length), dtype=bool)
        for s in self.slices:
            out |= s.visible(length)
        return out


def _check_slices(slices: Sequence[Slice]) -> None:
    """Slices may share query rows or key columns, never both (no pair counted twice)."""
    if not all(isinstance(s, Slice) for s in slices):
        raise InputError("mask slices must be Slice objects (q0, q1, k0, k1, type)")
    for i, a in enumerate(slices):
        for b in slices[i + 1:]:
            if a.q0 < b.q1 and b.q0 < a.q1 and a.k0 < b.k1 and b.k0 < a.k1:
                raise InputError(f"mask slices overlap in both query and key ranges: {a} and {b}")


def check_slices_fit(mask: Mask, length: int, doc: int | str = "?") -> None:
    """A ``slices`` mask's ranges must lie inside its document."""
    for s in mask.slices:
        if s.q1 > length or s.k1 > length:
            raise InputError(f"document {doc} has {length} tokens but a mask slice reaches q {s.q1} / k {s.k1}")


def layer_masks(pattern: Sequence[str | int], n_layers: int) -> list[Mask]:
    """Masks of ``n_layers`` layers from a repeating pattern, e.g. ``["window:128", "causal"]`` (gpt-oss),
    ``["window:1024"] * 5 + ["causal"]`` (Gemma 3), ``["chunked:8192"] * 3 + ["causal"]`` (Llama 4)."""
    if not pattern:
        raise InputError("a mask pattern needs at least one entry")
    masks = [Mask.parse(p) for p in pattern]
    return [masks[i % len(masks)] for i in range(n_layers)]


# An attention call's mask as the runtime keys it: an int window (-1 full causal, w > 0) for the families the
# window kernels run directly, a Mask for every other family. Plans, rounds and FLOPs are keyed by it.
AttentionKey = int | Mask


def attention_key(spec: str | int | Mask) -> AttentionKey:
    """The canonical key of a mask: its window when it is causal or a window, else the :class:`Mask` itself."""
    mask = spec if isinstance(spec, Mask) else Mask.parse(spec)
    w = mask.as_window
    return mask if w is None else w


def key_mask(key: AttentionKey) -> Mask:
    """The :class:`Mask` of an attention key."""
    return key if isinstance(key, Mask) else Mask.sliding(int(key))


def key_order(key: AttentionKey) -> tuple[int, int, str]:
    """A sort key over attention keys (windows first, by window; then masks by spec): deterministic plan order."""
    return (0, int(key), "") if not isinstance(key, Mask) else (1, 0, key.spec())


def key_text(key: AttentionKey) -> str:
    """How logs and errors name an attention key."""
    return key_mask(key).spec()
