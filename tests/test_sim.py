"""The cluster simulator: event engine semantics, step model invariants, predictions and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from distca.config import ModelConfig
from distca.sim import (
    Hardware,
    Link,
    MicroBatch,
    Parallelism,
    SimOptions,
    TaskGraph,
    published,
    simulate,
    simulate_step,
)
from distca.sim.engine import DeadlockError
from distca.sim.predict import GridPoint, K, predict_point
from distca.sim.step import pipeline_order
from distca.sim.workload import plain_packing, sample_documents, wlb_packing

TINY = ModelConfig(n_layers=4, hidden=256, n_heads=8, n_kv_heads=2, ffn_hidden=688, vocab_size=256)


# -- engine ---------------------------------------------------------------------------------------
def test_ordered_stream_and_cross_dependencies():
    g = TaskGraph()
    a, b = g.stream("a"), g.stream("b")
    t1 = g.add(a, 1.0, "x")
    t2 = g.add(b, 2.0, "y", (t1,))
    t3 = g.add(a, 0.5, "x")  # runs while t2 runs
    t4 = g.add(a, 1.0, "x", (t2,))
    res = simulate(g)
    assert res.tasks[t2].start == 1.0 and res.tasks[t3].start == 1.0
    assert res.tasks[t4].start == 3.0 and res.makespan_s == 4.0
    assert res.busy("a") == 2.5 and res.busy("b", ("y",)) == 2.0


def test_fifo_stream_serves_in_arrival_order():
    g = TaskGraph()
    a, b, srv = g.stream("a"), g.stream("b"), g.stream("srv", ordered=False)
    late = g.add(a, 2.0, "x")
    early = g.add(b, 1.0, "x")
    s_late = g.add(srv, 1.0, "serve", (late,))  # added first, but ready later
    s_early = g.add(srv, 1.0, "serve", (early,))
    res = simulate(g)
    assert res.tasks[s_early].start == 1.0
    assert res.tasks[s_late].start == 2.0


def test_processor_sharing_slows_core_tasks_not_communication():
    g = TaskGraph()
    for i in range(3):
        g.add(g.stream(f"s{i}"), 1.0, "x")
    comm = g.add(g.stream("net"), 1.0, "comm", uses_core=False)
    res = simulate(g, cores=2)
    assert math.isclose(res.makespan_s, 1.5)  # 3 core-seconds on 2 cores
    assert math.isclose(res.tasks[comm].end, 1.0)
    assert math.isclose(simulate(g).makespan_s, 1.0)


def test_deadlock_and_bad_work_are_reported():
    g = TaskGraph()
    a, b = g.stream("a"), g.stream("b")
    x = g.add(a, 1.0, "x")
    g.tasks[x].deps = (1,)
    g.add(b, 1.0, "y", (x,))
    with pytest.raises(DeadlockError, match="never ran"):
        simulate(g)
    with pytest.raises(ValueError, match="work"):
        g.add(a, float("nan"), "x")


# -- step model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pp,m", [(1, 1), (2, 4), (4, 3), (4, 8)])
def test_pipeline_order_is_1f1b(pp, m):
    for s in range(pp):
        order = pipeline_order(s, pp, m)
        assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        assert all(order.index(("F", i)) < order.index(("B", i)) for i in range(m))
        in_flight = max(sum(1 for k, _ in order[:j + 1] if k == "F") - sum(1 for k, _ in order[:j + 1] if k == "B")
                        for j in range(len(order)))
        assert in_flight == min(pp - s, m)


def _hw(**kw):
    base = dict(name="test", linear_flops=1e12, attention_flops=1e12, intra=Link(1e11, 1e-6), inter=Link(1e10, 5e-6),
                devices_per_node=8)
    base.update(kw)
    return Hardware(**base)


# Hand-counted for TINY (d = 256, 8 query heads and 2 kv heads of 32, ffn 688, vocab 256, 4 layers):
#   weights per block: q and o 256·256 = 65,536 each, k and v 256·64 = 16,384 each → attention 163,840;
#   MLP 3·256·688 = 528,384; DDL adds two gate vectors per residual update, 2·2·256 = 1,024.
#   W (weights per token) = 4 blocks · per block + LM head 256·256 = 65,536.
#   pairs of a 1024-token document: full causal 1024·1025/2 = 524,800; window 128:
#   128·129/2 + (1024 - 128)·128 = 8,256 + 114,688 = 122,944. Two such documents per attention call.
@pytest.mark.parametrize(("variant", "weights", "pairs"), [
    # 4·(163,840 + 528,384) + 65,536; 4 full calls · 2 · 524,800
    ({}, 2_834_432, 4_198_400),
    # a windowed sublayer before every full one: 4·(2·163,840 + 528,384) + 65,536; 4 · 2 · (524,800 + 122,944)
    ({"residual": "shortswa", "shortswa_window": 128}, 3_489_792, 5_181_952),
    # every 2nd layer windowed instead: the standard weights; 2 · 2 · 524,800 + 2 · 2 · 122,944
    ({"residual": "shortswa", "shortswa_window": 128, "shortswa_every": 2}, 2_834_432, 2_590_976),
    # 4·(692,224 + 1,024) + 65,536; as standard
    ({"residual": "ddl"}, 2_838_528, 4_198_400),
])
def test_single_device_step_is_the_sum_of_its_parts(variant, weights, pairs):
    mb = MicroBatch([[1024, 1024]], [False])
    rep = simulate_step(replace(TINY, **variant), _hw(), Parallelism(), SimOptions(system="colocated"), [mb])
    # linear: 2 FLOPs per weight per token forward, x3 with the backward, at 1e12 FLOP/s;
    # attention: 4 · head_dim 32 · 8 heads = 1,024 FLOPs per pair forward, 2.5x that backward, at 1e12 FLOP/s.
    want = (6 * weights * 2048 + 3.5 * 1024 * pairs) / 1e12
    assert math.isclose(rep.step_s, want, rel_tol=1e-9), (rep.step_s, want)
    assert rep.tokens == 2048


def _skewed(dp: int, per: int) -> list[MicroBatch]:
    # replica 0 holds one long document, the others many short ones: attention is badly imbalanced
    ranks = [[per]] + [[per // 16] * 16 for _ in range(dp - 1)]
    return [MicroBatch(ranks, [False] * dp)]


def test_cad_balances_what_colocated_cannot():
    hw = _hw(linear_flops=1e14)  # attention-dominated
    par = Parallelism(dp=4)
    col = simulate_step(TINY, hw, par, SimOptions(system="colocated"), _skewed(4, 8192))
    cad = simulate_step(TINY, hw, par, SimOptions(system="cad", eps=0.05), _skewed(4, 8192))
    assert col.attention_max_over_mean > 3.0
    assert cad.attention_max_over_mean <= 1.06
    assert cad.step_s < 0.6 * col.step_s
    assert cad.tokens_max_over_min == 1.0


def test_pingpong_hides_communication():
    hw = _hw(linear_flops=2e11, intra=Link(2e9, 1e-5), inter=Link(2e9, 1e-5))
    par = Parallelism(dp=4)
    flat = simulate_step(TINY, hw, par, SimOptions(system="cad"), _skewed(4, 8192))
    pp = simulate_step(TINY, hw, par, SimOptions(system="cad", pingpong=True), _skewed(4, 8192))
    assert pp.step_s < flat.step_s
    comm = sum(d.get("cad_comm", 0.0) for d in flat.result.busy_s.values())
    assert comm > 0


def test_wlb_context_parallel_pays_gathers_and_splits_work():
    hw = _hw(linear_flops=1e14)
    docs = [[8192, 2048], [4096, 4096]]
    one = simulate_step(TINY, hw, Parallelism(dp=2, cp=1), SimOptions(system="wlb"), [MicroBatch.whole(docs)])
    cp2 = simulate_step(TINY, hw, Parallelism(dp=2, cp=2), SimOptions(system="wlb"),
                        [MicroBatch.whole([docs[0] + docs[1]])])
    assert cp2.attention_max_over_mean == 1.0 and one.attention_max_over_mean > 1.2
    assert sum(d.get("cp_comm", 0.0) for d in cp2.per_device) > 0
    with pytest.raises(ValueError, match="whole documents"):
        simulate_step(TINY, hw, Parallelism(dp=2, cp=1), SimOptions(system="wlb"),
                      [MicroBatch([[1], [1]], [False, True])])


def test_bad_inputs_are_named():
    hw = _hw()
    with pytest.raises(ValueError, match="micro-batches"):
        simulate_step(TINY, hw, Parallelism(micro_batches=2), SimOptions(), [MicroBatch([[8]], [False])])
    with pytest.raises(ValueError, match="replicas"):
        simulate_step(TINY, hw, Parallelism(dp=2), SimOptions(), [MicroBatch([[8]], [False])])
    with pytest.raises(ValueError, match="multiple of cp"):
        Parallelism(dp=3, cp=2)
    with pytest.raises(ValueError, match="n_layers"):
        simulate_step(TINY, hw, Parallelism(pp=TINY.n_layers + 1), SimOptions(), [MicroBatch([[8]], [False])])
    with pytest.raises(ValueError, match="stage_blocks"):
        simulate_step(TINY, hw, Parallelism(pp=2), SimOptions(stage_blocks=(1, 1)), [MicroBatch([[8]], [False])])


def test_hardware_round_trips_and_rejects_unknown_keys(tmp_path):
    hw = published("h200")
    hw.save(tmp_path / "h.json")
    assert Hardware.load(tmp_path / "h.json") == hw
    bad = json.loads((tmp_path / "h.json").read_text())
    bad["warp_speed"] = 9
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="warp_speed"):
        Hardware.load(tmp_path / "bad.json")


# -- workloads and predictions -------------------------------------------------------------------
def test_packings_keep_every_token():
    lengths = sample_documents("pretrain", 128 * K, 4 * 32 * K * 2, seed=3)
    assert lengths.max() <= 128 * K and lengths.sum() == 4 * 32 * K * 2
    plain = plain_packing(lengths, 4, 32 * K, 2)
    assert all(sum(r) == 32 * K for mb in plain for r in mb.ranks)
    wlb = wlb_packing(lengths, 2, 2, lambda n: float(n) ** 2, slack=0.1)
    got = sorted(x for mb in wlb for r in mb.ranks for x in r)
    assert got == sorted(lengths.tolist())
    cap = 1.1 * lengths.sum() / 4
    assert max(sum(r) for mb in wlb for r in mb.ranks) <= max(cap, lengths.max())


def test_prediction_of_a_paper_point():
    from distca.config import load_config

    cfg = load_config("configs/llama3-8b-128k.yaml", []).model
    r = predict_point(GridPoint("8b", "3d", 64, 128 * K, "pretrain", 128 * K, 1, 128 * K), cfg, published("h200"),
                      seeds=1)
    assert r["cad_attn_max_over_mean"] <= 1.06
    assert r["colocated_attn_max_over_mean"] > 1.5
    assert r["speedup_vs_colocated"] > 1.2  # balance pays where attention is imbalanced
    assert np.isfinite(r["speedup_vs_wlb"]) and r["wlb_cp"] in (1, 2, 4, 8)


def test_cli_point_and_errors():
    out = subprocess.run([sys.executable, "-m", "distca.cli", "simulate", "point", "--config",
                          "configs/llama3-8b-128k.yaml", "--gpus", "64", "--seeds", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["speedup_vs_wlb"] > 0
    bad = subprocess.run([sys.executable, "-m", "distca.cli", "simulate", "validate", "/nonexistent.json",
                          "--hardware", "h100"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nonexistent" in bad.stderr


# -- calibration and validation replay -----------------------------------------------------------
def test_host_calibration_pieces_are_sane():
    import torch

    from distca.sim.calibrate import average_hardware, measure_attention, measure_ipc_link, measure_linear

    small = ModelConfig(n_layers=1, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=32)
    lin = measure_linear(small, (128, 256, 512), torch.float32, reps=2)
    assert lin["linear_flops"] > 1e6 and all(b > 0 for b in lin["bwd_s"])
    table = measure_attention(small, torch.float32, reps=1, q_lens=(32, 64), prefixes=(0, 64, 256))
    assert len(table.entries) == 6 and all(e["bwd_s"] > 0 for e in table.entries)
    link = measure_ipc_link(nbytes=1 << 16, n=4)
    assert link.bandwidth > 1e6 and 0 < link.latency_s < 0.1
    a = _hw(linear_flops=1e9, cores=2.0, attention_table=table.__dict__)
    b = _hw(linear_flops=3e9, cores=1.0, attention_table=table.__dict__)
    m = average_hardware([a, b])
    assert m.linear_flops == 2e9 and m.cores == 1.5


def test_validation_replays_a_hand_counted_step(tmp_path):
    from distca.config import load_config
    from distca.sim.validate import validate_file

    # tiny-cpu's model is TINY: one device, local attention, the standard model's step of two 1024-token
    # documents is 0.049876566016 s on _hw() (test_single_device_step_is_the_sum_of_its_parts, standard row:
    # (6 · 2,834,432 · 2048 + 3.5 · 1024 · 4,198,400) / 1e12).
    cfg = load_config("configs/tiny-cpu.yaml", ["--train.pipeline_parallel=1", "--cluster.n_trainers=1",
                                                "--cluster.n_servers=1", "--train.core_attention=local",
                                                "--train.micro_batches=1"]).to_dict()
    record = {"step_s": 0.1, "micro_batches": [{"ranks": [[1024, 1024]], "continues": [False]}]}
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"runs": {"x/local": {"config": cfg, "records": [record] * 2}}}))
    res = validate_file(path, _hw(), skip=1)["x/local"]
    assert res["steps"] == 1 and res["system"] == "colocated"
    assert math.isclose(res["predicted_s"], 0.049876566016, rel_tol=1e-9)
    assert math.isclose(res["error"], 0.049876566016 / 0.1 - 1, rel_tol=1e-9)


def test_validation_replays_recorded_steps(tmp_path):
    from distca.config import load_config
    from distca.sim.validate import run_options, validate_file

    cfg = load_config("configs/tiny-cpu.yaml", ["--train.tokens_per_rank", "512"]).to_dict()
    lengths = sample_documents("pretrain", 2048, 2 * 512 * 2 * 3, seed=1)
    mbs = plain_packing(lengths, 2, 512, 6)
    hw = _hw(cores=2.0, attention_fused=False)
    model, par, opt = run_options(cfg)
    assert (par.pp, par.dp, par.micro_batches, opt.system) == (2, 2, 2, "cad")
    records = []
    for step in range(3):
        pair = mbs[2 * step:2 * step + 2]
        want = simulate_step(model, hw, par, opt, pair).step_s
        records.append({"step_s": 1.5 * want, "micro_batches": [{"ranks": mb.ranks, "continues": mb.continues}
                                                                for mb in pair]})
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"runs": {"x/cad": {"config": cfg, "records": records}}}))
    res = validate_file(path, hw, skip=0)["x/cad"]
    assert res["steps"] == 3 and math.isclose(res["error"], 1 / 1.5 - 1, rel_tol=1e-9)
    path.write_text(json.dumps({"nothing": 1}))
    with pytest.raises(ValueError, match="no 'runs'"):
        validate_file(path, hw)


def test_h100_with_h200_kernels_keeps_published_links_and_the_measured_attention_table():
    from distca.attention.cost import AttentionShape, attention_flops, pair_count
    from distca.sim.hardware import H100_HBM, h100_with_h200_kernels, published

    hw = h100_with_h200_kernels()
    base = published("h100")
    assert hw.intra == base.intra and hw.inter == base.inter and hw.attention_table
    assert hw.optimizer_s_per_param == pytest.approx(16 / H100_HBM)
    assert "H200" in hw.sources["attention"] and "3.35" in hw.sources["hbm"]
    # a long causal task runs at the measured kernel's rate (FA2 class: 250-400 TFLOP/s), with 64 heads too
    for heads in (32, 64):
        model = hw.attention_model(AttentionShape(heads, 8, 128))
        n = 16 * 1024
        t = hw.attention_call_s(model, np.array([n]), np.array([n]), -1, "fwd")
        assert 250e12 < float(attention_flops(pair_count(n, n), heads, 128)) / t < 400e12
    # one fused call pays the per-task overhead once
    one = hw.attention_call_s(model, np.array([512]), np.array([512]), -1, "fwd")
    two = hw.attention_call_s(model, np.array([512, 512]), np.array([512, 512]), -1, "fwd")
    assert one < two < 2 * one
    assert hw.attention_call_s(model, np.array([], dtype=np.int64), np.array([], dtype=np.int64), -1, "fwd") == 0.0


# -- mask families ---------------------------------------------------------------------------------
def test_rect_costs_match_the_mask_task_cost():
    from distca.attention.cost import AttentionShape, CostModel, attention_flops, mask_task_cost
    from distca.masks import Mask, Slice

    shape = AttentionShape(8, 2, 64, 2)
    n = 3000
    for mask in (Mask.causal(), Mask.sliding(500), Mask.chunked(700), Mask.sink_window(4, 300), Mask.prefix_lm(900),
                 Mask.bidirectional(), Mask.from_slices([Slice(0, 1000, 0, 1000, "causal"),
                                                         Slice(1000, 3000, 0, 400, "full"),
                                                         Slice(1000, 3000, 500, 2800, "bi_causal"),
                                                         Slice(0, 1000, 1200, 3000, "inv_causal")])):
        for x, y in ((0, n), (128, 1900), (2500, 2600)):
            rects = mask.rects(n, x, y)
            args = ([r.nq for r in rects], [r.nk for r in rects], [r.kind == "full" for r in rects],
                    [r.window for r in rects])
            pairs, tiles = mask_task_cost(mask, n, x, y, tile=128)
            by_pairs = CostModel(shape, "pairs", peak_flops=1e12).rects_time_s(*args).sum()
            assert by_pairs == pytest.approx(attention_flops(pairs, 8, 64)[()] / 1e12, rel=1e-12)
            tiled = CostModel(shape, "tiles", peak_flops=1e12, per_task_s=0.0, tile=128).rects_time_s(*args, "bwd")
            assert tiled.sum() == pytest.approx(attention_flops(tiles * 128**2, 8, 64, "bwd")[()] / 1e12, rel=1e-12)
            if mask.as_window is not None:  # one task: exactly the task's cost
                r = rects[0]
                assert by_pairs == CostModel(shape, "pairs", peak_flops=1e12).time_s(r.nq, r.nk, r.window).sum()


@pytest.mark.parametrize("spec", ["chunked:1024", "sink_window:4:512", "prefix_lm:2048", "bidirectional"])
def test_cad_costs_mask_families_by_their_pairs(spec):
    # Pairs-mode cost model: the servers' attention seconds are the family's pairs (not its key hulls'), and
    # CAD still balances them.
    from distca.masks import Mask

    hw = _hw(linear_flops=1e14)
    par = Parallelism(dp=4)
    mbs = _skewed(4, 8192)
    rep = {}
    for s in ("causal", spec):
        cfg = replace(TINY, layer_masks=[s])
        rep[s] = simulate_step(cfg, hw, par, SimOptions(system="cad", eps=0.05), mbs)
        assert rep[s].attention_max_over_mean <= 1.06
    lens = [n for r in mbs[0].ranks for n in r]
    ratio = sum(Mask.parse(spec).cum(n, n) for n in lens) / sum(Mask.causal().cum(n, n) for n in lens)
    busy = {s: sum(d.get("attention", 0.0) for d in r.per_device) for s, r in rep.items()}
    overhead = hw.attention_task_s  # one call per server and round: the same for both
    assert busy[spec] > 0 and busy["causal"] > 0
    assert abs(busy[spec] / busy["causal"] - ratio) < 0.05 * ratio + 1e-9 + overhead
    col = simulate_step(replace(TINY, layer_masks=[spec]), hw, par, SimOptions(system="colocated"), mbs)
    assert col.attention_max_over_mean > 1.5
