"""Pair counts, tile counts and the calibrated cost model against brute-force enumeration."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from distca.attention import AttentionShape, CalibrationTable, CostModel, key_range, pair_count, tile_count
from distca.attention.cost import task_features
from distca.errors import CalibrationError

windows = st.one_of(st.just(-1), st.integers(1, 300))


def brute_pairs(q0: int, q1: int, window: int) -> int:
    """Count (query, key) pairs of document positions directly from the mask definition."""
    return sum(1 for i in range(q0, q1) for j in range(i + 1) if window == -1 or i - j < window)


def brute_tiles(q_len: int, kv_len: int, window: int, tq: int, tk: int) -> int:
    e = kv_len - q_len
    tiles = set()
    for j in range(q_len):
        p = e + j
        for key in range(max(0, p - window + 1) if window > 0 else 0, p + 1):
            tiles.add((j // tq, key // tk))
    return len(tiles)


@given(q0=st.integers(0, 400), n=st.integers(0, 200), window=windows)
def test_pair_count_equals_enumeration_for_any_shard(q0, n, window):
    k0, k1 = key_range(q0, q0 + n, window)
    assert int(pair_count(n, k1 - k0, window)) == brute_pairs(q0, q0 + n, window)


@given(lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=20), window=windows,
       cuts=st.lists(st.floats(0, 1), max_size=6))
def test_shard_pairs_add_up_to_the_whole_document(lengths, window, cuts):
    for n in lengths:
        bounds = sorted({0, n, *(int(c * n) for c in cuts)})
        parts = []
        for a, b in itertools.pairwise(bounds):
            k0, k1 = key_range(a, b, window)
            parts.append(int(pair_count(b - a, k1 - k0, window)))
        assert sum(parts) == int(pair_count(n, n, window))


def test_pair_count_closed_forms_and_vectorisation():
    assert int(pair_count(4, 4)) == 10  # C(C+1)/2
    assert int(pair_count(3, 10)) == 3 * 7 + 6  # C·P + C(C+1)/2
    assert int(pair_count(10, 10, 3)) == 1 + 2 + 8 * 3
    assert int(pair_count(5, 2)) == 1 + 2  # more queries than keys: the first three see nothing
    np.testing.assert_array_equal(pair_count([4, 3, 0], [4, 10, 0], [-1, -1, 5]), [10, 27, 0])
    big = pair_count(512 * 1024, 512 * 1024)  # no int64 overflow at the longest contexts
    assert int(big) == 512 * 1024 * (512 * 1024 + 1) // 2


@given(q_len=st.integers(1, 300), extra=st.integers(0, 300), window=windows,
       tile=st.sampled_from([(16, 16), (32, 16), (64, 64)]))
def test_tile_count_equals_enumeration(q_len, extra, window, tile):
    kv_len = q_len + extra
    assert int(tile_count(q_len, kv_len, window, *tile)) == brute_tiles(q_len, kv_len, window, *tile)


def test_tile_model_charges_short_shards_and_windows_more_than_pairs():
    m = CostModel(mode="tiles", per_task_s=0.0)
    pairs = CostModel(mode="pairs")
    # 16-token shards touch whole 128×128 tiles: far more time per pair than one big task.
    small = m.time_s(16, 4096) / pairs.time_s(16, 4096)
    large = m.time_s(4096, 4096) / pairs.time_s(4096, 4096)
    assert small > 5 * large
    # A 64-key window costs ~tokens × window, not tokens²; with 128-wide tiles each query tile
    # touches two key tiles, so it costs 4× its pair count would say, still ~16× below full.
    windowed = float(m.time_s(8192, 8192, 64) / m.time_s(8192, 8192))
    assert windowed == pytest.approx((1 + 63 * 2) / (64 * 65 / 2))  # the first query tile sees one key tile
    assert float(m.time_s(0, 10)) == 0.0


def _synthetic_table(coef_fwd, coef_bwd) -> CalibrationTable:
    rng = np.random.default_rng(0)
    entries = []
    for q in (64, 128, 256, 1024, 2048):
        for extra in (0, 512, 4096):
            for w in (-1, 128):
                feats = task_features(q, q + extra, w)
                noise = 1 + 0.01 * rng.standard_normal(2)
                entries.append(dict(q_len=q, kv_len=q + extra, window=w, fwd_s=float(feats @ coef_fwd * noise[0]),
                                    bwd_s=float(feats @ coef_bwd * noise[1])))
    return CalibrationTable("sdpa", "cpu", "float32", 8, 2, 64, entries=entries)


def test_calibrated_model_recovers_a_known_cost_law(tmp_path):
    truth_f = np.array([2e-5, 0.0, 3e-10, 1e-8, 2e-10])
    truth_b = np.array([5e-5, 1e-10, 5e-10, 0.0, 0.0])
    table = _synthetic_table(truth_f, truth_b)
    path = tmp_path / "cal.json"
    table.save(path)
    model = CostModel.from_table(CalibrationTable.load(path))
    for e in table.entries:
        pred = model.time_s(e["q_len"], e["kv_len"], e["window"], "fwd")
        assert abs(pred / e["fwd_s"] - 1) < 0.05
        pred = model.time_s(e["q_len"], e["kv_len"], e["window"], "bwd")
        assert abs(pred / e["bwd_s"] - 1) < 0.05
    # Costing twice the heads doubles compute but not the per-task overhead.
    wide = CostModel.from_table(table, AttentionShape(16, 4, 64))
    ratio = wide.time_s(2048, 6144, -1) / model.time_s(2048, 6144, -1)
    assert 1.8 < float(ratio) < 2.0


def test_calibration_table_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"backend": "sdpa", "device": "cpu", "dtype": "float32", "n_heads": 8,
                               "n_kv_heads": 2, "head_dim": 64, "entries": [], "colour": "red"}))
    with pytest.raises(CalibrationError, match=r"unknown keys \['colour'\]"):
        CalibrationTable.load(bad)
    with pytest.raises(CalibrationError, match="lacks"):
        CalibrationTable("sdpa", "cpu", "float32", 8, 2, 64, entries=[{"q_len": 4, "kv_len": 4, "window": -1}])
    with pytest.raises(CalibrationError, match="needs >= 5 entries"):
        CostModel.from_table(CalibrationTable("sdpa", "cpu", "float32", 8, 2, 64))
    with pytest.raises(CalibrationError, match="cannot read"):
        CalibrationTable.load(tmp_path / "missing.json")


def test_attention_shape_bytes():
    s = AttentionShape(32, 8, 128, 2)
    assert int(s.q_bytes(1)) == 32 * 128 * 2
    assert int(s.kv_bytes(1)) == 2 * 8 * 128 * 2
    assert int(s.lse_bytes(10)) == 10 * 32 * 4
    with pytest.raises(ValueError, match="multiple"):
        AttentionShape(32, 5)
