"""The mask convention, edge cases and input validation of the public attention API."""

from __future__ import annotations

import pytest
import torch

from distca.attention import CATask, available_backends, forward, key_range, pair_count, varlen_attention
from distca.errors import AttentionInputError, BackendUnavailableError

CPU_BACKENDS = available_backends("cpu", torch.float32)


def _cu(*lens: int) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def _uniform_probe(n: int, window: int, backend: str) -> torch.Tensor:
    """Attention weights of a length-``n`` document: q = 0 makes every visible key equally likely,
    and one-hot values make ``out[i, :, j]`` the weight query i gives key j."""
    q = torch.zeros(n, 1, n)
    k = torch.randn(n, 1, n)
    v = torch.eye(n).unsqueeze(1)
    out, _ = forward(q, k, v, _cu(n), _cu(n), n, n, window=window, backend=backend)
    return out[:, 0, :]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [1, 2, 3, 5, -1])
def test_window_convention_w_keys_including_self(backend, window):
    n = 7
    weights = _uniform_probe(n, window, backend)
    for i in range(n):
        visible = [j for j in range(n) if j <= i and (window == -1 or i - j < window)]
        expected = torch.zeros(n)
        expected[visible] = 1.0 / len(visible)
        torch.testing.assert_close(weights[i], expected, atol=1e-6, rtol=0)
        # The same visible set as key_range and as many keys as pair_count says.
        k0, k1 = key_range(i, i + 1, window)
        assert visible == list(range(k0, k1))
        assert int(pair_count(1, k1 - k0, window)) == len(visible)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_suffix_shard_is_bottom_right_aligned(backend):
    """A shard [4, 7) of a 7-token document with keys [0, 7): query i sees keys [0, 4 + i]."""
    n, q0 = 7, 4
    q = torch.zeros(n - q0, 1, n)
    v = torch.eye(n).unsqueeze(1)
    out, _ = forward(q, torch.randn(n, 1, n), v, _cu(n - q0), _cu(n), n - q0, n, backend=backend)
    for i in range(n - q0):
        expected = torch.zeros(n)
        expected[: q0 + i + 1] = 1.0 / (q0 + i + 1)
        torch.testing.assert_close(out[i, 0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_queries_without_keys_get_zero_output_and_minus_inf_lse(backend):
    """More queries than keys: the first q_len - kv_len queries see nothing (flash-attn semantics)."""
    q = torch.randn(5, 2, 4)
    k = torch.randn(2, 2, 4)
    out, lse = forward(q, k, k.clone(), _cu(5), _cu(2), 5, 2, backend=backend)
    assert torch.all(out[:3] == 0) and torch.all(torch.isneginf(lse[:3]))
    assert torch.isfinite(lse[3:]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_tasks_are_allowed(backend):
    q = torch.randn(3, 2, 4, requires_grad=True)
    k = torch.randn(3, 2, 4, requires_grad=True)
    out, _ = varlen_attention(q, k, k, _cu(0, 3, 0), _cu(0, 3, 0), 3, 3, backend=backend)
    out.sum().backward()
    assert out.shape == (3, 2, 4) and torch.isfinite(q.grad).all()


def test_catask_rejects_keys_its_mask_does_not_allow():
    assert CATask.for_queries(0, 10, 20, window=4) == CATask(0, 10, 20, 7, 20, 4)
    with pytest.raises(ValueError, match=r"must attend keys \[0, 20\)"):
        CATask(0, 10, 20, 5, 20)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.update(cu_q=a["cu_q"].long()), "cu_seqlens_q must be a 1-D int32"),
        (lambda a: a.update(cu_k=torch.tensor([0, 5, 4], dtype=torch.int32)), "non-decreasing"),
        (lambda a: a.update(cu_q=torch.tensor([0, 3], dtype=torch.int32)), "ends at 3 but the tensor has 4"),
        (lambda a: a.update(cu_q=torch.tensor([1, 4], dtype=torch.int32)), "must start at 0"),
        (lambda a: a.update(cu_k=torch.tensor([0, 2, 4], dtype=torch.int32)), "has 1 sequences but"),
        (lambda a: a.update(k=torch.randn(4, 3, 8), v=torch.randn(4, 3, 8)), "multiple of kv heads"),
        (lambda a: a.update(v=torch.randn(4, 2, 4)), "k and v shapes differ"),
        (lambda a: a.update(q=torch.randn(4, 4)), r"q must be \[tokens, heads, head_dim\]"),
        (lambda a: a.update(q=a["q"].double()), "dtypes differ"),
        (lambda a: a.update(window=0), "window must be -1"),
        (lambda a: a.update(max_q=2), "below the longest"),
    ],
)
def test_bad_inputs_raise_errors_that_name_the_problem(mutate, match):
    args = dict(q=torch.randn(4, 4, 8), k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8), cu_q=_cu(4), cu_k=_cu(4),
                max_q=4, max_k=4, window=-1)
    mutate(args)
    with pytest.raises(AttentionInputError, match=match):
        forward(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], args["max_q"], args["max_k"],
                window=args["window"], backend="reference")


def test_unknown_or_unusable_backend_is_a_clear_error():
    q = torch.randn(4, 2, 8)
    with pytest.raises(BackendUnavailableError, match="unknown attention backend 'nope'"):
        forward(q, q, q, _cu(4), _cu(4), 4, 4, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match=r"torch_varlen.*cannot run here"):
            forward(q, q, q, _cu(4), _cu(4), 4, 4, backend="torch_varlen")


def test_gpu_backends_are_unavailable_only_without_cuda_or_their_package(monkeypatch):
    import sys

    from distca.attention.backends import flash, torch_varlen

    for backend in (flash.FlashBackend(), torch_varlen.TorchVarlenBackend()):
        assert "CUDA" in backend.unavailable_reason(torch.device("cpu"), torch.bfloat16)
    # Not installed: unavailable, not an error.
    monkeypatch.setattr(flash.importlib.util, "find_spec", lambda name: None)
    assert flash._interface() is None
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # as in a torch without the module
    assert torch_varlen._varlen_ops() is None


def test_a_broken_gpu_build_is_an_error_not_a_missing_backend(monkeypatch):
    import builtins
    import sys

    from distca.attention.backends import flash, torch_varlen
    from distca.errors import BackendBrokenError

    def broken(name, *args, **kwargs):
        raise OSError(f"libcudart.so.12: cannot open shared object file (loading {name})")

    monkeypatch.setattr(flash.importlib.util, "find_spec", lambda name: object())  # flash_attn is installed
    monkeypatch.setattr(flash.importlib, "import_module", broken)
    with pytest.raises(BackendBrokenError, match=r"flash_attn is installed but does not import.*libcudart"):
        flash._interface()
    real_import = builtins.__import__
    monkeypatch.delitem(sys.modules, "torch.nn.attention.varlen", raising=False)
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: broken(name) if name ==
                        "torch.nn.attention.varlen" else real_import(name, *a, **k))
    with pytest.raises(BackendBrokenError, match=r"torch.nn.attention.varlen does not import \(OSError"):
        torch_varlen._varlen_ops()


def test_auto_picks_sdpa_on_cpu():
    from distca.attention import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "sdpa"
