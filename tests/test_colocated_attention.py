"""The colocated baseline for documents split at rank boundaries: each rank attends its own queries,
borrowing earlier ranks' keys through a gloo all-gather. Checked in real processes against
whole-document attention (outputs and q/k/v gradients), including a document spanning three ranks,
a rank with no borrowed keys, a sliding window, and the mask families whose queries see later keys of their
document (prefix-LM, bidirectional) or a part of its earlier ones (chunked, sink + window)."""

from __future__ import annotations

import pytest
import torch

from distca.attention import CATask, varlen_attention, varlen_metadata
from distca.attention.masked import document_call, masked_attention
from distca.masks import Mask, attention_key
from distca.train.colocated_attention import GroupLocalCoreAttention, PrefixRows

pytestmark = pytest.mark.cluster  # spawns trainer/server processes (left out of `make test-fast`)

H, HKV, D = 4, 2, 8


def _case(ranks, seed):
    gen = torch.Generator().manual_seed(seed)
    n = [sum(p) for p in ranks]
    mk = lambda h: [torch.randn(t, h, D, generator=gen, dtype=torch.float64) for t in n]  # noqa: E731
    return mk(H), mk(HKV), mk(HKV), mk(H)


def _rank(rank, world, port, ranks, continues, windows, *rest):
    import torch.distributed as dist

    *parts, q_out = rest  # (q_out,) or (parts, q_out): independent parts, each (ranks, continues)
    parts = parts[0] if parts else None
    from distca.model.core import DocLayout

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        qs, ks, vs, douts = _case(ranks, 0)
        if parts is None:
            first = PrefixRows.of(ranks, continues, rank).n
            core = GroupLocalCoreAttention(DocLayout.from_lengths(ranks[rank], first), ranks, continues, rank,
                                           dist.group.WORLD, backend="reference")
        else:  # independent parts: rank r's rows of part 0, then of part 1
            layout = DocLayout.concat([DocLayout.from_lengths(r_[rank], PrefixRows.of(r_, c_, rank).n)
                                       for r_, c_ in parts])
            core = GroupLocalCoreAttention(layout, *parts[0], rank, dist.group.WORLD, backend="reference",
                                           parts=parts)
        res = []
        for window in windows:  # one process group, every mask of the case in turn
            q, k, v = (x[rank].clone().requires_grad_() for x in (qs, ks, vs))
            out = core(q, k, v, attention_key(window))
            out.backward(douts[rank])
            # numpy, not tensors: a tensor would travel as a shared-memory handle that dies with this process
            res.append({"out": out.detach().numpy(), "dq": q.grad.numpy(), "dk": k.grad.numpy(),
                        "dv": v.grad.numpy()})
        q_out.put((rank, res))
    except Exception as exc:
        q_out.put((rank, repr(exc)))
    finally:
        dist.destroy_process_group()


def _reference(ranks, continues, window, seed_ranks=None, rows=None):
    """Whole documents in one call; gradients by autograd, scattered back to ranks. ``seed_ranks`` / ``rows``: the
    case's tensors are drawn for ``seed_ranks`` and this part holds rows ``rows`` of every rank's."""
    qs, ks, vs, douts = _case(seed_ranks or ranks, 0)
    if rows is not None:
        qs, ks, vs, douts = ([x[rows] for x in xs] for xs in (qs, ks, vs, douts))
    cat = lambda xs: torch.cat(xs).clone().requires_grad_()  # noqa: E731
    q, k, v = cat(qs), cat(ks), cat(vs)
    docs = []
    for r, pieces in enumerate(ranks):
        for i, n in enumerate(pieces):
            if i == 0 and continues[r]:
                docs[-1] += n
            else:
                docs.append(n)
    key = attention_key(window)
    if isinstance(key, Mask):  # whole documents on the masked executor (itself checked against dense attention)
        out, _ = masked_attention(q, k, v, document_call(docs, key), backend="reference")
    else:
        cu_q, cu_k, mq, mk = varlen_metadata([CATask.for_queries(d, 0, n, key) for d, n in enumerate(docs)])
        out, _ = varlen_attention(q, k, v, torch.from_numpy(cu_q), torch.from_numpy(cu_k), mq, mk, window=key,
                                  backend="reference")
    out.backward(torch.cat(douts))
    split = lambda x: torch.split(x.detach(), [sum(p) for p in ranks])  # noqa: E731
    return {"out": split(out), "dq": split(q.grad), "dk": split(k.grad), "dv": split(v.grad)}


FAMILIES = ["chunked:24", "sink_window:4:20", "prefix_lm:50", "bidirectional"]
CASES = {
    "doc-spans-three-ranks": ([[40, 24], [64], [20, 44]], [False, True, True], [-1]),
    "no-crossing": ([[30, 34], [64], [10, 54]], [False, False, False], [-1, *FAMILIES]),
    "window-across-boundary": ([[50, 14], [64], [64]], [False, True, False], [24]),
    "mask-families-across-boundaries": ([[40, 24], [64], [20, 44]], [False, True, True], FAMILIES),
}


PARTS = [([[40, 24], [64], [20, 44]], [False, True, True]), ([[50, 14], [64], [30, 34]], [False, True, False])]


def test_independent_parts_take_one_gather_and_equal_whole_documents(run_trainers):
    """``train.nano_split: repack``: every rank holds its rows of part 0 (a document over three ranks), then of part 1
    (one over two); one core attention serves both, each part's documents borrowing keys from the same part's rows
    of earlier ranks. Equal to whole documents for causal, a window and masked families."""
    from distca.train.launch import free_port

    windows = [-1, 24, "chunked:24", "prefix_lm:50"]
    ranks = [[x for r_, _ in PARTS for x in r_[r]] for r in range(3)]  # per rank: both parts' pieces
    port = free_port()
    got = run_trainers(_rank, [(r, 3, port, ranks, None, windows, PARTS) for r in range(3)], timeout_s=120)
    for i, window in enumerate(windows):
        refs = [_reference(r_, c_, window, seed_ranks=ranks, rows=_part_rows(j)) for j, (r_, c_) in enumerate(PARTS)]
        for r in range(3):
            assert not isinstance(got[r], str), got[r]
            for key in ("out", "dq", "dk", "dv"):
                want = torch.cat([ref[key][r] for ref in refs])
                torch.testing.assert_close(torch.from_numpy(got[r][i][key]), want, rtol=1e-9, atol=1e-9,
                                           msg=f"{window}: rank {r} {key}")


def _part_rows(j: int) -> slice:
    return slice(0, 64) if j == 0 else slice(64, 128)


@pytest.mark.parametrize("name", list(CASES))
def test_group_local_attention_equals_whole_documents(name, run_trainers):
    from distca.train.launch import free_port

    ranks, continues, windows = CASES[name]
    port = free_port()
    got = run_trainers(_rank, [(r, len(ranks), port, ranks, continues, windows) for r in range(len(ranks))],
                       timeout_s=120)
    for i, window in enumerate(windows):
        ref = _reference(ranks, continues, window)
        for r in range(len(ranks)):
            assert not isinstance(got[r], str), got[r]
            for key in ("out", "dq", "dk", "dv"):
                torch.testing.assert_close(torch.from_numpy(got[r][i][key]), ref[key][r], rtol=1e-9, atol=1e-9,
                                           msg=f"{window}: rank {r} {key}")


def test_prefix_rows():
    assert PrefixRows.of([[40, 30], [64], [20, 44]], [False, True, True], 2).pieces == ((0, 40, 30), (1, 0, 64))
    assert PrefixRows.of([[40, 30], [64], [20, 44]], [False, True, False], 2).n == 0
    assert PrefixRows.of([[40, 30], [64], [20, 44]], [False, True, True], 1).pieces == ((0, 40, 30),)
    assert PrefixRows.of([[40, 30], [64], [20, 44]], [False, True, True], 0).n == 0
    assert PrefixRows.of([[64], [64], [64]], [False, True, True], 2).pieces == ((0, 0, 64), (1, 0, 64))


def test_split_documents_need_a_group():
    from distca.model.core import DocLayout

    with pytest.raises(ValueError, match="process group"):
        GroupLocalCoreAttention(DocLayout.from_lengths([10]), [[10], [10]], [False, True], 1, group=None)
    with pytest.raises(ValueError, match="same number of tokens"):
        GroupLocalCoreAttention(DocLayout.from_lengths([10]), [[5], [10]], [False, True], 1, group=None)

