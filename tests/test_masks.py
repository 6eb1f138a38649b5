"""Mask families: rectangles, pair counts, key hulls and cuts against the dense definition of each family."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from distca.errors import InputError
from distca.masks import FAMILIES, Mask, Slice, layer_masks


@st.composite
def masks(draw, length: int) -> Mask:
    family = draw(st.sampled_from(FAMILIES))
    size = st.integers(1, length + 2)
    if family == "causal":
        return Mask.causal()
    if family == "window":
        return Mask.sliding(draw(size))
    if family == "chunked":
        return Mask.chunked(draw(size))
    if family == "sink_window":
        return Mask.sink_window(draw(size), draw(size))
    if family == "prefix_lm":
        return Mask.prefix_lm(draw(st.integers(0, length + 3)))
    if family == "bidirectional":
        return Mask.bidirectional()
    return draw(slice_masks(length))


@st.composite
def slice_masks(draw, length: int, cuts: int = 3) -> Mask:
    """A grid of cells, each a slice of a random type or empty: cells never overlap in both q and k."""
    qs = sorted({0, length, *draw(st.lists(st.integers(0, length), max_size=cuts))})
    ks = sorted({0, length, *draw(st.lists(st.integers(0, length), max_size=cuts))})
    cells = [(a, b, c, d) for a, b in itertools.pairwise(qs) for c, d in itertools.pairwise(ks)]
    kinds = draw(st.lists(st.sampled_from(["full", "causal", "inv_causal", "bi_causal", None]),
                          min_size=len(cells), max_size=len(cells)))
    return Mask.from_slices(Slice(*cell, kind) for cell, kind in zip(cells, kinds, strict=True) if kind)


@st.composite
def cases(draw):
    length = draw(st.integers(1, 48))
    mask = draw(masks(length))
    x = draw(st.integers(0, length))
    y = draw(st.integers(x, length))
    return length, mask, x, y


@given(cases())
def test_rectangles_cover_exactly_the_dense_mask_of_the_shard(case):
    length, mask, x, y = case
    dense = mask.dense(length)
    cover = np.zeros((length, length), dtype=np.int64)
    for r in mask.rects(length, x, y):
        assert x <= r.q0 < r.q1 <= y and 0 <= r.k0 < r.k1 <= length
        seen = r.visible()
        assert seen.sum() == r.pairs
        assert seen.any(axis=1).all() and seen.any(axis=0).all(), f"{r} has an empty row or column"
        cover[r.q0:r.q1, r.k0:r.k1] += seen
    want = np.zeros_like(cover)
    want[x:y] = dense[x:y]
    np.testing.assert_array_equal(cover, want)  # every pair once, no pair twice, nothing outside


@given(cases())
def test_pairs_key_hulls_and_cuts_are_exact(case):
    length, mask, x, y = case
    dense = mask.dense(length)
    assert mask.pairs(length, x, y) == int(dense[x:y].sum())
    assert mask.cum(length, y) == int(dense[:y].sum())
    keys = [j for a, b in mask.key_ranges(length, x, y) for j in range(a, b)]
    assert keys == np.flatnonzero(dense[x:y].any(axis=0)).tolist()
    ranges = mask.key_ranges(length, x, y)
    assert all(b < c for (_, b), (c, _) in itertools.pairwise(ranges)), "ranges disjoint, not touching"
    total = mask.pairs(length, x, length)
    for target in {0, min(1, total), total // 2, total}:
        cut = mask.first_reaching(length, x, target)
        assert x <= cut <= length
        assert mask.pairs(length, x, cut) >= target
        assert cut == x or mask.pairs(length, x, cut - 1) < target


def test_families_have_the_documented_semantics():
    # Spot values a reader can check by hand (L = 8).
    sink = Mask.sink_window(2, 3).dense(8)
    assert sink[7].nonzero()[0].tolist() == [0, 1, 5, 6, 7]
    assert Mask.chunked(3).dense(8)[7].nonzero()[0].tolist() == [6, 7]
    assert Mask.prefix_lm(3).dense(8)[0].nonzero()[0].tolist() == [0, 1, 2]
    assert Mask.prefix_lm(3).dense(8)[5].nonzero()[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert Mask.sliding(3).dense(8)[7].nonzero()[0].tolist() == [5, 6, 7]
    assert Mask.bidirectional().pairs(8, 0, 8) == 64
    inv = Mask.from_slices([(0, 4, 0, 4, "inv_causal")]).dense(8)
    assert inv[1].nonzero()[0].tolist() == [1, 2, 3]
    band = Mask.from_slices([(0, 4, 0, 6, "bi_causal")]).dense(8)
    assert band[0].nonzero()[0].tolist() == [0, 1, 2] and band[3].nonzero()[0].tolist() == [3, 4, 5]


def test_sink_window_costs_what_a_window_of_sink_plus_window_costs():
    for length in (1, 7, 50):
        assert Mask.sink_window(4, 8).cum(length, length) == Mask.sliding(12).cum(length, length)


def test_parse_round_trips_and_refuses_by_name():
    for spec in ("causal", "window:128", "chunked:8192", "sink_window:4:128", "prefix_lm:64", "bidirectional"):
        assert Mask.parse(spec).spec() == spec
    assert Mask.parse(-1) == Mask.causal() and Mask.parse(64) == Mask.sliding(64)
    assert Mask.sliding(64).as_window == 64 and Mask.chunked(4).as_window is None
    for bad, word in (("window", "takes 1"), ("chunked:x", "integers"), ("dilated:2", "unknown mask"),
                      ("window:0", "window"), ("sink_window:0:4", "sink")):
        with pytest.raises(InputError, match=word):
            Mask.parse(bad)
    with pytest.raises(InputError, match="overlap in both"):
        Mask.from_slices([(0, 4, 0, 4, "full"), (2, 6, 2, 6, "causal")])
    with pytest.raises(InputError, match="slice type"):
        Slice(0, 1, 0, 1, "diagonal")


def test_layer_patterns_repeat_over_the_layers():
    gemma = layer_masks(["window:1024"] * 5 + ["causal"], 12)
    assert [m.family for m in gemma].count("causal") == 2 and gemma[5] == Mask.causal()
    llama4 = layer_masks(["chunked:8192"] * 3 + ["causal"], 4)
    assert llama4[:3] == [Mask.chunked(8192)] * 3
    with pytest.raises(InputError):
        layer_masks([], 4)
