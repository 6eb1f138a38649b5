"""Every available backend equals the dense per-document definition of causal attention.

Ground truth is whole-document attention written from the mask definition in fp64 with torch
autograd for the gradients — independent of every backend, including ``reference``. Inputs are
cut into random shards (random cuts, random order, random window, GQA) and run as one fused
varlen call; outputs and gradients are scattered back to documents and compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distca.attention import (
    BACKEND_NAMES,
    CATask,
    backward,
    forward,
    get_backend_reason,
    shard_document,
    varlen_attention,
    varlen_metadata,
)
from distca.attention.backends.base import logsumexp
from distca.attention.tasks import task_row_indices
from distca.errors import AttentionInputError


# -- cases: packed documents, shard cuts, and the dense reference --------------------------------
@dataclass
class Case:
    """Packed documents with per-token q/k/v/dout, cut into tasks for one fused call."""

    lengths: list[int]
    tasks: list[CATask]
    window: int
    q: torch.Tensor  # [tokens, Hq, D] (packed documents)
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor

    @property
    def doc_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def fused_inputs(self, tasks: list[CATask] | None = None, dtype: torch.dtype | None = None,
                     device: str = "cpu"):
        """``(q, k, v, dout, cu_q, cu_k, max_q, max_k, q_rows, k_rows)`` of a fused call over tasks."""
        tasks = self.tasks if tasks is None else tasks
        q_rows, k_rows = (torch.from_numpy(r) for r in task_row_indices(tasks, self.doc_starts))
        cu_q, cu_k, mq, mk = varlen_metadata(tasks)
        dt = dtype or self.q.dtype
        to = lambda t: t.to(device=device, dtype=dt)  # noqa: E731
        return (to(self.q[q_rows]), to(self.k[k_rows]), to(self.v[k_rows]), to(self.dout[q_rows]),
                torch.from_numpy(cu_q).to(device), torch.from_numpy(cu_k).to(device), mq, mk, q_rows, k_rows)


@st.composite
def cases(draw, max_docs: int = 4, max_len: int = 300, heads=((4, 4), (4, 2), (6, 1)),
          head_dims=(8, 16), windows=(-1, 1, 2, 5, 16, 64, 1000)) -> Case:
    """Random documents, random shard cuts, random window and GQA layout."""
    n_docs = draw(st.integers(1, max_docs))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=n_docs, max_size=n_docs))
    window = draw(st.sampled_from(windows))
    hq, hkv = draw(st.sampled_from(heads))
    d = draw(st.sampled_from(head_dims))
    tasks = []
    for doc, n in enumerate(lengths):
        cuts = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4, unique=True)) if n > 1 else []
        tasks += shard_document(doc, n, cuts, window)
    order = draw(st.permutations(range(len(tasks))))  # a server sees shards in any order
    tasks = [tasks[i] for i in order]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    mk = lambda h: torch.randn(total, h, d, generator=gen, dtype=torch.float64)  # noqa: E731
    return Case(lengths, tasks, window, mk(hq), mk(hkv), mk(hkv), mk(hq))


def dense_document_attention(q, k, v, window: int, scale: float):
    """Whole-document causal attention written from the mask definition, differentiable (fp64).

    Query ``i`` attends key ``j`` iff ``j <= i`` and (``window == -1`` or ``i - j < window``):
    each query sees at most ``window`` keys, itself included.
    """
    n, hq, _ = q.shape
    groups = hq // k.shape[1]
    kk = k.repeat_interleave(groups, dim=1)
    vv = v.repeat_interleave(groups, dim=1)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = j <= i
    if window > 0:
        allowed &= (i - j) < window
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = logsumexp(s, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vv)
    return out, lse.transpose(0, 1)


# -- backends against the reference ----------------------------------------------------------------
# Normwise relative error bounds: max|x - truth| / max|truth|, per dtype (documented in README).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16)
GPU_DTYPES = (torch.bfloat16, torch.float16)


def _configs():
    for name in BACKEND_NAMES:
        for dtype in CPU_DTYPES:
            yield pytest.param(name, "cpu", dtype, id=f"{name}-cpu-{str(dtype)[6:]}")
        for dtype in GPU_DTYPES:
            yield pytest.param(name, "cuda", dtype, id=f"{name}-cuda-{str(dtype)[6:]}", marks=pytest.mark.gpu)


def _skip_unless_runnable(name: str, device: str, dtype: torch.dtype) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = get_backend_reason(name, torch.device(device), dtype)
    if reason is not None:
        pytest.skip(reason)


def ground_truth(case: Case, dtype: torch.dtype):
    """Per-document dense attention on inputs rounded to ``dtype``, computed in fp64."""
    outs, lses, dqs, dks, dvs = [], [], [], [], []
    scale = case.q.shape[-1] ** -0.5
    start = 0
    for n in case.lengths:
        sl = slice(start, start + n)
        q, k, v = (t[sl].to(dtype).double().requires_grad_() for t in (case.q, case.k, case.v))
        out, lse = dense_document_attention(q, k, v, case.window, scale)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), case.dout[sl].to(dtype).double())
        outs.append(out.detach())
        lses.append(lse.detach())
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
        start += n
    return [torch.cat(x) for x in (outs, lses, dqs, dks, dvs)]


def run_sharded(case: Case, backend: str, dtype: torch.dtype, device: str = "cpu"):
    """One fused call over the case's shards, graph-free forward + backward, scattered to documents."""
    q, k, v, dout, cu_q, cu_k, mq, mk, q_rows, k_rows = case.fused_inputs(dtype=dtype, device=device)
    out, lse = forward(q, k, v, cu_q, cu_k, mq, mk, window=case.window, backend=backend)
    dq, dk, dv = backward(q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, window=case.window, backend=backend)
    assert out.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    total = case.q.shape[0]
    f64 = torch.float64
    res = [torch.zeros(total, *out.shape[1:], dtype=f64), torch.zeros(total, lse.shape[1], dtype=f64),
           torch.zeros(total, *dq.shape[1:], dtype=f64), torch.zeros(case.k.shape, dtype=f64),
           torch.zeros(case.v.shape, dtype=f64)]
    res[0][q_rows] = out.cpu().double()
    res[1][q_rows] = lse.cpu().double()
    res[2][q_rows] = dq.cpu().double()
    res[3].index_add_(0, k_rows, dk.cpu().double())  # a key used by several shards sums their grads
    res[4].index_add_(0, k_rows, dv.cpu().double())
    return res


def rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    # Inputs are O(1) normals: quantities that are exactly 0 in truth (dq of a one-key query)
    # are judged against 1, not against their own magnitude.
    return float((got - truth).abs().max() / truth.abs().max().clamp_min(1.0))


@pytest.mark.parametrize(("name", "device", "dtype"), list(_configs()))
@given(case=cases())
def test_sharded_fused_call_matches_dense_document_attention(name, device, dtype, case):
    _skip_unless_runnable(name, device, dtype)
    got = run_sharded(case, name, dtype, device)
    truth = ground_truth(case, dtype)
    for label, g, t in zip(("out", "lse", "dq", "dk", "dv"), got, truth, strict=True):
        err = rel_err(g, t)
        assert err <= TOLERANCE[dtype], f"{name}/{dtype} {label}: relative error {err:.2e} (window {case.window})"


@pytest.mark.parametrize("name", BACKEND_NAMES)
@given(case=cases(max_docs=3, max_len=200))
def test_autograd_path_equals_explicit_backward(name, case):
    _skip_unless_runnable(name, "cpu", torch.float32)
    q, k, v, dout, cu_q, cu_k, mq, mk, _, _ = case.fused_inputs(dtype=torch.float32)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, mq, mk, window=case.window, backend=name)
    assert not lse.requires_grad
    out.backward(dout)
    out2, lse2 = forward(q.detach(), k.detach(), v.detach(), cu_q, cu_k, mq, mk, window=case.window, backend=name)
    grads = backward(q.detach(), k.detach(), v.detach(), out2, lse2, dout, cu_q, cu_k, mq, mk,
                     window=case.window, backend=name)
    torch.testing.assert_close(out.detach(), out2, rtol=0, atol=0)
    for a, b in zip((q.grad, k.grad, v.grad), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["reference", "sdpa"])
@given(case=cases(max_docs=4, max_len=400, windows=(-1, 3, 32)))
def test_one_fused_call_over_many_shards_equals_per_document_calls(name, case):
    """Invariant 1 in the backend's own terms: shards of many documents in one call == each whole document."""
    _skip_unless_runnable(name, "cpu", torch.float32)
    sharded = run_sharded(case, name, torch.float32)
    whole = Case(case.lengths, [], case.window, case.q, case.k, case.v, case.dout)
    per_doc = [torch.zeros_like(x) for x in sharded]
    start = 0
    for doc, n in enumerate(case.lengths):
        whole.tasks = [CATask.for_queries(doc, 0, n, case.window)]
        got = run_sharded(whole, name, torch.float32)
        for acc, g in zip(per_doc, got, strict=True):
            acc[start:start + n] = g[start:start + n]
        start += n
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), sharded, per_doc, strict=True):
        assert rel_err(a, b) <= 1e-5, f"{label} differs between sharded and per-document calls"


# -- non-causal calls (the mask families' ``full`` rectangles) ----------------------------------------
@st.composite
def full_cases(draw):
    """Independent (q_len, kv_len) sequences, GQA, packed for one non-causal fused call."""
    n = draw(st.integers(1, 4))
    q_lens = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    k_lens = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    hq, hkv = draw(st.sampled_from(((4, 4), (4, 2), (6, 1))))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    mk = lambda rows, h: torch.randn(rows, h, 8, generator=gen, dtype=torch.float64)  # noqa: E731
    tq, tk = sum(q_lens), sum(k_lens)
    return q_lens, k_lens, mk(tq, hq), mk(tk, hkv), mk(tk, hkv), mk(tq, hq)


def _full_truth(q_lens, k_lens, q, k, v, dout):
    """Per sequence, softmax over every key (fp64 autograd): ``(out, lse, dq, dk, dv)``."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    outs, lses = [], []
    qa = ka = 0
    for nq, nk in zip(q_lens, k_lens, strict=True):
        kk = k[ka:ka + nk].repeat_interleave(groups, dim=1)
        vv = v[ka:ka + nk].repeat_interleave(groups, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[qa:qa + nq], kk) * q.shape[-1] ** -0.5
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vv))
        lses.append(logsumexp(s, dim=-1).transpose(0, 1))
        qa, ka = qa + nq, ka + nk
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, (q, k, v), dout.double())
    return out.detach(), torch.cat(lses).detach(), *grads


@pytest.mark.parametrize(("name", "device", "dtype"), [
    p for p in _configs() if p.values[2] in (torch.float64, torch.float32, torch.float16)])
@given(case=full_cases())
def test_non_causal_call_sees_every_key_of_its_sequence(name, device, dtype, case):
    _skip_unless_runnable(name, device, dtype)
    q_lens, k_lens, q, k, v, dout = case
    cu_q = torch.tensor(np.cumsum([0, *q_lens]), dtype=torch.int32, device=device)
    cu_k = torch.tensor(np.cumsum([0, *k_lens]), dtype=torch.int32, device=device)
    q, k, v, dout = (t.to(device=device, dtype=dtype) for t in (q, k, v, dout))
    mq, mk = max(q_lens), max(k_lens)
    out, lse = forward(q, k, v, cu_q, cu_k, mq, mk, backend=name, causal=False)
    grads = backward(q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, backend=name, causal=False)
    truth = _full_truth(q_lens, k_lens, q.cpu(), k.cpu(), v.cpu(), dout.cpu())
    for label, g, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), truth, strict=True):
        assert g.shape == t.shape, f"{name} non-causal {label}: shape {tuple(g.shape)}, want {tuple(t.shape)}"
        err = rel_err(g.cpu().double(), t) if t.numel() else 0.0
        assert err <= TOLERANCE[dtype], f"{name}/{dtype} non-causal {label}: relative error {err:.2e}"
    # The autograd path computes the same gradients.
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    out2, _ = varlen_attention(qa, ka, va, cu_q, cu_k, mq, mk, backend=name, causal=False)
    out2.backward(dout)
    for a, b in zip((qa.grad, ka.grad, va.grad), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_causal_call_refuses_a_window():
    q = torch.zeros(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(AttentionInputError, match="window"):
        forward(q, q, q, cu, cu, 4, 4, window=2, causal=False)


def test_gpu_kernels_keyless_rows_get_minus_inf_lse():
    """flash-attn writes +inf for a row that sees no key; DistCA's lse is -inf there (a merge's neutral element)."""
    from distca.attention.backends.gpu_common import lse_to_token_major

    got = lse_to_token_major(torch.tensor([[0.5, float("inf"), float("-inf")]]), 3, 1)
    assert got.tolist() == [[0.5], [float("-inf")], [float("-inf")]]


@pytest.mark.parametrize("dim", [0, -1])
def test_logsumexp_is_exact_to_rounding_and_minus_inf_where_every_entry_is(dim):
    """The backends' and the merges' log-sum-exp (not torch.logsumexp: see its docstring) against numpy in long
    double, on causal scores with fully masked rows and columns."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 300, 300, generator=g, dtype=torch.float64) * 3
    s = s.masked_fill(~torch.ones(300, 300, dtype=torch.bool).tril(-1), float("-inf"))  # row 0, last column: none
    got = logsumexp(s, dim).numpy()
    x = s.numpy().astype(np.longdouble)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.max(x, axis=dim, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        want = np.log(np.exp(x - m).sum(axis=dim)) + np.squeeze(m, axis=dim)
    empty = np.isneginf(want)
    assert empty.any() and np.array_equal(np.isneginf(got), empty)
    assert np.abs(got[~empty] - want[~empty]).max() < 1e-14
    assert logsumexp(s.float(), dim).dtype == torch.float32
