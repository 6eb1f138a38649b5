"""Training under ``torchrun`` (multi-node; Slurm runs it the same way): one process per trainer rank.

    torchrun --nnodes N --node_rank I --nproc_per_node G --master_addr HOST --master_port PORT \\
        -m distca.train.torchrun --config configs/X.yaml [--section.key value ...]

Attention servers are colocated: on every node, local rank 0 starts G server processes (one per
trainer, bound to ``transport.host`` — the node's cluster-facing address) before training, and every
rank learns every server's address through one ``all_gather_object`` — no hand-editing. Server ``r``
sits on trainer rank ``r``'s node, which is what ``cluster.placement: colocated`` plans for. With
``train.core_attention: local``, or a data plane that needs no servers (``cluster.data_plane:
inplace``), no server starts.

On a CUDA run (``train.device``: ``cuda``, or ``auto`` on a machine with GPUs) each rank takes the GPU of
its local rank, the process group is NCCL bound to it, DeepSpeed runs on its CUDA accelerator, and the
node's server ``i`` computes on GPU ``i``, beside the trainer it is colocated with. On the CPU: gloo,
DeepSpeed's CPU accelerator, servers on the host.

torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) is read here, at the entry point, and passed down explicitly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from distca.config import DistCAConfig, load_config
from distca.parts import server_settings, train_device, uses_pool
from distca.server.processes import server_processes
from distca.train.rank import RankInfo, deepspeed_env, init_process_group, rank_device

log = logging.getLogger(__name__)


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise SystemExit(f"distca.train.torchrun: {name} is not set — start this module with torchrun")
    return int(value)


def run(cfg: DistCAConfig, env: Mapping[str, str], run_steps: int = 0, verbose: bool = False) -> dict | None:
    """Train as this torchrun rank (``env``: torchrun's variables, handed in by the entry point); rank 0
    prints the run's header, progress and the summary and returns its records. ``verbose`` lets the
    libraries (DeepSpeed, torch.distributed) log and print."""
    import time

    import torch.distributed as dist

    from distca.model.hf_config import with_checkpoint_model
    from distca.train.metrics import MetricsSink, TrainResult, collect, run_header, summary_table
    from distca.train.quiet import quiet_libraries
    from distca.train.trainer import Trainer

    t_start = time.perf_counter()
    cfg = with_checkpoint_model(cfg)  # every rank reads the same folder
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local, per_node = _env_int(env, "LOCAL_RANK"), _env_int(env, "LOCAL_WORLD_SIZE")
    device = train_device(cfg)
    info = RankInfo(rank, world, env.get("MASTER_ADDR", "127.0.0.1"), _env_int(env, "MASTER_PORT"), local_rank=local,
                    device=rank_device(device, local))
    os.environ.update(deepspeed_env(info))  # before DeepSpeed is first imported (quiet_libraries imports it)
    quiet_libraries(verbose)
    if rank == 0:
        print(run_header(cfg), flush=True)
    init_process_group(info, cfg.train.step_timeout_s)
    with contextlib.ExitStack() as stack:
        stack.callback(_destroy_process_group)  # runs last, after this node's servers have stopped
        mine: list[str] = []
        if uses_pool(cfg, device) and local == 0:
            if cfg.cluster.n_servers != world:
                raise SystemExit(f"torchrun launches colocate one server per trainer: cluster.n_servers must equal "
                                 f"the world size {world}, got {cfg.cluster.n_servers}")
            server = dataclasses.replace(server_settings(cfg), name=f"server{rank // per_node}-")
            devices = [rank_device(device, i) for i in range(per_node)]  # server i beside local rank i's trainer
            mine = stack.enter_context(server_processes(per_node, server, devices=devices)).addresses
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        addresses = [a for node in every for a in node]
        sink = MetricsSink(cfg, Path(cfg.output_dir) / "metrics.jsonl") if rank == 0 else None
        result = TrainResult([], 0, 0, metrics_path=str(sink.jsonl.name) if sink else "")

        report = (lambda rec: collect(result, sink, rec)) if rank == 0 else None
        trainer = Trainer(cfg, info, addresses, report=report, verbose=verbose)
        trainer.run(run_steps)  # destroys the process group at the end
        if sink is not None:
            sink.close()
            result.wall_s = time.perf_counter() - t_start
            print(summary_table(cfg, result), flush=True)
            return {"losses": result.losses, "records": result.records}
        return None


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distca.train.torchrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--run-steps", type=int, default=0)
    p.add_argument("--result-json", default="", help="rank 0 writes the per-step losses here (tests)")
    p.add_argument("--verbose", action="store_true", help="let DeepSpeed and torch.distributed log and print")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    cfg = load_config(args.config, overrides)
    torch.set_num_threads(cfg.threads or 1)
    out = run(cfg, dict(os.environ), args.run_steps, args.verbose)  # torchrun's environment, read once here
    if out is not None and args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
