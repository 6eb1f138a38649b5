"""``distca launch ray``: trainers as Ray Train workers (``TorchTrainer``, DeepSpeed inside each worker)
and the attention servers as Ray actors of the same cluster.

``cluster.ray_address: auto`` joins a running cluster (also what ``ray job submit -- distca launch ray
...`` gets); empty starts a local Ray bound to 127.0.0.1. Ray Train brings up the trainers' gloo
process group; each worker then runs the same :class:`~distca.train.trainer.Trainer` as every other
launcher. Worker 0 writes the metrics JSONL, TensorBoard logs and checkpoints under ``output_dir``
(on a shared filesystem in a real cluster), and the driver prints the summary table from them.
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

log = logging.getLogger(__name__)


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker = one trainer rank."""
    import ray.train
    import torch

    from distca.train.metrics import MetricsSink, collect
    from distca.train.quiet import quiet_libraries
    from distca.train.trainer import RankInfo, Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_dict(loop_config["cfg"])
    # what DeepSpeed reads, set at this process's entry point
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(ctx.get_local_rank()),
                       "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
                       "DS_ACCELERATOR": "cuda" if torch.cuda.is_available() else "cpu"})
    quiet_libraries(loop_config["verbose"])
    sink = MetricsSink(cfg, Path(cfg.output_dir) / "metrics.jsonl") if rank == 0 else None

    result = TrainResult([], 0, 0)  # the driver reads the records back from metrics.jsonl
    report = (lambda rec: collect(result, sink, rec)) if sink else None
    try:
        trainer = Trainer(cfg, RankInfo(rank, world), loop_config["addresses"], report=report,
                          verbose=loop_config["verbose"])
        trainer.run(loop_config["run_steps"])
    finally:
        if sink is not None:
            sink.close()


def train_on_ray(cfg: DistCAConfig, run_steps: int = 0, verbose: bool = False) -> TrainResult:
    """Start (or join) Ray, the server pool and ``cluster.n_trainers`` Ray Train workers; train. ``verbose``
    lets Ray Train and the libraries in the workers (DeepSpeed, torch.distributed) log and print."""
    from distca.parts import pool_settings
    from distca.server.pool import AttentionServerPool, local_ray_on_loopback

    t_start = time.perf_counter()
    _check_source(cfg)
    if not cfg.cluster.ray_address:
        local_ray_on_loopback()
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    n = cfg.cluster.n_trainers
    pool_cfg = pool_settings(cfg, local_cpus=n + 2)  # the local Ray also runs the n trainers
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    restore = _child_malloc_arenas(cfg.train.malloc_arena_max)  # a local Ray's workers inherit it
    try:
        pool = AttentionServerPool(pool_cfg) if cfg.train.core_attention == "cad" else None
    except BaseException:
        restore()
        raise
    try:
        if pool is None and not ray.is_initialized():
            ray.init(address=cfg.cluster.ray_address or "local", num_cpus=None if cfg.cluster.ray_address else n + 2,
                     include_dashboard=False, log_to_driver=False)
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg.to_dict(), "addresses": list(pool.addresses) if pool else [],
                               "run_steps": run_steps, "verbose": verbose},
            scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo", timeout_s=int(cfg.train.step_timeout_s)),
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
