"""Deferred weight gradients: a linear layer's backward split into its input gradient (on the pipeline's critical
path) and its weight gradient (work that can wait), so the pooled schedule can move weight gradients into the
warm-up and cool-down ticks where a stage would otherwise only serve attention (the zero-bubble idea, Qi et al.
2023, applied to DistCA's tick-aligned pipeline).

:func:`install` routes every ``nn.Linear`` of a module (subclasses included: the LM head) through
:class:`_DeferrableLinear`. Its backward always returns the input gradient. While the :class:`WeightGradQueue`
it was installed with is *collecting* (``queue.tag`` is not None) it keeps ``(layer, input, output gradient)``
under that tag; otherwise it computes the weight gradient at once. Either way a weight (and bias) gradient is
handed to autograd for the parameter itself (``torch.autograd.backward(param, grad)``), so it is accumulated as
``nn.Linear``'s would be: into ``param.grad``, through every hook DeepSpeed's optimizers registered on it.

The model knows nothing of this: the trainer installs it on the pipeline stage it built (``train.defer_weight_grads``).
Jobs of one tag run in the order they were kept. A deferred micro-batch's weight gradients are added after those
of later micro-batches that were not deferred, so a parameter's sum over micro-batches may be added up in another
order than without deferral: the same gradients up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class WeightGradJob:
    """One linear call's weight gradient, kept for later: ``layer``'s input and output gradient."""

    layer: nn.Linear
    x: torch.Tensor
    gy: torch.Tensor

    @property
    def rows(self) -> int:
        return self.x.numel() // self.x.shape[-1]

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.x.shape[-1] * self.gy.shape[-1]

    def split_at(self, rows: int) -> tuple[WeightGradJob, WeightGradJob]:
        """The job as two: its first ``rows`` token rows and the rest (their gradients add up to this one's)."""
        x, gy = self.x.reshape(-1, self.x.shape[-1]), self.gy.reshape(-1, self.gy.shape[-1])
        if not 0 < rows < len(x):
            raise ValueError(f"cannot split a job of {len(x)} rows at {rows}")
        return WeightGradJob(self.layer, x[:rows], gy[:rows]), WeightGradJob(self.layer, x[rows:], gy[rows:])

    def run(self) -> None:
        w, b = self.layer.weight, self.layer.bias
        gy = self.gy.reshape(-1, self.gy.shape[-1])
        x = self.x.reshape(-1, self.x.shape[-1])
        params, grads = [w], [gy.t().matmul(x).to(w.dtype)]
        if b is not None and b.requires_grad:
            params.append(b)
            grads.append(gy.sum(0).to(b.dtype))
        torch.autograd.backward(params, grads)  # accumulate as autograd would: into .grad, through its hooks


def spread(jobs: list[WeightGradJob], gaps: int) -> list[list[WeightGradJob]]:
    """``jobs`` in ``gaps`` groups of about equal work (FLOPs), in order; a job that does not fit the rest of a
    group is cut at a token row (the LM head's job is many times a block linear's). Every group but the last
    holds its share to within one row of one job."""
    if gaps < 1:
        raise ValueError(f"need at least one gap, got {gaps}")
    out: list[list[WeightGradJob]] = [[] for _ in range(gaps)]
    per = sum(j.flops for j in jobs) / gaps
    g, room = 0, per
    todo = list(reversed(jobs))
    while todo:
        job = todo.pop()
        if g == gaps - 1 or job.flops <= room * (1 + 1e-9):
            out[g].append(job)
            room -= job.flops
        else:
            take = int(job.rows * room / job.flops)
            if take >= 1:
                first, rest = job.split_at(take)
                out[g].append(first)
                todo.append(rest)
            else:
                todo.append(job)
            room = 0.0
        if room <= per * 1e-9 and g < gaps - 1:
            g, room = g + 1, room + per
    return out


class WeightGradQueue:
    """Weight-gradient jobs kept per tag (a tick of the pooled schedule), run later in collection order."""

    def __init__(self) -> None:
        self.tag: int | None = None  # collecting under this tag; None: weight gradients are immediate
        self._jobs: dict[int, list[WeightGradJob]] = {}

    def keep(self, job: WeightGradJob) -> None:
        if self.tag is None:
            raise RuntimeError("a weight-gradient job was kept while the queue was not collecting")
        self._jobs.setdefault(self.tag, []).append(job)

    def take(self, tags) -> list[WeightGradJob]:
        """The jobs kept under ``tags`` (in that order), removed from the queue."""
        out: list[WeightGradJob] = []
        for t in tags:
            out += self._jobs.pop(t, [])
        return out

    def take_all(self) -> list[WeightGradJob]:
        return self.take(sorted(self._jobs))

    @property
    def pending(self) -> int:
        return sum(len(j) for j in self._jobs.values())

    @staticmethod
    def run(jobs: list[WeightGradJob]) -> None:
        for job in jobs:
            job.run()


class _DeferrableLinear(torch.autograd.Function):
    """``F.linear(x, layer.weight, layer.bias)`` whose only autograd input is ``x``: the backward returns the input
    gradient and makes the weight gradient a :class:`WeightGradJob`, run at once or kept by the queue. (Were the
    weight an input, autograd would call its accumulation and hooks with no gradient when the job is kept.)"""

    @staticmethod
    def forward(ctx, x, layer, queue):
        ctx.save_for_backward(x)
        ctx.layer, ctx.queue = layer, queue
        return F.linear(x, layer.weight, layer.bias)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        layer, queue = ctx.layer, ctx.queue
        gx = gy.matmul(layer.weight.to(gy.dtype))
        job = WeightGradJob(layer, x.detach(), gy.detach())
        if queue.tag is not None:
            queue.keep(job)
        else:
            job.run()
        return gx, None, None


def _deferrable_forward(layer: nn.Linear, queue: WeightGradQueue):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):  # no backward through x: nothing to split
            return F.linear(x, layer.weight, layer.bias)
        return _DeferrableLinear.apply(x, layer, queue)
    return forward


def linears(module: nn.Module) -> Iterator[nn.Linear]:
    """``module``'s linear layers whose weight is trained."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.weight.requires_grad:
            yield m


def install(module: nn.Module, queue: WeightGradQueue) -> int:
    """Route every trained ``nn.Linear`` of ``module`` through ``queue`` (see the module docstring); the number
    of layers routed. Parameters, names and state dicts are unchanged."""
    n = 0
    for layer in linears(module):
        if "forward" in vars(layer):
            raise RuntimeError(f"{type(layer).__name__} already has its own forward: deferred weight gradients "
                               "were installed twice, or something else replaced it")
        layer.forward = _deferrable_forward(layer, queue)
        n += 1
    return n


class StageWeightGrads:
    """One pipeline stage's deferred weight gradients on the pooled schedule: its backward passes in the ticks
    ``plan.defer`` names keep their weight gradients (``enter``), the ticks it only serves in compute them
    (``due``), and whatever is left runs before the optimizer's reductions (``flush``)."""

    def __init__(self, module: nn.Module, plan, stage: int):
        self.plan, self.stage = plan, stage
        self.queue = WeightGradQueue()
        self.layers = install(module, self.queue)
        self.jobs_run = 0  # weight-gradient jobs (one per linear call) run deferred, this step

    def enter(self, tick: int | None) -> None:
        """The schedule starts ``tick``; None: the step's schedule is over (jobs still kept are dropped, which
        only happens when the step failed before its flush)."""
        if tick is None:
            self.queue.tag = None
            self.queue.take_all()
            return
        if tick == 0:
            self.jobs_run = 0
        self.queue.tag = tick if tick in self.plan.defer[self.stage] else None

    def due(self, tick: int) -> list[WeightGradJob]:
        """The jobs to run in ``tick``, which this stage only serves in (counted in ``jobs_run``: the serving tick
        runs them, in pieces if it cuts them)."""
        jobs = self.queue.take(self.plan.run_in(self.stage, tick))
        self.jobs_run += len(jobs)
        return jobs

    @staticmethod
    def run(jobs: list[WeightGradJob]) -> None:
        WeightGradQueue.run(jobs)

    def flush(self) -> int:
        """Run every job still kept (before the gradients are reduced); how many there were."""
        self.queue.tag = None
        jobs = self.queue.take_all()
        self.run(jobs)
        self.jobs_run += len(jobs)
        return len(jobs)
