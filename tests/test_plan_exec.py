"""Executing a plan (every server's fused call, the manifests' row moves, server-side and trainer-side
gradient sums) reproduces per-document attention and its gradients exactly (DESIGN.md invariant 1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distca.attention.backends.base import logsumexp
from distca.data import pack_into_ranks
from distca.runtime.plan_exec import RankTensors, execute_plan
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from tests.test_masks import masks, slice_masks


def _doc_attention(batch: BatchLayout, ranks: list[RankTensors], douts, window: int):
    """Reference: whole documents assembled from the ranks, dense attention, autograd gradients."""
    big = {}
    for name in ("q", "k", "v", "dout"):
        src = [getattr(t, name) for t in ranks] if name != "dout" else douts
        doc = [src[0].new_zeros((int(n), *src[0].shape[1:])) for n in batch.doc_len]
        for r, d, o, n, row in zip(batch.piece_rank, batch.piece_doc, batch.piece_off, batch.piece_len,
                                   batch.piece_row, strict=True):
            doc[d][o:o + n] = src[r][row:row + n]
        big[name] = doc
    res = {k: [] for k in ("out", "lse", "dq", "dk", "dv")}
    for q, k, v, do in zip(big["q"], big["k"], big["v"], big["dout"], strict=True):
        n = q.shape[0]
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        cu = torch.tensor([0, n], dtype=torch.int32)
        from distca.attention import varlen_attention

        out, lse = varlen_attention(q, k, v, cu, cu, n, n, window=window, backend="reference")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
        for key, val in zip(res, (out.detach(), lse, dq, dk, dv), strict=True):
            res[key].append(val)
    return res


def _scatter_to_docs(batch: BatchLayout, per_rank: list[torch.Tensor], d: int):
    out = per_rank[0].new_zeros((int(batch.doc_len[d]), *per_rank[0].shape[1:]))
    for r, dd, o, n, row in zip(batch.piece_rank, batch.piece_doc, batch.piece_off, batch.piece_len,
                                batch.piece_row, strict=True):
        if dd == d:
            out[o:o + n] = per_rank[r][row:row + n]
    return out


@st.composite
def packed_batches(draw, max_ranks: int = 5, max_rank_tokens: int = 400) -> BatchLayout:
    """Documents packed into equal per-rank budgets by the trainers' own packer: a document may start on one rank
    and continue on the next ones (the case where rows of one document come from several trainers)."""
    n, budget = draw(st.integers(1, max_ranks)), draw(st.integers(1, max_rank_tokens))
    lengths = draw(st.lists(st.integers(1, n * budget), min_size=1, max_size=10))
    lengths.append(max(1, n * budget - sum(lengths)))  # enough tokens to fill every rank
    packed = pack_into_ranks(lengths, n, budget)
    return BatchLayout.from_ranks(packed.ranks, packed.continues)


@given(batch=packed_batches(), eps=st.sampled_from([0.0, 0.05]),
       window=st.sampled_from([-1, 40]), kind=st.sampled_from(["colocated", "dedicated"]),
       n_servers=st.integers(1, 5), seed=st.integers(0, 1000))
def test_executed_plan_equals_per_document_attention(batch, eps, window, kind, n_servers, seed):
    if kind == "colocated":
        n_servers = batch.n_ranks
    cfg = SchedulerConfig(eps=eps, window=window, granularity=16, min_offload_pairs=200)
    plan, _ = make_plan(batch, Placement(batch.n_ranks, n_servers, kind), cfg)
    gen = torch.Generator().manual_seed(seed)
    ranks = [RankTensors(*(torch.randn(int(n), h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2)))
             for n in batch.rank_tokens]
    douts = [torch.randn(t.q.shape, generator=gen, dtype=torch.float64) for t in ranks]
    got = execute_plan(plan, ranks, douts, backend="reference")
    want = _doc_attention(batch, ranks, douts, window)
    for key in ("out", "lse", "dq", "dk", "dv"):
        for d in range(batch.n_docs):
            torch.testing.assert_close(_scatter_to_docs(batch, got[key], d), want[key][d], rtol=0, atol=1e-10,
                                       msg=lambda m, key=key, d=d: f"{key} of document {d}: {m}")


def test_sdpa_backend_executes_a_realistic_plan_in_fp32():
    from distca.data import sample_batch

    packed = sample_batch("pretrain", 4, 2048, seed=0, elongate=0.3)
    batch = BatchLayout.from_ranks(packed.ranks, packed.continues)
    plan, _ = make_plan(batch, Placement(4, 4), SchedulerConfig(eps=0.02, granularity=128, window=-1))
    assert plan.max_over_mean <= 1.02
    gen = torch.Generator().manual_seed(0)
    ranks = [RankTensors(*(torch.randn(2048, h, 16, generator=gen) for h in (4, 1, 1))) for _ in range(4)]
    douts = [torch.randn(2048, 4, 16, generator=gen) for _ in range(4)]
    got = execute_plan(plan, ranks, douts, backend="sdpa")
    want = _doc_attention(batch, ranks, douts, -1)
    for key in ("out", "dq", "dk", "dv"):
        for d in range(batch.n_docs):
            ref = want[key][d]
            err = (_scatter_to_docs(batch, got[key], d) - ref).abs().max() / ref.abs().max().clamp_min(1.0)
            assert err < 1e-5, (key, d, float(err))


def test_execute_plan_rejects_wrong_rank_count():
    plan, _ = make_plan(BatchLayout.from_ranks([[8], [8]]), Placement(2, 2),
                        SchedulerConfig(eps=0.05, granularity=128, window=-1))
    t = RankTensors(torch.zeros(8, 2, 4), torch.zeros(8, 2, 4), torch.zeros(8, 2, 4))
    with pytest.raises(ValueError, match="plan is for 2 ranks"):
        execute_plan(plan, [t])


def _dense_masked(q, k, v, allowed):
    """Softmax over the allowed keys of one document (GQA by repeating kv heads); rows with no key give 0."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    lse = logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.einsum("hqk,khd->qhd", p, vv), lse.T


def _check_against_dense(batch, plan, doc_masks, seed: int, backend: str) -> None:
    """Execute ``plan`` on random fp64 rows and compare every document with dense masked attention under its mask
    (``doc_masks[d]``), forward (out, lse) and backward (dq, dk, dv), to 1e-10."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [RankTensors(*(torch.randn(int(n), h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2)))
             for n in batch.rank_tokens]
    douts = [torch.randn(t.q.shape, generator=gen, dtype=torch.float64) for t in ranks]
    got = execute_plan(plan, ranks, douts, backend=backend)
    for d in range(batch.n_docs):
        q, k, v = (_scatter_to_docs(batch, [getattr(t, n) for t in ranks], d).requires_grad_() for n in "qkv")
        do = _scatter_to_docs(batch, douts, d)
        out, lse = _dense_masked(q, k, v, torch.from_numpy(doc_masks[d].dense(int(batch.doc_len[d]))))
        want = dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *torch.autograd.grad(out, (q, k, v), do)),
                        strict=True))
        for key, val in want.items():
            torch.testing.assert_close(_scatter_to_docs(batch, got[key], d), val.detach(), rtol=0, atol=1e-10,
                                       msg=lambda m, key=key, d=d: f"{doc_masks[d].spec()}: {key} of doc {d}: {m}")


@given(batch=packed_batches(max_ranks=4, max_rank_tokens=200),
       spec=st.sampled_from(["chunked:24", "sink_window:5:17", "prefix_lm:30", "bidirectional", "window:40", "causal"]),
       kind=st.sampled_from(["colocated", "dedicated"]), n_servers=st.integers(1, 4), seed=st.integers(0, 1000),
       backend=st.sampled_from(["reference", "sdpa"]))
def test_executed_masked_plan_equals_dense_masked_attention(batch, spec, kind, n_servers, seed, backend):
    """Every mask family planned over servers (exact key hulls, rectangles on the servers and on the trainers)
    equals dense masked attention of each whole document, forward and backward."""
    from distca.masks import Mask

    mask = Mask.parse(spec)
    if kind == "colocated":
        n_servers = batch.n_ranks
    cfg = SchedulerConfig(eps=0.05, mask=mask, granularity=16, min_offload_pairs=200)
    plan, _ = make_plan(batch, Placement(batch.n_ranks, n_servers, kind), cfg)
    _check_against_dense(batch, plan, [mask] * batch.n_docs, seed, backend)


@settings(max_examples=30, deadline=None)
@given(batch=packed_batches(max_ranks=4, max_rank_tokens=120), data=st.data(),
       kind=st.sampled_from(["colocated", "dedicated"]), n_servers=st.integers(1, 4), seed=st.integers(0, 1000),
       backend=st.sampled_from(["reference", "sdpa"]), exact=st.booleans())
def test_executed_plan_with_per_document_masks_equals_dense_masked_attention(batch, data, kind, n_servers, seed,
                                                                             backend, exact):
    """Per-document masks (random slice grids — full, causal, inverse-causal, bi-causal — and other families mixed
    in one batch) planned over servers equal dense masked attention of each document, forward and backward."""
    from distca.masks import Mask

    dm = [data.draw(slice_masks(int(n)) if data.draw(st.booleans()) else masks(int(n))) for n in batch.doc_len]
    if kind == "colocated":
        n_servers = batch.n_ranks
    cfg = SchedulerConfig(eps=0.05, mask=Mask.causal(), granularity=16, min_offload_pairs=200, exact_keys=exact)
    plan, _ = make_plan(batch.with_masks(dm), Placement(batch.n_ranks, n_servers, kind), cfg)
    _check_against_dense(batch, plan, dm, seed, backend)
