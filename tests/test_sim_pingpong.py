"""Ping-pong as the trainer runs it: nano-batches cut by query rows keep every document's attention, and the
runner's own calibrated per-row work is charged per block; GPU figures are untouched by either."""

from __future__ import annotations

import math

import pytest
import torch

from distca.config import ModelConfig
from distca.sim.calibrate import PINGPONG_FIELDS, average_hardware, measure_pingpong
from distca.sim.hardware import MEASURED_H200, Hardware, Link
from distca.sim.step import MicroBatch, Parallelism, SimOptions, simulate_step
from distca.sim.validate import run_options

CFG = ModelConfig(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=64)


def _hw(**kw) -> Hardware:
    link = Link(1e30, 0.0)  # communication free: only compute counts
    return Hardware("t", linear_flops=1e9, attention_flops=1e9, intra=link, inter=link, p2p=link,
                    devices_per_node=1 << 20, **kw)


# one 2048-token document over two replicas: its second half's queries see the first half's keys
LONG = MicroBatch([[1024], [1024]], [False, True])


def _step(hw: Hardware, pingpong: bool, split: str = "rows", schedule: str = "1f1b", pp: int = 1):
    par = Parallelism(pp=pp, dp=2, micro_batches=2 if pp > 1 else 1)
    opt = SimOptions(system="cad", server_streams=True, servers="all", pingpong=pingpong, nano_split=split,
                     schedule=schedule)
    return simulate_step(CFG, hw, par, opt, [LONG] * par.micro_batches)


def _server_attention(rep) -> float:
    return sum(s.get("attention", 0.0) for s in rep.servers)


@pytest.mark.parametrize("schedule,pp", [("1f1b", 1), ("pooled", 2)])
def test_row_split_keeps_all_attention_repack_loses_the_cut(schedule, pp):
    hw = _hw()
    whole = _server_attention(_step(hw, False, schedule=schedule, pp=pp))
    rows = _server_attention(_step(hw, True, "rows", schedule, pp))
    repack = _server_attention(_step(hw, True, "repack", schedule, pp))
    assert rows == pytest.approx(whole, rel=1e-9)  # a partition of the queries: the same (q, k) pairs
    assert repack < 0.6 * whole  # the document cut in two at the halves: about half of its pairs


def test_pingpong_runner_cost_is_rows_times_blocks_per_pass():
    f, b = 2e-6, 5e-6
    base = _step(_hw(), True)
    got = _step(_hw(pingpong_fwd_row_s=f, pingpong_bwd_row_s=b), True)
    for d in range(2):  # each trainer: 1024 rows, every block, forward and backward
        extra = got.per_device[d]["linear"] - base.per_device[d]["linear"]
        assert extra == pytest.approx(1024 * CFG.n_layers * (f + b), rel=1e-9)
    # without ping-pong the runner is not used: nothing charged
    assert _step(_hw(pingpong_fwd_row_s=f, pingpong_bwd_row_s=b), False).step_s == \
        pytest.approx(_step(_hw(), False).step_s)


def test_gpu_figures_and_defaults_are_unchanged():
    hw = Hardware.load(MEASURED_H200)
    assert all(getattr(hw, k) == 0.0 for k in PINGPONG_FIELDS)
    assert math.isinf(hw.cores)
    assert SimOptions().nano_split == "repack"  # the paper's driver, as the GPU-scale grid predicts it
    with pytest.raises(ValueError, match="nano_split"):
        SimOptions(nano_split="halves")


def test_validation_replays_the_trainers_split():
    cfg = {"model": {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
                     "vocab_size": 64},
           "train": {"pipeline_parallel": 2, "micro_batches": 2, "core_attention": "cad", "precision": "fp32",
                     "pingpong": True, "pipeline_schedule": "pooled"},
           "cluster": {"n_trainers": 4, "n_servers": 4, "data_plane": "zmq"},
           "scheduler": {"eps": 0.02}, "attention": {"shard_tokens": 128}}
    _, _, opt = run_options(cfg)
    assert opt.pingpong and opt.nano_split == "rows" and opt.schedule == "pooled"


def test_average_hardware_averages_pingpong_costs():
    a = average_hardware([_hw(pingpong_bwd_row_s=2e-6), _hw(pingpong_bwd_row_s=4e-6)])
    assert a.pingpong_bwd_row_s == pytest.approx(3e-6)


def test_measure_pingpong_smoke():
    out = measure_pingpong(CFG, 128, torch.float32, reps=2)
    assert out["tokens"] == 128
    assert all(out[k] >= 0.0 for k in PINGPONG_FIELDS)
    assert out["plain_block_fwd_s"] > 0 and out["pingpong_block_fwd_s"] > 0
