"""``distca launch ray``: trainers as Ray Train workers (``TorchTrainer``, DeepSpeed inside each worker)
and the attention servers as Ray actors of the same cluster.

``cluster.ray_address: auto`` joins a running cluster (also what ``ray job submit -- distca launch ray
...`` gets); empty starts a local Ray bound to 127.0.0.1. Ray Train brings up the trainers' process
group — NCCL with one GPU per worker on a CUDA run (``train.device`` ``cuda``, or ``auto`` where the
driver sees a GPU), gloo on the CPU; each worker then runs the same :class:`~distca.train.trainer.Trainer`
as every other launcher, on the GPU Ray gave it. Worker 0 writes the metrics JSONL, TensorBoard logs and
checkpoints under ``output_dir`` (on a shared filesystem in a real cluster), and the driver prints the
summary table from them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from distca.config import DistCAConfig, config_from_dict
from distca.train.launch import TrainError, _check_source, _child_malloc_arenas
from distca.train.metrics import TrainResult
from distca.train.rank import dist_backend

log = logging.getLogger(__name__)


def scaling_settings(n_workers: int, device: str) -> dict[str, Any]:
    """Ray Train's ``ScalingConfig`` arguments for ``n_workers`` trainer ranks on the run's resolved ``device``:
    one GPU per worker on a CUDA run (never because the cluster merely has GPUs), one CPU each."""
    gpu = device == "cuda"
    return {"num_workers": n_workers, "use_gpu": gpu, "resources_per_worker": {"CPU": 1, **({"GPU": 1} if gpu else {})}}


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker = one trainer rank."""
    import ray.train

    from distca.train.metrics import MetricsSink, collect
    from distca.train.quiet import quiet_libraries
    from distca.train.rank import RankInfo, deepspeed_env
    from distca.train.trainer import Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_dict(loop_config["cfg"])
    device = "cpu"
    if loop_config["device"] == "cuda":
        import ray.train.torch

        given = ray.train.torch.get_device()  # the GPU Ray assigned this worker, as this process sees it
        device = f"cuda:{given.index or 0}"  # an index, always (a bare "cuda" is the first visible one)
    info = RankInfo(rank, world, local_rank=ctx.get_local_rank(), device=device)
    # what DeepSpeed reads, set at this process's entry point (Ray Train has set MASTER_ADDR/PORT)
    os.environ.update({**deepspeed_env(info), "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size())})
    quiet_libraries(loop_config["verbose"])
    sink = MetricsSink(cfg, Path(cfg.output_dir) / "metrics.jsonl") if rank == 0 else None

    result = TrainResult([], 0, 0)  # the driver reads the records back from metrics.jsonl
    report = (lambda rec: collect(result, sink, rec)) if sink else None
    try:
        trainer = Trainer(cfg, info, loop_config["addresses"], report=report, verbose=loop_config["verbose"])
        trainer.run(loop_config["run_steps"])
    finally:
        if sink is not None:
            sink.close()


def train_on_ray(cfg: DistCAConfig, run_steps: int = 0, verbose: bool = False) -> TrainResult:
    """Start (or join) Ray, the server pool and ``cluster.n_trainers`` Ray Train workers; train. ``verbose``
    lets Ray Train and the libraries in the workers (DeepSpeed, torch.distributed) log and print."""
    from distca.model.hf_config import with_checkpoint_model
    from distca.parts import cluster_device, pool_settings, uses_pool
    from distca.server.pool import AttentionServerPool, local_ray_on_loopback

    t_start = time.perf_counter()
    cfg = with_checkpoint_model(cfg)  # on the driver: the workers get the resolved model
    device = cluster_device(cfg)  # resolved on the driver, once: every worker and server follows it
    _check_source(cfg)
    if not cfg.cluster.ray_address:
        local_ray_on_loopback()
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    n = cfg.cluster.n_trainers
    pool_cfg = pool_settings(cfg, local_cpus=n + 2, device=device)  # the local Ray also runs the n trainers
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    restore = _child_malloc_arenas(cfg.train.malloc_arena_max)  # a local Ray's workers inherit it
    try:
        pool = AttentionServerPool(pool_cfg) if uses_pool(cfg, device) else None
    except BaseException:
        restore()
        raise
    try:
        if pool is None and not ray.is_initialized():
            ray.init(address=cfg.cluster.ray_address or "local", num_cpus=None if cfg.cluster.ray_address else n + 2,
                     include_dashboard=False, log_to_driver=False)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg.to_dict(), "addresses": list(pool.addresses) if pool else [],
                               "run_steps": run_steps, "verbose": verbose, "device": device},
            scaling_config=ScalingConfig(**scaling_settings(n, device)),
            torch_config=TorchConfig(backend=dist_backend(device), timeout_s=int(cfg.train.step_timeout_s)),
            run_config=RunConfig(name="distca", storage_path=str(Path(cfg.output_dir, "ray").resolve()),
                                 logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
        )
        try:
            trainer.fit()
        except Exception as exc:
            raise TrainError(f"Ray Train run failed: {exc}") from exc
    finally:
        if pool is not None:
            pool.shutdown()
        elif ray.is_initialized() and not cfg.cluster.ray_address:
            ray.shutdown()
        restore()
    lines = metrics.read_text().splitlines()[before:] if metrics.exists() else []
    records = [json.loads(x) for x in lines]
    if not records:
        raise TrainError(f"the Ray run wrote no step records to {metrics}")
    return TrainResult(records, records[0]["step"], records[-1]["step"] + 1, metrics_path=str(metrics),
                       wall_s=time.perf_counter() - t_start)
