"""Training with a per-layer mask pattern on a real simulated cluster (PP=2 × DP=2, gloo, in-place attention
servers): gpt-oss-style sink + window layers alternating with Llama-4-style chunked layers. CAD (every trainer
serves every tick's rectangles, pooled ticks, ping-pong nano-batches) trains exactly like the colocated baseline,
whose group-local attention gathers each family's exact keys across rank boundaries."""

from __future__ import annotations

import pytest

from distca.masks import Mask
from distca.train.launch import train
from tests.test_train import STEPS, assert_same_curve, tiny

pytestmark = pytest.mark.cluster

PATTERN = ["sink_window:4:48", "chunked:96"]
OVER = {"model.n_layers": 4, "model.layer_masks": f"[{', '.join(PATTERN)}]"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    local = tiny(tmp_path_factory.mktemp("masks-local"), **OVER, **{"train.core_attention": "local"})
    cad = tiny(tmp_path_factory.mktemp("masks-cad"), **OVER, **{"train.core_attention": "cad",
                                                                 "cluster.data_plane": "inplace"})
    return (local, train(local)), (cad, train(cad))


def test_a_per_layer_mask_pattern_trains_with_cad_exactly_like_local_attention(runs):
    (_, local), (cad_cfg, cad) = runs
    assert [b for block in cad_cfg.model.block_windows() for b in block] == [
        Mask.sink_window(4, 48), Mask.chunked(96), Mask.sink_window(4, 48), Mask.chunked(96)]
    assert [r["step"] for r in cad.records] == list(range(STEPS))
    assert len(set(local.losses)) > STEPS // 2, "the loss must move, or parity proves nothing"
    assert_same_curve(local.losses, cad.losses)
    assert {r["data_plane"] for r in cad.records} == {"inplace"}
    assert {r["pipeline_schedule"] for r in cad.records} == {"pooled"} and all(r["pingpong"] for r in cad.records)
    assert max(r["attn_load_max_over_mean_planned"] for r in cad.records) < 1.1
