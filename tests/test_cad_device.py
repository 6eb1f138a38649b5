"""The CAD path with tensors on a device: servers computing on a GPU (host staging), trainers whose
q/k/v live on a GPU, and the single-GPU step benchmark.

The CPU tests pin what must not change (the default server is a CPU server) and run the benchmark's
plumbing end to end on a tiny shape. The GPU tests (skipped without CUDA) compare CAD with the servers
on the GPU — and mixed placements — against local varlen attention and an fp64 reference.

Self-contained on purpose (no fixtures from conftest.py): on a GPU machine without hypothesis this file
runs as ``pytest --noconftest tests/test_cad_device.py`` (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distca.attention import varlen_attention
from distca.runtime.cad_attention import cad_attention
from distca.runtime.client import CADClient
from distca.runtime.plan_exec import RankTensors, execute_plan
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.server.loop import ServerConfig
from distca.server.processes import server_processes
from distca.transport.channel import TransportConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_step  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=60.0, secret=None, checksum=False)
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
    return out, lse, grads


# -- CPU ---------------------------------------------------------------------------------------------


def test_server_config_defaults_to_a_cpu_server_and_checks_the_device():
    shape = dict(n_heads=8, n_kv_heads=2, head_dim=32, dtype="float32", backend="auto", max_plans=8, transport=TCFG)
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
    got = gpu_step._call_by_schema(torch.ops.aten._softmax, {"self": x, "dim": 1, "half_to_float": False,
                                                              "not_in_schema": 1})
    torch.testing.assert_close(got, torch.softmax(x, 1))
    # ord and dim keep their defaults; keepdim (positional in the schema) then goes by keyword.
    got = gpu_step._call_by_schema(torch.ops.aten.linalg_vector_norm, {"self": x, "keepdim": True})
    torch.testing.assert_close(got, torch.tensor([[5.0], [10.0]]).norm().reshape(1, 1))


class _FakeOp:
    """A stand-in for a private torch op: a schema with these argument names; records each call by name."""

    def __init__(self, names, kwarg_only=(), n_out=3):
        from types import SimpleNamespace

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
_BWD = ["grad_out", "query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal",
        "rng_state", "scale", "window_size"]
_ATEN_FWD = ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
             "return_debug_mask", "scale", "window_size_left", "window_size_right", "seqused_k"]
_ATEN_BWD = ["grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
             "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale", "window_size_left",
             "window_size_right"]


@pytest.mark.parametrize("fwd_names", [_FWD_OLD, _FWD_NEW], ids=["old-schema", "new-schema"])
def test_schema_built_varlen_calls_adapt_to_the_ops_arguments(monkeypatch, fwd_names):
    from distca.attention.varlen import make_meta

    ops = {("torch_attn", "_varlen_attn"): _FakeOp(fwd_names),
           ("torch_attn", "_varlen_attn_backward"): _FakeOp(_BWD),
           ("aten", "_flash_attention_forward"): _FakeOp(_ATEN_FWD, kwarg_only=_ATEN_FWD[10:], n_out=5),
           ("aten", "_flash_attention_backward"): _FakeOp(_ATEN_BWD, kwarg_only=_ATEN_BWD[14:])}
    monkeypatch.setattr(gpu_step, "_op", lambda ns, name: ops.get((ns, name)))
    monkeypatch.setattr(gpu_step, "_COMPAT_PATH", None)
    q, k, v, do = (x.float() for x in _inputs())
    cu = _cu()
    meta = make_meta(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS))
    out, lse = gpu_step._compat_forward(None, q, k, v, meta)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    call = ops[("torch_attn", "_varlen_attn")].calls[-1]
    assert set(call) == set(fwd_names) & {*_FWD_OLD, "scale", "window_size", "enable_gqa"}
    assert call["is_causal"] is True and call["max_q"] == max(LENGTHS)
    if "enable_gqa" in call:
        assert call["enable_gqa"] is True and call["window_size"] == [-1, 0]
    gpu_step._compat_backward(None, do, q, k, v, out, lse, meta)
    bcall = ops[("torch_attn", "_varlen_attn_backward")].calls[-1]
    assert bcall["lse"].shape == (H, q.shape[0]) and bcall["rng_state"].numel() == 2
    # A window the op cannot express: the aten op takes the call (and keeps it from then on).
    wmeta = make_meta(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), window=64)
    gpu_step._compat_forward(None, q, k, v, wmeta)
    if "window_size" in fwd_names:
        assert ops[("torch_attn", "_varlen_attn")].calls[-1]["window_size"] == [63, 0]
    else:
        acall = ops[("aten", "_flash_attention_forward")].calls[-1]
        assert acall["window_size_left"] == 63 and acall["window_size_right"] == 0 and acall["dropout_p"] == 0.0
        assert gpu_step._COMPAT_PATH == "aten"
        gpu_step._compat_backward(None, do, q, k, v, out, lse, wmeta)
        assert ops[("aten", "_flash_attention_backward")].calls[-1]["window_size_left"] == 63


def test_backend_check_passes_on_the_cpu():
    info = gpu_step.ensure_backend("auto", torch.device("cpu"), torch.float32)
    assert info["ok"] and info["window_ok"] and not info["patched"], info


def test_gpu_step_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_step.json"
    rc = gpu_step.main(["--device", "cpu", "--dtype", "float32", "--small", "--tokens", "512", "--reps", "1",
                        "--warmup", "0", "--threads", "2", "--skip", "matmul,model_noop", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["errors"]
    m = report["measurements"]
    for name in ("attention", "linear", "local", "cad"):
        assert m[name]["ok"], m[name]
    assert m["matmul"]["skipped"] == "--skip"
    assert m["cad"]["server"]["device"] == "cpu" and m["cad"]["server_busy_s"] > 0
    assert report["correctness"]["ok"] and report["correctness"]["loss_rel_diff"] <= 1e-4
    assert report["sim"]["linear_flops"] > 0 and report["docs"]["n_docs"] >= 1


def test_gpu_step_and_the_cad_path_import_without_ray_deepspeed_or_tqdm():
    code = (
        "import sys\n"
        "for m in ('ray', 'deepspeed', 'tqdm', 'tensorboard', 'pyarrow', 'hypothesis'): sys.modules[m] = None\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import gpu_step, kernels\n"
        "import distca.runtime.client, distca.runtime.cad_attention, distca.server.loop, distca.scheduler\n"
        "import distca.model, distca.data.distributions, distca.attention\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -- GPU ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend_info():
    return gpu_step.ensure_backend("auto", torch.device("cuda"), torch.bfloat16)


@contextlib.contextmanager
def _client(n: int, cfg: ServerConfig, patch: bool, backend: str):
    """A CAD client over ``n`` server processes started as the benchmark starts its server."""
    with server_processes(n, cfg, 120.0, functools.partial(gpu_step._serve, patch=patch)) as running:
        client = CADClient(0, running.addresses, TCFG, backend=backend)
        try:
            yield client
        finally:
            client.close()


@gpu
def test_cad_with_servers_on_the_gpu_equals_local_attention_on_the_gpu(backend_info):
    assert backend_info["ok"], backend_info
    patch = bool(backend_info["patched"])
    cfg = ServerConfig(n_heads=H, n_kv_heads=HKV, head_dim=D, dtype="bfloat16", backend=backend_info["name"],
                       device="cuda", transport=TCFG, max_plans=8)
    with _client(2, cfg, patch, backend_info["name"]) as client:
        plan = _plan(2)
        assert (plan.task_server >= 0).all()  # every task on a server
        out, lse, grads = _cad_vs_reference(client, plan, torch.device("cuda"), torch.bfloat16, 2e-2)
        # The same tensors through the local kernel on the GPU agree to bf16 rounding.
        q64, k64, v64, do64 = _inputs()
        q, k, v = (x.cuda().bfloat16().requires_grad_() for x in (q64, k64, v64))
        cu, m = _cu("cuda"), max(LENGTHS)
        lout, llse = varlen_attention(q, k, v, cu, cu, m, m, backend=backend_info["name"])
        lgrads = torch.autograd.grad(lout, (q, k, v), do64.cuda().bfloat16())
        for a, b in zip((out, lse, *grads), (lout, llse, *lgrads), strict=True):
            assert _normwise(a, b.double().cpu()) <= 3e-2
        pong = client.ping(0)
        assert pong["device"].startswith("cuda") and pong["busy_s"] > 0 and pong["stage_s"] > 0


@gpu
def test_gpu_trainer_with_a_cpu_server_and_a_cpu_trainer_with_a_gpu_server():
    # (server device, server kernel, trainer device): a GPU trainer (fp32: its local tasks use the
    # reference kernel on the GPU) with a host server, then a host trainer with a GPU server.
    for server_device, kernel, trainer_device in (("cpu", "auto", "cuda"), ("cuda", "reference", "cpu")):
        cfg = ServerConfig(n_heads=H, n_kv_heads=HKV, head_dim=D, dtype="float32", backend=kernel,
                           device=server_device, transport=TCFG, max_plans=8)
        with _client(1, cfg, False, "auto") as client:
            _cad_vs_reference(client, _plan(1), torch.device(trainer_device), torch.float32, 1e-4)


@gpu
def test_execute_plan_on_the_gpu_equals_the_reference(backend_info):
    assert backend_info["ok"], backend_info
    plan = _plan(3)
    q, k, v, do = (x.cuda().bfloat16() for x in _inputs())
    res = execute_plan(plan, [RankTensors(q, k, v)], [do], backend=backend_info["name"])
    ref = _reference(*_inputs())
    for name, r in zip(("out", "lse", "dq", "dk", "dv"), ref, strict=True):
        assert res[name][0].is_cuda
        assert _normwise(res[name][0], r) <= 2e-2, name
