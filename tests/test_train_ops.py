"""Operating a training run on a real simulated cluster (PP=2 × DP=2 DeepSpeed trainers, a local Ray running the
attention-server pool, ZeroMQ between them): the Ray launcher, a server killed mid-run (restart from a checkpoint)
and mid-step (recovered in the step), SIGTERM. Every check is against the undisturbed CAD run of this module, which
is ``tests/test_train.py``'s CAD run again: in a module of its own these runs go to the other test worker."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distca.train.launch import train
from tests.test_train import ROOT, STEPS, assert_same_curve, run, same_config, shared_pools, tiny

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def pools():
    """This module's pools (``tests.test_train.shared_pools``)."""
    yield from shared_pools()


@pytest.fixture(scope="module")
def cad_run(tmp_path_factory, pools):
    """The undisturbed run: CAD on the pool (shared memory), DeepSpeed's 1F1B schedule, 20 steps."""
    cfg = tiny(tmp_path_factory.mktemp("cad"), **{"train.core_attention": "cad", "train.pipeline_schedule": "1f1b"})
    return cfg, run(cfg, pools)


def test_ray_launch_trains_like_a_single_launch(tmp_path, cad_run):
    """``distca launch ray``: trainers as Ray Train workers and servers as actors, on a local Ray of its own. Two
    workers (DP 2, no pipeline) and two servers: the same data-parallel degree, micro-batches and seed as the
    PP 2 x DP 2 run on four servers, so the same curve within the parity tolerance, for half the processes to
    start (each imports torch; most of this test is Ray starting them)."""
    cad_cfg, single = cad_run
    cfg = tiny(tmp_path, **{"train.core_attention": "cad", "train.pipeline_schedule": "1f1b",
                            "cluster.n_trainers": 2, "train.pipeline_parallel": 1, "cluster.n_servers": 2})
    assert (cfg.data_parallel, cfg.train.micro_batches, cfg.seed) == (cad_cfg.data_parallel,
                                                                      cad_cfg.train.micro_batches, cad_cfg.seed)
    cmd = [sys.executable, "-m", "distca.cli", "launch", "ray", "--config", same_config(cfg, tmp_path),
           f"--output_dir={tmp_path / 'ray'}", "--run-steps", "4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "cad on 2 servers" in r.stdout
    losses = [json.loads(x)["loss"] for x in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert_same_curve(single.losses[:4], losses)

@pytest.mark.timeout(600)
def test_a_server_killed_mid_run_is_replaced_and_the_curve_is_unchanged(tmp_path, pools, cad_run):
    """Kill one attention-server actor while training: the step fails with a timeout naming the server, the pool
    replaces it (new address), the ranks resume from the last checkpoint, and the loss curve equals the
    undisturbed run's."""
    import os
    import threading

    _, undisturbed = cad_run
    cfg = tiny(tmp_path, **{"train.core_attention": "cad", "train.checkpoint_every": 1, "train.max_restarts": 1,
                            "transport.timeout_s": 5, "cluster.server_loss": "restart"})
    pool = pools(cfg)
    box = {}
    runner = threading.Thread(target=lambda: box.update(res=train(cfg, run_steps=6, pool=pool)), daemon=True)
    runner.start()
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    assert metrics.exists(), "the run did not reach step 2"
    old = list(pool.addresses)
    os.kill(pool.pids()[0], signal.SIGKILL)
    runner.join(timeout=400)
    res = box["res"]
    assert res.restarts == 1
    assert pool.addresses[0] != old[0] and pool.addresses[1:] == old[1:]
    assert [r["step"] for r in res.records] == list(range(6))
    assert_same_curve(undisturbed.losses[:6], res.losses)


RECOVERY_STEPS, KILL_AT = STEPS, 1


@pytest.mark.timeout(300)
def test_a_server_killed_mid_step_is_recovered_in_the_step_without_a_restart(tmp_path, pools, cad_run):
    """``cluster.server_loss: in_step`` on a PP=2 x DP=2 CAD run of the undisturbed run's 20 steps: an
    attention-server actor SIGKILLed while step 1 runs. The trainers find it lost by its dropped connection, finish
    its rounds themselves (exactly its fused call), agree at the step boundary that it is lost and send it nothing
    more; the run never restarts, and every step's loss equals the undisturbed run's (``cad_run``: same config, same
    shared pool) bit for bit. The driver has the pool replace the server in the background, and every rank takes
    the new one back at the same step boundary (when that comes before the run's end: it depends on how fast Ray
    starts an actor on a busy machine). Prints the step time with the loss against the median step (the benchmark
    line of the recovery)."""
    import os
    import threading

    _, undisturbed = cad_run
    cfg = tiny(tmp_path, **{"train.core_attention": "cad", "train.pipeline_schedule": "1f1b",
                            "cluster.server_loss": "in_step", "cluster.lost_after_s": 5.0})
    pool = pools(cfg)
    assert pool is pools(cad_run[0])  # the same servers as the undisturbed run
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(res=train(cfg, run_steps=RECOVERY_STEPS, pool=pool)),
                              daemon=True)
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    victim, old = pool.pids()[0], pool.addresses[0]
    runner.start()
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and runner.is_alive() and not (
                metrics.exists() and len(metrics.read_text().splitlines()) >= KILL_AT):
            time.sleep(0.02)
        assert runner.is_alive(), "the run ended before the kill"
        os.kill(victim, signal.SIGKILL)  # step KILL_AT is running (its predecessor was just reported)
        runner.join(timeout=240)
        replaced = pool.addresses[0] != old  # by the driver, while the run went on
    finally:
        pool.restart_dead()  # the shared pool serves the module's later runs
    res = box["res"]
    assert res.restarts == 0
    assert [r["step"] for r in res.records] == list(range(RECOVERY_STEPS))
    assert res.losses == undisturbed.losses[:RECOVERY_STEPS]  # exact: the same kernel on the same rows
    hit = next(r for r in res.records if r["recovered_rounds"])
    k = hit["step"]  # KILL_AT, unless this test's thread was descheduled past the whole step
    assert KILL_AT <= k <= KILL_AT + 1 and hit["servers_lost"] == [0] and hit["recovered_tasks"] > 0
    back = next((r["step"] + 1 for r in res.records if r.get("rejoined_after")), RECOVERY_STEPS)
    assert back > k and replaced
    assert all(r["servers_lost"] == [] for r in res.records[:k] + res.records[back:])
    assert all(r["servers_lost"] == [0] for r in res.records[k:back])  # agreed: nobody asks it meanwhile
    assert all(r["loss_detect_s"] == 0 for r in res.records[k + 1:])  # known lost: no more waiting
    assert all(r["recovered_rounds"] == 0 for r in res.records[back:])
    assert all(r["server_busy_s"][0] > 0 for r in res.records[back:])  # the replacement serves
    assert all(min(r["server_busy_s"]) >= 0 for r in res.records)  # a lost server counts no busy time
    median = float(np.median([r["step_s"] for r in undisturbed.records[1:]]))
    print(f"\nin-step recovery: step {hit['step']} with the loss took {hit['step_s']:.2f} s (waiting "
          f"{hit['loss_detect_s']:.2f} s to find server 0 lost, {hit['recovery_s']:.2f} s standing in for "
          f"{hit['recovered_rounds']} rounds / {hit['recovered_tasks']} tasks); median undisturbed step "
          f"{median:.2f} s; steps after it {[round(r['step_s'], 2) for r in res.records[k + 1:]]} s; "
          f"replacement back from step {back}")

def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
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


def test_sigterm_checkpoints_and_stops_cleanly_then_resumes(tmp_path, pools):
    """Operating a run: SIGTERM to ``distca train`` mid-run stops every rank after the same step, checkpoints,
    prints the summary, shuts its servers down and leaves no process behind; the run then resumes from there."""
    small = {"cluster.n_trainers": 2, "train.pipeline_parallel": 1, "cluster.n_servers": 2}  # fewer processes to start
    long_run = tiny(tmp_path, **{"train.core_attention": "cad", "train.steps": 200, **small})
    cmd = [sys.executable, "-m", "distca.cli", "train", "--config", same_config(long_run, tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    started = _descendants(proc.pid)  # the rank fork server and ranks, the local Ray and its server actors
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    done = steps[-1] + 1
    assert 3 <= done < 200
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step{done:08d}"
    assert f"0 -> {done}" in out  # the summary table still prints
    deadline = time.monotonic() + 60  # Ray's own processes may take a moment to go
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(started), f"processes left behind: {_alive(started)}"

    resumed = run(tiny(tmp_path, **{"train.core_attention": "cad", "train.steps": done + 2, "train.resume": True,
                                    **small}), pools)
    assert (resumed.start_step, resumed.end_step) == (done, done + 2)
    assert (tmp_path / "checkpoints" / f"step{done + 2:08d}").exists()
