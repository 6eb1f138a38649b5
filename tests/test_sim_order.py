"""The ping-pong order in the step model (``SimOptions.pingpong_order``): ``layer`` is the trainer's per-block order,
``fused`` the paper's Fig. 7 order (a nano-batch's post-attention work of layer l fused with its pre-attention work
of layer l + 1). Same work either way; fused hides each round behind more of the other nano-batch's work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distca.config import ModelConfig
from distca.sim.cli import load_hardware
from distca.sim.hardware import Link
from distca.sim.predict import GridPoint, predict_point
from distca.sim.step import MicroBatch, Parallelism, SimOptions, simulate_step

CFG = ModelConfig(n_layers=4, hidden=256, n_heads=8, n_kv_heads=2, ffn_hidden=512, vocab_size=128)
K = 1024


def _micro() -> list[MicroBatch]:
    # two replicas, documents that span them and a long one: rounds move rows in both directions
    return [MicroBatch([[3 * K, 5 * K], [2 * K, 6 * K]], [False, True]),
            MicroBatch([[8 * K], [1 * K, 7 * K]], [False, True])]


def _run(hw, order: str, pingpong: bool = True, schedule: str = "1f1b", pp: int = 1):
    par = Parallelism(pp=pp, dp=2, micro_batches=2)
    opt = SimOptions(system="cad", pingpong=pingpong, pingpong_order=order, schedule=schedule)
    return simulate_step(CFG, hw, par, opt, _micro())


def _slow_links(hw):
    """H200 figures scaled so this small model's compute and its rows' transfers are of one order (idle 30-70%)."""
    slow = Link(hw.inter.bandwidth / 1000, hw.inter.latency_s)
    return dataclasses.replace(hw, linear_flops=hw.linear_flops / 1000, attention_flops=hw.attention_flops / 1000,
                               intra=slow, inter=slow, devices_per_node=1)


@pytest.mark.parametrize(("schedule", "pp"), [("1f1b", 1), ("1f1b", 2), ("pooled", 2)])
def test_fused_order_does_the_same_work_and_hides_more_communication(schedule, pp):
    hw = _slow_links(load_hardware("h200"))
    layer, fused = _run(hw, "layer", schedule=schedule, pp=pp), _run(hw, "fused", schedule=schedule, pp=pp)
    busy = lambda r: sum(sum(v for k, v in d.items() if k in ("linear", "attention")) for d in r.per_device)  # noqa: E731
    assert busy(fused) == pytest.approx(busy(layer), rel=1e-9)  # every post-attention part still runs, once
    assert fused.step_s < layer.step_s
    assert fused.idle_fraction < layer.idle_fraction


def test_the_order_is_moot_without_ping_pong_or_without_communication():
    hw = load_hardware("h200")
    assert _run(hw, "fused", pingpong=False).step_s == _run(hw, "layer", pingpong=False).step_s
    free = dataclasses.replace(hw, intra=Link(1e30, 0.0), inter=Link(1e30, 0.0))
    assert _run(free, "fused").step_s == pytest.approx(_run(free, "layer").step_s, rel=1e-9)


def test_bad_orders_are_refused_by_name():
    with pytest.raises(ValueError, match="pingpong_order must be 'layer' or 'fused', got 'zigzag'"):
        SimOptions(pingpong_order="zigzag")
    with pytest.raises(ValueError, match="needs a first nano-batch whose round needs none of the second's keys"):
        SimOptions(pingpong=True, pingpong_order="fused", nano_split="rows")
    with pytest.raises(ValueError, match="nano_split must be 'repack', 'rows' or 'prefix', got 'cols'"):
        SimOptions(nano_split="cols")


def test_predict_point_takes_the_nano_split_and_the_order():
    cfg = ModelConfig(n_layers=4, hidden=256, n_heads=8, n_kv_heads=2, ffn_hidden=512, vocab_size=128)
    pt = GridPoint("t", "4d", 4, 16 * K, "pretrain", 16 * K, 2, 8 * K, tp=1)
    hw = _slow_links(load_hardware("h200"))
    got = {(n, o): predict_point(pt, cfg, hw, seeds=1, schedules=("pooled",), nano_split=n, pingpong_order=o)
           for n, o in (("repack", "layer"), ("repack", "fused"), ("rows", "layer"), ("prefix", "layer"),
                        ("prefix", "fused"))}
    steps = {k: v["cad"]["pooled"]["step_s"] for k, v in got.items()}
    assert steps[("repack", "fused")] < steps[("repack", "layer")]
    assert steps[("rows", "layer")] != steps[("repack", "layer")]  # another split, other plans
    # exact splits: the prefix split's first round needs none of the second's keys, so it starts earlier
    assert steps[("prefix", "layer")] < steps[("rows", "layer")]
    assert steps[("prefix", "fused")] < steps[("prefix", "layer")]
    # the baselines attend the documents CAD trains: the same for the exact splits, cut at the half too for repack
    wlb = {k: v["step_s"]["wlb"] for k, v in got.items()}
    assert wlb[("rows", "layer")] == wlb[("prefix", "layer")] == wlb[("prefix", "fused")]
    assert wlb[("repack", "layer")] == wlb[("repack", "fused")] != wlb[("rows", "layer")]
    whole = {n: predict_point(pt, cfg, hw, seeds=1, schedules=("pooled",), nano_split=n, baseline_docs="whole")
             for n in ("repack", "rows")}
    assert whole["repack"]["step_s"]["wlb"] == whole["rows"]["step_s"]["wlb"]  # the sampled documents, whole
    with pytest.raises(ValueError, match="baseline_docs must be 'trained' or 'whole'"):
        predict_point(pt, cfg, hw, seeds=1, baseline_docs="cut")
    with pytest.raises(ValueError, match="needs a first nano-batch"):
        predict_point(pt, cfg, hw, seeds=1, schedules=("pooled",), nano_split="rows", pingpong_order="fused")


@pytest.mark.parametrize("ranks, continues", [
    ([[3 * K, 5 * K], [2 * K, 6 * K]], [False, True]),
    ([[8 * K], [8 * K], [1 * K, 7 * K]], [False, True, True]),  # a document over two whole ranks: A empty there
    ([[100, 200, 300], [50, 550], [600]], [False, False, True]),
])
def test_the_prefix_split_keeps_every_key_of_the_first_nano_batch_in_it(ranks, continues):
    """``_prefix_halves``: together the two nano-batches hold every query row once, and every key an A query can
    see under a causal mask (its document's earlier tokens) is a row of A."""
    from distca.scheduler import BatchLayout
    from distca.sim.step import _prefix_halves

    batch = BatchLayout.from_ranks(ranks, continues)
    a, b = _prefix_halves(batch)

    def rows(lay):  # (rank, row) -> (document, position)
        return {(int(r), int(w) + i): (int(d), int(o) + i) for r, d, o, n, w in zip(
            lay.piece_rank, lay.piece_doc, lay.piece_off, lay.piece_len, lay.piece_row, strict=True) for i in range(n)}

    whole, ra, rb = rows(batch), rows(a), rows(b)
    assert not set(ra) & set(rb) and {**ra, **rb} == whole
    in_a = set(ra.values())
    assert all((d, p) in in_a for d, q in ra.values() for p in range(q))  # causal keys of A's queries
    half = [sum(r) // 2 for r in ranks]
    sizes = np.bincount(a.piece_rank, weights=a.piece_len, minlength=len(ranks))
    assert all(x <= h for x, h in zip(sizes, half, strict=True))
    assert sizes[0] == half[0]  # no continued document on the first rank: exactly half


def test_trained_documents_are_the_packing_s_and_the_halves_cuts():
    """What CAD trains (the baselines' documents by default): a micro-batch's documents as packed (a document cut at
    the micro-batch boundary restarts), and with ``repack`` the halves' (one more cut, at half of the tokens)."""
    from distca.sim.predict import trained_documents

    mbs = _micro()  # 16K tokens each: [3K, 5K+2K, 6K] and [8K+1K, 7K]
    assert [d.tolist() for d in trained_documents(mbs, False)] == [[3 * K, 7 * K, 6 * K], [9 * K, 7 * K]]
    # cut at 8K: the 7K document's last 2K and the 9K one's last 1K go to the second half
    assert [d.tolist() for d in trained_documents(mbs, True)] == [[3 * K, 5 * K, 2 * K, 6 * K],
                                                                  [8 * K, 1 * K, 7 * K]]


def test_a_micro_batch_of_two_parts_is_laid_out_as_the_trainer_does():
    """The trainer's ``repack`` layout (replica r: its pieces of part 0, then of part 1) for the simulator: a document
    continues only inside its part, each replica's attention is the sum of its parts', and ping-pong's nano-batches
    are the parts themselves (their plans: one per part)."""
    a = MicroBatch([[4 * K], [1 * K, 3 * K]], [False, True])  # a 5K document over both replicas' first halves
    b = MicroBatch([[2 * K, 2 * K], [4 * K]], [False, False])
    mb = MicroBatch.of_parts([a, b])
    assert mb.ranks == [[4 * K, 2 * K, 2 * K], [1 * K, 3 * K, 4 * K]] and mb.continues == [False, True]
    lay = mb.layout()
    assert lay.doc_len.tolist() == [5 * K, 3 * K, 2 * K, 2 * K, 4 * K]
    assert lay.rank_tokens.tolist() == [8 * K, 8 * K]
    # replica 1's first piece continues the document of replica 0's part 0 (offset 4K); its part 1 piece starts at 0
    r1 = lay.piece_rank == 1
    assert lay.piece_off[r1].tolist() == [4 * K, 0, 0] and lay.piece_row[r1].tolist() == [0, 1 * K, 4 * K]
    par = Parallelism(dp=2, micro_batches=1)
    col = simulate_step(CFG, load_hardware("h200"), par, SimOptions(system="colocated"), [mb])
    assert col.step_s > 0
    cad = simulate_step(CFG, load_hardware("h200"), par, SimOptions(system="cad", pingpong=True), [mb])
    assert cad.step_s > 0
    with pytest.raises(ValueError, match="without ping-pong over a micro-batch packed as halves"):
        simulate_step(CFG, load_hardware("h200"), par, SimOptions(system="cad", pingpong=False), [mb])
