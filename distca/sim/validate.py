"""Check the simulator against measured steps: replay every step that ``benchmarks/e2e.py`` measured
(same model, parallelism, scheduler settings and the exact packed documents of each micro-batch) on
a :class:`~distca.sim.hardware.Hardware` calibrated on the same machine, and compare step times.

The CPU simulated cluster is modelled as it runs: every trainer and every attention server is a
process, all sharing the machine's cores (processor sharing); CAD servers are separate processes
serving requests in arrival order; the trainer blocks while its attention round is out; pipeline
sends are asynchronous; the gradient all-reduce and the optimizer step close the step. A run's
pipeline schedule and in-stage ping-pong come from its config (``train.pipeline_schedule``,
``train.pingpong``; 1F1B and none when a config predates them), and each step's recorded planning time
is charged where the run put it (``train.prefetch``: a background thread sharing the cores). Runs over
ZeroMQ frames (``cluster.data_plane: zmq``) pay the calibrated pool per-round costs (``Hardware.pool_*``);
other data planes are not charged them (not calibrated).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from distca.config import ModelConfig
from distca.sim.hardware import Hardware
from distca.sim.step import MicroBatch, Parallelism, SimOptions, simulate_step


def run_options(config: dict, schedule_ran: str | None = None) -> tuple[ModelConfig, Parallelism, SimOptions]:
    """The simulator's view of a resolved training config (``dataclasses.asdict`` of DistCAConfig).
    ``schedule_ran``: the pipeline schedule the run's records say it used (what ``train.pipeline_schedule: auto``
    resolved to); without it ``auto`` is resolved by its rule (:func:`distca.parts.pipeline_schedule`)."""
    t, cl = config["train"], config["cluster"]
    model = ModelConfig(**config["model"])
    pp = int(t["pipeline_parallel"])
    par = Parallelism(pp=pp, dp=int(cl["n_trainers"]) // pp, micro_batches=int(t["micro_batches"]))
    cad = t["core_attention"] == "cad"
    if cad and int(cl["n_servers"]) != par.devices:
        raise ValueError(f"validation models one server per trainer; config has {cl['n_servers']} servers "
                         f"for {par.devices} trainers")
    schedule = str(t.get("pipeline_schedule", "1f1b")) if cad else "1f1b"
    if schedule == "auto":
        schedule = schedule_ran or ("pooled" if pp > 1 and cl.get("data_plane") != "collective" else "1f1b")
    opt = SimOptions(system="cad" if cad else "colocated", server_streams=True, servers="all",
                     eps=float(config["scheduler"]["eps"]), granularity=int(config["attention"]["shard_tokens"]),
                     dtype_bytes=2 if t["precision"] == "bf16" else 4, layer_chunks=0,
                     pingpong=bool(t.get("pingpong", False)) and cad, schedule=schedule,
                     prefetch_plans=bool(t.get("prefetch", False)),
                     pool_rounds=cl.get("data_plane") == "zmq",  # the per-round costs calibrated: ZeroMQ frames
                     # the trainer's nano-batches: the halves of every rank's query rows (distca.runtime.nano), or
                     # the micro-batch packed as two independent halves (the simulator's "repack")
                     nano_split="repack" if t.get("nano_split") == "repack" else "rows",
                     stage_split=str(t.get("stage_split", "even")), stage_blocks=tuple(t.get("stage_blocks") or ()))
    return model, par, opt


def _recorded(mb: dict) -> MicroBatch:
    """A recorded micro-batch for the simulator; one packed as independent halves (``"parts"``) keeps its halves
    (:meth:`MicroBatch.of_parts`: the trainer's layout, each half planned on its own under ping-pong)."""
    if "parts" not in mb:
        return MicroBatch(mb["ranks"], mb["continues"])
    return MicroBatch.of_parts([MicroBatch(p["ranks"], p["continues"]) for p in mb["parts"]])


def replay(run: dict, hw: Hardware, skip: int = 1) -> dict:
    """Simulate every recorded step of one run; medians of measured and predicted step times."""
    model, par, opt = run_options(run["config"], run["records"][0].get("pipeline_schedule") if run["records"] else None)
    measured, predicted = [], []
    for rec in run["records"][skip:]:
        mbs = [_recorded(mb) for mb in rec["micro_batches"]]
        # the step's measured planning: drawn and planned in the background when prefetched (prepare_ms),
        # else on the critical path (plan_ms)
        ms = rec.get("prepare_ms", 0.0) if opt.prefetch_plans else rec.get("plan_cpu_ms") or rec.get("plan_ms", 0.0)
        o = replace(opt, plan_s=float(ms or 0.0) / 1e3) if opt.system == "cad" else opt
        predicted.append(simulate_step(model, hw, par, o, mbs).step_s)
        measured.append(float(rec["step_s"]))
    if not measured:
        raise ValueError("the run has no steps after the warm-up step")
    m, p = statistics.median(measured), statistics.median(predicted)
    return {"system": opt.system, "steps": len(measured), "measured_s": m, "predicted_s": p,
            "error": p / m - 1.0, "per_step": list(zip(measured, predicted, strict=True))}


def validate_file(path: str | Path, hw: Hardware, skip: int = 1) -> dict[str, dict]:
    """Replay every run of an ``e2e.json``; returns ``{run name: replay result}``."""
    data = json.loads(Path(path).read_text())
    runs = data.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ValueError(f"{path} has no 'runs' (write it with benchmarks/e2e.py)")
    return {name: replay(run, hw, skip) for name, run in runs.items()}
