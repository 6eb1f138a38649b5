"""The ``distca`` command line, run as a user would (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distca.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_demo_shards_documents_and_reports_exactness():
    r = _run("demo", "--config", "configs/tiny-cpu.yaml", "--data.doc_lengths", "[700, 300, 50]",
             "--cluster.n_servers", "3")
    assert r.returncode == 0, r.stderr
    assert "OK: sharded attention equals colocated attention" in r.stdout
    assert "| 2 |" in r.stdout  # one row per simulated server


def test_demo_with_sliding_window_and_bf16():
    r = _run("demo", "--config", "configs/tiny-cpu.yaml", "--data.doc_lengths", "[600, 90]",
             "--attention.window", "64", "--attention.dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "OK:" in r.stdout


def test_config_command_prints_resolved_config():
    r = _run("config", "--config", "configs/tiny-cpu.yaml", "--model.n_layers", "3")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["n_layers"] == 3


def test_bad_override_exits_2_with_a_named_key():
    r = _run("demo", "--config", "configs/tiny-cpu.yaml", "--model.n_layerz", "3")
    assert r.returncode == 2
    assert "unknown config key model.n_layerz" in r.stderr
