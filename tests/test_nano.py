"""Ping-pong in a training stage (``distca.runtime.nano``), in one process: a block run as two nano-batches over an
in-place client (one trainer that is its own server) equals the block over local attention — output, input
gradient and every parameter gradient — for each residual variant, with and without recomputation; rounds
alternate between the nano-batches as the schedule says. Multi-rank ping-pong runs in tests/test_train.py."""

from __future__ import annotations

import pytest
import torch

from distca.attention.cost import AttentionShape
from distca.config import ModelConfig
from distca.model.core import DocLayout, LocalCoreAttention
from distca.model.layers import rope_cos_sin
from distca.model.llama import Block
from distca.runtime.inplace import InPlaceClient
from distca.runtime.nano import NanoPlans, PingPongBlocks
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.scheduler.plan import Plan
from distca.server.exchange import GroupRoles, RowExchange, RowFormat

LENGTHS = [70, 130, 50, 6]  # the cut at 128 falls inside the second document: its B rows need A's keys


def model(residual: str) -> ModelConfig:
    extra = {"shortswa_window": 16} if residual == "shortswa" else {}
    return ModelConfig(n_layers=1, hidden=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64,
                       residual=residual, **extra)


def nano_plans(cfg: ModelConfig, cut: int) -> NanoPlans:
    total = sum(LENGTHS)
    batch = BatchLayout.from_ranks([LENGTHS])
    shape = AttentionShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 4)
    rows = (slice(0, cut), slice(cut, total))
    plans: dict[int, tuple[Plan, ...]] = {}
    for w in sorted(set(cfg.attention_windows())):
        sched = SchedulerConfig(eps=0.05, granularity=16, window=w)
        plans[w] = tuple(make_plan(batch.query_rows([r.start], [r.stop]), Placement(1, 1), sched, shape,
                                   keys=batch)[0] for r in rows)
    return NanoPlans(rows, plans)


def client(cfg: ModelConfig, events: list | None = None) -> InPlaceClient:
    fmt = RowFormat(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, torch.float64)
    on_event = (lambda what, pid: events.append(what)) if events is not None else None
    return InPlaceClient(RowExchange(None, GroupRoles.inplace(1, 0), fmt, "cpu"), backend="reference",
                         on_event=on_event)


def grads(block: Block, x: torch.Tensor, run) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    block.zero_grad()
    x = x.detach().requires_grad_()
    y = run(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("residual", ["standard", "shortswa", "ddl"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_pingpong_block_equals_local_attention(residual, checkpoint):
    torch.manual_seed(0)
    cfg = model(residual)
    block = Block(cfg, 0).double()  # float64: the comparison is exact up to summation order
    layout = DocLayout.from_lengths(LENGTHS)
    cos, sin = rope_cos_sin(layout.position_ids, cfg.head_dim, cfg.rope_theta, torch.float64)
    x = torch.randn(sum(LENGTHS), cfg.hidden, dtype=torch.float64)
    local = LocalCoreAttention(layout, backend="reference")
    y0, dx0, dp0 = grads(block, x, lambda x: block(x, local, cos, sin))
    events: list[str] = []
    runner = PingPongBlocks(client(cfg, events), nano_plans(cfg, 128), checkpoint=checkpoint)
    y1, dx1, dp1 = grads(block, x, lambda x: runner(block, x, cos, sin))
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx1, dx0, rtol=1e-10, atol=1e-12)
    for a, b in zip(dp1, dp0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    calls = 2 if residual == "shortswa" else 1
    # per call: A's and B's forward rounds both sent before A's results are taken; no forward round repeated
    fwd = [e for e in events if e.startswith("forward")]
    assert fwd == ["forward_sent", "forward_sent", "forward_received", "forward_received"] * calls
    bwd = [e for e in events if e.startswith("backward")]
    assert bwd == ["backward_sent", "backward_sent", "backward_received", "backward_received"] * calls


def test_nano_plans_cover_each_query_once_and_refuse_mismatches():
    cfg = model("standard")
    nano = nano_plans(cfg, 128)
    a, b = nano.plans[-1]
    q_a = sorted(r for s, n in zip(a.q_xfer.src_row, a.q_xfer.n, strict=True) for r in range(s, s + n))
    q_b = sorted(r for s, n in zip(b.q_xfer.src_row, b.q_xfer.n, strict=True) for r in range(s, s + n))
    assert q_a == list(range(128)) and q_b == list(range(128, sum(LENGTHS)))
    # B's queries of the document cut at row 128 need keys from A's rows: its round sends them
    assert min(b.kv_xfer.src_row) < 128
    with pytest.raises(ValueError, match="2 plans for 3 nano-batches"):
        NanoPlans((slice(0, 1), slice(1, 2), slice(2, 3)), {-1: (a, b)})
    with pytest.raises(KeyError, match="no CAD plan for window 8"):
        nano.plan(8, 0)
    with pytest.raises(ValueError, match="query rows need"):
        BatchLayout.from_ranks([LENGTHS]).query_rows([5], [2])


@pytest.mark.parametrize("independent", [False, True], ids=["rows", "repack"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_pingpong_block_with_deferred_weight_gradients_gets_the_same_gradients_later(checkpoint, independent):
    """Deferred weight gradients (``train.defer_weight_grads``) inside a ping-pong block, whose backward runs the
    block's autograd graph itself: the input gradient comes at once, the linear layers' weight gradients only when
    the kept jobs run, and then every gradient equals local attention's."""
    from distca.train.wgrad import WeightGradQueue, install, linears

    torch.manual_seed(0)
    cfg = model("ddl")
    block = Block(cfg, 0).double()
    layout = DocLayout.from_lengths(LENGTHS)
    cos, sin = rope_cos_sin(layout.position_ids, cfg.head_dim, cfg.rope_theta, torch.float64)
    x = torch.randn(sum(LENGTHS), cfg.hidden, dtype=torch.float64)
    if independent:  # the halves of HALVES: the same 256 rows, no document across the cut
        layout = DocLayout.from_lengths([*HALVES[0], *HALVES[1]])
        cos, sin = rope_cos_sin(layout.position_ids, cfg.head_dim, cfg.rope_theta, torch.float64)
        x = torch.randn(256, cfg.hidden, dtype=torch.float64)
    y0, dx0, dp0 = grads(block, x, lambda x: block(x, LocalCoreAttention(layout, backend="reference"), cos, sin))
    queue = WeightGradQueue()
    install(block, queue)
    plans = independent_plans(cfg) if independent else nano_plans(cfg, 128)
    runner = PingPongBlocks(client(cfg), plans, checkpoint=checkpoint)
    block.zero_grad()
    xg = x.detach().requires_grad_()
    y = runner(block, xg, cos, sin)
    torch.testing.assert_close(y.detach(), y0, rtol=1e-10, atol=1e-12)
    queue.tag = 1
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    queue.tag = None
    torch.testing.assert_close(xg.grad, dx0, rtol=1e-10, atol=1e-12)
    weights = {id(lin.weight) for lin in linears(block)}
    assert all(p.grad is None for p in block.parameters() if id(p) in weights)
    assert queue.pending == 2 * len(weights)  # one job per linear call, per nano-batch
    WeightGradQueue.run(queue.take_all())
    for a, b in zip([p.grad for p in block.parameters()], dp0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


HALVES = ([70, 58], [72, 50, 6])  # independent halves of 128 rows each: no document spans the cut


def independent_plans(cfg: ModelConfig) -> NanoPlans:
    shape = AttentionShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 4)
    plans: dict[int, tuple[Plan, ...]] = {}
    for w in sorted(set(cfg.attention_windows())):
        sched = SchedulerConfig(eps=0.05, granularity=16, window=w)
        plans[w] = tuple(make_plan(BatchLayout.from_ranks([list(h)]), Placement(1, 1), sched, shape)[0]
                         for h in HALVES)
    return NanoPlans((slice(0, 128), slice(128, 256)), plans, independent=True)


@pytest.mark.parametrize("residual", ["standard", "shortswa", "ddl"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_independent_halves_equal_local_attention_and_start_each_round_after_its_own_work(residual, checkpoint):
    """``train.nano_split: repack``: each nano-batch's plan covers its own rows only, counted from its first row; a
    round starts before the other nano-batch's pre-attention work, and with two calls per block (ShortSWA) A's second
    round goes out before B's first is taken. Output and every gradient equal local attention's."""
    torch.manual_seed(0)
    cfg = model(residual)
    block = Block(cfg, 0).double()
    layout = DocLayout.from_lengths([*HALVES[0], *HALVES[1]])
    cos, sin = rope_cos_sin(layout.position_ids, cfg.head_dim, cfg.rope_theta, torch.float64)
    x = torch.randn(256, cfg.hidden, dtype=torch.float64)
    y0, dx0, dp0 = grads(block, x, lambda x: block(x, LocalCoreAttention(layout, backend="reference"), cos, sin))
    events: list[str] = []
    runner = PingPongBlocks(client(cfg, events), independent_plans(cfg), checkpoint=checkpoint)
    y1, dx1, dp1 = grads(block, x, lambda x: runner(block, x, cos, sin))
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx1, dx0, rtol=1e-10, atol=1e-12)
    for a, b in zip(dp1, dp0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for kind in ("forward", "backward"):
        got = [e.split("_")[1] for e in events if e.startswith(kind)]
        if residual == "shortswa":  # A1 B1 out; A1 back → A2 out; B1 back → B2 out; A2 back; B2 back
            assert got == ["sent", "sent", "received", "sent", "received", "sent", "received", "received"]
        else:
            assert got == ["sent", "sent", "received", "received"]


def test_independent_halves_refuse_a_plan_that_reaches_the_other_half():
    """A plan over the whole micro-batch's rows given as an independent nano-batch's is caught by the data plane
    (its rows lie outside the nano-batch's), not silently read from the wrong rows."""
    cfg = model("standard")
    nano = independent_plans(cfg)
    whole = make_plan(BatchLayout.from_ranks([[*HALVES[0], *HALVES[1]]]), Placement(1, 1),
                      SchedulerConfig(eps=0.05, granularity=16, window=-1), AttentionShape(4, 2, 8, 4))[0]
    bad = NanoPlans(nano.rows, {-1: (nano.plans[-1][0], whole)}, independent=True)
    block = Block(cfg, 0).double()
    layout = DocLayout.from_lengths([*HALVES[0], *HALVES[1]])
    cos, sin = rope_cos_sin(layout.position_ids, cfg.head_dim, cfg.rope_theta, torch.float64)
    with pytest.raises(Exception, match="row"):
        PingPongBlocks(client(cfg), bad)(block, torch.randn(256, cfg.hidden, dtype=torch.float64), cos, sin)
