"""What a training run measures and reports: the per-rank step meter, the step record combined over ranks,
and the driver's sink (progress bar, per-step lines, metrics JSONL, TensorBoard, header, summary table).

Per step and rank a :class:`StepMeter` measures where the rank's time and memory go
(:func:`combine_ranks` lists them per rank, in global-rank order):

- attention: ``local`` — seconds in the core-attention kernel, forward and backward (wall, and this
  thread's CPU); ``cad`` — seconds the trainer blocked on the servers (the servers' own ``busy_s``
  is the attention work);
- compute: this process's CPU seconds during the step (``time.process_time``: every thread, so
  gloo's and ZeroMQ's I/O threads count too); linear = compute − attention CPU (``local``) or
  compute (``cad``); waiting = step wall − compute, which on an over-subscribed machine includes
  waiting for a free core, not only for peers;
- memory: the peak bytes of tensors autograd holds for backward (saved activations, counted once per
  storage, parameters excluded) — what the tokens in flight cost, free of the process's baseline —
  and the step's resident-set high-water mark (``VmHWM``, reset before the step where Linux allows);
  on a GPU also the step's peak of allocated device memory (``torch.cuda.max_memory_allocated``, reset
  before the step: weights, gradients, optimizer state and activations together).

On a GPU the host only queues work, so the device is synchronised before the step's clock stops, and the
local attention timer's device-side intervals are settled then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distca.config import DistCAConfig, save_config
from distca.errors import ConfigError
from distca.masks import key_mask, key_order
from distca.parts import data_plane, pipeline_schedule, train_device
from distca.train.flops import step_flops
from distca.train.micro import part_batches

if TYPE_CHECKING:
    from distca.runtime.client import CADClient
    from distca.train.colocated_attention import AttentionTimer

log = logging.getLogger(__name__)


# -- one rank's step ---------------------------------------------------------------------------------
class StepMeter:
    """One rank's measurements of each step: started and stopped around ``train_batch`` by
    :meth:`measure`, then turned into the rank's step record by :meth:`record`.

    ``client`` is the CAD client (``None`` with local attention): its blocked seconds are the CAD
    attention time, and rank 0 pings every server before and after the step for their busy seconds
    and peak memory. ``attn_timer`` accumulates the local attention kernel's time.
    """

    def __init__(self, cfg: DistCAConfig, rank: int, stage: int, dp_rank: int, client: CADClient | None,
                 attn_timer: AttentionTimer, device: torch.device | str = "cpu"):
        """``device``: where the rank computes (a GPU is synchronised at the end of each step and its peak
        memory recorded)."""
        self.cfg, self.rank, self.stage, self.dp_rank = cfg, rank, stage, dp_rank
        self.client, self.attn_timer = client, attn_timer
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        sublayers = cfg.model.attention_windows()
        self.calls = {w: sublayers.count(w) for w in sorted(set(sublayers), key=key_order)}  # calls per mask
        self.saved = SavedActivations()
        self._window: dict[str, Any] = {}

    def _server_stats(self) -> list[dict]:
        """Every server's PING answer (busy seconds, peak RSS), asked by rank 0 between steps; with in-place
        servers, every rank's own server."""
        if self.client is None:
            return []
        if hasattr(self.client, "server_stats"):
            return self.client.server_stats()
        if self.rank != 0:
            return []
        return [self.client.ping(s, timeout_s=self.cfg.transport.timeout_s) for s in range(len(self.client.eps))]

    @contextlib.contextmanager
    def measure(self, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """Measure the step run inside the block; ``params`` (the model's) are not activations."""
        blocked0 = self.client.blocked_s if self.client is not None else 0.0
        attn0 = getattr(self.client, "attn_s", 0.0)
        before = self._server_stats()
        timer0 = dataclasses.replace(self.attn_timer)
        self.saved.reset(params)
        rss_reset = _reset_rss_peak()
        if self.gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        cpu0, thread0 = time.process_time(), time.thread_time()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack):
            yield
        if self.gpu:
            torch.cuda.synchronize(self.device)  # the step ends when the device has done its work
        step_s = time.perf_counter() - t0
        gpu_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.gpu else None
        self.attn_timer.settle()
        cpu_s, thread_cpu_s = time.process_time() - cpu0, time.thread_time() - thread0
        rss_peak_mb = _rss_peak_mb() if rss_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        after = self._server_stats()
        self._window = {
            "step_s": step_s, "cpu_s": cpu_s, "thread_cpu_s": thread_cpu_s, "rss_peak_mb": rss_peak_mb,
            "gpu_peak_mb": gpu_peak_mb, "after": after, "timer0": timer0,
            # a lost server (in-step recovery) answers no PING: {} counts no busy time
            "busy": [float(b["busy_s"]) - float(a["busy_s"]) if "busy_s" in a and "busy_s" in b else 0.0
                     for a, b in zip(before, after, strict=True)],
            # in-place with a node map: key rows this rank's server relayed for its node (distca.scheduler.relay)
            "relayed": sum(int(b.get("relayed_rows", 0)) - int(a.get("relayed_rows", 0))
                           for a, b in zip(before, after, strict=True)),
            "blocked": (self.client.blocked_s - blocked0) if self.client is not None else 0.0,
            "attn": getattr(self.client, "attn_s", 0.0) - attn0,
        }

    def record(self, step: int, loss: float, lr: float, micro_batches: list, plans: list[dict[int, Any]],
               plan_ms: float) -> dict[str, Any]:
        """This rank's record of the step just measured: ``micro_batches`` as drawn, ``plans`` each one's
        CAD plans by window (empty with local attention), ``plan_ms`` the time to build them."""
        w = self._window
        docs = [n for mb in micro_batches for n in mb.doc_lengths]
        if self.client is None:
            timer, timer0 = self.attn_timer, w["timer0"]
            attn_s, attn_cpu_s = timer.wall_s - timer0.wall_s, timer.cpu_s - timer0.cpu_s
            exchange_s = timer.exchange_s - timer0.exchange_s
        elif hasattr(self.client, "attn_s"):  # in-place: this rank computes attention too
            attn_s, attn_cpu_s, exchange_s = w["attn"], 0.0, w["blocked"]
        else:
            attn_s, attn_cpu_s, exchange_s = w["blocked"], 0.0, 0.0
        load = self._attention_load(micro_batches, plans)
        timing = {
            "stage": self.stage, "dp_rank": self.dp_rank, "attn_s": attn_s, "attn_cpu_s": attn_cpu_s,
            "exchange_s": exchange_s, "cpu_s": w["cpu_s"], "thread_cpu_s": w["thread_cpu_s"],
            "act_peak_mb": self.saved.peak / 2**20, "rss_peak_mb": w["rss_peak_mb"], "gpu_peak_mb": w["gpu_peak_mb"],
        }
        if self.rank == 0:  # every rank draws the same micro-batches: one copy is enough
            timing["micro_batches"] = [_parts_record(mb) for mb in micro_batches]
        return {
            **timing,
            "step": step, "loss": loss, "step_s": w["step_s"], "plan_ms": plan_ms, "blocked_s": w["blocked"],
            "tokens": sum(docs), "flops": step_flops(self.cfg.model, docs),
            "planned_load_max_over_mean": float(load.max() / load.mean()) if load.mean() > 0 else 1.0,
            "server_busy_s": w["busy"], "kv_rows_relayed": w["relayed"], "lr": lr,
            # which data plane(s) the CAD rows took: "inplace", "collective", "shm", "zmq", "shm+zmq"; or "local"
            "data_plane": "local" if self.client is None else self.client.data_plane,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_mb": _current_rss_mb(), "open_fds": _open_fds(),
            "server_peak_rss_mb": [float(s.get("peak_rss_kb", 0)) / 1024 for s in w["after"]],
        }

    def _attention_load(self, micro_batches: list, plans: list[dict[int, Any]]) -> np.ndarray:
        """Attention pairs of the step per server as planned (CAD), else per data-parallel replica."""
        if self.client is not None:
            return sum(self.calls[w] * plan.server_pairs.astype(np.float64)
                       for p in plans for w in p for plan in (p[w] if isinstance(p[w], tuple) else (p[w],)))
        load = np.zeros(self.cfg.data_parallel)
        for batch in (b for mb in micro_batches for b in part_batches(mb)):
            for w, n in self.calls.items():
                mask = key_mask(w)
                for d, r, o, x in zip(batch.piece_doc.tolist(), batch.piece_rank.tolist(), batch.piece_off.tolist(),
                                      batch.piece_len.tolist(), strict=True):
                    load[r] += n * mask.pairs(int(batch.doc_len[d]), o, o + x)
        return load


def _parts_record(mb) -> dict[str, Any]:
    """A micro-batch's packing as a run records it: ``{"ranks", "continues"}``, and for one packed as independent
    halves ``"parts"``, a list of those (the top-level pair is then part 0's)."""
    one = lambda p: {"ranks": [[int(x) for x in r] for r in p.ranks], "continues": [bool(c) for c in p.continues]}  # noqa: E731
    out = one(mb.parts[0])
    if len(mb.parts) > 1:
        out["parts"] = [one(p) for p in mb.parts]
    return out


# -- the step over all ranks -------------------------------------------------------------------------
def combine_ranks(every: list[dict[str, Any]], peak_flops: float) -> dict[str, Any]:
    """One step's record from every rank's measurements (what DESIGN §7 says every run reports)."""
    step_s = max(r["step_s"] for r in every)
    first = every[0]
    flops = first["flops"]
    if first.get("data_plane") == "inplace":  # every rank measured its own server
        busy = [b for r in every for b in r["server_busy_s"]]
    else:
        busy = first["server_busy_s"] or next((r["server_busy_s"] for r in every if r["server_busy_s"]), [])
    measured = (max(busy) / (sum(busy) / len(busy))) if busy and sum(busy) > 0 else None
    return {
        "step": first["step"], "loss": first["loss"], "lr": first["lr"], "step_s": step_s,
        "tokens": first["tokens"], "tokens_per_s": first["tokens"] / step_s,
        "mfu": flops["total"] / step_s / (peak_flops * len(every)),
        "attention_flops_share": flops["attention"] / flops["total"],
        "plan_ms": max(r["plan_ms"] for r in every),  # on the critical path (wall)
        "plan_cpu_ms": max(r.get("plan_cpu_ms", 0.0) for r in every),  # the same, this thread's CPU time
        "prepare_ms": max(r.get("prepare_ms", 0.0) for r in every),  # drawing + planning, in the background
        "exposed_comm_pct": 100 * max(r["blocked_s"] / r["step_s"] for r in every),
        # the same without the waits of ranks idle in a pooled tick (bubble time, counted as idle in the timelines)
        "exposed_comm_active_pct": 100 * max((r["blocked_s"] - r.get("blocked_idle_s", 0.0)) / r["step_s"]
                                             for r in every),
        "pingpong": bool(first.get("pingpong", False)),  # CAD blocks ran as two overlapping nano-batches
        "attn_load_max_over_mean_planned": max(r["planned_load_max_over_mean"] for r in every),
        "attn_load_max_over_mean_measured": measured,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in every),
        # on GPUs: the step's peak allocated device memory of the fullest rank (None on the CPU)
        "peak_gpu_mb": max((r["gpu_peak_mb"] for r in every if r.get("gpu_peak_mb") is not None), default=None),
        # per process, for soak runs: memory now (not the peak) and open file descriptors
        "rss_mb_per_rank": [round(r["rss_mb"], 1) for r in every],
        "open_fds_per_rank": [r["open_fds"] for r in every],
        "server_peak_rss_mb": first["server_peak_rss_mb"],
        "server_busy_s": list(busy),
        # key rows relayed inside nodes by gateways this step (cluster.devices_per_node on the inplace data plane)
        "kv_rows_relayed": sum(r.get("kv_rows_relayed", 0) for r in every),
        **_data_plane(every),
        **_per_rank(every),
        "micro_batches": first.get("micro_batches"),
        # the pipeline schedule ("1f1b" or "pooled"), how many trainers one CAD plan spans (pooled: every rank;
        # 1F1B: one stage's replicas), and each rank's ticks (distca.train.schedule.Timeline)
        "pipeline_schedule": first.get("pipeline_schedule"),
        "plan_trainers": first.get("plan_trainers"),
        "timeline_per_rank": [r.get("timeline") for r in every],
        "spans_per_rank": [r.get("spans") for r in every],
        **_recovery(every),
    }


def _recovery(every: list[dict[str, Any]]) -> dict[str, Any]:
    """In-step recovery from lost servers (``cluster.server_loss: in_step``): the servers the ranks agreed are lost
    (the same list on every rank), and what standing in for them cost this step: rounds and tasks the trainers
    finished themselves (summed over ranks), seconds spent on it and waiting to find a server lost (slowest rank)."""
    if "servers_lost" not in every[0]:
        return {}
    return {"servers_lost": every[0]["servers_lost"],
            "recovered_rounds": sum(r["recovered_rounds"] for r in every),
            "recovered_tasks": sum(r["recovered_tasks"] for r in every),
            "recovery_s": max(r["recovery_s"] for r in every),
            "loss_detect_s": max(r["loss_detect_s"] for r in every),
            "late_replies_dropped": sum(r["late_replies_dropped"] for r in every)}


def _data_plane(every: list[dict[str, Any]]) -> dict[str, str]:
    """``{"data_plane": ...}``: every plane the ranks' rows took ("shm", "zmq", "shm+zmq", "inplace", ...), or
    ``"local"`` (local attention)."""
    planes = {p for r in every if r.get("data_plane") for p in r["data_plane"].split("+")}
    return {"data_plane": "+".join(sorted(planes)) or "local"}


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
        "blocked_idle_s_per_rank": [r.get("blocked_idle_s", 0.0) for r in every],
        # linear layers' weight-gradient jobs run after their backward pass (train.defer_weight_grads), per rank
        "weight_grads_deferred_per_rank": [r.get("weight_grads_deferred", 0) for r in every],
        "compute_s_per_rank": compute,
        "main_thread_cpu_s_per_rank": [r["thread_cpu_s"] for r in every],
        "linear_s_per_rank": [c - r["attn_cpu_s"] for c, r in zip(compute, every, strict=True)],
        "wait_s_per_rank": [r["step_s"] - c for c, r in zip(compute, every, strict=True)],
        "act_peak_mb_per_rank": act,
        "rss_peak_mb_per_rank": [r["rss_peak_mb"] for r in every],
        "gpu_peak_mb_per_rank": [r.get("gpu_peak_mb") for r in every],
        "attn_max_over_mean_trainers": max_over_mean(attn),
        "attn_cpu_max_over_mean_trainers": max_over_mean(attn_cpu),
        "act_peak_max_over_min": max(act) / min(act) if min(act) > 0 else None,
    }


# -- activation memory -------------------------------------------------------------------------------
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

    def reset(self, params: Iterable[torch.nn.Parameter]) -> None:
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


# -- process memory and descriptors ------------------------------------------------------------------
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


# -- the driver's side -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    records: list[dict[str, Any]]
    start_step: int
    end_step: int
    checkpoints: list[str] = field(default_factory=list)
    metrics_path: str = ""
    wall_s: float = 0.0
    stopped_early: bool = False  # a SIGTERM/SIGINT ended the run at a step boundary
    restarts: int = 0  # times the ranks were restarted from a checkpoint after a failure

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]


CONFIG_FILE = "config.yaml"


class MetricsSink:
    """Progress bar, log lines, metrics JSONL and TensorBoard, where the run's outputs are written (the
    driver, or the rank that owns ``output_dir``). It also writes the resolved config there
    (``config.yaml``, which ``load_config`` reads back)."""

    def __init__(self, cfg: DistCAConfig, metrics_path: Path):
        self.cfg = cfg
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / CONFIG_FILE)
        self.jsonl = metrics_path.open("a")
        self.bar = None
        self.tb = None
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"))
            except ImportError as exc:  # tensorboard is a dependency; a broken install only loses the logs
                log.warning("TensorBoard logging off: %s", exc)

    def start(self, rec: dict[str, Any]) -> None:
        if self.cfg.train.progress and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=rec["end_step"], initial=rec["start_step"], desc="train", unit="step",
                            file=sys.stderr, dynamic_ncols=True)

    def step(self, rec: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "tokens_per_s", "mfu", "exposed_comm_pct", "plan_ms", "peak_rss_mb",
                        "peak_gpu_mb", "attn_load_max_over_mean_planned", "attn_load_max_over_mean_measured"):
                if rec.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", rec[key], rec["step"] + 1)
        line = format_step(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            self.bar.update(1)
            if (rec["step"] + 1) % self.cfg.train.log_every == 0:
                self.bar.write(line, file=sys.stderr)
        elif (rec["step"] + 1) % self.cfg.train.log_every == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def collect(result: TrainResult, sink: MetricsSink, rec: dict[str, Any]) -> None:
    """Apply one of rank 0's reports (``start``, ``step``, ``checkpoint``, ``stopping``) to the run's
    result and its progress/metrics sink — for every launcher."""
    ev = rec.pop("event")
    if ev == "start":
        result.start_step, result.end_step = rec["start_step"], rec["end_step"]
        sink.start(rec)
    elif ev == "step":
        result.records.append(rec)
        sink.step(rec)
    elif ev == "checkpoint":
        result.checkpoints.append(rec["tag"])
    elif ev == "stopping":
        result.stopped_early, result.end_step = True, rec["step"]
        log.warning("stopping after step %d as asked (checkpoint follows)", rec["step"])


def format_step(r: dict[str, Any]) -> str:
    """The per-step console line."""
    measured = r.get("attn_load_max_over_mean_measured")
    return (f"step {r['step'] + 1:>5}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:.0f} tok/s  "
            f"MFU {100 * r['mfu']:.2f}%  attn max/mean {r['attn_load_max_over_mean_planned']:.3f}"
            + (f" (measured {measured:.3f})" if measured else "")
            + f"  exposed comm {r['exposed_comm_pct']:.1f}%  plan {r['plan_ms']:.1f} ms  "
            f"peak {r['peak_rss_mb']:.0f} MB"
            + (f" RSS, GPU {r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") else ""))


def _setup_rows(cfg: DistCAConfig, plane: str) -> list[tuple[str, str]]:
    """What the run trains and how: the rows the header and the summary table share (``plane``: the CAD
    data plane to name)."""
    t, m = cfg.train, cfg.model
    schedule, why = _planned_schedule(cfg)
    if t.core_attention != "cad":
        where = " (colocated)"
    elif plane == "inplace" and schedule == "pooled":
        where = f" in-place: all {cfg.cluster.n_trainers} trainers are its servers (all-to-all data plane)"
    elif plane == "inplace":
        where = f" in-place: each stage's {cfg.data_parallel} replicas are its servers (all-to-all data plane)"
    else:
        where = f" on {cfg.cluster.n_servers} servers ({cfg.cluster.placement}), data plane {plane}"
    return [
        ("model", f"{m.n_layers} layers, hidden {m.hidden}, {m.n_heads}/{m.n_kv_heads} heads, residual {m.residual}"),
        ("parallelism", f"PP={t.pipeline_parallel} x DP={cfg.data_parallel}, {t.micro_batches} micro-batches, "
                        f"ZeRO-{t.zero_stage}, {t.precision}"),
        ("core attention", t.core_attention + where),
        ("pipeline schedule", f"{schedule} ({why})"),
    ]


def _planned_schedule(cfg: DistCAConfig) -> tuple[str, str]:
    """The pipeline schedule the config asks for on this machine, and why (``distca.parts.pipeline_schedule``)."""
    try:
        return pipeline_schedule(cfg, train_device(cfg))
    except ConfigError:  # the run itself reports it
        return cfg.train.pipeline_schedule, "as configured"


def _planned_plane(cfg: DistCAConfig) -> str:
    """The data plane the config asks for on this machine (what a run opens with)."""
    try:
        return data_plane(cfg, train_device(cfg))
    except ConfigError:  # the run itself reports it
        return cfg.cluster.data_plane


def run_header(cfg: DistCAConfig) -> str:
    """The few lines a run opens with: model, parallelism, servers, data, output folder."""
    d, t = cfg.data, cfg.train
    data = d.source + (f" {d.path}" if d.path else "")
    rows = [*_setup_rows(cfg, _planned_plane(cfg)),
            ("data", f"{data}, {t.micro_batches} x {cfg.data_parallel} x {t.tokens_per_rank} tokens / step"),
            ("steps", f"{t.steps}" + (" (resuming)" if t.resume else "")),
            ("output", f"{cfg.output_dir} (resolved config: {Path(cfg.output_dir) / CONFIG_FILE})")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _active_note(recs: list[dict[str, Any]], med) -> str:
    """Where ranks waited in rounds of pooled ticks they idled in (bubble time): the share without those waits."""
    if not any(x > 0 for r in recs for x in r.get("blocked_idle_s_per_rank", ())):
        return ""
    return f" ({med('exposed_comm_active_pct'):.1f}% in the ticks where a rank computes)"


def summary_table(cfg: DistCAConfig, res: TrainResult) -> str:
    """The run's final table: configuration, then medians over its steps (first step excluded when possible)."""
    recs = res.records[1:] if len(res.records) > 2 else res.records
    med = lambda key: statistics.median(r[key] for r in recs if r.get(key) is not None)  # noqa: E731
    measured = [r["attn_load_max_over_mean_measured"] for r in recs if r.get("attn_load_max_over_mean_measured")]
    gpu = [r["peak_gpu_mb"] for r in res.records if r.get("peak_gpu_mb")]
    used = _data_plane(res.records)["data_plane"]  # what the rows took (a server elsewhere: zmq too)
    rows = [
        *_setup_rows(cfg, used if used != "local" else _planned_plane(cfg)),
        ("steps", f"{res.start_step} -> {res.end_step}" + (" (stopped by a signal)" if res.stopped_early else "")),
        ("loss first -> last", f"{res.records[0]['loss']:.4f} -> {res.records[-1]['loss']:.4f}" if res.records
         else "-"),
        ("data plane (as run)", used),
        ("tokens / step", f"{res.records[0]['tokens']}" if res.records else "-"),
        ("tokens/s (median)", f"{med('tokens_per_s'):.0f}"),
        ("step time (median)", f"{med('step_s'):.2f} s"),
        ("MFU (median)", f"{100 * med('mfu'):.2f}% (model FLOPs, attention from exact pairs; see distca.train.flops)"),
        ("attention share of FLOPs", f"{100 * med('attention_flops_share'):.1f}%"),
        ("attention load max/mean", f"planned {med('attn_load_max_over_mean_planned'):.3f}"
         + (f", measured {statistics.median(measured):.3f}" if measured else "")),
        ("exposed communication (median)", f"{med('exposed_comm_pct'):.1f}% of step time"
         + _active_note(recs, med)),
        ("scheduler time (median)", f"{med('plan_ms'):.1f} ms / step"),
        ("peak memory (max rank)", f"{max(r['peak_rss_mb'] for r in res.records):.0f} MB RSS"
         + (f", GPU {max(gpu):.0f} MB allocated" if gpu else "")),
        ("wall time", f"{res.wall_s:.1f} s" + (f" ({res.restarts} restart(s) from a checkpoint)" if res.restarts
                                               else "")),
        ("metrics", res.metrics_path),
    ] if res.records else [("steps", "none run")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| " + "metric".ljust(width) + " | value |", "|" + "-" * (width + 2) + "|---|",
                      *(f"| {k.ljust(width)} | {v} |" for k, v in rows)])
