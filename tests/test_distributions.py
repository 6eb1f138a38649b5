"""Seeded length distributions (distca.data.distributions) and rank packing (distca.data.packing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distca.data import (
    DISTRIBUTIONS,
    DataError,
    LengthDistribution,
    PackedBatch,
    elongate_to,
    length_stats,
    long_token_share,
    pack_into_ranks,
    sample_batch,
    sample_lengths,
)

LONG_TAILED = {  # name: (median target, token share >16K target, cap)
    "pretrain": (3200, 0.20, 125_000),
    "prolong": (1900, 0.10, 340_000),
}
ALL_KW = {"fixed": {"length": 100}, "uniform": {"lo": 5, "hi": 50}, "pretrain": {}, "prolong": {}}


def test_registry_lists_all_families():
    assert set(DISTRIBUTIONS) == set(ALL_KW)


@pytest.mark.parametrize("name", sorted(ALL_KW))
def test_same_seed_same_lengths(name):
    kw = ALL_KW[name]
    a = sample_lengths(name, n_docs=1000, seed=7, **kw)
    b = sample_lengths(name, n_docs=1000, seed=7, **kw)
    assert a.dtype == np.int64 and a.shape == (1000,) and (a >= 1).all()
    np.testing.assert_array_equal(a, b)
    c = sample_lengths(name, total_tokens=100_000, seed=7, upsample_long=2.0, **kw)
    np.testing.assert_array_equal(c, sample_lengths(name, total_tokens=100_000, seed=7, upsample_long=2.0, **kw))


@pytest.mark.parametrize("name", ["uniform", "pretrain", "prolong"])
def test_different_seed_different_lengths(name):
    kw = ALL_KW[name]
    assert not np.array_equal(sample_lengths(name, n_docs=500, seed=0, **kw),
                              sample_lengths(name, n_docs=500, seed=1, **kw))


def test_fixed_and_uniform():
    np.testing.assert_array_equal(sample_lengths("fixed", n_docs=5, length=33), np.full(5, 33))
    x = sample_lengths("uniform", n_docs=20_000, seed=1, lo=3, hi=9)
    assert x.min() == 3 and x.max() == 9
    assert len(sample_lengths("uniform", n_docs=0, lo=1, hi=2)) == 0


@pytest.mark.parametrize("name", sorted(LONG_TAILED))
def test_long_tailed_statistics(name):
    median, share, cap = LONG_TAILED[name]
    x = sample_lengths(name, n_docs=200_000, seed=0)
    stats = length_stats(x)
    assert abs(stats["median"] / median - 1) <= 0.15, stats
    assert abs(stats["long_share"] - share) <= 0.05, stats
    assert stats["max"] <= cap and stats["max"] >= 0.8 * cap, stats
    assert LengthDistribution(name).max_len == cap


@pytest.mark.parametrize("name", sorted(LONG_TAILED))
def test_upsample_long_increases_long_share(name):
    base = long_token_share(sample_lengths(name, n_docs=50_000, seed=3))
    up = long_token_share(sample_lengths(name, n_docs=50_000, seed=3, upsample_long=4.0))
    assert up > base + 0.1


def test_upsample_long_is_exact_reweighting():
    # uniform on [1, 20] with threshold 10: long docs (11..20) get weight 3 → P(long) = 30/40.
    x = sample_lengths("uniform", n_docs=40_000, seed=5, upsample_long=3.0, lo=1, hi=20, long_threshold=10)
    assert len(x) == 40_000
    assert abs((x > 10).mean() - 0.75) < 0.01


def test_elongate_scales_lengths():
    base = sample_lengths("pretrain", n_docs=2000, seed=4)
    longer = sample_lengths("pretrain", n_docs=2000, seed=4, elongate=2.0)
    np.testing.assert_array_equal(longer, 2 * base)
    half = sample_lengths("uniform", n_docs=100, seed=4, elongate=0.5, lo=1, hi=4)
    assert (half >= 1).all()
    assert elongate_to("pretrain", 250_000) == pytest.approx(2.0)
    assert elongate_to("fixed", 64, length=16) == pytest.approx(4.0)
    dist = LengthDistribution("prolong").scaled_to(680_000)
    assert dist.elongate == pytest.approx(2.0) and dist.max_len == 680_000


@pytest.mark.parametrize("name", sorted(ALL_KW))
@pytest.mark.parametrize("total", [1, 17, 65_536, 1_000_003])
def test_total_tokens_is_exact(name, total):
    x = sample_lengths(name, total_tokens=total, seed=2, **ALL_KW[name])
    assert int(x.sum()) == total and (x >= 1).all()


def test_total_tokens_only_trims_last_document():
    full = sample_lengths("fixed", total_tokens=250, length=100)
    np.testing.assert_array_equal(full, [100, 100, 50])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sample_lengths("nope", n_docs=3), r"'nope'.*valid names.*pretrain"),
        (lambda: sample_lengths("pretrain"), "exactly one of n_docs"),
        (lambda: sample_lengths("pretrain", n_docs=3, total_tokens=5), "exactly one of n_docs"),
        (lambda: sample_lengths("pretrain", n_docs=-1), "n_docs"),
        (lambda: sample_lengths("pretrain", total_tokens=0), "total_tokens"),
        (lambda: sample_lengths("pretrain", n_docs=3, upsample_long=0.5), "upsample_long"),
        (lambda: sample_lengths("pretrain", n_docs=3, elongate=0), "elongate"),
        (lambda: sample_lengths("pretrain", n_docs=3, bogus=1), r"bogus.*'pretrain'"),
        (lambda: sample_lengths("fixed", n_docs=3), r"needs parameter.*length"),
        (lambda: sample_lengths("fixed", n_docs=3, length=0), "length"),
        (lambda: sample_lengths("uniform", n_docs=3, lo=5, hi=4), "lo"),
        (lambda: sample_lengths("prolong", n_docs=3, tail_p=2.0), "tail_p"),
        (lambda: elongate_to("pretrain", 0), "max_len"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
    with pytest.raises(DataError):
        call()


# ---------------------------------------------------------------------------------------------- packing


def check_packing(lengths: list[int], n_ranks: int, tpr: int, b: PackedBatch) -> None:
    """Every invariant of a packed batch built from ``lengths``."""
    assert b.n_ranks == n_ranks and b.rank_tokens == [tpr] * n_ranks
    assert all(x >= 1 for p in b.ranks for x in p)
    assert b.continues[0] is False
    # concatenating pieces by doc id gives the length prefix, the last one possibly truncated
    got = b.doc_lengths
    assert got[:-1] == lengths[: len(got) - 1]
    assert 1 <= got[-1] <= lengths[len(got) - 1]
    prev_doc, prev_end = -1, 0
    for r in range(n_ranks):
        for i, (d, off, x) in enumerate(zip(b.doc_ids[r], b.offsets[r], b.ranks[r], strict=True)):
            if d == prev_doc:
                assert off == prev_end and i == 0 and r > 0 and b.continues[r]
            else:
                assert d == prev_doc + 1 and off == 0
                if i == 0 and r > 0:
                    assert not b.continues[r]
            prev_doc, prev_end = d, off + x
    # a rank is only not-continued when the previous rank ended on a document boundary
    for r in range(1, n_ranks):
        prev_done = b.offsets[r - 1][-1] + b.ranks[r - 1][-1] == lengths[b.doc_ids[r - 1][-1]]
        assert b.continues[r] == (not prev_done)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.integers(1, 6), st.integers(1, 200),
       st.data())
def test_packing_invariants(lengths, n_ranks, tpr, data):
    need = n_ranks * tpr
    while sum(lengths) < need:
        lengths = [*lengths, data.draw(st.integers(1, 1000))]
    b = pack_into_ranks(lengths, n_ranks, tpr)
    check_packing(lengths, n_ranks, tpr, b)
    assert PackedBatch.from_json(json.loads(json.dumps(b.to_json()))) == b


def test_long_document_spans_ranks():
    b = pack_into_ranks(np.array([5, 30, 3]), 3, 10)
    assert b.ranks == [[5, 5], [10], [10]]
    assert b.continues == [False, True, True]
    assert b.doc_ids == [[0, 1], [1], [1]] and b.offsets == [[0, 0], [5], [15]]


def test_exact_boundary_does_not_continue():
    b = pack_into_ranks([4, 6, 10, 7], 2, 10)
    assert b.ranks == [[4, 6], [10]] and b.continues == [False, False]


@pytest.mark.parametrize("name", sorted(ALL_KW))
def test_sample_batch(name):
    b = sample_batch(name, 4, 32_768, seed=11, **ALL_KW[name])
    lengths = sample_lengths(name, total_tokens=4 * 32_768, seed=11, **ALL_KW[name])
    check_packing([int(x) for x in lengths], 4, 32_768, b)
    assert b == sample_batch(name, 4, 32_768, seed=11, **ALL_KW[name])


def test_json_round_trip_and_plain_list():
    b = sample_batch("prolong", 3, 20_000, seed=1, upsample_long=2.0, elongate=1.5)
    text = json.dumps(b.to_json())
    assert set(json.loads(text)) == {"ranks", "continues"}
    assert PackedBatch.from_json(json.loads(text)) == b
    plain = PackedBatch.from_json([[3, 4], [7], [1, 1, 5]])
    assert plain.continues == [False, False, False]
    assert plain.doc_ids == [[0, 1], [2], [3, 4, 5]] and plain.offsets == [[0, 0], [0], [0, 0, 0]]
    assert plain.doc_lengths == [3, 4, 7, 1, 1, 5]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pack_into_ranks([5, 5], 2, 10), "fewer than"),
        (lambda: pack_into_ranks([5, 0, 50], 2, 10), ">= 1"),
        (lambda: pack_into_ranks([5.5, 50], 2, 10), "ints"),
        (lambda: pack_into_ranks([50], 0, 10), "n_ranks"),
        (lambda: pack_into_ranks([50], 2, 0), "tokens_per_rank"),
        (lambda: sample_batch("nope", 2, 10), "valid names"),
        (lambda: PackedBatch.from_json({"ranks": [[3]], "continues": [True]}), "continues"),
        (lambda: PackedBatch.from_json({"ranks": [[3], [4]], "continues": [False]}), "continues"),
        (lambda: PackedBatch.from_json({"rank": [[3]]}), "ranks"),
        (lambda: PackedBatch.from_json([[3], []]), "at least one piece"),
        (lambda: PackedBatch.from_json([[3, 0]]), ">= 1"),
        (lambda: PackedBatch.from_json([[3, "a"]]), "ints"),
        (lambda: PackedBatch.from_json("[[3]]"), "object or a list"),
        (lambda: PackedBatch([[3]], [False], [[1]], [[0]]), "inconsistent"),
    ],
)
def test_bad_packing_inputs(call, match):
    with pytest.raises(DataError, match=match):
        call()
