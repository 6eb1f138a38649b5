"""The next step's micro-batches, CAD plans and document layouts, prepared on a background thread while this
step trains.

The data stream is deterministic and every plan (and layout) is a pure function of its micro-batch (DESIGN
§3), so step n+1's draws and plans can be computed during step n and are exactly what step n+1 would compute
itself. A
prepared step carries the stream position from *before* its draws: a checkpoint written at a step boundary
saves that position, so a stop, a failure or a resume never skips or reuses a micro-batch, and a plan never
outlives the micro-batch it was computed from (they travel together).

Only the background thread touches the stream while a step is being prepared; the trainer waits for it
before reading the stream's position (:meth:`StepPrefetch.stream_state`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from distca.data.stream import MicroBatch, PackedStream


@dataclass
class PreparedStep:
    """One step's micro-batches, what ``prepare`` made of each (the trainer: its document layout and CAD plans),
    the stream position before they were drawn, the milliseconds drawing and preparing took, and what
    ``prepare_step`` made of the step's micro-batches together (the pooled schedule's tick plans; else None)."""

    state: dict[str, Any]
    micro_batches: list[MicroBatch]
    parts: list[Any]
    ms: float
    step: Any = None


class StepPrefetch:
    """Prepares steps for a trainer: ``take()`` this step's (prepared earlier, or now), ``start_next()`` to
    prepare the next one in the background."""

    def __init__(self, stream: PackedStream, micro_batches: int, prepare: Callable[[MicroBatch], Any],
                 background: bool = True, prepare_step: Callable[[list[MicroBatch]], Any] | None = None):
        self.stream, self.n, self.prepare, self.background = stream, micro_batches, prepare, background
        self.prepare_step = prepare_step
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distca-prefetch") if background else None
        self._next: Future[PreparedStep] | None = None

    def _prepare(self) -> PreparedStep:
        t0 = time.perf_counter()
        state = self.stream.state_dict()
        mbs = [self.stream.next_micro_batch() for _ in range(self.n)]
        parts = [self.prepare(mb) for mb in mbs]
        step = self.prepare_step(mbs) if self.prepare_step is not None else None
        return PreparedStep(state, mbs, parts, (time.perf_counter() - t0) * 1e3, step)

    def take(self) -> PreparedStep:
        """This step: the one prepared in the background (waiting for it if it is not done), else prepared now."""
        if self._next is None:
            return self._prepare()
        fut, self._next = self._next, None
        return fut.result()

    def start_next(self) -> None:
        """Prepare the next step in the background (no-op without a background thread)."""
        if self._pool is not None and self._next is None:
            self._next = self._pool.submit(self._prepare)

    def stream_state(self) -> dict[str, Any]:
        """The stream's position at the step boundary: before the draws of a step prepared ahead."""
        if self._next is not None:
            return self._next.result().state
        return self.stream.state_dict()

    def close(self) -> None:
        """Wait for a step being prepared (its draws are dropped) and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._next = None
