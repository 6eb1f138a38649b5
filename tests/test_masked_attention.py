"""The rectangle executor equals dense masked attention for every mask family, on every CPU backend.

Ground truth is written here from ``Mask.dense`` (each family's definition, not its rectangles): one
block-diagonal boolean mask over the packed documents, softmax over the allowed keys in fp64, GQA by
``repeat_interleave``, rows with no allowed key (or in no computed shard) giving 0 — differentiated by
torch autograd. The executor runs the same documents as rectangles on the backends' varlen kernels.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distca.attention import BACKEND_NAMES, available_backends, get_backend_reason
from distca.attention.backends import get_backend
from distca.attention.backends.base import logsumexp
from distca.attention.masked import RectCall, backward, document_call, forward, masked_attention
from distca.errors import AttentionInputError, InputError
from distca.masks import Mask, Rect
from tests.test_masks import masks

CPU64 = available_backends("cpu", torch.float64)


@st.composite
def doc_cases(draw, max_docs: int = 4, max_len: int = 40, heads=((4, 2), (4, 4), (2, 1))):
    """Packed documents, a random family each, random shard cuts (some shards left out), GQA."""
    n_docs = draw(st.integers(1, max_docs))
    lens = draw(st.lists(st.integers(1, max_len), min_size=n_docs, max_size=n_docs))
    doc_masks = [draw(masks(n)) for n in lens]
    shards = []
    for d, n in enumerate(lens):
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3)))) if n > 1 else []
        pieces = [(d, a, b) for a, b in itertools.pairwise([0, *cuts, n])]
        keep = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
        shards += [p for p, k in zip(pieces, keep, strict=True) if k or len(pieces) == 1]
    shards = [shards[i] for i in draw(st.permutations(range(len(shards))))]
    hq, hkv = draw(st.sampled_from(heads))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    total = sum(lens)
    mk = lambda h: torch.randn(total, h, 8, generator=gen, dtype=torch.float64)  # noqa: E731
    return lens, doc_masks, shards, mk(hq), mk(hkv), mk(hkv), mk(hq)


def dense_allowed(lens, doc_masks, shards) -> torch.Tensor:
    """Bool ``[tokens, tokens]``: packed query row r may see key row c (block-diagonal, computed shards only)."""
    total = sum(lens)
    allowed = np.zeros((total, total), dtype=bool)
    starts = np.concatenate([[0], np.cumsum(lens)])
    for d, x, y in shards:
        s, n = starts[d], lens[d]
        allowed[s + x:s + y, s:s + n] = doc_masks[d].dense(n)[x:y]
    return torch.from_numpy(allowed)


def dense_attention(q, k, v, allowed):
    """Softmax over allowed keys (fp64, differentiable); rows with none give out 0, lse -inf."""
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * q.shape[-1] ** -0.5
    has = allowed.any(dim=1)  # [q]
    s = torch.where(has[:, None], s.masked_fill(~allowed, float("-inf")), torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * has[:, None]
    lse = torch.where(has, logsumexp(s, dim=-1), torch.full_like(s[..., 0], float("-inf")))
    return torch.einsum("hqk,khd->qhd", p, vv), lse.transpose(0, 1)


def rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    if truth.numel() == 0:
        return 0.0
    return float((got.double() - truth).abs().max() / truth.abs().max().clamp_min(1.0))


def check_against_dense(case, name: str, dtype: torch.dtype, tol: float, device: str = "cpu") -> None:
    lens, doc_masks, shards, q, k, v, dout = case
    truth_in = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    t_out, t_lse = dense_attention(*truth_in, dense_allowed(lens, doc_masks, shards))
    t_grads = torch.autograd.grad(t_out, truth_in, dout.to(dtype).double())

    call = document_call(lens, doc_masks, shards)
    ins = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    out, lse = masked_attention(*ins, call, backend=name)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not lse.requires_grad
    grads = [g.cpu() for g in torch.autograd.grad(out, ins, dout.to(device=device, dtype=dtype))]
    out, lse = out.cpu(), lse.cpu()

    what = f"{name}/{dtype} masks {[m.spec() for m in doc_masks]} shards {shards}"
    dead = torch.isinf(t_lse)
    assert torch.equal(torch.isinf(lse), dead), f"{what}: rows without keys differ"
    assert rel_err(lse[~dead], t_lse[~dead].detach()) <= tol, f"{what}: lse"
    for label, g, t in zip(("out", "dq", "dk", "dv"), (out.detach(), *grads), (t_out.detach(), *t_grads),
                           strict=True):
        err = rel_err(g, t)
        assert err <= tol, f"{what}: {label} relative error {err:.2e}"


def _skip_unless(name: str, dtype: torch.dtype) -> None:
    reason = get_backend_reason(name, torch.device("cpu"), dtype)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("name", BACKEND_NAMES)
@given(case=doc_cases())
def test_every_family_matches_dense_masked_attention_fp64(name, case):
    _skip_unless(name, torch.float64)
    check_against_dense(case, name, torch.float64, 1e-10)


@pytest.mark.parametrize("name", BACKEND_NAMES)
@settings(max_examples=10)
@given(case=doc_cases(max_docs=3))
def test_every_family_matches_dense_masked_attention_fp32(name, case):
    _skip_unless(name, torch.float32)
    check_against_dense(case, name, torch.float32, 2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash", "torch_varlen"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=10)
@given(case=doc_cases(max_docs=3))
def test_every_family_matches_dense_masked_attention_cuda(name, dtype, case):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = get_backend_reason(name, torch.device("cuda"), dtype)
    if reason is not None:
        pytest.skip(reason)
    check_against_dense(case, name, dtype, {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype], "cuda")


@pytest.mark.parametrize("name", CPU64)
@settings(max_examples=15)
@given(length=st.integers(1, 40), data=st.data())
def test_server_buffers_of_one_shard_equal_the_document_rows(name, length, data):
    """A server holds a shard's queries and only its key hull, in its own rows: same result as the document's."""
    mask = data.draw(masks(length))
    x = data.draw(st.integers(0, length - 1))
    y = data.draw(st.integers(x + 1, length))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v, dout = (torch.randn(length, 2, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    whole = document_call([length], mask, [(0, x, y)])
    out, lse = forward(q, k, v, whole, name)
    dq, dk, dv = backward(dout, q, k, v, out, lse, whole, name)

    hull = mask.key_ranges(length, x, y)
    key_rows = np.concatenate([np.arange(a, b) for a, b in hull]) if hull else np.zeros(0, dtype=np.int64)
    buffer_row = {int(j): i for i, j in enumerate(key_rows)}
    rects = []
    for r in mask.rects(length, x, y):  # a rectangle's keys are contiguous inside one hull range
        rects.append(Rect(r.q0 - x, r.q1 - x, buffer_row[r.k0], buffer_row[r.k1 - 1] + 1, r.kind, r.window))
    server = RectCall.from_rects(rects, y - x, len(key_rows))
    kb, vb = k[key_rows], v[key_rows]
    s_out, s_lse = forward(q[x:y], kb, vb, server, name)
    s_dq, s_dk, s_dv = backward(dout[x:y], q[x:y], kb, vb, s_out, s_lse, server, name)
    torch.testing.assert_close(s_out, out[x:y], rtol=0, atol=1e-12)
    torch.testing.assert_close(s_lse, lse[x:y], rtol=0, atol=1e-12)
    torch.testing.assert_close(s_dq, dq[x:y], rtol=0, atol=1e-12)
    torch.testing.assert_close(s_dk, dk[key_rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(s_dv, dv[key_rows], rtol=0, atol=1e-12)


class _Counting:
    """Wraps a backend's forward/backward to count kernel calls; the math is the backend's own."""

    def __init__(self, monkeypatch, name: str):
        self.calls = {"forward": 0, "backward": 0}
        backend = get_backend(name)
        for method in self.calls:
            real = getattr(backend, method)
            monkeypatch.setattr(backend, method, self._counted(method, real))

    def _counted(self, method, real):
        def wrapper(*args, **kwargs):
            self.calls[method] += 1
            return real(*args, **kwargs)
        return wrapper


@pytest.mark.parametrize("name", CPU64)
def test_causal_documents_are_one_kernel_call_with_no_merge(monkeypatch, name):
    from distca.attention import backward as varlen_backward
    from distca.attention import forward as varlen_forward

    lens = [5, 9, 3]
    call = document_call(lens, Mask.sliding(4))
    assert call.n_calls == 1 and call.depth == 1 and call.groups[0].q_identity and call.groups[0].k_identity
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(sum(lens), 2, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    counter = _Counting(monkeypatch, name)
    out, lse = forward(q, k, v, call, name)
    grads = backward(dout, q, k, v, out, lse, call, name)
    assert counter.calls == {"forward": 1, "backward": 1}
    cu = torch.tensor(np.cumsum([0, *lens]), dtype=torch.int32)
    ref_out, ref_lse = varlen_forward(q, k, v, cu, cu, 9, 9, window=4, backend=name)
    ref_grads = varlen_backward(q, k, v, ref_out, ref_lse, dout, cu, cu, 9, 9, window=4, backend=name)
    for a, b in zip((out, lse, *grads), (ref_out, ref_lse, *ref_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_calls_group_rectangles_by_kind_and_reverse_inverse_causal_rows():
    call = document_call([6, 4], [Mask.sink_window(2, 2), Mask.from_slices([(0, 4, 0, 4, "inv_causal")])])
    kinds = [(g.causal, g.window) for g in call.groups]
    assert kinds == [(False, -1), (True, -1), (True, 2)]  # sink full part; triangle + inv_causal; window
    inv = call.groups[1]
    assert inv.q_index[-4:].tolist() == [9, 8, 7, 6] and inv.k_index[-4:].tolist() == [9, 8, 7, 6]
    assert call.depth == 2  # a sink_window query sees its window and the sinks: two results merged
    assert call.pairs == Mask.sink_window(2, 2).cum(6, 6) + 10


def test_uncovered_rows_are_zero_with_minus_inf_lse():
    call = RectCall.from_rects([Rect(1, 3, 0, 2, "full")], n_q=4, n_k=2)
    q, k = torch.randn(4, 2, 8, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64)
    out, lse = forward(q, k, k, call, "reference")
    assert torch.isinf(lse[[0, 3]]).all() and (out[[0, 3]] == 0).all() and torch.isfinite(lse[1:3]).all()
    empty = RectCall.from_rects([], n_q=3, n_k=0)
    out, lse = forward(torch.ones(3, 2, 8), torch.ones(0, 2, 8), torch.ones(0, 2, 8), empty)
    assert (out == 0).all() and torch.isinf(lse).all() and empty.n_calls == 0


def test_bad_inputs_are_refused_by_name():
    with pytest.raises(InputError, match="2 documents but 3 masks"):
        document_call([3, 4], [Mask.causal()] * 3)
    with pytest.raises(InputError, match="shard 0 end"):
        document_call([3, 4], Mask.causal(), [(0, 1, 5)])
    with pytest.raises(InputError, match="share queries"):
        document_call([8], Mask.causal(), [(0, 0, 5), (0, 2, 2), (0, 3, 8)])
    with pytest.raises(InputError, match="mask slice reaches"):
        document_call([3], Mask.from_slices([(0, 5, 0, 5, "full")]))
    with pytest.raises(AttentionInputError, match="only causal rects take a window"):
        RectCall.from_rects([Rect(0, 2, 0, 2, "full", 3)], 2, 2)
    with pytest.raises(AttentionInputError, match="n_q = 2"):
        RectCall.from_rects([Rect(0, 3, 0, 2)], 2, 2)
    with pytest.raises(AttentionInputError, match="kind"):
        RectCall.build([0], [1], [0], [1], ["diagonal"], n_q=1, n_k=1)
    call = document_call([4], Mask.causal())
    with pytest.raises(AttentionInputError, match="covers 4 q rows"):
        forward(torch.ones(5, 2, 8), torch.ones(4, 2, 8), torch.ones(4, 2, 8), call)
