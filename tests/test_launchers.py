"""Launchers train exactly like a single launch (same config, same losses):

- a "two-node" torchrun launch simulated on one machine: two torchrun invocations (``--nnodes 2``, node
  ranks 0 and 1, rendezvous on 127.0.0.1), each node's local rank 0 starting its colocated attention
  servers, addresses exchanged through the process group;
- a Ray launch on a local Ray bound to loopback: trainers as Ray Train workers, servers as actors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distca.config import load_config
from distca.train.launch import free_port, train

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["--seed=5", "--threads=1", "--model.n_layers=2", "--model.hidden=64", "--model.n_heads=4",
             "--model.ffn_hidden=172", "--train.steps=4", "--train.tokens_per_rank=256", "--train.peak_tflops=1",
             "--train.tensorboard=false", "--train.progress=false", "--train.step_timeout_s=120",
             "--train.core_attention=cad", "--attention.shard_tokens=64"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return train(load_config(ROOT / "configs/tiny-cpu.yaml", [*OVERRIDES, f"--output_dir={out}"])).losses


def _same(a_losses, b_losses):
    assert len(a_losses) == len(b_losses) == 4
    for a, b in zip(a_losses, b_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_two_node_torchrun_matches_single_launch(tmp_path, single):
    port = free_port()
    result = tmp_path / "rank0.json"
    env = {"NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    cmd = ["bash", "launch/torchrun.sh", "configs/tiny-cpu.yaml", *OVERRIDES, f"--output_dir={tmp_path / 'tr'}"]
    nodes = [subprocess.Popen([*cmd, *(["--result-json", str(result)] if i == 0 else [])], cwd=ROOT,
                              env={**env, "NODE_RANK": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [n.communicate(timeout=400)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outs)
    assert "| core attention" in outs[0] and "cad on 4 servers" in outs[0]
    _same(single, json.loads(result.read_text())["losses"])


def test_ray_launch_matches_single_launch(tmp_path, single):
    cmd = [sys.executable, "-m", "distca.cli", "launch", "ray", "--config", "configs/tiny-cpu.yaml", *OVERRIDES,
           f"--output_dir={tmp_path}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "cad on 4 servers" in r.stdout
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    _same(single, losses)
