"""The trainer-side runtime over a real server process: CAD attention as an autograd function, and the
ping-pong schedule, both equal to local attention; ping-pong overlaps one nano-batch's round with the
other's linear work (checked from the order of the client's round events, not from timings)."""

from __future__ import annotations

import pytest
import torch

from distca.attention import varlen_attention
from distca.runtime.cad_attention import cad_attention
from distca.runtime.client import CADClient
from distca.runtime.pingpong import pingpong_layer, sequential_layer
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.server.layout import plan_id
from distca.server.loop import ServerConfig
from distca.server.processes import server_processes
from distca.transport.channel import TransportConfig

pytestmark = pytest.mark.cluster  # spawns trainer/server processes (left out of `make test-fast`)

TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=30.0, secret=None, checksum=False,
                       shm_max_bytes=1 << 30)
H, HKV, D = 4, 2, 8


@pytest.fixture(scope="module")
def events() -> list[tuple[str, object]]:
    """What happened, in order: the client's round events ``(what, plan_id)`` and the tests' own
    linear-work calls ``("pre" | "post", nano-batch)``. Each test clears it first."""
    return []


@pytest.fixture(scope="module")
def client(events):
    scfg = ServerConfig(n_heads=H, n_kv_heads=HKV, head_dim=D, dtype="float64", backend="reference", max_plans=8,
                        max_rows=1 << 16, transport=TCFG)
    with server_processes(2, scfg) as running:
        c = CADClient(0, running.addresses, TCFG, backend="reference",
                      on_event=lambda what, pid: events.append((what, pid)))
        yield c
        c.close()


def _plan(lengths):
    batch = BatchLayout.from_ranks([lengths])
    plan, _ = make_plan(batch, Placement(1, 2, "dedicated"), SchedulerConfig(eps=0.0, granularity=16,
                                                                            min_offload_pairs=0, window=-1))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return plan, cu, max(lengths)


def _local(q, k, v, cu, m):
    return varlen_attention(q, k, v, cu, cu, m, m, backend="reference")


def test_cad_attention_autograd_equals_local_attention(client):
    plan, cu, m = _plan([700, 300, 24])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1024, h, D, generator=gen, dtype=torch.float64, requires_grad=True) for h in (H, HKV, HKV))
    dout = torch.randn(1024, H, D, generator=gen, dtype=torch.float64)
    out, lse = cad_attention(q, k, v, plan, client)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_ref, lse_ref = _local(q, k, v, cu, m)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), dout)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_pingpong_equals_sequential_and_local_and_overlaps(client, events):
    lengths = [[500, 12], [256, 256]]
    plans = [_plan(x)[0] for x in lengths]
    a, b = (plan_id(p) for p in plans)
    gen = torch.Generator().manual_seed(1)
    hidden = H * D
    wqkv = torch.randn(hidden, (H + 2 * HKV) * D, generator=gen, dtype=torch.float64) / hidden**0.5
    wo = torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    xs = [torch.randn(512, hidden, generator=gen, dtype=torch.float64) for _ in range(2)]

    def pre(i, x):
        events.append(("pre", i))
        q, k, v = (x @ wqkv).split([H * D, HKV * D, HKV * D], dim=1)
        return q.reshape(-1, H, D).contiguous(), k.reshape(-1, HKV, D).contiguous(), v.reshape(-1, HKV, D).contiguous()

    def post(i, x, attn):
        events.append(("post", i))
        return x + attn.reshape(x.shape[0], -1) @ wo

    events.clear()
    got = pingpong_layer(xs, plans, client, pre, post)
    # Overlap: A's round is on the servers while the trainer computes B's pre-attention work, and B's round
    # was started before A's wait completed, so it is in flight while A's post-attention work runs.
    assert events == [("pre", 0), ("forward_sent", a), ("pre", 1), ("forward_sent", b), ("forward_received", a),
                      ("post", 0), ("forward_received", b), ("post", 1)]
    events.clear()
    seq = sequential_layer(xs, plans, client, pre, post)
    # The control overlaps nothing: each round completes before the next linear work starts.
    assert events == [("pre", 0), ("forward_sent", a), ("forward_received", a), ("post", 0), ("pre", 1),
                      ("forward_sent", b), ("forward_received", b), ("post", 1)]
    for i in range(2):
        q, k, v = pre(i, xs[i])
        _, cu, m = _plan(lengths[i])
        ref = post(i, xs[i], _local(q, k, v, cu, m)[0])
        torch.testing.assert_close(got[i], ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(seq[i], ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="exactly two nano-batches"):
        pingpong_layer(xs[:1], plans[:1], client, pre, post)


@pytest.mark.parametrize("overlap", [True, False])
def test_train_forward_backward_overlapped_equals_local_autograd(client, events, overlap):
    from distca.runtime.pingpong import train_backward, train_forward

    lengths = [[300, 212], [512]]
    plans = [_plan(x)[0] for x in lengths]
    a, b = (plan_id(p) for p in plans)
    gen = torch.Generator().manual_seed(2)
    hidden = H * D
    wqkv = (torch.randn(hidden, (H + 2 * HKV) * D, generator=gen, dtype=torch.float64) / hidden**0.5).requires_grad_()
    wo = (torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) / hidden**0.5).requires_grad_()
    xs = [torch.randn(512, hidden, generator=gen, dtype=torch.float64) for _ in range(2)]
    dys = [torch.randn(512, hidden, generator=gen, dtype=torch.float64) for _ in range(2)]

    def pre(i, x):
        q, k, v = (x @ wqkv).split([H * D, HKV * D, HKV * D], dim=1)
        return q.reshape(-1, H, D), k.reshape(-1, HKV, D), v.reshape(-1, HKV, D)

    def post(i, x, attn):
        return x + attn.reshape(x.shape[0], -1) @ wo

    events.clear()
    ys, states = train_forward(xs, plans, client, pre, post, overlap=overlap)
    dxs = train_backward(states, dys, plans, client, params=[wqkv, wo], overlap=overlap)
    # With overlap, B's round (forward, then backward) starts before A's completes; without, never.
    for kind in ("forward", "backward"):
        b_started_before_a_done = events.index((f"{kind}_sent", b)) < events.index((f"{kind}_received", a))
        assert b_started_before_a_done == overlap, (kind, events)
    got_w = (wqkv.grad.clone(), wo.grad.clone())
    wqkv.grad = wo.grad = None
    # Reference: the same layer with local attention, through autograd.
    for i in range(2):
        x = xs[i].clone().requires_grad_()
        q, k, v = pre(i, x)
        _, cu, m = _plan(lengths[i])
        y = post(i, x, _local(q.contiguous(), k.contiguous(), v.contiguous(), cu, m)[0])
        torch.testing.assert_close(ys[i], y.detach(), rtol=0, atol=1e-12)
        y.backward(dys[i])
        torch.testing.assert_close(dxs[i], x.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_w[0], wqkv.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(got_w[1], wo.grad, rtol=0, atol=1e-11)


@pytest.mark.parametrize("residual", ["standard", "shortswa"])
def test_model_switches_between_local_and_cad_core_attention(client, residual):
    """The same model, the same data: logits and every parameter gradient agree, local vs CAD."""
    from distca.config import ModelConfig
    from distca.model import DocLayout, LlamaModel, LocalCoreAttention
    from distca.model.llama import next_token_labels
    from distca.runtime.cad_attention import CADCoreAttention

    cfg = ModelConfig(n_layers=2, hidden=H * D, n_heads=H, n_kv_heads=HKV, ffn_hidden=48, vocab_size=61,
                      residual=residual, shortswa_window=24)
    torch.manual_seed(0)
    model = LlamaModel(cfg).double()
    lengths = [90, 200, 30]
    layout = DocLayout.from_lengths(lengths)
    tokens = torch.randint(0, 61, (sum(lengths),), generator=torch.Generator().manual_seed(4))
    labels = next_token_labels(tokens, layout)
    batch = BatchLayout.from_ranks([lengths])
    plans = {w: make_plan(batch, Placement(1, 2, "dedicated"), SchedulerConfig(eps=0.0, window=w, granularity=16,
                                                                              min_offload_pairs=0))[0]
             for w in (-1, 24)}
    results = []
    for core in (LocalCoreAttention(layout, backend="reference"), CADCoreAttention(client, plans)):
        model.zero_grad()
        logits = model(tokens, layout, core)
        torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-10)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
