"""``train.nano_split: repack`` on the simulated cluster (PP=2 × DP=2, gloo, the module's pool over a local Ray):
each micro-batch packed as two independent halves, so each ping-pong nano-batch is planned on its own rows and its
round starts right after its own pre-attention work (:mod:`distca.runtime.nano`).

The packing differs from ``rows``' (a document cut at the half restarts), so the reference is colocated attention
on the same packing: CAD equals it at every step with ping-pong on the pooled ticks in place (with activation
checkpointing), with ping-pong on DeepSpeed's 1F1B over the pool, and without ping-pong (one plan over both halves
side by side) on the pooled ticks in place."""

from __future__ import annotations

import pytest
from test_train import assert_same_curve, run, shared_pools, tiny

from distca.train.launch import train

pytestmark = pytest.mark.cluster

STEPS = 6
REPACK = {"train.nano_split": "repack", "train.steps": STEPS}


@pytest.fixture(scope="module")
def pools():
    yield from shared_pools()


@pytest.fixture(scope="module")
def local_repack(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("local-repack"), **REPACK, **{"train.core_attention": "local"})
    return cfg, train(cfg)


def test_repacked_halves_are_what_the_runs_trained_on(local_repack):
    """Every recorded micro-batch is two halves of 128 tokens per rank, and documents continue across ranks inside a
    half (so the local reference borrows keys and CAD plans move them)."""
    cfg, res = local_repack
    assert len(res.losses) == STEPS
    assert len(set(res.losses)) > STEPS // 2, "the loss must move, or parity proves nothing"
    for r in res.records:
        for mb in r["micro_batches"]:
            assert len(mb["parts"]) == 2
            assert all(sum(p) == cfg.train.tokens_per_rank // 2 for part in mb["parts"] for p in part["ranks"])
    assert any(any(part["continues"]) for r in res.records for mb in r["micro_batches"] for part in mb["parts"])


@pytest.mark.parametrize("case", [
    {"cluster.data_plane": "inplace", "train.pipeline_schedule": "pooled", "train.activation_checkpointing": True},
    {"cluster.data_plane": "shm", "train.pipeline_schedule": "1f1b"},
    {"cluster.data_plane": "inplace", "train.pipeline_schedule": "pooled", "train.pingpong": False},
], ids=["pooled-inplace-pingpong-ckpt", "1f1b-pool-pingpong", "pooled-inplace-no-pingpong"])
def test_cad_on_repacked_halves_matches_local_every_step(local_repack, pools, tmp_path, case):
    _, local = local_repack
    cfg = tiny(tmp_path, **REPACK, **{"train.core_attention": "cad", **case})
    res = run(cfg, pools)
    pingpong = case.get("train.pingpong", True)
    assert {r["pingpong"] for r in res.records} == {pingpong}
    assert {r["pipeline_schedule"] for r in res.records} == {case["train.pipeline_schedule"]}
    assert_same_curve(local.losses, res.losses)
    assert max(r["attn_load_max_over_mean_planned"] for r in res.records) < 1.1
    if case["train.pipeline_schedule"] == "pooled":  # every rank ran each tick's one call as one round per half,
        for r in res.records:                         # ping-pong or not
            for tl in r["timeline_per_rank"]:
                assert {e[6] for e in tl if e[1] != "-" and e[2] != "idle"} == {2}
