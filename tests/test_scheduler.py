"""CAD scheduler invariants: coverage, mask-exact key ranges, the max bound, determinism, locality,
and manifests that move exactly the right rows (checked by executing them on token ids)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distca.attention import forward, varlen_metadata
from distca.attention.cost import cum_pairs
from distca.attention.tasks import CATask
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.scheduler.work import first_reaching, key_start


@st.composite
def batches(draw, max_ranks=8, max_tokens=4096):
    """Random per-rank pieces with documents continuing across rank boundaries."""
    n = draw(st.integers(1, max_ranks))
    ranks, continues = [], []
    for r in range(n):
        pieces = draw(st.lists(st.integers(1, max_tokens), min_size=1, max_size=6))
        ranks.append(pieces)
        continues.append(r > 0 and draw(st.booleans()))
    return BatchLayout.from_ranks(ranks, continues)


configs = st.builds(
    SchedulerConfig,
    eps=st.sampled_from([0.0, 0.02, 0.1, 0.5]),
    granularity=st.sampled_from([1, 16, 128]),
    window=st.sampled_from([-1, -1, 64, 300]),
)


def _layout_ids(batch: BatchLayout) -> list[np.ndarray]:
    """Per-rank local buffers filled with token ids ``doc * BIG + position``."""
    big = int(batch.doc_len.max()) + 1
    out = [np.full(int(n), -1, dtype=np.int64) for n in batch.rank_tokens]
    for r, d, o, n, row in zip(batch.piece_rank, batch.piece_doc, batch.piece_off, batch.piece_len, batch.piece_row,
                               strict=True):
        out[r][row:row + n] = d * big + np.arange(o, o + n)
    return out


def within_bound(loads: np.ndarray, eps: float, slack: int) -> bool:
    """The planner's guarantee: the busiest server carries at most ``max((1 + eps) * mean, ceil(mean))`` pairs plus
    ``slack`` (one query token's work: cuts are token-granular, and the mean is rounded up to whole pairs)."""
    total, n = int(loads.sum()), loads.size
    mean = total / n
    return bool(loads.max() <= max((1 + eps) * mean, -(-total // n)) + slack + 1e-6 * mean)


def _execute(xfer, rank_bufs, sizes):
    """Apply a transfer list; every destination row must be written exactly once."""
    bufs = [np.full(int(s), -1, dtype=np.int64) for s in sizes]
    hits = [np.zeros(int(s), dtype=np.int64) for s in sizes]
    for r, s, src, dst, n in zip(xfer.rank, xfer.server, xfer.src_row, xfer.dst_row, xfer.n, strict=True):
        bufs[s][dst:dst + n] = rank_bufs[r][src:src + n]
        hits[s][dst:dst + n] += 1
    for h in hits:
        assert (h == 1).all(), "a receive-buffer row is written twice or never"
    return bufs


@given(batch=batches(), n_servers=st.integers(1, 9), cfg=configs,
       kind=st.sampled_from(["colocated", "dedicated"]), per_node=st.sampled_from([None, None, 1, 2, 3]))
def test_plan_covers_every_query_once_with_exact_key_ranges_and_correct_manifests(batch, n_servers, cfg, kind,
                                                                                   per_node):
    if kind == "colocated":
        n_servers = batch.n_ranks
    placement = Placement(batch.n_ranks, n_servers, kind, devices_per_node=per_node)
    plan, _ = make_plan(batch, placement, cfg)

    # Coverage: every document's queries exactly once.
    for d, length in enumerate(batch.doc_len.tolist()):
        m = plan.task_doc == d
        spans = sorted(zip(plan.task_q0[m].tolist(), plan.task_q1[m].tolist(), strict=True))
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(a < b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    # Key ranges: exactly what the mask allows.
    for q0, k0, k1, q1 in zip(plan.task_q0, plan.task_k0, plan.task_k1, plan.task_q1, strict=True):
        assert CATask.for_queries(0, int(q0), int(q1), cfg.window) == CATask(0, int(q0), int(q1), int(k0), int(k1),
                                                                           cfg.window)
    # Manifests: executing them on token ids delivers each task exactly its queries and keys.
    ids = _layout_ids(batch)
    big = int(batch.doc_len.max()) + 1
    qbuf = _execute(plan.q_xfer, ids, plan.server_q_rows)
    kvbuf = _execute(plan.kv_xfer, ids, plan.server_kv_rows)
    for i in range(plan.n_tasks):
        d, q0, q1, k0, k1 = (int(x[i]) for x in (plan.task_doc, plan.task_q0, plan.task_q1, plan.task_k0,
                                                  plan.task_k1))
        s = int(plan.task_server[i])
        if s < 0:  # runs on its trainer: its rows are local and hold its queries
            r, row = int(plan.task_rank[i]), int(plan.task_row[i])
            assert (ids[r][row:row + q1 - q0] == d * big + np.arange(q0, q1)).all()
            continue
        qr, kr = int(plan.task_q_row[i]), int(plan.task_kv_row[i])
        assert (qbuf[s][qr:qr + q1 - q0] == d * big + np.arange(q0, q1)).all()
        assert (kvbuf[s][kr:kr + k1 - k0] == d * big + np.arange(k0, k1)).all()
    # Transfers are ordered by (server, destination row).
    for x in (plan.q_xfer, plan.kv_xfer):
        key = list(zip(x.server.tolist(), x.dst_row.tolist(), strict=True))
        assert key == sorted(key)
    # Transfers cost bytes exactly when they cross devices.
    if kind == "dedicated":
        assert plan.q_xfer.remote.all() and plan.kv_xfer.remote.all()
    else:
        assert (plan.q_xfer.remote == (plan.q_xfer.rank != plan.q_xfer.server)).all()


@given(batch=batches(max_ranks=12, max_tokens=20000), eps=st.sampled_from([0.0, 0.01, 0.02, 0.05, 0.1]),
       window=st.sampled_from([-1, 512]), per_node=st.sampled_from([None, 2, 4]))
def test_busiest_server_is_within_one_plus_eps_of_the_mean(batch, eps, window, per_node):
    plan, _ = make_plan(batch, Placement(batch.n_ranks, batch.n_ranks, devices_per_node=per_node),
                        SchedulerConfig(eps=eps, window=window, granularity=128))
    # Token-granular cuts: the bound holds up to one query token's work (<= the longest document).
    loads = plan.server_pairs
    assert loads.max() <= plan.capacity  # no server ends above the planned cap
    assert within_bound(loads, eps, int(batch.doc_len.max()))
    assert loads.sum() == sum(cum_pairs(int(n), window) for n in batch.doc_len)


def test_bound_is_met_exactly_at_realistic_scale():
    from distca.data import sample_batch

    for dist in ("pretrain", "prolong"):
        packed = sample_batch(dist, 32, 131072, seed=3)
        batch = BatchLayout.from_ranks(packed.ranks, packed.continues)
        for eps in (0.02, 0.05):
            plan, _ = make_plan(batch, Placement(32, 32), SchedulerConfig(eps=eps, granularity=128, window=-1))
            assert plan.max_over_mean <= 1 + eps + 1e-9, (dist, eps, plan.max_over_mean)


@given(batch=batches(), cfg=configs)
def test_same_input_gives_the_same_plan_byte_for_byte(batch, cfg):
    placement = Placement(batch.n_ranks, batch.n_ranks)
    first, _ = make_plan(batch, placement, cfg)
    again, _ = make_plan(BatchLayout.from_ranks(*_ranks_of(batch)), placement, cfg)
    assert first.digest() == again.digest()


def test_topology_aware_plans_keep_the_bound_and_move_fewer_bytes_across_nodes():
    """Nodes of 8 GPUs: one node plans exactly as the flat planner; over several nodes the planner (nano-batches
    planned with the whole batch's keys, as ping-pong does) keeps the bound, covers every query and sends fewer
    bytes between nodes."""
    from distca.attention.cost import AttentionShape
    from distca.data import sample_batch

    shape = AttentionShape(64, 8, 128, 2)
    cfg = SchedulerConfig(eps=0.02, granularity=128, window=-1)
    one = sample_batch("pretrain", 8, 16384, seed=1)
    b = BatchLayout.from_ranks(one.ranks, one.continues)
    flat, _ = make_plan(b, Placement(8, 8), cfg, shape)
    node, _ = make_plan(b, Placement(8, 8, devices_per_node=8), cfg, shape)
    assert flat.digest() == node.digest()

    packed = sample_batch("prolong", 32, 32768, seed=2)
    b = BatchLayout.from_ranks(packed.ranks, packed.continues)
    half = b.rank_tokens // 2
    cross = {}
    for per_node in (None, 8):
        total = 0
        for lo, hi in ((np.zeros_like(half), half), (half, b.rank_tokens)):
            part = b.query_rows(lo, hi)
            plan, _ = make_plan(part, Placement(32, 32, devices_per_node=per_node), cfg, shape, keys=b)
            assert plan.max_over_mean <= 1.02 + 1e-9
            assert int((plan.task_q1 - plan.task_q0).sum()) == int(part.piece_len.sum())
            kv = plan.row_bytes("k") + plan.row_bytes("v")
            for x, rb in ((plan.q_xfer, plan.row_bytes("q")), (plan.kv_xfer, kv)):
                across = x.rank // 8 != x.server // 8
                total += int(x.n[across].sum()) * rb
        cross[per_node] = total
    assert cross[8] < cross[None], cross


def _ranks_of(batch: BatchLayout):
    ranks = [batch.piece_len[batch.piece_rank == r].tolist() for r in range(batch.n_ranks)]
    continues = [bool(r > 0 and batch.piece_off[np.flatnonzero(batch.piece_rank == r)[0]] > 0)
                 for r in range(batch.n_ranks)]
    return ranks, continues


@pytest.mark.parametrize("window", [-1, 256])
def test_balanced_batch_moves_nothing(window):
    ranks = [[4096, 1000, 3000]] * 6
    plan, _ = make_plan(BatchLayout.from_ranks(ranks), Placement(6, 6),
                        SchedulerConfig(eps=0.0, window=window, granularity=128))
    assert plan.bytes_moved == 0 and plan.bytes_returned == 0
    assert (plan.task_server == plan.task_rank).all()
    assert plan.n_tasks == 18


def test_only_the_excess_moves_and_the_heaviest_work_is_cut_at_tile_multiples():
    # Rank 0 holds one long document, rank 1 short ones: rank 0 sheds a suffix of its document.
    batch = BatchLayout.from_ranks([[16384], [1024] * 16])
    plan, _ = make_plan(batch, Placement(2, 2), SchedulerConfig(eps=0.02, granularity=128, window=-1))
    moved = (plan.task_server != plan.task_rank)
    assert moved.sum() == 1
    i = int(np.flatnonzero(moved)[0])
    assert plan.task_doc[i] == 0 and plan.task_q1[i] == 16384 and plan.task_q0[i] % 128 == 0
    assert plan.max_over_mean <= 1.02
    assert plan.bytes_moved > 0


def test_windowed_work_is_tokens_times_window():
    batch = BatchLayout.from_ranks([[65536], [8192]])
    plan, _ = make_plan(batch, Placement(2, 2), SchedulerConfig(eps=0.02, window=128, granularity=128))
    assert int(plan.server_pairs.sum()) == cum_pairs(65536, 128) + cum_pairs(8192, 128)
    assert plan.server_pairs.sum() < 74000 * 128
    assert plan.max_over_mean <= 1.02


def test_dedicated_servers_keep_tiny_pieces_on_their_trainer():
    batch = BatchLayout.from_ranks([[4096, 8], [4096, 16]])
    cfg = SchedulerConfig(eps=0.1, min_offload_pairs=1000, granularity=128, window=-1)
    plan, _ = make_plan(batch, Placement(2, 2, "dedicated"), cfg)
    local = plan.task_server < 0
    assert sorted((plan.task_q1[local] - plan.task_q0[local]).tolist()) == [8, 16]


def test_plan_executes_to_exact_attention():
    """Invariant 1 through a plan: per-server fused calls reproduce whole-document attention."""
    batch = BatchLayout.from_ranks([[700, 60], [300, 500], [200]], [False, True, False])
    plan, _ = make_plan(batch, Placement(3, 3), SchedulerConfig(eps=0.0, granularity=16, window=-1))
    gen = torch.Generator().manual_seed(0)
    total = int(batch.doc_len.sum())
    q, k, v = (torch.randn(total, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    doc_start = np.r_[0, np.cumsum(batch.doc_len)[:-1]]
    out = torch.zeros_like(q)
    for s in range(plan.n_servers):
        m = np.flatnonzero(plan.task_server == s)
        tasks = [CATask.for_queries(int(plan.task_doc[i]), int(plan.task_q0[i]), int(plan.task_q1[i]))
                 for i in m]
        if not tasks:
            continue
        rows_q = np.concatenate([doc_start[t.doc_id] + np.arange(t.q_start, t.q_end) for t in tasks])
        rows_k = np.concatenate([doc_start[t.doc_id] + np.arange(t.k_start, t.k_end) for t in tasks])
        cu_q, cu_k, mq, mk = varlen_metadata(tasks)
        o, _ = forward(q[rows_q], k[rows_k], v[rows_k], torch.from_numpy(cu_q), torch.from_numpy(cu_k), mq, mk,
                       backend="reference")
        out[rows_q] = o
    cu = np.r_[0, np.cumsum(batch.doc_len)].astype(np.int32)
    ref, _ = forward(q, k, v, torch.from_numpy(cu), torch.from_numpy(cu), int(batch.doc_len.max()),
                     int(batch.doc_len.max()), backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@given(t=st.integers(0, 10**12), w=st.sampled_from([-1, 1, 7, 128, 4096]))
def test_first_reaching_inverts_cum_pairs(t, w):
    y = first_reaching(t, w)
    assert cum_pairs(y, w) >= t and (y == 0 or cum_pairs(y - 1, w) < t)
    assert key_start(y, w) <= y


@pytest.mark.parametrize(
    ("ranks", "continues", "match"),
    [
        ([], None, "at least one rank"),
        ([[5], [0]], None, "positive integers"),
        ([[5], [4]], [True, False], "continues\\[0\\] must be false"),
        ([[5], [4]], [False], "2 ranks"),
        ([[5], []], [False, True], "holds no pieces"),
    ],
)
def test_bad_batches_are_rejected_with_a_reason(ranks, continues, match):
    with pytest.raises(ValueError, match=match):
        BatchLayout.from_ranks(ranks, continues)


def test_bad_config_and_placement():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        SchedulerConfig(eps=-1, granularity=128, window=-1)
    with pytest.raises(ValueError, match="placement must be"):
        Placement(2, 2, "shared")
    with pytest.raises(ValueError, match="3 trainers but the batch has 2"):
        make_plan(BatchLayout.from_ranks([[4], [4]]), Placement(3, 3),
                  SchedulerConfig(eps=0.05, granularity=128, window=-1))


def test_pass_messages_and_link_bytes():
    batch = BatchLayout.from_ranks([[16384], [1024] * 16])
    plan, _ = make_plan(batch, Placement(2, 2), SchedulerConfig(eps=0.02, granularity=128, window=-1))
    assert plan.link_bytes("fwd") == plan.bytes_moved + plan.bytes_returned
    q_rows = int(plan.q_xfer.n[plan.q_xfer.remote].sum())
    kv_rows = int(plan.kv_xfer.n[plan.kv_xfer.remote].sum())
    q, kv, lse = plan.row_bytes("q"), plan.row_bytes("k"), plan.row_bytes("lse")
    # Backward: q, out, dout, lse and k, v there; dq, dk, dv back.
    assert plan.link_bytes("bwd") == q_rows * (4 * q + lse) + kv_rows * 4 * kv
    with pytest.raises(ValueError, match="'fwd' or 'bwd'"):
        plan.messages("sideways")


def test_dedicated_default_keeps_documents_below_one_shard_local():
    batch = BatchLayout.from_ranks([[4096, 100, 127, 128], [4096, 20]])
    plan, _ = make_plan(batch, Placement(2, 2, "dedicated"), SchedulerConfig(eps=0.1, granularity=128, window=-1))
    local = plan.task_server < 0
    assert sorted((plan.task_q1[local] - plan.task_q0[local]).tolist()) == [20, 100, 127]


@st.composite
def placements(draw):
    """Any trainer/server counts, either kind, trainers on the first devices or on any distinct ones."""
    trainers, servers = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["colocated", "dedicated"]))
    devices = None
    if draw(st.booleans()):
        devices = tuple(draw(st.lists(st.integers(0, 24), min_size=trainers, max_size=trainers, unique=True)))
    return Placement(trainers, servers, kind, devices)


@given(placements())
def test_vectorised_placement_matches_a_scalar_reference(p):
    # The placement rules, written out one trainer at a time from the Placement docstring.
    for t in range(p.n_trainers):
        device = t if p.devices is None else p.devices[t]
        local = device if p.kind == "colocated" and device < p.n_servers else -1
        block = t * p.n_servers // p.n_trainers  # contiguous blocks: neighbouring trainers share a server
        assert p.local_server(t) == local
        assert p.home_server(t) == (local if local >= 0 else block)
        assert bool(p.has_local_server()[t]) == (local >= 0)
        for s in range(p.n_servers):
            assert bool(p.is_remote(t, s)) == (p.kind == "dedicated" or device != s)
    assert p.home_servers().tolist() == [p.home_server(t) for t in range(p.n_trainers)]
    trainers = np.repeat(np.arange(p.n_trainers), p.n_servers)
    servers = np.tile(np.arange(p.n_servers), p.n_trainers)
    assert p.is_remote(trainers, servers).tolist() == [bool(p.is_remote(int(t), int(s)))
                                                       for t, s in zip(trainers, servers, strict=True)]


# Every rank computes the plans itself, so a plan must not depend on anything process-specific (str
# hashing, set/dict order of hashed keys). Each subprocess writes the digests of a fixed grid of plans.
_PLAN_GRID = """
import sys
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan

ranks = [[3000, 900, 4292], [8192], [1200, 5000, 1992], [700] * 8 + [2592], [8192], [4000, 4192]]
continues = [False, True, True, False, True, False]  # documents split across ranks 0-2 and 3-4
batch = BatchLayout.from_ranks(ranks, continues)
out, n_tasks = [], []
for placement in (Placement(6, 6), Placement(6, 3), Placement(6, 4, "dedicated"), Placement(6, 6, devices_per_node=2)):
    for window in (-1, 256, 4096):
        for eps in (0.0, 0.05):
            plan, _ = make_plan(batch, placement, SchedulerConfig(eps=eps, granularity=64, window=window))
            out.append(plan.digest())
            n_tasks.append(plan.n_tasks)
assert max(n_tasks) > batch.n_pieces  # the planner cut pieces into shards: the interesting case
open(sys.argv[1], "wb").write(b"".join(len(d).to_bytes(8, "little") + d for d in out))
"""


def test_plans_are_byte_identical_across_processes_with_different_hash_seeds(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    outputs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        path = tmp_path / f"plans-{seed}.bin"
        done = subprocess.run([sys.executable, "-c", _PLAN_GRID, str(path)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(path.read_bytes())
    assert len(outputs[0]) > 0 and outputs[0] == outputs[1]
