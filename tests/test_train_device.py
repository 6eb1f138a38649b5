"""Where trainer ranks compute, decided once by the launchers: the rank's device, the process-group backend,
DeepSpeed's accelerator and environment, the optimizer on CUDA vs the CPU, Ray Train's GPU request, and the
GPU-side bookkeeping of a step (device-resident layouts, the micro-batch index read once, peak GPU memory in
the records). Pure decisions, checked here without a GPU; ``tests/test_train_cuda.py`` runs them on one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distca.config import load_config
from distca.model.core import DocLayout, LocalCoreAttention
from distca.train.colocated_attention import AttentionTimer, GroupLocalCoreAttention
from distca.train.flops import measure_peak_flops
from distca.train.metrics import combine_ranks, format_step
from distca.train.pipe import StepContext
from distca.train.rank import RankInfo, bind_device, deepspeed_env, dist_backend, ds_accelerator, rank_device
from distca.train.ray_launch import scaling_settings
from distca.train.trainer import Trainer, deepspeed_config


def _cfg(*over: str):
    return load_config(None, ["--cluster.n_trainers=1", "--cluster.n_servers=1", "--train.pipeline_parallel=1",
                              *over])


def test_deepspeed_config_takes_torchs_fused_adamw_on_cuda_and_leaves_the_cpu_optimizer_as_it_was():
    cfg = _cfg("--train.precision=bf16")
    cpu, cuda, cuda3 = deepspeed_config(cfg, "cpu"), deepspeed_config(cfg, "cuda"), deepspeed_config(cfg, "cuda:3")
    assert cuda["optimizer"]["params"]["fused"] is True and cuda3 == cuda
    assert "fused" not in cpu["optimizer"]["params"] and "foreach" not in cpu["optimizer"]["params"]
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # torch's AdamW on both: no JIT-built DeepSpeed op
    # everything else is the same on both devices: bf16 + ZeRO-1 (fp32 master copies, see deepspeed_config)
    strip = lambda c: {**c, "optimizer": {**c["optimizer"], "params": {  # noqa: E731
        k: v for k, v in c["optimizer"]["params"].items() if k != "fused"}}}
    assert strip(cpu) == strip(cuda)
    assert cpu["bf16"] == {"enabled": True} and cpu["zero_optimization"] == {"stage": 1}


def test_a_rank_takes_the_gpu_of_its_local_rank_or_the_cpu():
    assert rank_device("cuda", 3) == "cuda:3" and rank_device("cpu", 3) == "cpu"
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        rank_device("auto", 0)  # the launcher resolves train.device first
    assert RankInfo(2, 4, local_rank=2, device="cuda:2").torch_device == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="cuda:N"):
        RankInfo(0, 1, device="cuda")  # one GPU per rank: an index, always
    with pytest.raises(ValueError, match="outside"):
        RankInfo(4, 4)


def test_nccl_and_deepspeeds_cuda_accelerator_on_gpus_gloo_and_its_cpu_accelerator_on_the_cpu():
    assert (dist_backend("cuda:1"), ds_accelerator("cuda:1")) == ("nccl", "cuda")
    assert (dist_backend("cpu"), ds_accelerator(torch.device("cpu"))) == ("gloo", "cpu")


def test_deepspeed_env_names_the_ranks_own_gpu_as_local_rank():
    # torchrun and `distca train`: the GPU index is the local rank
    assert deepspeed_env(RankInfo(5, 8, local_rank=1, device="cuda:1")) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "DS_ACCELERATOR": "cuda"}
    # Ray Train may give local rank 2 the GPU it sees as cuda:0: DeepSpeed must place the model there
    assert deepspeed_env(RankInfo(2, 4, local_rank=2, device="cuda:0"))["LOCAL_RANK"] == "0"
    # the CPU: what the launchers always set
    assert deepspeed_env(RankInfo(3, 4, local_rank=3)) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3",
                                                           "DS_ACCELERATOR": "cpu"}


def test_binding_a_gpu_this_process_cannot_see_fails_with_the_count():
    assert bind_device(RankInfo(0, 1)) == torch.device("cpu")
    missing = torch.cuda.device_count()  # one past the last visible GPU (cuda:0 on a machine without one)
    with pytest.raises(RuntimeError, match=f"sees {missing} GPU"):
        bind_device(RankInfo(0, 1, device=f"cuda:{missing}"))


def test_ray_train_workers_ask_for_a_gpu_only_on_a_cuda_run():
    assert scaling_settings(4, "cuda") == {"num_workers": 4, "use_gpu": True,
                                           "resources_per_worker": {"CPU": 1, "GPU": 1}}
    assert scaling_settings(4, "cpu") == {"num_workers": 4, "use_gpu": False, "resources_per_worker": {"CPU": 1}}


def test_inplace_cad_needs_no_server_addresses_and_a_pool_plane_does():
    cfg = _cfg("--train.core_attention=cad", "--cluster.data_plane=inplace")
    assert Trainer(cfg, RankInfo(0, 1), server_addresses=[]).plane == "inplace"
    with pytest.raises(ValueError, match="no attention-server addresses"):
        Trainer(_cfg("--train.core_attention=cad", "--cluster.data_plane=zmq"), RankInfo(0, 1), server_addresses=[])


def test_a_layout_moves_to_the_device_once():
    lay = DocLayout.from_lengths([5, 3], first_position=2)
    assert lay.to("cpu") is lay
    meta = lay.to("meta")
    assert meta.cu_seqlens.device.type == "meta" and meta.position_ids.device.type == "meta"
    assert meta.max_len == lay.max_len


def test_colocated_attention_refuses_tensors_away_from_its_layout_and_matches_the_kernel_on_the_host():
    lay = DocLayout.from_lengths([6, 10])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, h, 8, generator=gen) for h in (4, 2, 2))
    core = GroupLocalCoreAttention(lay, [[6, 10]], [False], 0, backend="reference")
    assert torch.equal(core(q, k, v), LocalCoreAttention(lay, backend="reference")(q, k, v))
    with pytest.raises(ValueError, match="layout is on cpu but q is on meta"):  # e.g. a GPU run's host layout
        core(*(t.to("meta") for t in (q, k, v)))


def test_the_micro_batch_index_is_read_once_per_tensor():
    ctx = StepContext()
    ctx.set(["first", "second"])
    micro = torch.tensor([1])
    assert ctx[micro] == "second" and micro._distca_micro == 1
    micro._distca_micro = 0  # a second read uses what the first one kept (no device round trip on a GPU)
    assert ctx[micro] == "first" and ctx[1] == "second"
    with pytest.raises(IndexError):
        ctx[torch.tensor([2])]


def test_the_attention_timer_copies_for_step_deltas_and_settles_nothing_on_the_cpu():
    timer = AttentionTimer(wall_s=1.5, cpu_s=1.0, exchange_s=0.5, calls=3)
    copy = dataclasses.replace(timer)
    assert (copy.wall_s, copy.exchange_s, copy.calls) == (1.5, 0.5, 3) and copy._events is not timer._events
    timer.settle()
    assert timer.wall_s == 1.5


def test_peak_flops_are_measured_in_the_training_precision_on_its_device():
    assert measure_peak_flops(torch.bfloat16, n=64, reps=1) > 0
    assert measure_peak_flops(torch.float32, n=64, reps=1, device="cpu") > 0


def _rank_record(**over):
    rec = {"step": 0, "loss": 2.0, "lr": 1e-3, "step_s": 2.0, "tokens": 4096, "plan_ms": 1.0, "blocked_s": 0.0,
           "flops": {"total": 1e12, "attention": 2e11, "linear": 8e11}, "planned_load_max_over_mean": 1.0,
           "server_busy_s": [], "peak_rss_mb": 900.0, "rss_mb": 800.0, "open_fds": 40, "server_peak_rss_mb": [],
           "stage": 0, "dp_rank": 0, "attn_s": 0.1, "attn_cpu_s": 0.0, "exchange_s": 0.0, "cpu_s": 2.0,
           "thread_cpu_s": 1.9, "act_peak_mb": 10.0, "rss_peak_mb": 900.0, "gpu_peak_mb": None}
    return {**rec, **over}


def test_step_records_carry_the_peak_gpu_memory_of_the_fullest_rank_and_none_on_the_cpu():
    on_gpus = combine_ranks([_rank_record(gpu_peak_mb=70_000.0), _rank_record(gpu_peak_mb=90_000.0, dp_rank=1)], 1e15)
    assert on_gpus["peak_gpu_mb"] == 90_000.0 and on_gpus["gpu_peak_mb_per_rank"] == [70_000.0, 90_000.0]
    assert "GPU 90000 MB" in format_step(on_gpus)
    on_cpus = combine_ranks([_rank_record(), _rank_record(dp_rank=1)], 1e12)
    assert on_cpus["peak_gpu_mb"] is None and "GPU" not in format_step(on_cpus)
