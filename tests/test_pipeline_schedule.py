"""The pooled, tick-aligned pipeline schedule as instruction streams (no processes, no DeepSpeed): every stage
forwards and backwards every micro-batch once, in 1F1B's per-stage order, after what it depends on; the active
stages of a tick share its phase; every send has its receive in the same tick between adjacent stages; stages
idle in a tick where others compute serve, and ticks where nobody computes are empty everywhere."""

from __future__ import annotations

import pytest

from distca.train.schedule import (
    SERVE,
    B,
    F,
    active_ticks,
    backward_tick,
    forward_tick,
    n_ticks,
    stage_program,
    tick_micro,
    tick_phase,
)

CASES = [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 4, 7)]


def _programs(P: int, M: int) -> list[list[list[tuple]]]:
    return [stage_program(P, M, s) for s in range(P)]


def _where(programs, op: str) -> dict[tuple[int, int], list[int]]:
    """``(stage, micro) -> [ticks]`` of instruction ``op``."""
    out: dict[tuple[int, int], list[int]] = {}
    for s, prog in enumerate(programs):
        for t, ops in enumerate(prog):
            for o, m in ops:
                if o == op:
                    out.setdefault((s, m), []).append(t)
    return out


@pytest.mark.parametrize(("P", "M"), CASES)
def test_each_stage_runs_each_micro_batch_once_forward_and_backward_in_order(P, M):
    progs = _programs(P, M)
    assert all(len(p) == n_ticks(P, M) == 2 * (M + 2 * P - 2) for p in progs)
    fwd, bwd = _where(progs, "fwd"), _where(progs, "bwd")
    for s in range(P):
        for m in range(M):
            assert fwd[(s, m)] == [forward_tick(m, s, P)] and tick_phase(fwd[(s, m)][0]) == F
            assert bwd[(s, m)] == [backward_tick(m, s, P)] and tick_phase(bwd[(s, m)][0]) == B
            assert fwd[(s, m)][0] < bwd[(s, m)][0]  # its own forward first
            if s > 0:
                assert fwd[(s - 1, m)][0] < fwd[(s, m)][0]  # the activation exists
            if s < P - 1:
                assert bwd[(s + 1, m)][0] < bwd[(s, m)][0]  # the gradient exists
        # 1F1B's per-stage order: forwards and backwards each in micro-batch order (the same sums)
        assert [fwd[(s, m)][0] for m in range(M)] == sorted(fwd[(s, m)][0] for m in range(M))
        assert [bwd[(s, m)][0] for m in range(M)] == sorted(bwd[(s, m)][0] for m in range(M))
    assert len(fwd) == len(bwd) == P * M
    # the first and last stages load each micro-batch once, in the tick of its forward
    for s in {0, P - 1}:
        assert {m: t for (st, m), (t,) in _where(progs, "load").items() if st == s} == \
            {m: forward_tick(m, s, P) for m in range(M)}


@pytest.mark.parametrize(("P", "M"), CASES)
def test_every_tick_is_one_phase_and_idle_stages_serve(P, M):
    progs = _programs(P, M)
    active = set(active_ticks(P, M))
    for t in range(n_ticks(P, M)):
        computing = {s for s in range(P) if any(o in ("fwd", "bwd") for o, _ in progs[s][t])}
        phases = {"fwd": F, "bwd": B}
        assert {phases[o] for s in computing for o, _ in progs[s][t] if o in phases} <= {tick_phase(t)}
        assert computing == {s for s in range(P) if tick_micro(t, s, P, M) is not None}
        assert (t in active) == bool(computing)
        for s in range(P):
            serves = [o for o, _ in progs[s][t] if o == SERVE]
            # a stage serves exactly when it has no micro-batch in a tick where another stage computes
            assert serves == ([SERVE] if t in active and s not in computing else [])
            if t not in active:  # nobody computes: no transfers, no rounds, only the optimizer's tail at the end
                assert all(o in ("reduce_tied", "reduce", "step") for o, _ in progs[s][t])
    # as many active ticks as DeepSpeed's 1F1B has steps
    assert len(active) == 2 * (M + P - 1)
    # the optimizer runs once, at the very end, on every stage
    for p in progs:
        assert [o for ops in p for o, _ in ops if o in ("reduce_tied", "reduce", "step")] == \
            ["reduce_tied", "reduce", "step"]
        assert [o for o, _ in p[-1]][-3:] == ["reduce_tied", "reduce", "step"]


@pytest.mark.parametrize(("P", "M"), CASES)
def test_sends_match_receives_in_the_same_tick_between_adjacent_stages(P, M):
    progs = _programs(P, M)
    for t in range(n_ticks(P, M)):
        sends_act = {(s + 1, m) for s in range(P) for o, m in progs[s][t] if o == "send_act"}
        recvs_act = {(s, m) for s in range(P) for o, m in progs[s][t] if o == "recv_act"}
        sends_grad = {(s - 1, m) for s in range(P) for o, m in progs[s][t] if o == "send_grad"}
        recvs_grad = {(s, m) for s in range(P) for o, m in progs[s][t] if o == "recv_grad"}
        assert sends_act == recvs_act and sends_grad == recvs_grad, t
        if tick_phase(t) == F:
            assert not sends_grad and not recvs_grad
        else:
            assert not sends_act and not recvs_act
        for s in range(P):
            ops = [o for o, _ in progs[s][t]]
            # a stage's transfers come before its compute or serving (attention rounds may be collectives);
            # receive first, then send: the blocking transfers form a chain, never a cycle
            xfer = [i for i, o in enumerate(ops) if o.startswith(("send", "recv"))]
            work = [i for i, o in enumerate(ops) if o in ("load", "fwd", "bwd", SERVE)]
            assert not xfer or not work or max(xfer) < min(work)
            if "recv_act" in ops and "send_act" in ops:
                assert ops.index("recv_act") < ops.index("send_act")
            if "recv_grad" in ops and "send_grad" in ops:
                assert ops.index("recv_grad") < ops.index("send_grad")
            # what is received is what this stage computes now; what is sent was computed in the previous pair
            for o, m in progs[s][t]:
                if o in ("recv_act", "recv_grad"):
                    assert m == tick_micro(t, s, P, M)
                if o == "send_act":
                    assert forward_tick(m, s, P) == t - 2
                if o == "send_grad":
                    assert backward_tick(m, s, P) == t - 2
    # every activation and every input gradient crosses each stage boundary exactly once
    assert sorted(_where(progs, "recv_act")) == [(s, m) for s in range(1, P) for m in range(M)]
    assert sorted(_where(progs, "recv_grad")) == [(s, m) for s in range(P - 1) for m in range(M)]


def test_the_blocking_transfers_of_a_tick_resolve_without_deadlock():
    """Simulate DeepSpeed's blocking p2p (a send waits for its receive and vice versa), each stage running its
    tick's transfers in order: every tick's transfers all complete."""
    for P, M in CASES:
        progs = _programs(P, M)
        for t in range(n_ticks(P, M)):
            queues = {s: [(o, m) for o, m in progs[s][t] if o.startswith(("send", "recv"))] for s in range(P)}
            while any(queues.values()):
                progressed = False
                for s in range(P):
                    if not queues[s]:
                        continue
                    o, m = queues[s][0]
                    peer = s + 1 if o in ("send_act", "recv_grad") else s - 1
                    want = {"send_act": "recv_act", "recv_act": "send_act", "send_grad": "recv_grad",
                            "recv_grad": "send_grad"}[o]
                    if queues.get(peer) and queues[peer][0] == (want, m):
                        queues[s].pop(0)
                        queues[peer].pop(0)
                        progressed = True
                assert progressed, f"P={P} M={M} tick {t}: blocked with {queues}"


# -- the pooled schedule's configuration and plans ---------------------------------------------------------------
def _cfg(*over: str):
    from distca.config import load_config

    return load_config(None, ["--model.n_layers=4", "--cluster.n_trainers=4", "--train.pipeline_parallel=2", *over])


def test_auto_pools_cad_on_pooling_data_planes_and_says_why_otherwise():
    from distca.parts import pipeline_schedule

    cad = "--train.core_attention=cad"
    for plane in ("inplace", "shm", "zmq", "auto"):
        assert pipeline_schedule(_cfg(cad, f"--cluster.data_plane={plane}"), "cpu")[0] == "pooled"
    for over, why in [(("--train.core_attention=local",), "local"), ((cad, "--cluster.data_plane=collective"),
                                                                      "collective"),
                      ((cad, "--train.pipeline_parallel=1"), "one pipeline stage"),
                      ((cad, "--train.pipeline_schedule=1f1b"), "1f1b")]:
        schedule, reason = pipeline_schedule(_cfg(*over), "cpu")
        assert schedule == "1f1b" and why in reason, (over, reason)
    # unequal stages pool too: block position 1's rounds are over the stage that has a block there
    assert pipeline_schedule(_cfg(cad, "--model.n_layers=3"), "cpu")[0] == "pooled"


def test_pooled_is_refused_where_ticks_cannot_align():
    from distca.errors import ConfigError

    pooled = "--train.pipeline_schedule=pooled"
    with pytest.raises(ConfigError, match="collective"):
        _cfg(pooled, "--train.core_attention=cad", "--cluster.data_plane=collective")
    # interleaved ShortSWA with the windowed block on one stage only: round i would use two windows at once
    with pytest.raises(ConfigError, match="different windows"):
        _cfg(pooled, "--model.residual=shortswa", "--model.shortswa_window=8", "--model.shortswa_every=4")
    # the same model split 1/3: positions 0 (blocks 0 and 1) and 1 (blocks 2 alone) align, 2 and 3 are stage 1's
    with pytest.raises(ConfigError, match="position 0"):
        _cfg(pooled, "--model.residual=shortswa", "--model.shortswa_window=8", "--model.shortswa_every=2",
             "--train.stage_blocks=[1, 3]")
    _cfg(pooled, "--model.residual=shortswa", "--model.shortswa_window=8", "--model.shortswa_every=2")  # aligned
    _cfg(pooled, "--train.core_attention=local")  # the schedule alone: no attention to pool, still the same math


def test_tick_rounds_forward_in_order_backward_in_reverse_and_recompute_before_backward():
    from distca.train.pooled import tick_rounds

    blocks = [(8, -1), (8, -1)]  # ShortSWA: a windowed call, then full attention, per block
    assert tick_rounds(blocks, False) == {F: [(F, 8, 0, 0), (F, -1, 0, 0), (F, 8, 1, 0), (F, -1, 1, 0)],
                                          B: [(B, -1, 1, 0), (B, 8, 1, 0), (B, -1, 0, 0), (B, 8, 0, 0)]}
    assert [r[:2] for r in tick_rounds(blocks, True)[B]] == [(F, 8), (F, -1), (B, -1), (B, 8), (F, 8), (F, -1),
                                                             (B, -1), (B, 8)]
    # ping-pong: each call is a round per nano-batch, in order; a recomputed forward sends nothing
    assert tick_rounds(blocks[:1], True, nanos=2) == {F: [(F, 8, 0, 0), (F, 8, 0, 1), (F, -1, 0, 0), (F, -1, 0, 1)],
                                                      B: [(B, -1, 0, 0), (B, -1, 0, 1), (B, 8, 0, 0), (B, 8, 0, 1)]}


def test_position_groups_follow_the_stages_that_still_have_a_block():
    from distca.train.pooled import position_groups

    assert position_groups((2, 2)) == ([(0, 1)], [0, 0])
    assert position_groups((9, 9, 8, 6)) == ([(0, 1, 2, 3), (0, 1, 2), (0, 1)], [0] * 6 + [1, 1, 2])
    assert position_groups((1, 2)) == ([(0, 1), (1,)], [0, 1])


def test_tick_plans_pool_every_stages_micro_batch_over_all_servers():
    """One plan per active tick and window over all P x DP trainers: stage s's replicas hold the rows of the
    micro-batch it runs in the tick (none when idle), every token of the tick is planned exactly once."""
    import numpy as np

    from distca.data.stream import PackedStream
    from distca.train.data import make_source
    from distca.train.pooled import PooledCAD, pooled_placement

    cfg = _cfg("--train.core_attention=cad", "--cluster.data_plane=inplace", "--train.micro_batches=3",
               "--train.tokens_per_rank=256", "--attention.shard_tokens=64", "--model.residual=shortswa",
               "--model.shortswa_window=32", "--data.source=synthetic", "--data.n_docs=200", "--data.max_len=600")
    P, DP, M = 2, 2, 3
    stream = PackedStream(make_source(cfg), DP, 256, seed=1)
    mbs = [stream.next_micro_batch() for _ in range(M)]
    pooled = PooledCAD(cfg, 0, None, pooled_placement(cfg, "inplace"), None, serves=True)
    plans = pooled.plan_step(mbs)
    assert sorted(plans) == active_ticks(P, M)
    for t, per in plans.items():
        assert sorted(per) == [-1, 32]
        for plan in per.values():
            assert (plan.n_ranks, plan.n_servers) == (P * DP, P * DP)
            planned = np.bincount(plan.task_rank, weights=plan.task_q1 - plan.task_q0, minlength=P * DP)
            want = [sum(mbs[m].packed.ranks[d]) if m is not None else 0
                    for m in (tick_micro(t, s, P, M) for s in range(P)) for d in range(DP)]
            assert planned.tolist() == want, t
            assert plan.window != -1 or plan.max_over_mean < 1.05  # balanced (a 32-token window: shards of 64)
    # F tick 0 (stage 0 alone) and a steady tick (both stages) differ; the table follows the tick
    assert plans[0][-1].digest() != plans[2][-1].digest()


def test_repacked_tick_plans_are_one_per_half_tagged_apart_and_match_the_old_tick_layout():
    """``train.nano_split: repack``: each tick plans each half on its own (rows counted from the half's first), the
    two plans of a call carry different tags (so different plan ids even when the halves pack alike), and a tick's
    layout of one part is what ``from_ranks`` over every stage's ranks gives."""
    import numpy as np

    from distca.data.stream import PackedStream
    from distca.scheduler import BatchLayout
    from distca.server.layout import plan_id
    from distca.train.data import make_source
    from distca.train.pooled import PooledCAD, pooled_placement, tick_batch

    cfg = _cfg("--train.core_attention=cad", "--cluster.data_plane=inplace", "--train.micro_batches=3",
               "--train.tokens_per_rank=256", "--attention.shard_tokens=64", "--train.nano_split=repack",
               "--data.source=synthetic", "--data.n_docs=200", "--data.max_len=600")
    P, DP, M = 2, 2, 3
    stream = PackedStream(make_source(cfg), DP, 256, seed=1, parts=2)
    mbs = [stream.next_micro_batch() for _ in range(M)]
    for pingpong in (True, False):
        pooled = PooledCAD(cfg, 0, None, pooled_placement(cfg, "inplace"), None, serves=True, pingpong=pingpong)
        plans = pooled.plan_step(mbs)
        assert sorted(plans) == active_ticks(P, M)
        for t, per in plans.items():
            micros = [tick_micro(t, s, P, M) for s in range(P)]
            halves = per[-1]
            assert isinstance(halves, tuple) and [h.tag for h in halves] == [0, 1]
            assert plan_id(halves[0]) != plan_id(halves[1])
            for i, plan in enumerate(halves):
                planned = np.bincount(plan.task_rank, weights=plan.task_q1 - plan.task_q0, minlength=P * DP)
                assert planned.tolist() == [128 if m is not None else 0 for m in micros for _ in range(DP)]
                ranks = [list(r) if m is not None else [] for m in micros
                         for r in (mbs[m].parts[i].ranks if m is not None else [[]] * DP)]
                cont = [c if m is not None else False for m in micros
                        for c in (mbs[m].parts[i].continues if m is not None else [False] * DP)]
                want, got = BatchLayout.from_ranks(ranks, cont), tick_batch(mbs, tuple(micros), i)
                for f in ("piece_rank", "piece_doc", "piece_off", "piece_len", "piece_row", "doc_len"):
                    np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    untagged = plans[0][-1][1].tagged(0)
    assert untagged.digest() != plans[0][-1][1].digest() and untagged.tagged(1).digest() == plans[0][-1][1].digest()
    assert pooled.rounds[F][:3] == [(F, -1, 0, 0), (F, -1, 0, 1), (F, -1, 1, 0)]  # a round per half, ping-pong or not


def test_unequal_stages_plan_each_block_position_over_the_stages_that_have_it():
    """Split 1/3 (``train.stage_blocks``): position 0's plans (group 0) hold both stages' rows, positions 1 and 2's
    (group 1) stage 1's alone; a tick whose group-1 stage has no micro-batch gets no group-1 plan. Blocks find
    their group's plans through the table, and the step's planned load counts each group once per position."""
    import numpy as np

    from distca.data.stream import PackedStream
    from distca.model.core import DocLayout
    from distca.train.data import make_source
    from distca.train.pooled import PooledCAD, pooled_placement
    from distca.train.schedule import tick_micros

    cfg = _cfg("--train.core_attention=cad", "--cluster.data_plane=inplace", "--train.micro_batches=2",
               "--train.tokens_per_rank=256", "--attention.shard_tokens=64", "--model.n_layers=4",
               "--train.stage_blocks=[1, 3]", "--train.pingpong=false")
    P, DP, M = 2, 2, 2
    stream = PackedStream(make_source(cfg), DP, 256, seed=1)
    mbs = [stream.next_micro_batch() for _ in range(M)]
    stage1 = PooledCAD(cfg, 1, None, pooled_placement(cfg, "inplace"), None, serves=True)
    assert (stage1.groups, stage1.group_of) == ([(0, 1), (1,)], [0, 1, 1])
    plans, later = stage1.plan_ticks(mbs)
    assert sorted(plans) == active_ticks(P, M)
    for t in plans:
        micros = tick_micros(t, P, M)
        if micros[1] is None:
            assert t not in later  # nobody computes positions 1 and 2 in this tick
            continue
        plan = later[t][(-1, 1)]
        planned = np.bincount(plan.task_rank, weights=plan.task_q1 - plan.task_q0, minlength=P * DP)
        assert planned[:DP].tolist() == [0, 0] and planned[DP:].tolist() == [sum(r) for r in
                                                                           mbs[micros[1]].packed.ranks]
    layouts = [DocLayout.from_lengths([256]) for _ in range(M)]
    ctx = stage1.contexts(layouts, (plans, later))
    t = forward_tick(0, 1, P)
    stage1.enter(t)
    assert ctx[0].core_at(1).plan(-1, False) is plans[t][-1]  # block 1: position 0
    assert ctx[0].core_at(3).plan(-1, False) is later[t][(-1, 1)]  # block 3: position 2
    f_ticks = [u for u in plans if u % 2 == 0]
    assert len(stage1.forward_plans()) == sum(1 + 2 * (u in later) for u in f_ticks)
    stage1.enter(None)
    assert stage1.rounds[F] == [(F, -1, 0, 0), (F, -1, 1, 0), (F, -1, 2, 0)]
    assert stage1._trailing_rounds(F) == []  # stage 1 has every position; stage 0 serves positions 1 and 2
    stage0 = PooledCAD(cfg, 0, None, pooled_placement(cfg, "inplace"), None, serves=True)
    assert stage0._trailing_rounds(F) == [(F, -1, 1, 0), (F, -1, 2, 0)]
    assert stage0._trailing_rounds(B) == [(B, -1, 2, 0), (B, -1, 1, 0)]


def test_a_stage_s_replicas_get_the_nodes_of_their_global_ranks():
    """The node map of a 1F1B in-place group (cluster.devices_per_node): replica d of stage s sits on DeepSpeed's
    global rank of (pipe=s, data=d), checked against DeepSpeed's own topology class."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from distca.config import load_config
    from distca.train.pooled import replica_nodes

    topo = PipeDataParallelTopology(num_pp=2, num_dp=4)
    over = ["--cluster.n_trainers=8", "--cluster.n_servers=8", "--train.pipeline_parallel=2"]
    cfg = load_config(None, [*over, "--cluster.devices_per_node=2"])
    assert replica_nodes(cfg, topo, 0) == (0, 0, 1, 1) and replica_nodes(cfg, topo, 1) == (2, 2, 3, 3)
    assert replica_nodes(load_config(None, [*over, "--cluster.devices_per_node=8"]), topo, 1) == (0, 0, 0, 0)
    assert replica_nodes(load_config(None, over), topo, 1) is None
