"""Operating a run: SIGTERM mid-run stops every rank after the same step, checkpoints, shuts the servers
down and leaves no trainer process behind; the run can then be resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["--seed=2", "--threads=1", "--model.n_layers=2", "--model.hidden=64", "--model.n_heads=4",
             "--model.ffn_hidden=172", "--train.tokens_per_rank=256", "--train.peak_tflops=1",
             "--train.tensorboard=false", "--train.progress=false", "--train.step_timeout_s=120",
             "--attention.shard_tokens=64"]


def _children(pid: int) -> set[int]:
    """All descendants of ``pid`` (from /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.update(kids)
        todo += kids
    return out


def _alive(pids: set[int]) -> list[int]:
    out = []
    for p in pids:
        with contextlib.suppress(OSError):
            if "zombie" not in Path(f"/proc/{p}/status").read_text().lower():
                out.append(p)
    return out


def test_sigterm_checkpoints_and_stops_cleanly_then_resumes(tmp_path):
    cmd = [sys.executable, "-m", "distca.cli", "train", "--config", "configs/tiny-cpu.yaml", *OVERRIDES,
           "--train.steps=200", "--train.core_attention=cad", f"--output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    trainers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    done = steps[-1] + 1
    assert 3 <= done < 200
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step{done:08d}"
    assert f"0 -> {done}" in out  # the summary table still prints
    alive = _alive(trainers)
    deadline = time.monotonic() + 60  # processes outside the driver (Ray's) may take a moment to go
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = _alive(trainers)
    assert not alive, f"processes left behind: {alive}"

    resumed = subprocess.run([*cmd[:-1], f"--output_dir={tmp_path}", "--train.resume=true", "--train.steps",
                              str(done + 2)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"{done} -> {done + 2}" in resumed.stdout
    assert os.path.exists(tmp_path / "checkpoints" / f"step{done + 2:08d}")
