"""The pipeline schedule of a training step — DeepSpeed's 1F1B or the pooled, tick-aligned one — installed on a
DeepSpeed ``PipelineEngine``, and the per-tick timeline every rank records of it.

**Pooled ticks** (DistCA §4.1, paper Fig. 8). Ticks come in pairs ``k = 0 .. K-1`` (``K = M + 2P - 2`` for ``P``
stages and ``M`` micro-batches), an F tick then a B tick; tick index ``2k`` is pair ``k``'s F tick, ``2k + 1`` its
B tick. Stage ``s`` runs the forward of micro-batch ``m`` in pair ``m + s`` and its backward in pair
``m + 2(P-1) - s``. So in every tick all active stages run the same phase, and the attention tasks of a tick (one
micro-batch per active stage) form one CAD plan over all servers (:mod:`distca.train.pooled`). A stage with no
micro-batch in a tick where others compute (warm-up and cool-down) runs :class:`ServeTick` instead: it takes part
in every attention round of the tick with no rows of its own, so an in-place rank serves its share. A tick in
which no stage computes (the first ``P - 1`` B ticks and the last ``P - 1`` F ticks) is empty on every rank.

Transfers (DeepSpeed's blocking p2p) happen at the start of a tick, before any attention round (the rounds may be
collectives of all ranks): in an F tick stage ``s`` first receives from ``s - 1`` the activation of the
micro-batch it forwards now, then sends ``s + 1`` the activation of the micro-batch it forwarded in the previous
pair; in a B tick stage ``s`` first receives from ``s + 1`` the gradient of the micro-batch it runs backward now,
then sends ``s - 1`` the input gradient of the micro-batch it ran backward in the previous pair. Every transfer
is one matched pair (``s`` sends in a tick exactly what ``s ± 1`` receives in it), and the waits form a chain
from stage 0 upwards (F) or from stage ``P - 1`` downwards (B): the chain's end only sends, each other stage's
receive is answered by its neighbour's send, which follows only the neighbour's own receive further down the
chain — no cycle, so no deadlock. Every micro-batch keeps its own pipe buffer (``num_pipe_buffers = M``).

The math is 1F1B's: every stage runs the forwards and the backwards of the micro-batches in the same order
(0, 1, ..., M-1), so losses and accumulated gradients are the same sums in the same order.

**Timeline.** :class:`Timeline` times each tick's instructions (``time.perf_counter``, relative to the start of
the step's schedule) for either schedule: per tick ``[tick, phase, kind, t0, t1, server_busy_s, rounds]`` with
phase ``F``/``B`` and kind ``compute`` (the rank ran a micro-batch), ``serve`` (it only served attention rounds)
or ``idle``; the optimizer's reductions and step at the end are one more entry, phase ``-``, kind ``optimizer``.
The server columns are the rank's own attention server's busy seconds and rounds in the tick (in-place; zero
elsewhere). ``spans`` holds what the rank's instructions did when, ``[what, t0, t1]`` with ``what`` one of ``F``
and ``B`` (a forward or backward pass, its attention rounds included), ``serve`` (an idle stage's rounds), ``p2p``
(sending or receiving activations or gradients: waiting for a neighbour stage shows here) and ``optimizer``: the
bubbles a plot of a step shows.

The tick arithmetic here imports no DeepSpeed; the DeepSpeed classes are made when a schedule is installed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

F, B = "F", "B"
SERVE = "serve"
TAIL_OPS = ("reduce_tied", "reduce", "step")  # the optimizer's end of a step

Op = tuple[str, int | None]  # (what, micro-batch): recv_act, send_act, load, fwd, recv_grad, send_grad, bwd, serve, ...


# -- tick arithmetic ------------------------------------------------------------------------------------------
def n_ticks(stages: int, micro_batches: int) -> int:
    """Ticks of a pooled step: ``2K``, ``K = M + 2P - 2`` pairs."""
    return 2 * (micro_batches + 2 * stages - 2)


def forward_tick(micro: int, stage: int, stages: int) -> int:
    """The tick in which ``stage`` runs the forward of ``micro`` (pair ``micro + stage``, its F tick)."""
    return 2 * (micro + stage)


def backward_tick(micro: int, stage: int, stages: int) -> int:
    """The tick in which ``stage`` runs the backward of ``micro`` (pair ``micro + 2(P-1) - stage``, its B tick)."""
    return 2 * (micro + 2 * (stages - 1) - stage) + 1


def tick_phase(tick: int) -> str:
    return F if tick % 2 == 0 else B


def tick_micro(tick: int, stage: int, stages: int, micro_batches: int) -> int | None:
    """The micro-batch ``stage`` runs in ``tick`` (None: none)."""
    k = tick // 2
    m = k - stage if tick % 2 == 0 else k - 2 * (stages - 1) + stage
    return m if 0 <= m < micro_batches else None


def tick_micros(tick: int, stages: int, micro_batches: int) -> tuple[int | None, ...]:
    """Every stage's micro-batch in ``tick``."""
    return tuple(tick_micro(tick, s, stages, micro_batches) for s in range(stages))


def active_ticks(stages: int, micro_batches: int) -> list[int]:
    """The ticks in which some stage runs a micro-batch (the others are empty on every rank)."""
    return [t for t in range(n_ticks(stages, micro_batches))
            if any(m is not None for m in tick_micros(t, stages, micro_batches))]


def stage_program(stages: int, micro_batches: int, stage: int) -> list[list[Op]]:
    """``stage``'s instructions per tick of the pooled schedule (the order DeepSpeed executes them in)."""
    P, M, s = stages, micro_batches, stage
    valid = lambda m: m is not None and 0 <= m < M  # noqa: E731
    total = n_ticks(P, M)
    out: list[list[Op]] = []
    for t in range(total):
        m = tick_micro(t, s, P, M)
        anyone = any(x is not None for x in tick_micros(t, P, M))
        ops: list[Op] = []
        if tick_phase(t) == F:
            prev = t // 2 - 1 - s  # what this stage forwarded in the previous pair
            if s > 0 and valid(m):
                ops.append(("recv_act", m))
            if s < P - 1 and valid(prev):
                ops.append(("send_act", prev))
            if valid(m):
                if s in (0, P - 1):
                    ops.append(("load", m))
                ops.append(("fwd", m))
            elif anyone:
                ops.append((SERVE, None))
        else:
            prev = t // 2 - 1 - 2 * (P - 1) + s  # what this stage ran backward in the previous pair
            if s < P - 1 and valid(m):
                ops.append(("recv_grad", m))
            if s > 0 and valid(prev):
                ops.append(("send_grad", prev))
            if valid(m):
                ops.append(("bwd", m))
            elif anyone:
                ops.append((SERVE, None))
        if t == total - 1:
            ops += [(op, None) for op in TAIL_OPS]
        out.append(ops)
    return out


@dataclass(frozen=True)
class WeightGradPlan:
    """Deferred weight gradients on the pooled schedule (:mod:`distca.train.wgrad`), per stage: ``defer[s]``, the B
    ticks whose backward leaves its weight gradients for later, and ``runs[s]``, for each tick the stage only
    serves in, the deferred B ticks whose weight gradients it computes there (between the tick's rounds)."""

    defer: tuple[frozenset[int], ...]
    runs: tuple[dict[int, tuple[int, ...]], ...]

    def run_in(self, stage: int, tick: int) -> tuple[int, ...]:
        return self.runs[stage].get(tick, ())

    def peak_kept(self) -> list[int]:
        """Per stage, the most micro-batches whose weight-gradient jobs it holds at once (their memory: each linear
        layer's input and output gradient); jobs with no planned tick are held until the step's end."""
        out = []
        for defer, runs in zip(self.defer, self.runs, strict=True):
            until = {t: u for u, ts in runs.items() for t in ts}
            end = max([*defer, *until.values()], default=0) + 1
            spans = [(t, until.get(t, end)) for t in defer]
            out.append(max((sum(1 for a, b in spans if a <= t < b) for t, _ in spans), default=0))
        return out


def weight_grad_plan(stages: int, micro_batches: int) -> WeightGradPlan:
    """Which backward passes defer their weight gradients, and where they run.

    A B tick is only shorter when *every* stage active in it leaves its weight gradients for later, so a tick
    defers all or nothing: from the last B tick to the first, a tick defers when each of its active stages still
    has a free tick after it in which it only serves (warm-up and cool-down); each takes the earliest such tick.
    Each such tick runs one micro-batch's weight gradients, about as much linear work as the active stages' pass
    in it. This moves ``P - 1`` micro-batches' weight gradients per stage off the critical path, like ZB-H1, and a
    stage keeps at most ``P - 1`` micro-batches' jobs (their inputs and output gradients) at a time."""
    P, M = stages, micro_batches
    total = n_ticks(P, M)
    micros = [tick_micros(t, P, M) for t in range(total)]
    free = [[t for t in range(total) if micros[t][s] is None and any(m is not None for m in micros[t])]
            for s in range(P)]
    defer: list[set[int]] = [set() for _ in range(P)]
    runs: list[dict[int, list[int]]] = [{} for _ in range(P)]
    for t in reversed(range(1, total, 2)):
        active = [s for s in range(P) if micros[t][s] is not None]
        if not active:
            continue
        slots = {s: next((u for u in free[s] if u > t and u not in runs[s]), None) for s in active}
        if any(u is None for u in slots.values()):
            continue
        for s, u in slots.items():
            defer[s].add(t)
            runs[s][u] = [t]
    return WeightGradPlan(tuple(frozenset(d) for d in defer),
                          tuple({u: tuple(ts) for u, ts in sorted(r.items())} for r in runs))


def one_f_one_b_weight_grad_plan(stages: int, micro_batches: int) -> WeightGradPlan:
    """Deferred weight gradients on DeepSpeed's 1F1B schedule (steps of its ``TrainSchedule``, as the timeline
    numbers them): stage ``s`` keeps the weight gradients of its last ``s`` backward passes and computes them
    after its last backward, before the optimizer's reductions (``runs`` is empty: everything is flushed then).
    In 1F1B's cool-down each backward waits for the stage above, so the chain of last backward passes down the
    stages gets shorter by one weight gradient per hop, and stage ``s``'s ``s`` kept jobs fit in the ``s`` hops
    below it (ZB-H1's amount; stage 0 keeps none)."""
    _, _, ds = _deepspeed_classes()
    P, M = stages, micro_batches
    defer = []
    for s in range(P):
        sched = ds.TrainSchedule(micro_batches=M, stages=P, stage_id=s)
        steps = set()
        for t in range(2 * (M + P - 1)):
            m, forward = sched._step_to_micro_batch(t)
            if not forward and sched._valid_micro_batch(m) and m >= M - s:
                steps.add(t)
        defer.append(frozenset(steps))
    return WeightGradPlan(tuple(defer), tuple({} for _ in range(P)))


# -- DeepSpeed --------------------------------------------------------------------------------------------------
@functools.cache
def _deepspeed_classes():
    """``(ServeTick, PooledSchedule, schedule module)``, made on first use (DeepSpeed is imported then)."""
    from deepspeed.runtime.pipe import schedule as ds

    class ServeTick(ds.PipeInstruction):
        """Serve this tick's attention rounds without a micro-batch (``tick``, ``phase``)."""

    class PooledSchedule(ds.PipeSchedule):
        """The pooled, tick-aligned schedule of one stage (see the module docstring); one buffer per micro-batch."""

        def steps(self):
            make = {"recv_act": ds.RecvActivation, "send_act": ds.SendActivation, "load": ds.LoadMicroBatch,
                    "fwd": ds.ForwardPass, "recv_grad": ds.RecvGrad, "send_grad": ds.SendGrad,
                    "bwd": ds.BackwardPass, "reduce_tied": ds.ReduceTiedGrads, "reduce": ds.ReduceGrads,
                    "step": ds.OptimizerStep}
            for t, ops in enumerate(stage_program(self.stages, self.micro_batches, self.stage_id)):
                cmds = []
                for op, m in ops:
                    if op == SERVE:
                        cmds.append(ServeTick(tick=t, phase=tick_phase(t)))
                    elif m is None:
                        cmds.append(make[op]())
                    else:
                        cmds.append(make[op](buffer_id=self._buffer_idx(m)))
                yield cmds

        def num_pipe_buffers(self):
            return self.micro_batches

    return ServeTick, PooledSchedule, ds


def _exec_serve_tick(engine, tick: int, phase: str) -> None:
    """The engine's handler of :class:`ServeTick` (bound to the engine by ``_exec_schedule``)."""
    engine._distca_timeline.served |= bool(engine._distca_serve(tick, phase))


@dataclass
class Timeline:
    """One rank's ticks of the current step (see the module docstring). ``probe()`` gives the rank's own
    attention server's ``(busy seconds, rounds served)`` so far (zeros without one)."""

    probe: Callable[[], tuple[float, int]] = lambda: (0.0, 0)
    entries: list[list] = field(default_factory=list)
    spans: list[list] = field(default_factory=list)
    served: bool = False
    _t0: float = 0.0

    def start(self) -> None:
        self.entries, self.spans, self._t0 = [], [], time.perf_counter()

    def span(self, what: str, t0: float) -> None:
        self.spans.append([what, round(t0 - self._t0, 6), round(time.perf_counter() - self._t0, 6)])

    def record(self, tick: int, phase: str, kind: str, t0: float, busy0: tuple[float, int]) -> None:
        busy, rounds = self.probe()
        self.entries.append([tick, phase, kind, round(t0 - self._t0, 6), round(time.perf_counter() - self._t0, 6),
                             round(busy - busy0[0], 6), rounds - busy0[1]])


class TimedSchedule:
    """A DeepSpeed schedule whose ticks are timed into ``timeline``; ``on_tick(t)`` hears each tick start (and
    ``None`` when the schedule ends). The optimizer's tail of the last tick runs as a separate entry."""

    def __init__(self, inner, timeline: Timeline, phase_of: Callable[[int, list], str],
                 on_tick: Callable[[int | None], None], before_tail: Callable[[], None] = lambda: None,
                 tick_done: Callable[[], None] = lambda: None, before_pass: Callable[[int], None] | None = None):
        self.inner, self.timeline, self.phase_of, self.on_tick = inner, timeline, phase_of, on_tick
        self.before_tail, self.tick_done, self.before_pass = before_tail, tick_done, before_pass

    def num_pipe_buffers(self) -> int:
        return self.inner.num_pipe_buffers()

    def __iter__(self) -> Iterator[list]:
        _, _, ds = _deepspeed_classes()
        tl = self.timeline
        tl.start()
        tail_types = (ds.ReduceTiedGrads, ds.ReduceGrads, ds.OptimizerStep)
        try:
            for t, cmds in enumerate(self.inner):
                body = [c for c in cmds if not isinstance(c, tail_types)]
                tail = [c for c in cmds if isinstance(c, tail_types)]
                self.on_tick(t)
                tl.served = False
                t0, busy0 = time.perf_counter(), tl.probe()
                passes = [i for i, c in enumerate(body) if isinstance(c, ds.ForwardPass | ds.BackwardPass)]
                if self.before_pass is not None and passes:
                    # DeepSpeed runs a schedule's commands in order whatever their grouping: the tick's transfers,
                    # then the hook, then its pass
                    yield body[:passes[0]]
                    self.before_pass(t)
                    yield body[passes[0]:]
                else:
                    yield body
                self.tick_done()  # what the tick started beside its instructions (a short stage's rounds) ends here
                computed = any(isinstance(c, ds.ForwardPass | ds.BackwardPass) for c in body)
                tl.record(t, self.phase_of(t, body), "compute" if computed else SERVE if tl.served else "idle", t0,
                          busy0)
                if tail:
                    t0, busy0 = time.perf_counter(), tl.probe()
                    self.before_tail()
                    yield tail
                    tl.record(t, "-", "optimizer", t0, busy0)
        finally:
            self.on_tick(None)


def _one_f_one_b_phase(sched) -> Callable[[int, list], str]:
    """The phase of a step of DeepSpeed's ``TrainSchedule`` (its idle steps too)."""
    def phase(t: int, cmds: list) -> str:
        return F if sched._step_to_micro_batch(t)[1] else B
    return phase


def install(engine, schedule: str, timeline: Timeline, on_tick: Callable[[int | None], None] = lambda t: None,
            serve: Callable[[int, str], bool] | None = None, before_tail: Callable[[], None] = lambda: None,
            tick_done: Callable[[], None] = lambda: None, before_pass: Callable[[int], None] | None = None) -> None:
    """Make ``engine.train_batch`` run ``schedule`` (``"1f1b"``: DeepSpeed's own; ``"pooled"``), timed into
    ``timeline``. Pooled: ``serve(tick, phase)`` runs an idle stage's attention rounds of a tick (True when the
    rank served any), ``on_tick`` hears each tick start (the pooled core attention's plans follow it).
    ``before_tail`` runs just before the optimizer's reductions (deferred weight gradients are flushed there),
    ``tick_done`` after each tick's instructions (a stage with fewer blocks finishes the rounds it serves there),
    ``before_pass(tick)`` (pooled) between a tick's transfers and its forward or backward pass."""
    ServeTick, PooledSchedule, _ = _deepspeed_classes()
    if schedule not in ("1f1b", "pooled"):
        raise ValueError(f"unknown pipeline schedule {schedule!r}")
    own = type(engine)._train_schedule  # DeepSpeed's TrainSchedule for this stage

    def train_schedule():
        if schedule == "pooled":
            inner = PooledSchedule(micro_batches=engine.micro_batches, stages=engine.num_stages,
                                   stage_id=engine.stage_id)
            return TimedSchedule(inner, timeline, lambda t, _cmds: tick_phase(t), on_tick, before_tail, tick_done,
                                 before_pass)
        inner = own(engine)
        return TimedSchedule(inner, timeline, _one_f_one_b_phase(inner), on_tick, before_tail)

    engine._train_schedule = train_schedule
    engine._distca_timeline = timeline
    handlers = dict(type(engine)._INSTRUCTION_MAP)
    if schedule == "pooled":
        engine._distca_serve = serve or (lambda tick, phase: False)
        handlers[ServeTick] = _exec_serve_tick
    # ``_exec_schedule`` binds each handler to the engine (``MethodType(handler, self)``): wrap them to time spans
    engine._INSTRUCTION_MAP = {kind: _timed(handler, _span_name(kind, ServeTick)) for kind, handler in handlers.items()}


def _span_name(kind: type, serve_tick: type) -> str | None:
    """What a span of an instruction of ``kind`` is called (None: not timed)."""
    _, _, ds = _deepspeed_classes()
    if kind is ds.ForwardPass:
        return F
    if kind is ds.BackwardPass:
        return B
    if kind is serve_tick:
        return SERVE
    if kind in (ds.SendActivation, ds.RecvActivation, ds.SendGrad, ds.RecvGrad):
        return "p2p"
    if kind in (ds.ReduceTiedGrads, ds.ReduceGrads, ds.OptimizerStep):
        return "optimizer"
    return None


def _timed(handler: Callable, what: str | None) -> Callable:
    if what is None:
        return handler

    @functools.wraps(handler)
    def run(engine, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return handler(engine, *args, **kwargs)
        finally:
            engine._distca_timeline.span(what, t0)
    return run
