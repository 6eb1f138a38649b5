"""One trainer rank: DeepSpeed pipeline × data parallel training with core attention local or on CAD.

Per step, every rank draws the same micro-batches from the same seeded stream (so every rank knows
every replica's documents without communication), builds its own rows' document layout, and — with
``core_attention: cad`` — computes the CAD plans of each micro-batch deterministically (DESIGN §3:
every trainer uses the same plan). On DeepSpeed's 1F1B schedule the data-parallel replicas of one pipeline
stage are one plan's trainers; the stages share the server pool, each under its own plan ids
(``CADClient.group``). On the pooled schedule (:mod:`distca.train.schedule`, :mod:`distca.train.pooled`) one
plan per tick spans every stage's trainers, and stages idle in a tick serve its rounds.

Process groups, the server addresses and the metrics sink are passed in; nothing here reads
environment variables (the launcher sets what ``torch.distributed`` and DeepSpeed need before calling us,
see :mod:`distca.train.rank`). The rank computes on ``RankInfo.device``: on a GPU the process group is
NCCL, DeepSpeed runs on its CUDA accelerator and the model, the micro-batches' document layouts and core
attention live on that GPU; on the CPU it is gloo and DeepSpeed's CPU accelerator. What each step
measures is :mod:`distca.train.metrics`' business (:class:`~distca.train.metrics.StepMeter`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distca.attention import resolve_backend
from distca.config import DistCAConfig
from distca.masks import key_order
from distca.model.core import DocLayout
from distca.parts import (
    attention_shape,
    client_settings,
    data_plane,
    pipeline_schedule,
    scheduler_settings,
    server_dtype,
)
from distca.scheduler import Placement, make_plan
from distca.train.colocated_attention import AttentionTimer
from distca.train.data import make_source
from distca.train.export import (
    check_pipeline_layout,
    run_checkpoint_dir,
    write_model_config,
    write_pipeline_layout,
)
from distca.train.flops import measure_peak_flops
from distca.train.metrics import StepMeter, combine_ranks
from distca.train.micro import local_core, part_batches, part_layouts, part_rows
from distca.train.pipe import MicroContext, StepContext, build_pipeline, llama_parameters, runner_only
from distca.train.pooled import PooledCAD, check_topology, describe, pooled_client, pooled_placement, replica_nodes
from distca.train.prefetch import StepPrefetch
from distca.train.quiet import library_prints
from distca.train.rank import RankInfo, bind_device, dist_backend, ds_accelerator, init_process_group
from distca.train.schedule import Timeline, install, one_f_one_b_weight_grad_plan, weight_grad_plan
from distca.train.wgrad import StageWeightGrads

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


def deepspeed_config(cfg: DistCAConfig, device: str) -> dict[str, Any]:
    """The DeepSpeed engine config implied by ``cfg.train`` (optimizer, LR schedule, ZeRO, precision) for ranks
    on ``device`` (the run's resolved device: ``cpu``, ``cuda`` or ``cuda:N``).

    The optimizer is torch's AdamW (``torch_adam``: DeepSpeed's own FusedAdam/CPUAdam would compile a C++/CUDA
    op at start). DeepSpeed 0.19.8 hands every optimizer param except ``torch_adam`` to ``torch.optim.AdamW``
    as keywords (``foreach`` separately, ``None`` unless given), so on CUDA ``fused: True`` selects torch's
    fused AdamW kernel (one launch for all tensors of a group, no JIT build); on the CPU the optimizer is what
    it always was (``foreach=None``: torch's per-tensor loop for CPU tensors).

    Precision: with ``bf16`` and ``zero_stage: 1`` DeepSpeed wraps AdamW in its ZeRO stage-1 optimizer
    (``DeepSpeedZeroOptimizer``; ``grad_accum_dtype`` is unset, so it equals the bf16 model dtype): the model's
    parameters and gradients are bf16, and each data-parallel rank keeps an fp32 master copy of its partition
    (``single_partition_of_fp32_groups``) that AdamW updates, with fp32 moments, before the partition is copied
    back to bf16. Gradients of a step's micro-batches are summed in bf16 before the fp32 step.
    """
    t = cfg.train
    adam: dict[str, Any] = {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay,
                            "torch_adam": True}
    if torch.device(device).type == "cuda":
        adam["fused"] = True
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": t.micro_batches,
        "train_batch_size": t.micro_batches * cfg.data_parallel,
        "optimizer": {"type": "AdamW", "params": adam},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": t.steps, "warmup_num_steps": max(t.warmup_steps, 1), "warmup_type": "linear",
            "warmup_min_ratio": 0.0 if t.warmup_steps else 1.0, "cos_min_ratio": t.min_lr_ratio}},
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The optimiser's two parameter groups: weight decay for matrices, none for vectors.

    Every parameter with fewer than 2 dimensions (RMSNorm gains, the biases of DDL's β and v) gets no
    decay, as in nanoGPT: decay would pull a norm gain towards 0 and a bias towards no offset, which
    regularises nothing. The embedding (2-D) keeps its decay — nanoGPT's choice too, and with a tied head
    it is the head's matrix as well. A group left empty on this stage is dropped.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _cpu_deepspeed() -> None:
    """DeepSpeed on CPU without JIT-compiled ops: its shared-memory all-reduce would compile a C++ op at
    init (about 26 s on a 2-core machine); gloo does the collectives instead."""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class Trainer:
    """A trainer rank; ``run()`` trains ``cfg.train.steps`` steps (or resumes) and returns its summary."""

    def __init__(self, cfg: DistCAConfig, info: RankInfo, server_addresses: list[str] | None = None,
                 report: Report | None = None, verbose: bool = False,
                 replacements: Callable[[], dict[int, str]] | None = None):
        """``verbose`` lets DeepSpeed print what it prints while the pipeline is built. ``replacements()`` (rank 0;
        the launcher's): servers the pool replaced since the last call, index -> new address; every rank takes
        them back at the same step boundary (in-step recovery)."""
        self.cfg, self.info, self.report, self.verbose = cfg, info, report or (lambda rec: None), verbose
        self.replacements = replacements
        self.addresses = list(server_addresses or [])
        t = cfg.train
        self.plane = data_plane(cfg, info.torch_device.type) if t.core_attention == "cad" else "local"
        if self.plane not in ("local", "inplace") and not self.addresses:
            raise ValueError(f"train.core_attention is 'cad' on the {self.plane!r} data plane but no attention-server "
                             "addresses were given")
        if info.world != cfg.cluster.n_trainers:
            raise ValueError(f"{info.world} processes started for cluster.n_trainers={cfg.cluster.n_trainers}")
        self.windows = sorted(set(cfg.model.attention_windows()), key=key_order)
        # ping-pong nano-batches inside the stages (CAD only); they recompute activations themselves, so
        # DeepSpeed's per-block checkpointing is off when they are on
        self.pingpong = t.core_attention == "cad" and t.pingpong
        self.stop_requested = False
        self.attn_timer = AttentionTimer()

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
        from deepspeed.accelerator import get_accelerator

        cfg, info = self.cfg, self.info
        torch.set_num_threads(cfg.threads or 1)
        self.device = bind_device(info)  # before anything touches CUDA: this rank's GPU is the current device
        if not torch.distributed.is_initialized():  # a launcher (torchrun's, Ray Train) may have joined already
            init_process_group(info, cfg.train.step_timeout_s)
        accelerator = get_accelerator().device_name()
        if accelerator != ds_accelerator(self.device):
            raise RuntimeError(f"DeepSpeed runs on its {accelerator!r} accelerator but this rank computes on "
                               f"{self.device}: the launcher must set DS_ACCELERATOR={ds_accelerator(self.device)} "
                               "before DeepSpeed is first imported (distca.train.rank.deepspeed_env)")
        if self.device.type == "cpu":
            _cpu_deepspeed()
        deepspeed.init_distributed(dist_backend(self.device), timeout=timedelta(seconds=cfg.train.step_timeout_s))
        self.ctx = StepContext()
        with library_prints(self.verbose):  # DeepSpeed prints its seeds, topology and layer listing on rank 0
            pipe = build_pipeline(cfg.model, self.ctx, cfg.train.pipeline_parallel, cfg.seed,
                                  cfg.train.activation_checkpointing and not self.pingpong, cfg.stage_blocks())
        if cfg.train.init_from_hf:  # before DeepSpeed copies parameters into its optimizer state
            from distca.model.hf import load_hf_weights

            load_hf_weights(cfg.model, llama_parameters(pipe, cfg.model), cfg.train.init_from_hf)
        groups = param_groups(pipe, cfg.train.weight_decay)
        # DeepSpeed casts the stage to bf16 (if so configured) and moves it to cuda:LOCAL_RANK, this rank's GPU
        self.engine, *_ = deepspeed.initialize(model=pipe, model_parameters=groups,
                                               config=deepspeed_config(cfg, str(self.device)))
        kept = [g["weight_decay"] for g in self.engine.optimizer.param_groups]
        if kept != [g["weight_decay"] for g in groups]:  # DeepSpeed's optimizers and ZeRO keep groups today
            raise RuntimeError(f"DeepSpeed's optimizer has weight-decay groups {kept}, not the trainer's "
                               f"{[g['weight_decay'] for g in groups]}")
        self.stage, self.dp_rank = self.engine.stage_id, self.engine.grid.data_parallel_id
        self.dp_group = self.engine.grid.get_data_parallel_group()
        topo = self.topo = pipe.topology()
        self.devices = tuple(topo.get_rank(pipe=self.stage, data=d) for d in range(cfg.data_parallel))
        # the pipeline schedule: DeepSpeed's 1F1B, or pooled ticks (distca.train.schedule, distca.train.pooled)
        self.schedule, why = pipeline_schedule(cfg, self.device.type)
        if info.rank == 0:
            log.info("pipeline schedule: %s (%s)", self.schedule, why)
        if self.schedule == "pooled":
            check_topology(topo, cfg.train.pipeline_parallel, cfg.data_parallel)
        self.source = make_source(cfg)
        if self.source.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"data source {self.source.name} has {self.source.vocab_size} token ids but "
                             f"model.vocab_size is {cfg.model.vocab_size}")
        from distca.data.stream import PackedStream

        self.stream = PackedStream(self.source, cfg.data_parallel, cfg.train.tokens_per_rank, cfg.seed,
                                   max_doc_tokens=cfg.data.max_doc_tokens or None, shuffle=cfg.data.shuffle,
                                   parts=2 if cfg.train.nano_split == "repack" else 1)
        self.client = self._cad_client()
        self.shape = attention_shape(cfg)
        if self.plane == "inplace":  # the stage's replicas are its plans' servers, server i on replica i
            self.placement = Placement(cfg.data_parallel, cfg.data_parallel, "colocated")
        else:
            self.placement = Placement(cfg.data_parallel, cfg.cluster.n_servers, cfg.cluster.placement, self.devices)
        precision = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        if self.device.type == "cuda":  # auto: flash where installed, else torch's varlen kernel (bf16/fp16 only)
            kernel = resolve_backend(cfg.attention.backend, self.device, precision).name
            log.info("core attention kernel on %s: %s", self.device, kernel)
            if kernel == "reference":
                log.warning("core attention on %s runs the dense reference kernel (the CUDA varlen kernels take "
                            "bf16/fp16, this run is %s): memory grows with the square of a document's length",
                            self.device, cfg.train.precision)
        # pooled CAD: tick plans over every stage's trainers (None with 1F1B or local attention)
        self.pooled = None
        if self.schedule == "pooled" and self.client is not None:
            self.placement = pooled_placement(cfg, self.plane)
            self.pooled = PooledCAD(cfg, self.stage, self.client, self.placement, self.device,
                                    serves=self.plane == "inplace", pingpong=self.pingpong)
        if self.pooled is not None:
            self.timeline = Timeline(self.pooled.probe)
        elif hasattr(self.client, "busy_s") and hasattr(self.client, "served"):  # an in-place rank's own server
            self.timeline = Timeline(lambda: (float(self.client.busy_s), int(self.client.served)))
        else:
            self.timeline = Timeline()
        # deferred weight gradients: pooled, B ticks before a stage's serving ticks keep them for those; 1F1B, the
        # last backward passes of the upper stages keep them for after their last backward
        self.wgrad = None
        if cfg.train.defer_weight_grads:
            plan = weight_grad_plan if self.schedule == "pooled" else one_f_one_b_weight_grad_plan
            self.wgrad = StageWeightGrads(pipe, plan(cfg.train.pipeline_parallel, cfg.train.micro_batches), self.stage)
        install(self.engine, self.schedule, self.timeline, on_tick=self._enter_tick,
                serve=self._serve_tick if self.schedule == "pooled" else None, before_tail=self._before_tail,
                tick_done=self.pooled.join_trailing if self.pooled is not None else lambda: None,
                before_pass=self.pooled.before_pass if self.pooled is not None else None)
        self.peak_flops = cfg.train.peak_tflops * 1e12 or measure_peak_flops(precision, device=self.device)
        self.meter = StepMeter(cfg, info.rank, self.stage, self.dp_rank, self.client, self.attn_timer, self.device)
        self.prefetch = StepPrefetch(self.stream, cfg.train.micro_batches, self._prepare,
                                     background=cfg.train.prefetch,
                                     prepare_step=self.pooled.plan_ticks if self.pooled is not None else None)

    def _enter_tick(self, tick: int | None) -> None:
        if self.wgrad is not None:
            self.wgrad.enter(tick)
        if self.pooled is not None:
            self.pooled.enter(tick)

    def _serve_tick(self, tick: int, phase: str) -> bool:
        """A tick this stage has no micro-batch in: serve its attention rounds, computing the deferred weight
        gradients the plan put here between them."""
        jobs = self.wgrad.due(tick) if self.wgrad is not None else []
        if self.pooled is not None:
            return self.pooled.serve(tick, phase, jobs, self._run_weight_grads)
        if jobs:
            self._run_weight_grads(jobs)
        return False

    def _run_weight_grads(self, jobs: list) -> None:
        t0 = time.perf_counter()
        self.wgrad.run(jobs)
        self.timeline.span("W", t0)

    def _before_tail(self) -> None:
        if self.wgrad is not None and self.wgrad.queue.pending:
            t0 = time.perf_counter()
            self.wgrad.flush()
            self.timeline.span("W", t0)

    def _cad_client(self):
        """The CAD runtime of this rank's data plane (None with local attention): in-place servers over the
        stage's data-parallel group, the pool's servers over a data-plane group of the stage's trainers and the
        servers (``collective``), or a client of the server pool over ZeroMQ."""
        cfg = self.cfg
        settings = client_settings(cfg, self.device.type)
        if self.plane == "local":
            return None
        if self.schedule == "pooled":  # one plan per tick over every stage's trainers
            client = pooled_client(cfg, self.plane, self.stage * cfg.data_parallel + self.dp_rank, self.device,
                                   self.addresses)
            if hasattr(client, "recover_with"):  # a pool client: plan rank r is stage r // dp, replica r % dp
                dp = cfg.data_parallel
                rec = self._recovery([self.topo.get_rank(pipe=r // dp, data=r % dp)
                                      for r in range(cfg.cluster.n_trainers)])
                if rec is not None:
                    client.recover_with(rec)
            return client
        if self.plane == "inplace":
            from distca.runtime.inplace import InPlaceClient
            from distca.server.exchange import GroupRoles, RowExchange, RowFormat

            m = cfg.model
            fmt = RowFormat(m.n_heads, m.n_kv_heads, m.head_dim, getattr(torch, server_dtype(cfg)))
            roles = GroupRoles.inplace(cfg.data_parallel, self.dp_rank)
            return InPlaceClient(RowExchange(self.dp_group, roles, fmt, self.device,
                                             nodes=replica_nodes(cfg, self.topo, self.stage)), backend=settings.backend)
        if self.plane == "collective":  # the stage's trainers and the pool's servers in one gloo group
            from distca.train.collective import collective_client

            return collective_client(cfg, self.stage, self.dp_rank, self.addresses, self.device)
        from distca.runtime.client import CADClient

        return CADClient(self.dp_rank, self.addresses, settings.transport, backend=settings.backend, group=self.stage,
                         shm=settings.shm, recovery=self._recovery(list(self.devices)))

    def _recovery(self, peers: list[int]):
        """In-step recovery from lost servers for a pool client whose plan rank ``r`` is global rank ``peers[r]``
        (``cluster.server_loss: in_step``; None: ``restart``). Its gloo group of every trainer is made here, so
        every rank calls this, in the same order."""
        cfg = self.cfg
        if cfg.cluster.server_loss != "in_step":
            return None
        import torch.distributed as dist

        from distca.runtime.recovery import Recovery

        group = dist.new_group(list(range(self.info.world)), backend="gloo")  # host rows, even on NCCL runs
        return Recovery(cfg.cluster.lost_after_s, peers, group,
                        exchange_timeout_s=cfg.transport.timeout_s + cfg.cluster.lost_after_s)

    # -- one step ------------------------------------------------------------------------------
    def _prepare(self, mb) -> tuple[DocLayout, dict[int, Any]]:
        """What a micro-batch needs before it runs, from the micro-batch alone (the prefetch thread computes it
        for the next step): this rank's document layout, on its device, and the CAD plans, one per attention
        window (the same on every rank; none with local attention) — with ping-pong a tuple per window, one
        plan per nano-batch: the queries of the first and of the second half of every rank's rows (``rows``), or
        each independent half of the micro-batch on its own (``repack``, rows counted from the half's first)."""
        # on the rank's device before the step: RoPE tables and the kernels' offsets are built there
        layout = DocLayout.concat(part_layouts(mb, self.dp_rank)).to(self.device)
        if self.client is None or self.schedule == "pooled":  # pooled: tick plans, see PooledCAD.plan_step
            return layout, {}
        plan = lambda batch, w, keys=None: make_plan(batch, self.placement, scheduler_settings(self.cfg, w),  # noqa: E731
                                                     self.shape, keys=keys)[0]
        batches = part_batches(mb)
        if len(batches) > 1:  # independent halves, each planned on its own rows, ping-pong or not; tagged: equal
            # halves must not share a plan id while both are in flight
            return layout, {w: tuple(plan(h, w).tagged(i) for i, h in enumerate(batches)) for w in self.windows}
        batch = batches[0]
        if not self.pingpong:
            return layout, {w: plan(batch, w) for w in self.windows}
        from distca.runtime.nano import nano_batches

        return layout, {w: tuple(plan(n, w, batch) for n in nano_batches(batch)) for w in self.windows}

    def _micro_context(self, mb, layout: DocLayout, plans: dict[int, Any]) -> MicroContext:
        if self.client is None:
            core = local_core(mb, self.dp_rank, self.dp_group, self.cfg.attention.backend, self.attn_timer, layout)
        elif self.pingpong:
            from distca.runtime.nano import NanoPlans, PingPongBlocks, nano_rows

            # as _prepare planned them: the halves of the rows, or the independent parts
            independent = len(mb.parts) > 1
            rows = part_rows(mb, self.dp_rank) if independent else nano_rows(int(layout.cu_seqlens[-1]))
            run = PingPongBlocks(self.client, NanoPlans(rows, plans, independent=independent),
                                 checkpoint=self.cfg.train.activation_checkpointing)
            return MicroContext(layout, runner_only, run_block=run)
        else:
            from distca.runtime.cad_attention import CADCoreAttention

            core = CADCoreAttention(self.client, plans, part_rows(mb, self.dp_rank) if len(mb.parts) > 1 else None)
        return MicroContext(layout, core)

    def _batches(self, mbs) -> list:
        """The engine's micro-batches, on the host: DeepSpeed's pipeline engine moves the first stage's inputs
        and the last stage's labels to the rank's device as it loads each micro-batch."""
        d = self.dp_rank
        return [((torch.from_numpy(np.ascontiguousarray(mb.tokens[d])).long(), torch.tensor([i])),
                 torch.from_numpy(np.ascontiguousarray(mb.labels[d])).long()) for i, mb in enumerate(mbs)]

    def step(self, step: int, prepare_next: bool = False) -> dict[str, Any]:
        """Train one step; returns this rank's measurements. ``prepare_next``: draw and plan the next step on
        the background thread while this one trains (``train.prefetch``)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        prep = self.prefetch.take()
        if self.pooled is not None:  # core attention follows the ticks' plans
            self.ctx.set(self.pooled.contexts([layout for layout, _ in prep.parts], prep.step))
        else:
            self.ctx.set([self._micro_context(mb, *part)
                          for mb, part in zip(prep.micro_batches, prep.parts, strict=True)])
        plan_ms = (time.perf_counter() - t0) * 1e3  # on the critical path: waiting for the step, the contexts
        plan_cpu_ms = (time.thread_time() - c0) * 1e3  # the same without time the OS gave other processes
        if prepare_next:  # after the contexts: the thread's first slice of the GIL then overlaps the step
            self.prefetch.start_next()
        if self.client is not None:
            self.client.forget_plans()
        mbs = prep.micro_batches
        idle0 = self.pooled.idle_blocked_s if self.pooled is not None else 0.0
        with self.meter.measure(self.engine.module.parameters()):
            loss = float(self.engine.train_batch(data_iter=iter(self._batches(mbs))))
        plans = self.pooled.forward_plans() if self.pooled is not None else [plans for _, plans in prep.parts]
        rec = self.meter.record(step, loss, float(self.engine.get_lr()[0]), mbs, plans, plan_ms)
        rec.update(self._agree_on_servers())
        rec["pipeline_schedule"], rec["timeline"] = self.schedule, self.timeline.entries
        rec["spans"] = self.timeline.spans
        rec["plan_trainers"] = describe(prep.step)["plan_trainers"] if self.pooled is not None else \
            next(((p[0] if isinstance(p, tuple) else p).n_ranks for _, per in prep.parts for p in per.values()), 0)
        rec["prepare_ms"] = prep.ms  # drawing and planning the step, in the background when prefetched
        rec["plan_cpu_ms"] = plan_cpu_ms
        rec["pingpong"] = self.pingpong
        # pooled ticks: the part of blocked_s this rank waited in the rounds of ticks it had no micro-batch in
        rec["blocked_idle_s"] = (self.pooled.idle_blocked_s - idle0) if self.pooled is not None else 0.0
        if self.wgrad is not None:  # linear layers' weight gradients computed after their backward pass
            rec["weight_grads_deferred"] = self.wgrad.jobs_run
        return rec

    def _agree_on_servers(self) -> dict[str, Any]:
        """At the step boundary every rank takes the union of the servers any rank lost (one small all-reduce), so
        every rank of the next step skips the same ones; returns this step's recovery counters for the record."""
        rec = getattr(self.client, "recovery", None)
        if rec is None:
            return {}
        rec.agree(self.cfg.cluster.n_servers)
        now = rec.stats()
        was, self._recovery_seen = getattr(self, "_recovery_seen", {}), now
        return {**now, **{k: now[k] - was.get(k, 0) for k in ("recovered_rounds", "recovered_tasks", "recovery_s",
                                                               "loss_detect_s", "late_replies_dropped")}}

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return run_checkpoint_dir(self.cfg)

    def save(self, step: int) -> str:
        """DeepSpeed checkpoint (weights, optimizer, LR schedule) + data position + RNG, tag ``stepN``."""
        tag = f"step{step:08d}"
        state = {"step": step, "data": self.prefetch.stream_state(), "torch_rng": torch.get_rng_state(),
                 "numpy_rng": np.random.get_state()}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state={"distca": state})
        if self.info.rank == 0:  # the model beside its tensors, for `distca export`; the stages, for a resume
            write_model_config(self.checkpoint_dir / tag, self.cfg.model)
            write_pipeline_layout(self.checkpoint_dir / tag, self.cfg.stage_blocks())
        return tag

    def load(self) -> int:
        """Resume from the latest checkpoint; returns the number of steps already done."""
        check_pipeline_layout(self.checkpoint_dir, self.cfg.stage_blocks())
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
        finished = False
        try:
            t = self.cfg.train
            start = self.load() if t.resume else 0
            end = t.steps if run_steps <= 0 else min(t.steps, start + run_steps)
            records = []
            self.report({"event": "start", "rank": self.info.rank, "start_step": start, "end_step": end,
                         "peak_flops": self.peak_flops})
            for step in range(start, end):
                mine = self.step(step, prepare_next=step + 1 < end)
                mine["stop"] = self.stop_requested
                if self.replacements is not None and getattr(self.client, "recovery", None) is not None:
                    mine["rejoin"] = self.replacements()
                every = [None] * self.info.world
                dist.all_gather_object(every, mine)  # rank 0's replacements reach every rank here
                rec = combine_ranks(every, self.peak_flops)
                rejoin = every[0].get("rejoin") or {}
                for s, address in sorted(rejoin.items()):  # every rank at this step boundary
                    self.client.rejoin(s, address)
                if rejoin:
                    rec["rejoined_after"] = sorted(rejoin)
                records.append(rec)
                if self.info.rank == 0:
                    self.report({"event": "step", **rec})
                # a stop asked of any rank (SIGTERM/SIGINT) ends every rank after the same step
                stopping = any(r["stop"] for r in every)
                last = step + 1 == end or stopping
                if stopping and self.info.rank == 0:
                    self.report({"event": "stopping", "step": step + 1})
                if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or (last and t.checkpoint_at_end):
                    tag = self.save(step + 1)
                    if self.info.rank == 0:
                        self.report({"event": "checkpoint", "step": step + 1, "tag": tag,
                                     "dir": str(self.checkpoint_dir)})
                if stopping:
                    end = step + 1
                    break
            finished = True
            return {"rank": self.info.rank, "records": records, "start_step": start, "end_step": end}
        finally:
            self.close(barrier=finished)

    def close(self, barrier: bool = True) -> None:
        """Release sockets and the engine, and leave the process group: after a finished run with a barrier
        first, so no rank leaves while a peer still talks to it; after a failure without one, so the error
        reaches the launcher at once instead of after the peers' collective timeout (the launcher stops them)."""
        import torch.distributed as dist

        if getattr(self, "prefetch", None) is not None:
            self.prefetch.close()
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.engine = None
        gc.collect()
        if dist.is_initialized():
            if barrier:
                with contextlib.suppress(Exception):
                    dist.barrier()
            dist.destroy_process_group()
