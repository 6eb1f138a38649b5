"""A small discrete-event engine for task graphs on streams.

A *stream* is one in-order queue of work on one resource: a GPU's compute stream, its communication
stream (a NIC or copy engine), a trainer or server process on a CPU host. Tasks are placed on streams
and may depend on tasks of any stream. A stream is either

- ``ordered``: it runs its tasks in program order (a CUDA stream, a trainer's Python loop), the next
  one starting when it is at the head and its dependencies are done; or
- ``fifo``: it runs whichever of its tasks became ready first (a server answering requests as they
  arrive).

Tasks marked ``uses_core`` share a host's processor cores when the cluster has a finite number of
them (a CPU machine running several ranks): with ``n`` such tasks running on ``C`` cores each
progresses at ``min(1, C / n)`` of its full speed (processor sharing, which is how the Linux scheduler
divides cores among runnable threads over a step's time scale). GPU clusters set ``cores=inf``: every
stream runs at full speed and the engine becomes a plain event queue.

The result gives each task's start and end, each stream's busy time by task kind, and the makespan.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Task:
    stream: int
    work_s: float  # seconds at full speed
    kind: str  # breakdown label: "linear", "attention", "comm", "allreduce", ...
    deps: tuple[int, ...] = ()
    uses_core: bool = True
    start: float = math.nan
    end: float = math.nan


@dataclass
class Stream:
    name: str
    ordered: bool = True
    tasks: list[int] = field(default_factory=list)


class TaskGraph:
    """Streams and tasks; ``add`` returns a task id used for dependencies."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.tasks: list[Task] = []

    def stream(self, name: str, ordered: bool = True) -> int:
        self.streams.append(Stream(name, ordered))
        return len(self.streams) - 1

    def add(self, stream: int, work_s: float, kind: str, deps=(), uses_core: bool = True) -> int:
        if not work_s >= 0 or math.isinf(work_s):
            raise ValueError(f"task of kind {kind!r} on stream {self.streams[stream].name!r} has work {work_s!r}")
        tid = len(self.tasks)
        self.tasks.append(Task(stream, float(work_s), kind, tuple(d for d in deps if d is not None), uses_core))
        self.streams[stream].tasks.append(tid)
        return tid

    def join(self, stream: int, deps, kind: str = "sync") -> int:
        """A zero-work task that completes when all ``deps`` have (a barrier on ``stream``)."""
        return self.add(stream, 0.0, kind, tuple(deps), uses_core=False)


@dataclass
class SimResult:
    makespan_s: float
    busy_s: dict[str, dict[str, float]]  # stream name -> kind -> seconds of full-speed work done
    tasks: list[Task]

    def busy(self, stream: str, kinds: tuple[str, ...] | None = None) -> float:
        b = self.busy_s.get(stream, {})
        return sum(v for k, v in b.items() if kinds is None or k in kinds)


class DeadlockError(RuntimeError):
    """The graph has tasks that can never start (a dependency cycle, or an ordered stream whose head
    waits on a task behind it)."""


def simulate(graph: TaskGraph, cores: float = math.inf) -> SimResult:
    """Run ``graph`` to completion; ``cores`` is the host's processor count shared by ``uses_core`` tasks."""
    tasks, streams = graph.tasks, graph.streams
    n = len(tasks)
    waiting = [len(t.deps) for t in tasks]
    children: list[list[int]] = [[] for _ in range(n)]
    for i, t in enumerate(tasks):
        for d in t.deps:
            if not 0 <= d < n:
                raise ValueError(f"task {i} depends on unknown task {d}")
            children[d].append(i)
    pos = [0] * len(streams)  # ordered streams: index of the head task
    ready_fifo: list[list[tuple[float, int]]] = [[] for _ in streams]
    busy_stream = [False] * len(streams)
    ready_at = [0.0] * n
    done = 0
    now = 0.0
    running: dict[int, float] = {}  # task -> remaining work (processor-sharing mode)
    events: list[tuple[float, int]] = []  # (end time, task) in plain mode
    finite = math.isfinite(cores)

    def candidates(s: int):
        st = streams[s]
        if st.ordered:
            if pos[s] < len(st.tasks):
                tid = st.tasks[pos[s]]
                if waiting[tid] == 0:
                    return tid
            return None
        if ready_fifo[s]:
            return ready_fifo[s][0][1]
        return None

    def try_start(s: int) -> None:
        while not busy_stream[s]:
            tid = candidates(s)
            if tid is None:
                return
            st = streams[s]
            if st.ordered:
                pos[s] += 1
            else:
                heapq.heappop(ready_fifo[s])
            t = tasks[tid]
            t.start = now
            if t.work_s == 0.0:
                finish(tid)
                continue
            busy_stream[s] = True
            if finite:
                running[tid] = t.work_s
            else:
                heapq.heappush(events, (now + t.work_s, tid))

    def finish(tid: int) -> None:
        nonlocal done
        t = tasks[tid]
        t.end = now
        done += 1
        touched = {t.stream}
        for c in children[tid]:
            waiting[c] -= 1
            if waiting[c] == 0:
                ready_at[c] = now
                cs = tasks[c].stream
                if not streams[cs].ordered:
                    heapq.heappush(ready_fifo[cs], (now, c))
                touched.add(cs)
        pending.extend(touched)

    pending: list[int] = []
    for i, t in enumerate(tasks):
        if waiting[i] == 0 and not streams[t.stream].ordered:
            heapq.heappush(ready_fifo[t.stream], (0.0, i))
    for s in range(len(streams)):
        try_start(s)
    while pending:
        s = pending.pop()
        try_start(s)

    while done < n:
        if finite:
            if not running:
                break
            n_core = sum(1 for tid in running if tasks[tid].uses_core)
            core_rate = min(1.0, cores / n_core) if n_core else 1.0
            rates = {tid: (core_rate if tasks[tid].uses_core else 1.0) for tid in running}
            dt = min(rem / rates[tid] for tid, rem in running.items())
            now += dt
            finished = []
            for tid in running:
                running[tid] -= dt * rates[tid]
                if running[tid] <= 1e-12 * max(1.0, tasks[tid].work_s):
                    finished.append(tid)
            for tid in finished:
                del running[tid]
                busy_stream[tasks[tid].stream] = False
                finish(tid)
        else:
            if not events:
                break
            now, tid = heapq.heappop(events)
            busy_stream[tasks[tid].stream] = False
            finish(tid)
        while pending:
            try_start(pending.pop())

    if done < n:
        stuck = [i for i, t in enumerate(tasks) if math.isnan(t.end)][:5]
        raise DeadlockError(f"{n - done} of {n} tasks never ran; first: "
                            + ", ".join(f"{i} ({tasks[i].kind} on {streams[tasks[i].stream].name})" for i in stuck))
    busy: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for t in tasks:
        busy[streams[t.stream].name][t.kind] += t.work_s
    return SimResult(now, {k: dict(v) for k, v in busy.items()}, tasks)
