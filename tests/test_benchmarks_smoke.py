"""The benchmark scripts run end to end on tiny settings and print their tables (numbers are not
asserted here: speed lives in BENCHMARKS.md, never in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster  # spawns trainer/server processes (left out of `make test-fast`)

ROOT = Path(__file__).parent.parent


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_kernels_composability_and_calibration_run(tmp_path):
    out = _run("benchmarks/kernels.py", "composability", "--total-tokens", "512", "--min-shard", "128", "--reps", "1",
               "--warmup", "0", "--out-dir", str(tmp_path))
    assert "| shard tokens |" in out and "relative fwd" in out
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_scheduler_benchmark_runs(tmp_path):
    out = _run("benchmarks/scheduler.py", "--dists", "pretrain", "--contexts", "8192", "--servers", "4", "--eps",
               "0.02", "--seeds", "1", "--out-dir", str(tmp_path))
    assert (tmp_path / "scheduler.png").exists()
    assert "| pretrain | 8K" in out
    assert "cad max/mean above 1+eps (+0.001) in 0" in out


def test_transport_benchmark_runs():
    out = _run("benchmarks/transport.py", "--reps", "1", "--memory-rounds", "2", "--max-mb", "4")
    assert "| ipc " in out and "| tcp " in out and "| shm " in out and "small-message RTT" in out
    assert "| server (shm) " in out and "segments 1 -> 1" in out


def test_pingpong_benchmark_runs():
    out = _run("benchmarks/pingpong.py", "--tokens", "256", "--docs", "128", "128", "--layers", "1", "--steps", "1",
               "--heads", "2", "--kv-heads", "1", "--head-dim", "8")
    assert "| forward, ping-pong " in out and "| fwd+bwd, ping-pong " in out


def test_gpu_step_checks_the_backend_and_runs_end_to_end_on_the_cpu(tmp_path):
    import json

    probe = json.loads(_run("benchmarks/gpu_step.py", "probe", "cpu"))
    assert probe["ok"] and probe["window_ok"] and probe["name"] == "sdpa", probe
    out = tmp_path / "gpu_step.json"
    _run("benchmarks/gpu_step.py", "--device", "cpu", "--dtype", "float32", "--small", "--tokens", "512", "--reps", "1",
         "--warmup", "0", "--threads", "2", "--skip", "matmul,model_noop", "--out", str(out))
    report = json.loads(out.read_text())
    m = report["measurements"]
    for name in ("attention", "linear", "local", "cad"):
        assert m[name]["ok"], m[name]
    assert m["matmul"]["skipped"] == "--skip"
    assert m["cad"]["server"]["device"] == "cpu" and m["cad"]["server_busy_s"] > 0
    assert report["correctness"]["ok"] and report["correctness"]["loss_rel_diff"] <= 1e-4
    assert report["sim"]["linear_flops"] > 0 and report["docs"]["n_docs"] >= 1


def test_gpu_step_imports_without_ray_deepspeed_or_tqdm():
    """The GPU check runs on machines without the training stack: the benchmark needs only the CAD path."""
    code = ("import runpy, sys\n"
            "for m in ('ray', 'deepspeed', 'tqdm', 'tensorboard', 'pyarrow', 'hypothesis'): sys.modules[m] = None\n"
            "sys.argv = ['gpu_step.py', '--help']\n"
            "sys.path.insert(0, 'benchmarks')  # what `python benchmarks/gpu_step.py` does\n"
            "runpy.run_path('benchmarks/gpu_step.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-2000:]


def test_gpu_train_runs_the_torchrun_path_for_both_attentions_on_the_cpu(tmp_path):
    """benchmarks/gpu_train.py --cpu (gpu_check.sh's dry run of its training step): a tiny model of the 1-GPU
    config through `python -m distca.train.torchrun`, local and CAD on the in-place plane, into one JSON."""
    import json

    r = subprocess.run([sys.executable, "benchmarks/gpu_train.py", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "gpu_train.json").read_text())
    runs = report["runs"]
    assert runs["local"]["status"] == "ok", r.stdout[-3000:]
    assert runs["local"]["steps"] == 3 and runs["local"]["tokens_per_s"] > 0 and runs["local"]["mfu"] > 0
    assert runs["local"]["peak_gpu_mb"] is None  # the CPU: no GPU memory to report
    assert runs["cad"]["overrides"][-1] == "--cluster.data_plane=inplace"
    both = runs["cad"]["status"] == "ok"  # the trainer refuses the in-place plane until it runs it
    assert r.returncode == (0 if both else 1) and "| local | ok" in r.stdout
    assert (report["cad_over_local_tokens_per_s"] is not None) == both


def test_train_benchmark_runs(tmp_path):
    out = _run("benchmarks/train.py", "--steps", "2", "--out-dir", str(tmp_path), "--model.n_layers=2",
               "--model.hidden=64", "--model.n_heads=4", "--model.ffn_hidden=128", "--train.tokens_per_rank=128",
               "--train.peak_tflops=1", "--train.tensorboard=false",
               "--cluster.data_plane=inplace")  # CAD without a server pool: no Ray to start (the soak runs one)
    assert "| local " in out and "| cad " in out and "CAD / local tokens/s" in out
    assert (tmp_path / "train.png").exists()


def test_short_soak_finds_no_leak(tmp_path):
    """The soak benchmark at 8 steps of the tiny CAD config (PP 2 x DP 2; its server pool included, two servers to
    start rather than four): no memory or descriptor growth per rank beyond the soak's bounds after warm-up, and no
    error."""
    import json

    out = _run("benchmarks/soak.py", "--steps", "8", "--out-dir", str(tmp_path), "--model.n_layers=2",
               "--model.hidden=64", "--model.n_heads=4", "--model.ffn_hidden=172", "--train.tokens_per_rank=256",
               "--train.peak_tflops=1", "--train.tensorboard=false", "--attention.shard_tokens=64",
               "--cluster.n_servers=2")
    assert "verdict: OK" in out, out[-2000:]
    analysis = json.loads((tmp_path / "soak.json").read_text())["analysis"]
    assert analysis["steps"] == 8 and len(analysis["per_rank"]) == 4
    assert len(analysis["server_peak_growth_mb"]) == 2


def test_attention_scaling_benchmark_runs(tmp_path, capsys, monkeypatch):
    """The simulated weak-scaling table (both mask families, both kernel models, the published H100 rows) and
    the --cpu scheduler table, at tiny sizes (in this process: no subprocess start)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import attention_scaling

    attention_scaling.main(["--gpus", "8", "16", "--tokens-per-gpu", "1024", "--seeds", "1", "--window", "256",
                            "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "SIMULATED" in out and "| MagiAttention " in out and "| varlen-window 256 " in out
    assert "16 vs 8 GPUs keeps" in out and "without ping-pong" in out
    assert "Key/value relay side by side" in out  # 16 GPUs are two 8-GPU nodes: direct vs relayed key rows
    assert (tmp_path / "attention_scaling.png").exists() and (tmp_path / "attention_scaling.json").exists()
    attention_scaling.main(["--cpu", "--servers", "2", "4", "--tokens-per-gpu", "512", "--seeds", "1",
                            "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "4 | varlen-causal" in out and "4 | varlen-window 256" in out and "max/mean pairs" in out
    # --cpu runs every family by default (scaled to the token budget): chunked, sink + window, prefix-LM too.
    assert "4 | varlen-chunked 512" in out and "4 | varlen-sink 4 + window 256" in out and "varlen-prefix-LM 128" in out
    # --families: the planner gets each family's mask; useful FLOPs count its pairs.
    attention_scaling.main(["--gpus", "8", "--tokens-per-gpu", "1024", "--seeds", "1", "--no-pingpong",
                            "--families", "chunked:512", "sink_window:4:256", "prefix_lm:256",
                            "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| varlen-chunked 512 " in out and "| varlen-prefix-LM 256 " in out and "| varlen-causal " not in out


def test_idle_budget_benchmark_shows_each_cause_removed(tmp_path, capsys, monkeypatch):
    """The 4D idle budget (simulated what-ifs, in this process): removing communication, the balance tolerance and
    the LM head one at a time never adds idle time, and all three together leave less than the model as is."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import idle_budget

    idle_budget.main(["--gpus", "16", "--max-len", "65536", "--tokens-per-node", "131072", "--micro-tokens", "32768",
                      "--out-dir", str(tmp_path)])
    assert "| no comm + eps 0 + no LM head " in capsys.readouterr().out
    res = {r["case"]: r for r in json.loads((tmp_path / "idle_budget.json").read_text())["results"]}
    base = res["as modelled"]
    for case in ("no comm", "eps 0", "no LM head"):
        assert res[case]["step_s"] <= base["step_s"] * 1.001
    assert res["no comm + eps 0 + no LM head"]["idle"] < base["idle"]
    for r in res.values():
        assert abs(r["full"] + r["partial"] + r["tail"] - r["idle"]) < 1e-6
