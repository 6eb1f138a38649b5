"""The simulator's pooled tick-aligned pipeline schedule, its idle share and prefetched plans (issue 14)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distca.config import ModelConfig
from distca.sim import Hardware, Link, MicroBatch, Parallelism, SimOptions, simulate_step
from distca.sim.step import _Builder, peak_in_flight, pipeline_order, pooled_ticks

TINY = ModelConfig(n_layers=4, hidden=256, n_heads=8, n_kv_heads=2, ffn_hidden=688, vocab_size=256)


def _hw(**kw):
    base = dict(name="test", linear_flops=1e12, attention_flops=1e12, intra=Link(1e11, 1e-6), inter=Link(1e10, 5e-6),
                devices_per_node=8)
    base.update(kw)
    return Hardware(**base)


@pytest.mark.parametrize("pp,m", [(1, 1), (1, 3), (2, 1), (2, 4), (3, 2), (4, 8)])
def test_pooled_ticks_pair_up_respect_dependencies_and_run_everything(pp, m):
    ticks = pooled_ticks(pp, m)
    assert len(ticks) == 2 * (m + 2 * pp - 2)  # K = M + 2P - 2 pairs
    assert [ph for ph, _ in ticks] == ["F", "B"] * (m + 2 * pp - 2)
    at = {}
    for t, (phase, active) in enumerate(ticks):
        for s, mb in active.items():
            assert (phase, s, mb) not in at
            at[(phase, s, mb)] = t
    for s in range(pp):  # every stage: M forwards and M backwards, each exactly once
        assert sorted(mb for (ph, st, mb) in at if st == s and ph == "F") == list(range(m))
        assert sorted(mb for (ph, st, mb) in at if st == s and ph == "B") == list(range(m))
        for mb in range(m):
            assert at[("F", s, mb)] // 2 == mb + s and at[("B", s, mb)] // 2 == mb + 2 * (pp - 1) - s
            assert at[("F", s, mb)] < at[("B", s, mb)]
            if s > 0:  # a forward moves to the next stage at the next F tick
                assert at[("F", s, mb)] == at[("F", s - 1, mb)] + 2
            if s < pp - 1:  # a backward comes back one B tick later
                assert at[("B", s, mb)] == at[("B", s + 1, mb)] + 2
    assert peak_in_flight("pooled", pp, m) == [min(2 * (pp - 1 - s) + 1, m) for s in range(pp)]
    assert peak_in_flight("1f1b", pp, m) == [min(pp - s, m) for s in range(pp)]
    assert all(len(pipeline_order(s, pp, m)) == 2 * m for s in range(pp))


def _micro(tokens, docs):
    """One micro-batch over two replicas of ``tokens`` each, documents of ``docs`` tokens (split at the
    replicas' boundary when they cross it)."""
    from distca.data.packing import pack_into_ranks

    p = pack_into_ranks(np.asarray(docs, dtype=np.int64), 2, tokens)
    return MicroBatch(p.ranks, p.continues)


def test_pooled_plan_is_never_worse_balanced_than_per_stage_plans():
    heavy, light = _micro(2048, [4096]), _micro(2048, [256] * 16)  # one long document vs short ones
    par = Parallelism(pp=2, dp=2, micro_batches=2)
    pooled = _Builder(TINY, _hw(), par, SimOptions(system="cad", schedule="pooled"), [heavy, light])
    per_stage = _Builder(TINY, _hw(), par, SimOptions(system="cad"), [heavy, light])
    for b in (pooled, per_stage):
        b._plan_cache, b._halves_cache = {}, {}
    both = pooled._pooled_plans("F", {0: 1, 1: 0})[0]["srv"][(-1, "fwd")]  # stage 1 holds the heavy one
    alone = [per_stage._plans(s, m)[0]["srv"][(-1, "fwd")] for s, m in ((0, 1), (1, 0))]
    assert both.shape == (4,) and all(a.shape == (2,) for a in alone)
    assert math.isclose(both.sum(), sum(a.sum() for a in alone), rel_tol=0.05)  # the same work, spread wider
    assert both.max() <= max(a.max() for a in alone)
    assert both.max() < 0.75 * max(a.max() for a in alone)
    # a warm-up tick: stage 1 has no micro-batch, its devices serve stage 0's attention all the same
    warm = pooled._pooled_plans("F", {0: 0})[0]["srv"][(-1, "fwd")]
    assert warm[2] > 0 and warm[3] > 0 and warm.max() <= 1.1 * warm.mean() + 1e-12


def test_pooled_without_a_pipeline_is_1f1b_and_options_are_checked():
    mbs = [_micro(1024, [1500, 300, 248]), _micro(1024, [2048])]
    par = Parallelism(pp=1, dp=2, micro_batches=2)
    a = simulate_step(TINY, _hw(), par, SimOptions(system="cad", pingpong=True), mbs)
    b = simulate_step(TINY, _hw(), par, SimOptions(system="cad", pingpong=True, schedule="pooled"), mbs)
    assert math.isclose(a.step_s, b.step_s, rel_tol=1e-12)
    with pytest.raises(ValueError, match="system='cad'"):
        SimOptions(system="colocated", schedule="pooled")
    with pytest.raises(ValueError, match="pooled schedule only"):
        SimOptions(idle_aware=True)
    with pytest.raises(ValueError, match="schedule"):
        SimOptions(schedule="gpipe")


def test_idle_share_counts_serving_attention_as_busy():
    # one device, CAD over a separate server process: the trainer's stream never runs attention, the
    # server's does; the device is busy while either computes
    mb = MicroBatch([[2048]], [False])
    rep = simulate_step(TINY, _hw(), Parallelism(), SimOptions(system="cad", server_streams=True, servers="all"), [mb])
    trainer = sum(v for k, v in rep.per_device[0].items() if k in ("linear", "optimizer"))
    served = rep.servers[0]["attention"]
    assert served > 0 and math.isclose(rep.busy_union_s[0], trainer + served, rel_tol=1e-9)
    assert 0 <= rep.idle_fraction < 1 - trainer / rep.step_s
    # pooled, PP = 2: in warm-up/cool-down ticks the idle stage's devices serve, so every device's busy
    # time exceeds its own linear work, and the pooled step idles less than 1F1B's
    mbs = [_micro(2048, [4096]), _micro(2048, [1024] * 4), _micro(2048, [3000, 1096]), _micro(2048, [4096])]
    par = Parallelism(pp=2, dp=2, micro_batches=4)
    hw = _hw(attention_flops=2e11)
    one = simulate_step(TINY, hw, par, SimOptions(system="cad", pingpong=True), mbs)
    pooled = simulate_step(TINY, hw, par, SimOptions(system="cad", pingpong=True, schedule="pooled"), mbs)
    for d, busy in enumerate(pooled.busy_union_s):
        own = pooled.per_device[d].get("linear", 0.0) + pooled.per_device[d].get("optimizer", 0.0)
        assert busy > own
    assert pooled.idle_fraction < one.idle_fraction
    assert pooled.idle_split_s["partial"] > 0 and set(pooled.idle_split_s) == {"full", "partial", "tail"}
    assert pooled.in_flight == [3, 1] and one.in_flight == [2, 1]
    aware = simulate_step(TINY, hw, par, SimOptions(system="cad", pingpong=True, schedule="pooled",
                                                    idle_aware=True), mbs)
    assert aware.step_s > 0 and math.isclose(sum(aware.busy_union_s), sum(pooled.busy_union_s), rel_tol=0.05)


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8)])
def test_deferred_weight_gradients_move_linear_work_into_serving_ticks(pp, m):
    """``defer_wgrad``: the same linear work per device (half of each deferred backward's moves to a tick the stage
    only serves in, or on 1F1B to after the stage's last backward), a shorter step, and on the pooled ticks less
    idle time in the warm-up/cool-down ticks."""
    from distca.train.schedule import weight_grad_plan

    mbs = [_micro(2048, [4096]), _micro(2048, [1024] * 4), _micro(2048, [3000, 1096]), _micro(2048, [4096])] * (m // 4)
    cfg = ModelConfig(**{**TINY.__dict__, "n_layers": 8})
    par = Parallelism(pp=pp, dp=2, micro_batches=m)
    hw = _hw(attention_flops=2e11, linear_flops=2e11)
    pooled = simulate_step(cfg, hw, par, SimOptions(system="cad", schedule="pooled"), mbs)
    deferred = simulate_step(cfg, hw, par, SimOptions(system="cad", schedule="pooled", defer_wgrad=True), mbs)
    assert any(weight_grad_plan(pp, m).defer)
    for d in range(len(pooled.per_device)):
        assert math.isclose(deferred.per_device[d]["linear"], pooled.per_device[d]["linear"], rel_tol=1e-9)
    assert deferred.step_s < pooled.step_s
    assert deferred.idle_split_s["partial"] < pooled.idle_split_s["partial"]
    # 1F1B (CAD and colocated attention): stage s's last s backward passes keep theirs for after its last backward
    for system in ("cad", "colocated"):
        one = simulate_step(cfg, hw, par, SimOptions(system=system), mbs)
        kept = simulate_step(cfg, hw, par, SimOptions(system=system, defer_wgrad=True), mbs)
        for d in range(len(one.per_device)):
            assert math.isclose(kept.per_device[d]["linear"], one.per_device[d]["linear"], rel_tol=1e-9)
        assert kept.step_s < one.step_s, system


@pytest.mark.parametrize("schedule", ["pooled", "1f1b"])
def test_a_balanced_split_moves_blocks_off_the_stage_with_the_lm_head(schedule):
    """``stage_split="balanced"`` with a head worth 1.5 blocks (a 4K vocabulary on a small model): the last stage
    holds fewer blocks, every device does the same linear work in total as with the even split (moved
    between stages, not lost: the head's forward and backward too), and the step is shorter. Pooled: the last
    stage computes its head between the rounds of the positions it has no block at, and every stage's blocks
    are still in rounds with everyone's."""
    from distca.config import stage_blocks

    cfg = ModelConfig(**{**TINY.__dict__, "n_layers": 8, "vocab_size": 4096})
    assert stage_blocks(cfg, 2, "balanced") == (5, 3)
    mbs = [_micro(2048, [4096]), _micro(2048, [1024] * 4), _micro(2048, [3000, 1096]), _micro(2048, [4096])]
    par = Parallelism(pp=2, dp=2, micro_batches=4)
    hw = _hw(attention_flops=2e11, linear_flops=2e11)
    even = simulate_step(cfg, hw, par, SimOptions(system="cad", schedule=schedule), mbs)
    bal = simulate_step(cfg, hw, par, SimOptions(system="cad", schedule=schedule, stage_split="balanced"), mbs)
    lin = lambda r: sum(d["linear"] for d in r.per_device)  # noqa: E731
    assert math.isclose(lin(bal), lin(even), rel_tol=1e-9)
    assert bal.per_device[0]["linear"] > even.per_device[0]["linear"]  # stage 0 took blocks ...
    assert bal.per_device[-1]["linear"] < even.per_device[-1]["linear"]  # ... off the head's stage
    assert bal.step_s < even.step_s
    with pytest.raises(ValueError, match="stage_split"):
        SimOptions(stage_split="uneven")


def test_prefetched_plans_leave_the_critical_path():
    mb = MicroBatch([[2048]], [False])
    base = SimOptions(system="cad")
    t0 = simulate_step(TINY, _hw(), Parallelism(), base, [mb]).step_s
    on_path = simulate_step(TINY, _hw(), Parallelism(), SimOptions(system="cad", plan_s=0.01, prefetch_plans=False),
                            [mb]).step_s
    ahead = simulate_step(TINY, _hw(), Parallelism(), SimOptions(system="cad", plan_s=0.01), [mb]).step_s
    assert math.isclose(on_path, t0 + 0.01, rel_tol=1e-9) and math.isclose(ahead, t0, rel_tol=1e-12)
    # on a CPU host the background thread still takes its share of the cores
    cpu = _hw(cores=1.0)
    c0 = simulate_step(TINY, cpu, Parallelism(), base, [mb]).step_s
    c1 = simulate_step(TINY, cpu, Parallelism(), SimOptions(system="cad", plan_s=0.01), [mb]).step_s
    assert c0 < c1 <= c0 + 0.01 + 1e-12


def test_validation_reads_schedule_pingpong_and_prefetch_and_weights_calibrations():
    from distca.config import load_config
    from distca.sim.calibrate import average_hardware
    from distca.sim.validate import run_options

    cfg = load_config("configs/tiny-cpu.yaml", []).to_dict()
    _, _, opt = run_options(cfg, schedule_ran="1f1b")  # auto resolved as the run's records say
    assert (opt.schedule, opt.pingpong, opt.prefetch_plans) == ("1f1b", True, cfg["train"]["prefetch"])
    _, _, opt = run_options(cfg)  # auto by its rule: CAD over 2 stages on a pooling data plane
    assert opt.schedule == "pooled"
    cfg["train"].update(pipeline_schedule="pooled", pingpong=True, prefetch=False)
    _, _, opt = run_options(cfg)
    assert (opt.schedule, opt.pingpong, opt.prefetch_plans) == ("pooled", True, False)
    assert (opt.stage_split, opt.stage_blocks) == ("even", ())
    cfg["train"].update(stage_blocks=[3, 1])  # the run's split, replayed: stage 0 holds 3 of the 4 blocks
    model, par, opt = run_options(cfg)
    assert opt.stage_blocks == (3, 1) and _Builder(model, _hw(), par, opt, []).c.stage_blocks == [[0, 1, 2], [3]]
    a, b = _hw(linear_flops=1e9, cores=2.0), _hw(linear_flops=3e9, cores=1.0)
    m = average_hardware([a, b], weights=[0.75, 0.25])
    assert math.isclose(m.linear_flops, 1.5e9) and math.isclose(m.cores, 1.75)
    with pytest.raises(ValueError, match="weights"):
        average_hardware([a, b], weights=[1.0])
    # validation replays a run on each component at the faster of the calibrations around it
    from distca.sim.calibrate import fastest_hardware
    from distca.sim.hardware import Link

    a = _hw(linear_flops=1e9, cores=2.0, linear_overhead_s=2e-5, intra=Link(1e9, 5e-6), optimizer_s_per_param=1e-9)
    b = _hw(linear_flops=3e9, cores=1.0, linear_overhead_s=1e-5, intra=Link(2e9, 9e-6), optimizer_s_per_param=3e-9)
    f = fastest_hardware([a, b])
    assert (f.linear_flops, f.cores, f.linear_overhead_s, f.optimizer_s_per_param) == (3e9, 2.0, 1e-5, 1e-9)
    assert (f.intra.bandwidth, f.intra.latency_s) == (2e9, 5e-6) and f.inter == f.intra
    assert simulate_step(TINY, f, Parallelism(), SimOptions(system="cad"), [MicroBatch([[2048]], [False])]).step_s \
        <= min(simulate_step(TINY, h, Parallelism(), SimOptions(system="cad"), [MicroBatch([[2048]], [False])]).step_s
               for h in (a, b))
    with pytest.raises(ValueError, match="no calibrations"):
        fastest_hardware([])


def test_host_load_interpolates_foreign_cores():
    from distca.sim.hostload import HostLoad

    h = HostLoad()
    h.t, h.foreign_s = [0.0, 1.0, 3.0], [0.0, 0.5, 2.5]  # others: 0.5 cores, then 1 core
    assert math.isclose(h.foreign_cores(0.0, 1.0), 0.5) and math.isclose(h.foreign_cores(1.0, 3.0), 1.0)
    assert math.isclose(h.foreign_cores(0.5, 2.0), (1.5 - 0.25) / 1.5)
    assert h.foreign_cores(2.0, 2.0) == 0.0
    if HostLoad.available():
        h = HostLoad(period_s=0.05).start()
        h.sample()
        h.stop()
        assert len(h.t) >= 2 and h.foreign_s[-1] >= 0.0
