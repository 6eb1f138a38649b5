"""The ``distca`` command line, run as a user would (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distca.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_demo_shards_documents_and_reports_exactness():
    r = _run("demo", "--config", "configs/tiny-cpu.yaml", "--data.doc_lengths", "[700, 300, 50]",
             "--cluster.n_servers", "3")
    assert r.returncode == 0, r.stderr
    assert "OK: CAD attention equals whole-document attention" in r.stdout
    assert "-> CAD 1.0" in r.stdout  # balanced within (1 + eps)
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


def test_plan_command_reads_both_lengths_formats(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([[16384], [1024] * 16, [512] * 8]))
    r = _run("plan", "--lengths", str(plain), "--servers", "3", "--eps", "0.02", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    for key in ("max_over_mean", "bytes_moved", "bytes_total", "plan_ms", "compile_ms", "n_tasks"):
        assert key in summary
    assert summary["max_over_mean"] <= 1.02 and 0 < summary["bytes_moved"] < summary["bytes_total"]
    assert summary["n_docs"] == 25

    spanning = tmp_path / "spanning.json"
    spanning.write_text(json.dumps({"ranks": [[4096, 4096], [8192], [300, 7892]], "continues": [False, True, False]}))
    r = _run("plan", "--lengths", str(spanning), "--servers", "3", "--window", "256", "--placement", "dedicated",
             "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["n_docs"] == 4 and summary["placement"] == "dedicated" and summary["window"] == 256


def test_plan_command_rejects_bad_lengths(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ranks": [[10], [-3]]}))
    r = _run("plan", "--lengths", str(bad), "--servers", "2")
    assert r.returncode == 2 and "positive integers" in r.stderr
    r = _run("plan", "--lengths", str(tmp_path / "missing.json"), "--servers", "2")
    assert r.returncode == 2 and "cannot read lengths file" in r.stderr


@pytest.mark.cluster
def test_serve_starts_a_pool_prints_addresses_and_stops(monkeypatch):
    monkeypatch.setenv("DISTCA_TEST_KEY", "00ff" * 16)  # the key from the environment, never the command line
    r = _run("serve", "--config", "configs/tiny-cpu.yaml", "--cluster.n_servers", "2", "--hold-s", "0",
             "--transport.secret_env", "DISTCA_TEST_KEY")
    assert "00ff" * 16 not in r.stdout + r.stderr
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["servers"]) == 2 and out["healthy"] == [True, True]
