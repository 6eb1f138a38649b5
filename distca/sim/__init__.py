"""Cluster simulator: a discrete-event model of DistCA and its baselines at scales beyond one machine,
driven by the same cost model and the same scheduler as the real system (DESIGN §4, §6)."""

from distca.sim.engine import SimResult, TaskGraph, simulate
from distca.sim.hardware import Hardware, Link, published
from distca.sim.step import MicroBatch, Parallelism, SimOptions, StepReport, simulate_step

__all__ = ["Hardware", "Link", "MicroBatch", "Parallelism", "SimOptions", "SimResult", "StepReport", "TaskGraph",
           "published", "simulate", "simulate_step"]
