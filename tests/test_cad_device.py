"""The CAD path with tensors on a device: servers computing on a GPU (host staging), trainers whose
q/k/v live on a GPU, and the library's ``torch_varlen`` backend across torch's changing private ops.

The CPU tests pin what must not change (the default server is a CPU server, host results stay on the
host) and drive the ``torch_varlen`` backend's kernel calls through stand-in ops with the argument lists
of different torch releases. The GPU tests (skipped only without CUDA) compare CAD with the servers on
the GPU — and mixed placements — against local varlen attention and an fp64 reference.

Self-contained on purpose (no fixtures from conftest.py): on a GPU machine without hypothesis this file
runs as ``pytest --noconftest tests/test_cad_device.py`` (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distca.attention import resolve_backend, varlen_attention
from distca.attention.backends.gpu_common import call_by_schema
from distca.attention.backends.torch_varlen import TorchVarlenBackend
from distca.attention.varlen import make_meta
from distca.errors import BackendUnavailableError
from distca.runtime.cad_attention import cad_attention
from distca.runtime.client import CADClient
from distca.runtime.plan_exec import RankTensors, execute_plan
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.server.loop import AttentionServer, ServerConfig
from distca.transport.channel import TransportConfig
from distca.transport.wire import Kind

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=60.0, secret=None, checksum=False,
                       shm_max_bytes=1 << 30)
H, HKV, D = 8, 2, 64
LENGTHS = [700, 300, 24]  # the 24-token document stays on the trainer (a LOCAL task) under "dedicated"


def _plan(n_servers: int, kind: str = "dedicated"):
    cfg = SchedulerConfig(eps=0.0, granularity=16, window=-1)  # default offload threshold: tiny documents stay local
    plan, _ = make_plan(BatchLayout.from_ranks([LENGTHS]), Placement(1, n_servers, kind), cfg)
    return plan


def _cu(device="cpu"):
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    return [torch.randn(t, h, D, generator=gen, dtype=torch.float64) for h in (H, HKV, HKV, H)]


def _reference(q, k, v, dout):
    """fp64 whole-document attention on the host: out, lse, dq, dk, dv."""
    q, k, v = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    cu, m = _cu(), max(LENGTHS)
    out, lse = varlen_attention(q, k, v, cu, cu, m, m, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), dout.double().cpu())
    return out.detach(), lse, *grads


def _normwise(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - ref).abs().max() / max(float(ref.abs().max()), 1.0))


def _cad_vs_reference(client, plan, device, dtype, tol):
    q64, k64, v64, do64 = _inputs()
    q, k, v = (x.to(device, dtype).requires_grad_() for x in (q64, k64, v64))
    dout = do64.to(device, dtype)
    out, lse = cad_attention(q, k, v, plan, client)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert out.device == q.device and out.dtype == dtype and lse.device == q.device
    assert all(g.device == q.device and g.dtype == dtype for g in grads)
    ref = _reference(q64, k64, v64, do64)
    errs = {n: _normwise(a, b) for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref,
                                                  strict=True)}
    assert max(errs.values()) <= tol, errs
    return out, lse, grads, errs


@contextlib.contextmanager
def _servers(n: int, cfg: ServerConfig):
    """``n`` attention servers on threads of this process (the device is what these tests vary) and one
    client connected to all of them; the servers are shut down on exit."""
    servers = [AttentionServer(ServerConfig(**{**cfg.__dict__, "name": f"server{i}"})) for i in range(n)]
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_s": 0.1}, daemon=True) for s in servers]
    for t in threads:
        t.start()
    client = CADClient(0, [s.address for s in servers], TCFG, backend="auto")
    try:
        yield client
    finally:
        for ep in client.eps:
            ep.send(Kind.SHUTDOWN)
            ep.recv(timeout_s=10)
        client.close()
        for t in threads:
            t.join(timeout=10)


# -- CPU ---------------------------------------------------------------------------------------------


def test_server_config_defaults_to_a_cpu_server_and_checks_the_device():
    shape = dict(n_heads=8, n_kv_heads=2, head_dim=32, dtype="float32", backend="auto", max_plans=8, max_rows=1 << 16,
                 transport=TCFG)
    assert ServerConfig(**shape).device == "cpu"
    assert ServerConfig(**shape, device="cuda:1").device == "cuda:1"  # a descriptor: no GPU needed to build it
    with pytest.raises(ValueError, match="cpu or cuda"):
        ServerConfig(**shape, device="meta")


def test_execute_plan_keeps_host_results_on_the_host():
    plan = _plan(2)
    q, k, v, do = _inputs()
    res = execute_plan(plan, [RankTensors(q, k, v)], [do], backend="reference")
    ref = _reference(q, k, v, do)
    for name, r in zip(("out", "lse", "dq", "dk", "dv"), ref, strict=True):
        assert res[name][0].device.type == "cpu"
        torch.testing.assert_close(res[name][0], r, rtol=0, atol=1e-10)


def test_call_by_schema_passes_positions_then_keywords():
    x = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    got = call_by_schema(torch.ops.aten._softmax, {"self": x, "dim": 1, "half_to_float": False, "not_in_schema": 1})
    torch.testing.assert_close(got, torch.softmax(x, 1))
    # ord and dim keep their defaults; keepdim (positional in the schema) then goes by keyword.
    got = call_by_schema(torch.ops.aten.linalg_vector_norm, {"self": x, "keepdim": True})
    torch.testing.assert_close(got, torch.tensor([[5.0], [10.0]]).norm().reshape(1, 1))


class _FakeOp:
    """A stand-in for a private torch op: a schema with these argument names; records each call by name."""

    def __init__(self, names, kwarg_only=(), n_out=3):
        args = [SimpleNamespace(name=n, kwarg_only=n in kwarg_only) for n in names]
        self.default = SimpleNamespace(_schema=SimpleNamespace(arguments=args))
        self.names, self.n_out, self.calls = names, n_out, []

    def __call__(self, *args, **kwargs):
        got = dict(zip(self.names, args, strict=False)) | kwargs
        self.calls.append(got)
        q = got.get("query", got.get("grad_out"))
        if "grad_out" in got:
            return torch.zeros_like(q), torch.zeros_like(got["key"]), torch.zeros_like(got["value"])
        return (torch.zeros_like(q), torch.zeros(q.shape[1], q.shape[0]), torch.zeros(2), None, None)[:self.n_out]


_FWD_OLD = ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal"]
_FWD_NEW = [*_FWD_OLD, "scale", "window_size", "enable_gqa", "seqused_k", "block_table", "num_splits"]
_BWD_OLD = ["grad_out", "query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal",
            "rng_state"]
_BWD_NEW = [*_BWD_OLD, "scale", "window_size"]
_ATEN_FWD = ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
             "return_debug_mask", "scale", "window_size_left", "window_size_right", "seqused_k"]
_ATEN_BWD = ["grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
             "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale", "window_size_left",
             "window_size_right"]


def _stand_in_backend(fwd_names, bwd_names, aten=True):
    varlen = SimpleNamespace(_varlen_attn=_FakeOp(fwd_names), _varlen_attn_backward=_FakeOp(bwd_names))
    aten_ops = SimpleNamespace(_flash_attention_forward=_FakeOp(_ATEN_FWD, kwarg_only=_ATEN_FWD[10:], n_out=5),
                               _flash_attention_backward=_FakeOp(_ATEN_BWD, kwarg_only=_ATEN_BWD[14:]))
    return TorchVarlenBackend(varlen, aten_ops if aten else SimpleNamespace()), varlen, aten_ops


@pytest.mark.parametrize("schemas", [(_FWD_OLD, _BWD_OLD), (_FWD_NEW, _BWD_NEW)], ids=["old-schema", "new-schema"])
def test_torch_varlen_calls_adapt_to_the_ops_arguments(schemas):
    backend, varlen, aten = _stand_in_backend(*schemas)
    windows = "window_size" in schemas[0]
    q, k, v, do = (x.float() for x in _inputs())
    cu = _cu()
    meta = make_meta(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS))
    out, lse = backend.forward(q, k, v, meta)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    call = varlen._varlen_attn.calls[-1]
    assert set(call) == set(schemas[0]) & {*_FWD_OLD, "scale", "window_size", "enable_gqa"}
    assert call["is_causal"] is True and call["max_q"] == max(LENGTHS)
    if windows:
        assert call["enable_gqa"] is True and call["window_size"] == [-1, 0]
    backend.backward(do, q, k, v, out, lse, meta)
    bcall = varlen._varlen_attn_backward.calls[-1]
    assert bcall["lse"].shape == (H, q.shape[0]) and bcall["rng_state"].numel() == 2
    # A sliding window: through torch_attn where its op takes one, else through the aten flash op.
    wmeta = make_meta(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), window=64)
    n_varlen = len(varlen._varlen_attn.calls)
    backend.forward(q, k, v, wmeta)
    backend.backward(do, q, k, v, out, lse, wmeta)
    if windows:
        assert varlen._varlen_attn.calls[-1]["window_size"] == [63, 0]
        assert varlen._varlen_attn_backward.calls[-1]["window_size"] == [63, 0]
        assert not aten._flash_attention_forward.calls
    else:
        assert len(varlen._varlen_attn.calls) == n_varlen  # the window is never dropped silently
        acall = aten._flash_attention_forward.calls[-1]
        assert acall["window_size_left"] == 63 and acall["window_size_right"] == 0 and acall["dropout_p"] == 0.0
        assert acall["is_causal"] is False
        bcall = aten._flash_attention_backward.calls[-1]
        assert bcall["window_size_left"] == 63 and bcall["logsumexp"].shape == (H, q.shape[0])


def test_torch_varlen_refuses_a_window_no_op_can_express():
    backend, varlen, _ = _stand_in_backend(_FWD_OLD, _BWD_OLD, aten=False)
    q, k, v, _do = (x.float() for x in _inputs())
    cu = _cu()
    with pytest.raises(BackendUnavailableError, match="takes a window"):
        backend.forward(q, k, v, make_meta(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), window=64))
    assert not varlen._varlen_attn.calls


def test_the_cad_path_imports_without_ray_deepspeed_or_tqdm():
    code = (
        "import sys\n"
        "for m in ('ray', 'deepspeed', 'tqdm', 'tensorboard', 'pyarrow', 'hypothesis'): sys.modules[m] = None\n"
        "import distca.runtime.client, distca.runtime.cad_attention, distca.server.loop, distca.scheduler\n"
        "import distca.model, distca.data.distributions, distca.attention\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -- GPU ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_backend():
    """The backend ``auto`` picks for bf16 on this GPU (a broken GPU build fails here, it does not skip)."""
    return resolve_backend("auto", torch.device("cuda"), torch.bfloat16).name


@gpu
def test_cad_with_servers_on_the_gpu_equals_local_attention_on_the_gpu(gpu_backend):
    cfg = ServerConfig(n_heads=H, n_kv_heads=HKV, head_dim=D, dtype="bfloat16", backend=gpu_backend,
                       device="cuda", transport=TCFG, max_plans=8, max_rows=1 << 16)
    with _servers(2, cfg) as client:
        plan = _plan(2)
        assert (plan.task_server >= 0).all()  # every task on a server
        out, lse, grads, _ = _cad_vs_reference(client, plan, torch.device("cuda"), torch.bfloat16, 2e-2)
        # The same tensors through the local kernel on the GPU agree to bf16 rounding.
        q64, k64, v64, do64 = _inputs()
        q, k, v = (x.cuda().bfloat16().requires_grad_() for x in (q64, k64, v64))
        cu, m = _cu("cuda"), max(LENGTHS)
        lout, llse = varlen_attention(q, k, v, cu, cu, m, m, backend=gpu_backend)
        lgrads = torch.autograd.grad(lout, (q, k, v), do64.cuda().bfloat16())
        for a, b in zip((out, lse, *grads), (lout, llse, *lgrads), strict=True):
            assert _normwise(a, b.double().cpu()) <= 3e-2
        pong = client.ping(0)
        assert pong["device"].startswith("cuda") and pong["busy_s"] > 0 and pong["stage_s"] > 0


@gpu
@pytest.mark.parametrize(("server_device", "kernel", "trainer_device"), [("cpu", "auto", "cuda"),
                                                                         ("cuda", "reference", "cpu")])
def test_gpu_trainer_with_a_cpu_server_and_a_cpu_trainer_with_a_gpu_server(server_device, kernel, trainer_device):
    # A GPU trainer (fp32: its local tasks use the reference kernel on the GPU) with a host server, then a host
    # trainer with a GPU server: results come back on the trainer's device, equal to the fp64 reference.
    cfg = ServerConfig(n_heads=H, n_kv_heads=HKV, head_dim=D, dtype="float32", backend=kernel,
                       device=server_device, transport=TCFG, max_plans=8, max_rows=1 << 16)
    with _servers(1, cfg) as client:
        out, _, _, errs = _cad_vs_reference(client, _plan(1), torch.device(trainer_device), torch.float32, 1e-4)
        assert out.device.type == trainer_device and max(errs.values()) <= 1e-4, errs
        assert client.ping(0)["device"].startswith(server_device)


@gpu
def test_execute_plan_on_the_gpu_equals_the_reference(gpu_backend):
    plan = _plan(3)
    q, k, v, do = (x.cuda().bfloat16() for x in _inputs())
    res = execute_plan(plan, [RankTensors(q, k, v)], [do], backend=gpu_backend)
    ref = _reference(*_inputs())
    for name, r in zip(("out", "lse", "dq", "dk", "dv"), ref, strict=True):
        assert res[name][0].is_cuda
        assert _normwise(res[name][0], r) <= 2e-2, name
