"""Training on CUDA: one trainer rank on one GPU — NCCL, DeepSpeed's CUDA accelerator, the model and its
micro-batches on the device, torch's fused AdamW over fp32 master weights (bf16 + ZeRO-1), the CUDA varlen
kernel for core attention, peak GPU memory in the step records — and a world-of-one torchrun run whose CAD
loss (a server process on the same GPU) follows the local one.

The engine check runs on the CPU too, where it pins what a CPU run keeps (gloo, DeepSpeed's CPU accelerator,
the unfused AdamW, the same fp32 master copies); every CUDA case skips only where torch sees no GPU.

Self-contained (no conftest fixtures, no hypothesis): benchmarks/gpu_check.sh runs it on a GPU machine as
``pytest --noconftest tests/test_train_cuda.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

TINY = ["--seed=1", "--threads=1", "--model.n_layers=2", "--model.hidden=128", "--model.n_heads=4",
        "--model.n_kv_heads=2", "--model.ffn_hidden=256", "--model.vocab_size=512", "--cluster.n_trainers=1",
        "--cluster.n_servers=1", "--train.pipeline_parallel=1", "--train.micro_batches=2",
        "--train.tokens_per_rank=512", "--data.source=synthetic", "--data.n_docs=200", "--data.max_len=512",
        "--data.elongate=0.1", "--train.precision=bf16", "--train.peak_tflops=1.0", "--train.tensorboard=false",
        "--train.progress=false", "--train.checkpoint_at_end=false", "--train.lr=0.003", "--train.warmup_steps=1",
        "--attention.shard_tokens=64", "--train.step_timeout_s=120", "--transport.timeout_s=60"]

# One trainer rank in a fresh process: what its engine is made of after setup, and one step's record.
ENGINE_FACTS = r"""
import json, os, sys
from distca.config import load_config
from distca.train.rank import RankInfo, deepspeed_env

device, port, out, *over = sys.argv[1:]
info = RankInfo(0, 1, "127.0.0.1", int(port), device=device)
os.environ.update({**deepspeed_env(info), "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
import torch
from distca.train.trainer import Trainer

trainer = Trainer(load_config(None, over), info)
trainer._init()
engine = trainer.engine
opt, basic = engine.optimizer, engine.basic_optimizer
masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition")
params = list(engine.module.parameters())
rec = trainer.step(0)
facts = {
    "optimizer": type(opt).__name__, "basic": type(basic).__name__, "fused": basic.defaults.get("fused"),
    "foreach": basic.defaults.get("foreach"), "master_dtypes": sorted({str(m.dtype) for m in masters}),
    "master_devices": sorted({str(m.device) for m in masters}), "param_dtypes": sorted({str(p.dtype) for p in params}),
    "param_devices": sorted({str(p.device) for p in params}), "engine_device": str(engine.device),
    "backend": torch.distributed.get_backend(), "loss": rec["loss"], "gpu_peak_mb": rec["gpu_peak_mb"],
    "attn_s": rec["attn_s"],
}
trainer.close()
with open(out, "w") as f:
    json.dump(facts, f)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def engine_facts(tmp_path: Path, device: str, *over: str) -> dict:
    out = tmp_path / f"facts-{device.replace(':', '')}.json"
    cmd = [sys.executable, "-c", ENGINE_FACTS, device, str(_port()), str(out), *TINY, f"--output_dir={tmp_path}",
           "--train.core_attention=local", f"--train.device={device.split(':')[0]}", *over]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.cluster
def test_a_cpu_rank_keeps_gloo_the_cpu_accelerator_and_unfused_adamw_over_fp32_master_weights(tmp_path):
    f = engine_facts(tmp_path, "cpu")
    assert (f["backend"], f["engine_device"], f["param_devices"]) == ("gloo", "cpu", ["cpu"])
    # bf16 + ZeRO-1: DeepSpeed's stage-1 optimizer keeps fp32 master copies that torch's AdamW updates
    assert (f["optimizer"], f["basic"]) == ("DeepSpeedZeroOptimizer", "AdamW")
    assert f["master_dtypes"] == ["torch.float32"] and f["param_dtypes"] == ["torch.bfloat16"]
    assert not f["fused"] and f["gpu_peak_mb"] is None and f["loss"] > 0


@gpu
def test_a_cuda_rank_trains_on_its_gpu_with_nccl_and_fused_adamw_over_fp32_master_weights(tmp_path):
    f = engine_facts(tmp_path, "cuda:0")
    assert (f["backend"], f["engine_device"], f["param_devices"]) == ("nccl", "cuda:0", ["cuda:0"])
    assert (f["optimizer"], f["basic"], f["fused"]) == ("DeepSpeedZeroOptimizer", "AdamW", True)
    assert f["master_dtypes"] == ["torch.float32"] and f["master_devices"] == ["cuda:0"]
    assert f["param_dtypes"] == ["torch.bfloat16"]
    assert f["gpu_peak_mb"] > 0 and f["attn_s"] > 0 and 0 < f["loss"] < 20  # attention timed by CUDA events


@gpu
def test_auto_attention_on_cuda_in_bf16_is_a_cuda_varlen_kernel():
    from distca.attention import resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16).name in ("flash", "torch_varlen")


@gpu
def test_colocated_attention_on_the_gpu_matches_the_local_kernel_and_is_timed_on_the_device():
    from distca.model.core import DocLayout, LocalCoreAttention
    from distca.train.colocated_attention import GroupLocalCoreAttention

    dev = torch.device("cuda", 0)
    lay = DocLayout.from_lengths([300, 700, 24]).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1024, h, 64, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 2, 2))
    core = GroupLocalCoreAttention(lay, [[300, 700, 24]], [False], 0)
    out = core(q, k, v)
    out.float().square().sum().backward()
    ref = LocalCoreAttention(lay)(q.detach(), k.detach(), v.detach())
    torch.cuda.synchronize(dev)
    core.timer.settle()
    assert out.device == dev and torch.equal(out.detach(), ref)
    assert core.timer.calls == 2 and core.timer.wall_s > 0


@gpu
def test_peak_flops_measure_the_gpus_bf16_rate():
    from distca.train.flops import measure_peak_flops

    assert measure_peak_flops(torch.bfloat16, n=4096, device="cuda:0") > 50e12


def _torchrun_world_of_one(tmp_path: Path, name: str, *over: str) -> dict:
    result = tmp_path / f"{name}.json"
    env = {**_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port())}
    cmd = [sys.executable, "-m", "distca.train.torchrun", "--config", str(ROOT / "configs" / "llama3-8b-1gpu.yaml"),
           "--result-json", str(result), *TINY, "--train.steps=4", "--train.device=cuda", *over,
           f"--output_dir={tmp_path / name}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(result.read_text())


@gpu
def test_torchrun_on_one_gpu_trains_and_cad_follows_the_local_loss(tmp_path):
    """The 1-GPU config's path (the torchrun entry, a world of one) with a tiny model: local attention, and CAD
    through one attention-server process on the same GPU (the zmq data plane; ``inplace`` is not run yet)."""
    local = _torchrun_world_of_one(tmp_path, "local", "--train.core_attention=local")
    cad = _torchrun_world_of_one(tmp_path, "cad", "--train.core_attention=cad", "--cluster.data_plane=zmq")
    assert len(local["losses"]) == len(cad["losses"]) == 4
    assert all(r["peak_gpu_mb"] > 0 and r["mfu"] > 0 for r in local["records"] + cad["records"])
    for step, (a, b) in enumerate(zip(local["losses"], cad["losses"], strict=True)):
        assert abs(a - b) <= 2e-2 * abs(a), f"step {step}: local {a} vs CAD {b} (bf16)"
