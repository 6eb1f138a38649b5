"""Pipeline stages with unequal numbers of blocks (``train.stage_blocks`` / ``stage_split``) on a real simulated
cluster: PP=2 × DP=2 trainers, a 3-block model.

DeepSpeed builds each stage from the given boundaries. Under the pooled schedule, block position 1 exists on one
stage only: its rounds have plans of their own over that stage's rows. In place, the stage without a block there
serves those rounds on a thread of its own, after its blocks' forward and before their backward, beside the rest
of its work (the LM head on the last stage); on the pool's data planes it simply sends nothing (that run is in
``test_train.py``, on its module's running pool). Every split is the same math: the loss equals colocated
attention's at every step."""

from __future__ import annotations

import pytest
from test_train import SHORT, assert_same_curve, tiny

from distca.train.launch import train

pytestmark = pytest.mark.cluster

THREE = {"model.n_layers": 3, "train.steps": SHORT}


@pytest.fixture(scope="module")
def local3(tmp_path_factory):
    """Colocated attention on DeepSpeed's 1F1B, the even split (2 blocks, then 1)."""
    cfg = tiny(tmp_path_factory.mktemp("local3"), **THREE, **{"train.core_attention": "local"})
    return cfg, train(cfg)


def _check(res, cfg, blocks):
    assert [r["step"] for r in res.records] == list(range(SHORT))
    assert {r["pipeline_schedule"] for r in res.records} == {"pooled"}
    assert all(r["plan_trainers"] == cfg.cluster.n_trainers for r in res.records)
    assert cfg.stage_blocks() == blocks


def test_the_even_split_of_three_blocks_is_unequal_and_learns(local3):
    cfg, res = local3
    assert cfg.stage_blocks() == (2, 1)
    assert len(set(res.losses)) > SHORT // 2, "the loss must move, or parity proves nothing"


@pytest.fixture(scope="module")
def short_first(tmp_path_factory):
    """CAD in place, pooled ticks with ping-pong, split 1/2, a checkpoint every 4 steps."""
    cfg = tiny(tmp_path_factory.mktemp("short_first"), **THREE,
               **{"train.core_attention": "cad", "cluster.data_plane": "inplace", "train.stage_blocks": [1, 2],
                  "train.checkpoint_every": 4})
    return cfg, train(cfg)


def test_in_place_a_short_first_stage_serves_the_later_positions_rounds(local3, short_first):
    """Split 1/2 with ping-pong: stage 0 has no block at position 1, so in every tick it computes in while stage 1
    does too, it serves that position's two rounds (one per nano-batch) on its thread: forward after its block,
    backward before. (In place every round is an all-to-all of all four ranks: had stage 0 not served them, the
    run would have stopped at its first such tick.)"""
    _, local = local3
    cfg, res = short_first
    _check(res, cfg, (1, 2))
    assert all(r["pingpong"] for r in res.records)
    assert_same_curve(local.losses, res.losses)


def test_a_resume_continues_exactly_and_refuses_other_stages(short_first, tmp_path):
    """Resumed from the step-4 checkpoint, the 1/2 run continues bit for bit; asked to resume with the stages split
    2/1, the run stops before anything starts, naming both layouts (each rank's optimizer partition holds its own
    stage's parameters)."""
    import shutil
    from pathlib import Path

    from distca.errors import ConfigError

    cfg, straight = short_first
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(Path(cfg.output_dir) / "checkpoints", ckpt)
    (ckpt / "latest").write_text("step00000004")
    over = {**THREE, "train.core_attention": "cad", "cluster.data_plane": "inplace", "train.resume": True,
            "train.checkpoint_dir": str(ckpt), "train.checkpoint_at_end": False}
    with pytest.raises(ConfigError, match=r"holding \[1, 2\] blocks; this run's stages hold \[2, 1\]"):
        train(tiny(tmp_path / "other", **over))
    resumed = train(tiny(tmp_path, **over, **{"train.stage_blocks": [1, 2]}))
    assert (resumed.start_step, resumed.end_step) == (4, SHORT)
    assert resumed.losses == straight.losses[4:]  # bit for bit


def test_in_place_a_short_last_stage_runs_its_head_beside_the_rounds_with_checkpointing(local3, tmp_path):
    """Split 2/1 without ping-pong, with activation checkpointing and deferred weight gradients: the last stage
    serves position 1's forward round while it computes the head and the loss, and position 1's recomputed forward
    and backward rounds while it computes the head's backward."""
    _, local = local3
    cfg = tiny(tmp_path, **THREE, **{"train.core_attention": "cad", "cluster.data_plane": "inplace",
                                     "train.pipeline_schedule": "pooled", "train.activation_checkpointing": True,
                                     "train.pingpong": False, "train.defer_weight_grads": True,
                                     "train.stage_blocks": [2, 1]})
    res = train(cfg)
    _check(res, cfg, (2, 1))
    assert_same_curve(local.losses, res.losses)
    assert all(sum(r["weight_grads_deferred_per_rank"]) > 0 for r in res.records)
