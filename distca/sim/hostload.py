"""What other tenants take from this host's processors while we measure (Linux ``/proc``).

On a shared VM the cores a measured run gets drift with whatever else runs: other users' jobs and the
hypervisor's steal time. A calibration made a minute before or after a run sees a different machine.
:class:`HostLoad` samples, every ``period_s``, the processor time the whole host used (``/proc/stat``:
everything but idle and iowait, steal included) and the time this process and all its descendants
used (``/proc/<pid>/stat``: trainers, attention servers and Ray's processes of the runs we start). The
difference is the *foreign* load: the cores others took, per interval.

The validation uses it in units of consumed cores: a calibration measures what our processes get
relative to one process alone (``cores``); a run during which others took ``f_run`` of the host's
``n`` processors is replayed with ``cores · (n - f_run) / n``.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import defaultdict


def _host_busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(v) - v[3] - v[4]


def _tree_ticks(root: int, prev: dict[int, int]) -> tuple[int, dict[int, int]]:
    """Processor ticks the descendants of ``root`` (and it) used since ``prev``, and the new snapshot.
    A process that appeared since counts whole; one that exited loses only its last interval."""
    kids: dict[int, list[int]] = defaultdict(list)
    ticks: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        pid = int(d)
        kids[int(rest[1])].append(pid)
        ticks[pid] = int(rest[11]) + int(rest[12])  # utime + stime
    ours, stack = {}, [root]
    while stack:
        p = stack.pop()
        if p in ticks and p not in ours:
            ours[p] = ticks[p]
            stack.extend(kids.get(p, ()))
    delta = sum(t - prev.get(p, 0) for p, t in ours.items())
    return max(0, delta), ours


class HostLoad:
    """Background sampler of the foreign processor load (cores others used) on this host."""

    def __init__(self, period_s: float = 0.5, root: int | None = None):
        self.period_s, self.root = period_s, root or os.getpid()
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t: list[float] = []
        self.foreign_s: list[float] = []  # cumulative processor-seconds others used, at self.t
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return os.path.exists("/proc/stat") and os.path.exists(f"/proc/{os.getpid()}/stat")

    def start(self) -> HostLoad:
        self._busy, self._ours = _host_busy_ticks(), _tree_ticks(self.root, {})[1]
        self.t, self.foreign_s = [time.time()], [0.0]
        self._thread = threading.Thread(target=self._loop, name="hostload", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> None:
        busy = _host_busy_ticks()
        mine, self._ours = _tree_ticks(self.root, self._ours)
        foreign = max(0, busy - self._busy - mine) / self.hz
        self._busy = busy
        self.t.append(time.time())
        self.foreign_s.append(self.foreign_s[-1] + foreign)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _at(self, t: float) -> float:
        i = bisect.bisect_left(self.t, t)
        if i <= 0:
            return self.foreign_s[0]
        if i >= len(self.t):
            return self.foreign_s[-1]
        t0, t1 = self.t[i - 1], self.t[i]
        f0, f1 = self.foreign_s[i - 1], self.foreign_s[i]
        return f0 + (f1 - f0) * (t - t0) / max(t1 - t0, 1e-9)

    def foreign_cores(self, t0: float, t1: float) -> float:
        """Mean cores others used between ``t0`` and ``t1`` (seconds since the epoch)."""
        if t1 <= t0 or len(self.t) < 2:
            return 0.0
        return max(0.0, (self._at(t1) - self._at(t0)) / (t1 - t0))
