"""The end-to-end benchmark (colocated vs CAD over the ZeroMQ pool and in-place, on long-tailed synthetic
documents) runs on tiny settings and writes what the cluster simulator replays; the trainer's per-rank
measurements it relies on are sound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distca.config import load_config
from distca.data.distributions import LengthDistribution
from distca.train.data import make_source
from distca.train.metrics import SavedActivations

ROOT = Path(__file__).parent.parent
PER_RANK = ("step_s", "attn_s", "attn_cpu_s", "exchange_s", "blocked_s", "compute_s", "linear_s", "wait_s",
            "act_peak_mb", "rss_peak_mb", "stage", "dp_rank")


def test_synthetic_data_keys_reach_the_source():
    cfg = load_config(None, ["--data.source=synthetic", "--data.distribution=pretrain", "--data.n_docs=400",
                             "--data.upsample_long=4", "--data.elongate=0.25", "--data.max_len=3000"])
    lengths = make_source(cfg).lengths
    want = LengthDistribution("pretrain", upsample_long=4, elongate=0.25).sample(n_docs=400, seed=cfg.seed)
    assert np.array_equal(lengths, np.minimum(want, 3000)) and lengths.max() == 3000


def test_saved_activation_meter_counts_storages_once_and_frees_them():
    meter = SavedActivations()
    w = torch.nn.Parameter(torch.randn(64, 64))
    meter.reset([w])
    x = torch.randn(128, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        h = x @ w  # saves x (32 KiB) and w (a parameter: not counted)
        y = (h * h).sum()  # saves h twice (one storage, 32 KiB)
    assert meter.bytes == meter.peak == 2 * 128 * 64 * 4
    y.backward()
    del h, y
    assert meter.bytes == 0 and meter.peak == 2 * 128 * 64 * 4
    assert torch.allclose(x.grad, 2 * (x @ w) @ w.T)


@pytest.mark.cluster
def test_e2e_benchmark_runs_and_records_the_layouts(tmp_path):
    r = subprocess.run(
        [sys.executable, "benchmarks/e2e.py", "--steps", "2", "--dists", "pretrain", "--modes", "local", "cad-zmq",
         "cad-inplace", "--tokens-per-rank", "256", "--max-doc", "4096", "--out-dir", str(tmp_path),
         "--model.n_layers=2", "--model.hidden=64", "--model.n_heads=4", "--model.ffn_hidden=128",
         "--attention.shard_tokens=64", "--train.peak_tflops=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "cannot show a wall-clock speed-up" in out and "data plane (ran)" in out
    for mode in ("local", "cad-zmq", "cad-inplace"):
        assert f"| pretrain/{mode} " in out
        if mode != "local":
            assert f"pretrain: {mode} (ran " in out  # its ratios against local
    assert (tmp_path / "e2e.png").exists()
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert set(data) == {"info", "notes", "runs"}
    assert set(data["runs"]) == {"pretrain/local", "pretrain/cad-zmq", "pretrain/cad-inplace"}
    assert data["info"]["commit"] and data["info"]["date"]
    local, zmq, inplace = (data["runs"][f"pretrain/{m}"] for m in ("local", "cad-zmq", "cad-inplace"))
    for run, attention, plane in ((local, "local", "local"), (zmq, "cad", "zmq"), (inplace, "cad", "inplace")):
        cfg = run["config"]
        assert cfg["train"]["core_attention"] == attention and cfg["data"]["source"] == "synthetic"
        assert attention == "local" or cfg["cluster"]["data_plane"] == plane
        assert cfg["data"]["upsample_long"] == 16 and cfg["data"]["elongate"] == 4096 / 125_000
        assert [x["step"] for x in run["records"]] == [0, 1]
        assert run["summary"]["data_plane"] == plane
        for rec in run["records"]:
            assert rec["data_plane"] == plane  # what ran, as the trainers recorded it
            for key in PER_RANK:
                assert len(rec[f"{key}_per_rank"]) == 4, key
            assert rec["step_s"] == max(rec["step_s_per_rank"])
            # the layout the simulator replays: per micro-batch, DP replicas of equal token counts
            assert len(rec["micro_batches"]) == 2
            for mb in rec["micro_batches"]:
                assert len(mb["ranks"]) == 2 and [sum(p) for p in mb["ranks"]] == [256, 256]
                assert len(mb["continues"]) == 2 and mb["continues"][0] is False
    # same data in every mode, same losses (DESIGN invariant 5)
    for cad in (zmq, inplace):
        assert [x["micro_batches"] for x in local["records"]] == [x["micro_batches"] for x in cad["records"]]
        for a, b in zip(local["records"], cad["records"], strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    # local: the kernel ran on the trainers; CAD over the pool: on the servers, the trainers only waited for it
    assert all(x > 0 for x in local["records"][-1]["attn_cpu_s_per_rank"])
    assert all(x == 0 for x in zmq["records"][-1]["attn_cpu_s_per_rank"])
    assert len(zmq["records"][-1]["server_busy_s"]) == 4 and sum(zmq["records"][-1]["server_busy_s"]) > 0
    # in-place: no pool; every trainer's own server did attention work, and the trainer spent time in attention
    for rec in inplace["records"]:
        assert len(rec["server_busy_s"]) == 4 and all(b > 0 for b in rec["server_busy_s"])
        assert all(a > 0 for a in rec["attn_s_per_rank"])
    # CAD: the replicas of a stage hold the same tokens and the same saved tensors
    assert zmq["summary"]["act_peak_max_over_min_within_stage"] <= 1.05
