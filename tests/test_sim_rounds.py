"""Pool per-round costs: the fit recovers known constants, and the step model charges rounds x cost."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distca.config import ModelConfig
from distca.sim.calibrate import POOL_FIELDS, average_hardware, fit_round_costs, round_fields
from distca.sim.hardware import Hardware, Link
from distca.sim.step import MicroBatch, Parallelism, SimOptions, simulate_step

CFG = ModelConfig(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=64)


def test_fit_recovers_synthetic_constants():
    rows = np.array([128, 512, 2048, 8192, 128, 512, 2048, 8192])
    noise = np.random.default_rng(0).normal(0, 1e-6, rows.size)
    fixed, per_row = fit_round_costs(rows, 4e-4 + 2.5e-6 * rows + noise)
    assert fixed == pytest.approx(4e-4, rel=0.02)
    assert per_row == pytest.approx(2.5e-6, rel=0.01)


def test_fit_clamps_at_zero_and_handles_one_size():
    fixed, per_row = fit_round_costs([100, 1000], [-1e-4 + 1e-6 * 100, -1e-4 + 1e-6 * 1000])
    assert fixed == 0.0 and per_row > 0
    assert fit_round_costs([100, 1000], [2e-3, 1e-3]) == (pytest.approx(1.5e-3), 0.0)
    assert fit_round_costs([256, 256], [1e-3, 3e-3]) == (pytest.approx(2e-3), 0.0)


def test_round_fields_name_every_hardware_field():
    fit = {f"{s}_{w}": (1.0, 2.0) for s in ("server", "trainer") for w in ("fwd", "bwd")}
    f = round_fields(fit)
    assert set(f) == set(POOL_FIELDS) and set(POOL_FIELDS) <= set(Hardware.__dataclass_fields__)
    avg = average_hardware([dataclasses.replace(_hw(), **f), _hw()])
    assert avg.pool_server_fwd_s == 0.5 and avg.pool_trainer_bwd_row_s == 1.0


def _hw(**kw) -> Hardware:
    link = Link(1e30, 0.0)  # communication free: only compute and the round costs count
    return Hardware("t", linear_flops=1e30, attention_flops=1e30, intra=link, inter=link, p2p=link,
                    devices_per_node=1 << 20, **kw)


def _step(hw: Hardware, pingpong: bool = False, pool_rounds: bool = True) -> float:
    par = Parallelism(pp=1, dp=1, micro_batches=1)
    opt = SimOptions(system="cad", server_streams=True, servers="all", pingpong=pingpong, pool_rounds=pool_rounds)
    return simulate_step(CFG, hw, par, opt, [MicroBatch.whole([[256]])]).step_s


@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("side", ["server", "trainer"])
def test_fixed_round_cost_adds_rounds_times_cost(side, pingpong):
    base = _step(_hw(), pingpong)
    c_f, c_b = 1e-3, 3e-3
    hw = _hw(**{f"pool_{side}_fwd_s": c_f, f"pool_{side}_bwd_s": c_b})
    rounds = CFG.n_layers * (2 if pingpong else 1)  # one round per layer and nano-batch, each pass
    assert _step(hw, pingpong) - base == pytest.approx(rounds * (c_f + c_b), rel=1e-6)
    assert _step(hw, pingpong, pool_rounds=False) == pytest.approx(base)


def test_per_row_cost_scales_with_rows():
    base = _step(_hw())
    hw = _hw(pool_server_fwd_row_s=1e-6)
    # one trainer, one server: the server receives the 256 q rows and 256 k/v rows each round
    assert _step(hw) - base == pytest.approx(CFG.n_layers * 512 * 1e-6, rel=1e-6)
