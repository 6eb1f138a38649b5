"""One trainer rank: DeepSpeed pipeline × data parallel training with core attention local or on CAD.

Per step, every rank draws the same micro-batches from the same seeded stream (so every rank knows
every replica's documents without communication), builds its own rows' document layout, and — with
``core_attention: cad`` — computes the CAD plans of each micro-batch deterministically (DESIGN §3:
every trainer uses the same plan). The data-parallel replicas of one pipeline stage are one plan's
trainers; the stages share the server pool, each under its own plan ids (``CADClient.group``).

Process groups, the server addresses and the metrics sink are passed in; nothing here reads
environment variables (the launcher sets what ``torch.distributed`` needs before calling us).

Per step and rank the trainer also measures where its time and memory go (``_combine`` lists them
per rank, in global-rank order):

- attention: ``local`` — seconds in the core-attention kernel, forward and backward (wall, and this
  thread's CPU); ``cad`` — seconds the trainer blocked on the servers (the servers' own ``busy_s``
  is the attention work);
- compute: this process's CPU seconds during the step (``time.process_time``: every thread, so
  gloo's and ZeroMQ's I/O threads count too); linear = compute − attention CPU (``local``) or
  compute (``cad``); waiting = step wall − compute, which on an over-subscribed machine includes
  waiting for a free core, not only for peers;
- memory: the peak bytes of tensors autograd holds for backward (saved activations, counted once per
  storage, parameters excluded) — what the tokens in flight cost, free of the process's baseline —
  and the step's resident-set high-water mark (``VmHWM``, reset before the step where Linux allows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distca.attention import AttentionShape
from distca.config import DistCAConfig
from distca.model.core import DocLayout
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.scheduler.work import cum_pairs
from distca.train.colocated_attention import AttentionTimer, GroupLocalCoreAttention, PrefixRows
from distca.train.data import make_source
from distca.train.flops import attention_sublayers, measure_peak_flops, step_flops
from distca.train.pipe import MicroContext, StepContext, build_pipeline

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: global rank, world size and the rendezvous address."""

    rank: int
    world: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def deepspeed_config(cfg: DistCAConfig) -> dict[str, Any]:
    """The DeepSpeed engine config implied by ``cfg.train`` (optimizer, LR schedule, ZeRO, precision)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": t.micro_batches,
        "train_batch_size": t.micro_batches * cfg.data_parallel,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": t.steps, "warmup_num_steps": max(t.warmup_steps, 1), "warmup_type": "linear",
            "warmup_min_ratio": 0.0 if t.warmup_steps else 1.0, "cos_min_ratio": t.min_lr_ratio}},
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _cpu_deepspeed() -> None:
    """DeepSpeed on CPU without JIT-compiled ops: its shared-memory all-reduce would compile a C++ op at
    init (about 26 s on a 2-core machine); gloo does the collectives instead."""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class Trainer:
    """A trainer rank; ``run()`` trains ``cfg.train.steps`` steps (or resumes) and returns its summary."""

    def __init__(self, cfg: DistCAConfig, info: RankInfo, server_addresses: list[str] | None = None,
                 report: Report | None = None):
        self.cfg, self.info, self.report = cfg, info, report or (lambda rec: None)
        self.addresses = list(server_addresses or [])
        t = cfg.train
        if t.core_attention == "cad" and not self.addresses:
            raise ValueError("train.core_attention is 'cad' but no attention-server addresses were given")
        if info.world != cfg.cluster.n_trainers:
            raise ValueError(f"{info.world} processes started for cluster.n_trainers={cfg.cluster.n_trainers}")
        self.windows = sorted(set(attention_sublayers(cfg.model)))
        self.stop_requested = False
        self.attn_timer = AttentionTimer()
        self.saved = SavedActivations()

    def request_stop(self, *_signal) -> None:
        """Finish the current step, checkpoint, and leave (the SIGTERM/SIGINT handler)."""
        self.stop_requested = True

    def install_signal_handlers(self) -> None:
        """Make SIGTERM and SIGINT stop training gracefully (main thread only)."""
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)

    # -- setup ---------------------------------------------------------------------------------
    def _init(self) -> None:
        import deepspeed

        cfg, info = self.cfg, self.info
        torch.set_num_threads(cfg.threads or 1)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                "gloo", init_method=f"tcp://{info.master_addr}:{info.master_port}", rank=info.rank,
                world_size=info.world, timeout=timedelta(seconds=cfg.train.step_timeout_s))
        _cpu_deepspeed()
        deepspeed.init_distributed("gloo", timeout=timedelta(seconds=cfg.train.step_timeout_s))
        self.ctx = StepContext()
        pipe = build_pipeline(cfg.model, self.ctx, cfg.train.pipeline_parallel, cfg.seed,
                              cfg.train.activation_checkpointing)
        if cfg.train.init_from_hf:  # before DeepSpeed copies parameters into its optimizer state
            from types import SimpleNamespace

            from distca.model.hf import load_hf_weights

            load_hf_weights(SimpleNamespace(cfg=cfg.model), cfg.train.init_from_hf,
                            params=stage_params_by_llama_name(pipe, cfg.model))
        params = [p for p in pipe.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=pipe, model_parameters=params, config=deepspeed_config(cfg))
        self.stage, self.dp_rank = self.engine.stage_id, self.engine.grid.data_parallel_id
        self.dp_group = self.engine.grid.get_data_parallel_group()
        topo = pipe._topo
        self.devices = tuple(topo.get_rank(pipe=self.stage, data=d) for d in range(cfg.data_parallel))
        self.source = make_source(cfg)
        if self.source.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"data source {self.source.name} has {self.source.vocab_size} token ids but "
                             f"model.vocab_size is {cfg.model.vocab_size}")
        from distca.data.stream import PackedStream

        self.stream = PackedStream(self.source, cfg.data_parallel, cfg.train.tokens_per_rank, cfg.seed,
                                   max_doc_tokens=cfg.data.max_doc_tokens or None, shuffle=cfg.data.shuffle)
        self.client = None
        if cfg.train.core_attention == "cad":
            from distca.runtime.client import CADClient
            from distca.server.pool import server_config

            self.client = CADClient(self.dp_rank, self.addresses, server_config(cfg).transport,
                                    backend=cfg.attention.backend, group=self.stage)
        m = cfg.model
        self.shape = AttentionShape(m.n_heads, m.n_kv_heads, m.head_dim, 2 if cfg.train.precision == "bf16" else 4)
        self.placement = Placement(cfg.data_parallel, cfg.cluster.n_servers, cfg.cluster.placement, self.devices)
        self.peak_flops = cfg.train.peak_tflops * 1e12 or measure_peak_flops()

    # -- one step ------------------------------------------------------------------------------
    def _micro_context(self, mb) -> tuple[MicroContext, dict[int, Any]]:
        p, d = mb.packed, self.dp_rank
        first = PrefixRows.of(p.ranks, p.continues, d).n
        layout = DocLayout.from_lengths(p.ranks[d], first_position=first)
        plans: dict[int, Any] = {}
        if self.client is None:
            core = GroupLocalCoreAttention(layout, p.ranks, p.continues, d, self.dp_group, self.cfg.attention.backend,
                                           timer=self.attn_timer)
        else:
            from distca.runtime.cad_attention import CADCoreAttention

            batch = BatchLayout.from_ranks(p.ranks, p.continues)
            for w in self.windows:
                sched = SchedulerConfig(eps=self.cfg.scheduler.eps, granularity=self.cfg.attention.shard_tokens,
                                        window=w)
                plans[w], _ = make_plan(batch, self.placement, sched, self.shape)
            core = CADCoreAttention(self.client, plans)
        return MicroContext(layout, core), plans

    def _batches(self, mbs) -> list:
        d = self.dp_rank
        return [((torch.from_numpy(np.ascontiguousarray(mb.tokens[d])).long(), torch.tensor([i])),
                 torch.from_numpy(np.ascontiguousarray(mb.labels[d])).long()) for i, mb in enumerate(mbs)]

    def _server_stats(self) -> list[dict]:
        """Every server's PING answer (busy seconds, peak RSS), asked by rank 0 between steps."""
        if self.client is None or self.info.rank != 0:
            return []
        return [self.client.ping(s, timeout_s=self.cfg.transport.timeout_s) for s in range(len(self.addresses))]

    def step(self, step: int) -> dict[str, Any]:
        """Train one step; returns this rank's measurements."""
        t = self.cfg.train
        mbs = [self.stream.next_micro_batch() for _ in range(t.micro_batches)]
        t0 = time.perf_counter()
        built = [self._micro_context(mb) for mb in mbs]
        plan_ms = (time.perf_counter() - t0) * 1e3
        self.ctx.set([c for c, _ in built])
        if self.client is not None:
            self.client.forget_plans()
        blocked0 = self.client.blocked_s if self.client is not None else 0.0
        before = self._server_stats()
        timer0 = dataclasses.replace(self.attn_timer)
        self.saved.reset(self.engine.module.parameters())
        rss_reset = _reset_rss_peak()
        cpu0, thread0 = time.process_time(), time.thread_time()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack):
            loss = float(self.engine.train_batch(data_iter=iter(self._batches(mbs))))
        step_s = time.perf_counter() - t0
        cpu_s, thread_cpu_s = time.process_time() - cpu0, time.thread_time() - thread0
        rss_peak_mb = _rss_peak_mb() if rss_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        after = self._server_stats()
        busy = [float(b.get("busy_s", 0.0)) - float(a.get("busy_s", 0.0)) for a, b in zip(before, after, strict=True)]
        blocked = (self.client.blocked_s - blocked0) if self.client is not None else 0.0

        # Attention load: per server as planned (pairs summed over the step's calls), else per replica.
        calls = {w: attention_sublayers(self.cfg.model).count(w) for w in self.windows}
        if self.client is not None:
            load = sum(calls[w] * plans[w].server_pairs.astype(np.float64) for _, plans in built for w in plans)
        else:
            load = np.zeros(self.cfg.data_parallel)
            for mb in mbs:
                for w, n in calls.items():
                    for r, (lens, offs) in enumerate(zip(mb.packed.ranks, mb.packed.offsets, strict=True)):
                        load[r] += n * sum(cum_pairs(o + x, w) - cum_pairs(o, w) for x, o in
                                           zip(lens, offs, strict=True))
        docs = [n for mb in mbs for n in mb.packed.doc_lengths]
        if self.client is None:
            attn_s = self.attn_timer.wall_s - timer0.wall_s
            attn_cpu_s = self.attn_timer.cpu_s - timer0.cpu_s
            exchange_s = self.attn_timer.exchange_s - timer0.exchange_s
        else:
            attn_s, attn_cpu_s, exchange_s = blocked, 0.0, 0.0
        timing = {
            "stage": self.stage, "dp_rank": self.dp_rank, "attn_s": attn_s, "attn_cpu_s": attn_cpu_s,
            "exchange_s": exchange_s, "cpu_s": cpu_s, "thread_cpu_s": thread_cpu_s,
            "act_peak_mb": self.saved.peak / 2**20, "rss_peak_mb": rss_peak_mb,
        }
        if self.info.rank == 0:  # every rank draws the same micro-batches: one copy is enough
            timing["micro_batches"] = [{"ranks": [[int(x) for x in r] for r in mb.packed.ranks],
                                        "continues": [bool(c) for c in mb.packed.continues]} for mb in mbs]
        return {
            **timing,
            "step": step, "loss": loss, "step_s": step_s, "plan_ms": plan_ms, "blocked_s": blocked,
            "tokens": sum(docs), "flops": step_flops(self.cfg.model, docs),
            "planned_load_max_over_mean": float(load.max() / load.mean()) if load.mean() > 0 else 1.0,
            "server_busy_s": busy, "lr": float(self.engine.get_lr()[0]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_mb": _current_rss_mb(), "open_fds": _open_fds(),
            "server_peak_rss_mb": [float(s.get("peak_rss_kb", 0)) / 1024 for s in after],
        }

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.train.checkpoint_dir or Path(self.cfg.output_dir) / "checkpoints")

    def save(self, step: int) -> str:
        """DeepSpeed checkpoint (weights, optimizer, LR schedule) + data position + RNG, tag ``stepN``."""
        tag = f"step{step:08d}"
        state = {"step": step, "data": self.stream.state_dict(), "torch_rng": torch.get_rng_state(),
                 "numpy_rng": np.random.get_state()}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state={"distca": state})
        return tag

    def load(self) -> int:
        """Resume from the latest checkpoint; returns the number of steps already done."""
        path, client = self.engine.load_checkpoint(str(self.checkpoint_dir))
        if path is None:
            raise FileNotFoundError(f"train.resume is set but {self.checkpoint_dir} holds no checkpoint")
        state = client["distca"]
        self.stream.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        return int(state["step"])

    # -- the run -------------------------------------------------------------------------------
    def run(self, run_steps: int = 0) -> dict[str, Any]:
        """Train to ``cfg.train.steps`` (at most ``run_steps`` steps in this call when > 0); every rank
        returns the per-step records gathered from all ranks (rank 0 reports them as they come)."""
        import torch.distributed as dist

        self._init()
        try:
            t = self.cfg.train
            start = self.load() if t.resume else 0
            end = t.steps if run_steps <= 0 else min(t.steps, start + run_steps)
            records = []
            self.report({"event": "start", "rank": self.info.rank, "start_step": start, "end_step": end,
                         "peak_flops": self.peak_flops})
            for step in range(start, end):
                mine = self.step(step)
                mine["stop"] = self.stop_requested
                every = [None] * self.info.world
                dist.all_gather_object(every, mine)
                rec = _combine(every, self.cfg, self.peak_flops)
                records.append(rec)
                if self.info.rank == 0:
                    self.report({"event": "step", **rec})
                # a stop asked of any rank (SIGTERM/SIGINT) ends every rank after the same step
                stopping = any(r["stop"] for r in every)
                last = step + 1 == end or stopping
                if stopping and self.info.rank == 0:
                    self.report({"event": "stopping", "step": step + 1})
                if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or last:
                    tag = self.save(step + 1)
                    if self.info.rank == 0:
                        self.report({"event": "checkpoint", "step": step + 1, "tag": tag,
                                     "dir": str(self.checkpoint_dir)})
                if stopping:
                    end = step + 1
                    break
            return {"rank": self.info.rank, "records": records, "start_step": start, "end_step": end}
        finally:
            self.close()

    def close(self) -> None:
        """Release sockets and the engine, and leave the process group (else torch + gloo may abort at exit)."""
        import torch.distributed as dist

        if getattr(self, "client", None) is not None:
            self.client.close()
        self.engine = None
        gc.collect()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def stage_params_by_llama_name(pipe, cfg) -> dict[str, torch.nn.Parameter]:
    """This stage's parameters under their :class:`~distca.model.llama.LlamaModel` names (the layers of
    ``distca.train.pipe.pipeline_layers``: embedding, blocks, norm, head; a tied embedding lives under
    ``tied_modules.embed``)."""
    out = {}
    last_block = cfg.n_layers
    for name, p in pipe.named_parameters():
        head, rest = name.split(".", 1)
        if head == "tied_modules":
            out["embed.weight"] = p
            continue
        i = int(head)
        if i == 0:
            out["embed.weight"] = p
        elif i <= last_block:
            out[f"blocks.{i - 1}.{rest.removeprefix('block.')}"] = p
        elif i == last_block + 1:
            out[f"norm.{rest.removeprefix('norm.')}"] = p
        else:
            out[f"head.{rest.removeprefix('head.')}"] = p
    return out


def _combine(every: list[dict[str, Any]], cfg: DistCAConfig, peak_flops: float) -> dict[str, Any]:
    """One step's record from every rank's measurements (what DESIGN §7 says every run reports)."""
    step_s = max(r["step_s"] for r in every)
    first = every[0]
    flops = first["flops"]
    busy = first["server_busy_s"] or next((r["server_busy_s"] for r in every if r["server_busy_s"]), [])
    measured = (max(busy) / (sum(busy) / len(busy))) if busy and sum(busy) > 0 else None
    return {
        "step": first["step"], "loss": first["loss"], "lr": first["lr"], "step_s": step_s,
        "tokens": first["tokens"], "tokens_per_s": first["tokens"] / step_s,
        "mfu": flops["total"] / step_s / (peak_flops * len(every)),
        "attention_flops_share": flops["attention"] / flops["total"],
        "plan_ms": max(r["plan_ms"] for r in every),
        "exposed_comm_pct": 100 * max(r["blocked_s"] / r["step_s"] for r in every),
        "attn_load_max_over_mean_planned": max(r["planned_load_max_over_mean"] for r in every),
        "attn_load_max_over_mean_measured": measured,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in every),
        # per process, for soak runs: memory now (not the peak) and open file descriptors
        "rss_mb_per_rank": [round(r["rss_mb"], 1) for r in every],
        "open_fds_per_rank": [r["open_fds"] for r in every],
        "server_peak_rss_mb": first["server_peak_rss_mb"],
        "server_busy_s": list(busy),
        **_per_rank(every),
        "micro_batches": first.get("micro_batches"),
    }


def _per_rank(every: list[dict[str, Any]]) -> dict[str, Any]:
    """Where each rank's step went (lists in global-rank order; see the module docstring)."""
    attn = [r["attn_s"] for r in every]
    attn_cpu = [r["attn_cpu_s"] for r in every]
    compute = [r["cpu_s"] for r in every]
    act = [r["act_peak_mb"] for r in every]
    max_over_mean = lambda xs: max(xs) * len(xs) / sum(xs) if sum(xs) > 0 else None  # noqa: E731
    return {
        "stage_per_rank": [r["stage"] for r in every],
        "dp_rank_per_rank": [r["dp_rank"] for r in every],
        "step_s_per_rank": [r["step_s"] for r in every],
        "attn_s_per_rank": attn,
        "attn_cpu_s_per_rank": attn_cpu,
        "exchange_s_per_rank": [r["exchange_s"] for r in every],
        "blocked_s_per_rank": [r["blocked_s"] for r in every],
        "compute_s_per_rank": compute,
        "main_thread_cpu_s_per_rank": [r["thread_cpu_s"] for r in every],
        "linear_s_per_rank": [c - r["attn_cpu_s"] for c, r in zip(compute, every, strict=True)],
        "wait_s_per_rank": [r["step_s"] - c for c, r in zip(compute, every, strict=True)],
        "act_peak_mb_per_rank": act,
        "rss_peak_mb_per_rank": [r["rss_peak_mb"] for r in every],
        "attn_max_over_mean_trainers": max_over_mean(attn),
        "attn_cpu_max_over_mean_trainers": max_over_mean(attn_cpu),
        "act_peak_max_over_min": max(act) / min(act) if min(act) > 0 else None,
    }


class SavedActivations:
    """Bytes of the tensors autograd saves for backward that are alive now, and their peak since
    :meth:`reset` — a trainer's activation memory, without the process's baseline.

    Used as ``torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)`` around the step.
    A storage counts once however many saved tensors view it (its whole ``nbytes``); the parameters'
    storages are left out. Tensors saved inside a region with its own hooks (non-reentrant activation
    checkpointing) are not seen.
    """

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage address -> [saved tensors holding it, bytes]
        self.bytes = self.peak = 0
        self.exclude: set[int] = set()

    def reset(self, params) -> None:
        """Start a new peak window; ``params`` (the model's parameters) are not activations."""
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.peak = self.bytes

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or storage.nbytes() == 0:
            return t
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [1, storage.nbytes()]
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
        else:
            entry[0] += 1
        return _Held(self, ptr, t.detach())

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[ptr]


class _Held:
    """A saved tensor as autograd keeps it; gives its bytes back to the meter when autograd drops it
    (the tensor keeps its storage alive until then, so the address cannot be reused meanwhile)."""

    __slots__ = ("meter", "ptr", "tensor")

    def __init__(self, meter: SavedActivations, ptr: int, tensor: torch.Tensor):
        self.meter, self.ptr, self.tensor = meter, ptr, tensor

    def __del__(self):
        self.meter.release(self.ptr)


def _reset_rss_peak() -> bool:
    """Reset this process's resident-set high-water mark (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_peak_mb() -> float:
    """``VmHWM`` of this process in MB (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1
