"""A drawn micro-batch as one rank trains it: its document layout, the rows of each packed part, the scheduler's
view of its documents, and the colocated core attention over its parts.

A micro-batch is one packing (``train.nano_split: rows``) or two independent halves (``repack``): rank ``r``
holds its rows of part 0, then its rows of part 1, and no document spans the two (:mod:`distca.data.stream`).
Each part's documents may still continue from one rank to the next, so each part is its own
:class:`~distca.scheduler.BatchLayout` (from its per-rank pieces and continuation flags, rows counted from the
part's first row on each rank), planned on its own: CAD runs one round per part and call, ping-pong or not.
"""

from __future__ import annotations

from distca.model.core import DocLayout
from distca.scheduler import BatchLayout
from distca.train.colocated_attention import AttentionTimer, GroupLocalCoreAttention, PrefixRows


def part_batches(mb) -> list[BatchLayout]:
    """Each packed part of ``mb`` as the scheduler reads it (rows counted from the part's first row)."""
    return [BatchLayout.from_ranks(p.ranks, p.continues) for p in mb.parts]


def part_layouts(mb, rank: int) -> list[DocLayout]:
    """This rank's documents of each part (positions continue from earlier ranks' pieces of the same part)."""
    return [DocLayout.from_lengths(p.ranks[rank], first_position=PrefixRows.of(p.ranks, p.continues, rank).n)
            for p in mb.parts]


def part_rows(mb, rank: int) -> tuple[slice, ...]:
    """This rank's rows of each part."""
    out, at = [], 0
    for p in mb.parts:
        n = p.rank_tokens[rank]
        out.append(slice(at, at + n))
        at += n
    return tuple(out)


def local_core(mb, rank: int, group, backend: str, timer: AttentionTimer | None, layout: DocLayout):
    """The colocated baseline's core attention for ``mb`` on this rank: per part, its queries against the keys of
    its own documents, borrowed from earlier ranks of the data-parallel ``group`` where a document continues —
    one gather and one kernel call for all parts. ``layout``: the rank's whole layout (:func:`part_layouts`
    concatenated), on the device attention runs on."""
    p = mb.parts
    return GroupLocalCoreAttention(layout, p[0].ranks, p[0].continues, rank, group, backend, timer=timer,
                                   parts=[(x.ranks, x.continues) for x in p] if len(p) > 1 else None)
