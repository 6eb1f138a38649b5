"""Training on a real simulated cluster: DeepSpeed trainer processes (PP=2 × DP=2, gloo on loopback), a local
Ray running the attention-server pools, ZeroMQ between them.

Each run is expensive on a 2-core machine, so one run is checked by several tests: one colocated and one CAD
run of the same tiny config carry parity, resume, metrics files and the launchers' comparisons; the pools
(one per server setting) and their Ray are shared by every CAD run of this module.

- parity: colocated attention and CAD give the same loss at every step (DESIGN invariant 5), with rows as
  ZeroMQ frames and over the pool's collective data plane;
- exact resume: a checkpoint written in the middle of a run, resumed, continues the same curve bit for bit;
- launchers: two "nodes" under torchrun train exactly like ``train()``;
- every residual variant learns; bf16 + tied embeddings + activation checkpointing train like bf16 without;
- failures (bad data, unreachable servers) end the run with a clear error.

The Ray launcher, servers killed mid-run and SIGTERM are in ``tests/test_train_ops.py`` (a module of its own, so
that the two test workers share the cluster runs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from distca.config import load_config
from distca.errors import ConfigError
from distca.parts import pool_settings
from distca.server.pool import AttentionServerPool
from distca.train.launch import TrainError, free_port, train

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20
SHORT = 8  # steps of the runs checked against a prefix of the 20-step curve (parity needs the loss to move, not 20)
TINY = {"seed": 3, "threads": 1, "model.n_layers": 2, "model.hidden": 64, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.ffn_hidden": 172, "model.vocab_size": 256, "cluster.n_trainers": 4, "cluster.n_servers": 4,
        "transport.timeout_s": 60, "train.steps": STEPS, "train.pipeline_parallel": 2, "train.micro_batches": 2,
        "train.tokens_per_rank": 256, "train.lr": 0.003, "train.warmup_steps": 2, "train.progress": False,
        "train.tensorboard": False, "train.peak_tflops": 1.0, "train.step_timeout_s": 120,
        "attention.shard_tokens": 64}


def overrides(**over) -> list[str]:
    """The tiny config's command-line overrides (``--key=value``), with ``over`` applied."""
    args = {**TINY, **over}
    return [f"--{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in args.items()]


def tiny(tmp: Path, **over):
    """A small model on the embedded corpus: PP=2 × DP=2, two micro-batches of 2 × 256 tokens."""
    return load_config(None, overrides(output_dir=str(tmp), **over))


def shared_pools():
    """A module fixture's body: yields ``pools(cfg)``, a running attention-server pool for ``cfg``'s server settings,
    shared by every run of the module that needs the same settings (the first pool starts the local Ray; it is
    shut down last)."""
    started: dict = {}

    def get(cfg) -> AttentionServerPool:
        key = pool_settings(cfg)
        if key not in started:
            started[key] = AttentionServerPool(key)
        return started[key]

    try:
        yield get
    finally:
        for pool in reversed(list(started.values())):
            pool.shutdown()


@pytest.fixture(scope="module")
def pools():
    yield from shared_pools()


def run(cfg, pools, **kw):
    """``train(cfg)`` on the module's shared pool (CAD) or on no pool (local)."""
    return train(cfg, pool=pools(cfg) if cfg.train.core_attention == "cad" else None, **kw)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    cfg = tiny(tmp, **{"train.core_attention": "local", "train.tensorboard": True, "train.checkpoint_every": 7})
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def cad_run(tmp_path_factory, pools):
    """CAD on the pool (shared memory), on DeepSpeed's 1F1B schedule (the other CAD runs pool their ticks)."""
    cfg = tiny(tmp_path_factory.mktemp("cad"), **{"train.core_attention": "cad", "train.pipeline_schedule": "1f1b"})
    return cfg, run(cfg, pools)


@pytest.fixture(scope="module")
def inplace_run(tmp_path_factory):
    """CAD with in-place servers, rows by all-to-all over gloo; ``auto`` pools the ticks of both stages, so every
    trainer serves every tick's plan."""
    cfg = tiny(tmp_path_factory.mktemp("inplace"), **{"train.core_attention": "cad", "cluster.data_plane": "inplace",
                                                        "train.checkpoint_every": 7})
    return cfg, train(cfg)


def assert_same_curve(a: list[float], b: list[float], rel: float = 1e-5) -> None:
    assert len(a) == len(b), (len(a), len(b))
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert abs(x - y) <= rel * abs(x), f"step {step}: {x} vs {y}"


def test_cad_matches_local_loss_every_step(local_run, cad_run):
    (_, local), (_, cad) = local_run, cad_run
    assert [r["step"] for r in cad.records] == list(range(STEPS))
    assert len(set(local.losses)) > STEPS // 2, "the loss must move, or parity proves nothing"
    assert_same_curve(local.losses, cad.losses)
    assert all(r["pingpong"] for r in cad.records) and not any(r["pingpong"] for r in local.records)
    # the runs were the real thing: documents crossed rank boundaries and CAD balanced the servers
    assert max(r["attn_load_max_over_mean_planned"] for r in local.records) > 1.2
    assert max(r["attn_load_max_over_mean_planned"] for r in cad.records) < 1.1
    assert all(r["attn_load_max_over_mean_measured"] for r in cad.records)
    # 1F1B has no pooled ticks: no rank waits in a round it has no rows in
    assert all(r["blocked_idle_s_per_rank"] == [0.0] * 4 and r["exposed_comm_active_pct"] == r["exposed_comm_pct"]
               for r in cad.records)


def test_inplace_cad_matches_local_loss_every_step(local_run, inplace_run):
    """In-place attention servers (issue 13): PP=2 x DP=2, the stage's replicas exchange rows by all-to-all."""
    (_, local), (cfg, inplace) = local_run, inplace_run
    assert [r["step"] for r in inplace.records] == list(range(STEPS))
    assert {r["data_plane"] for r in inplace.records} == {"inplace"}
    assert all(r["pingpong"] for r in inplace.records)
    assert {r["pipeline_schedule"] for r in inplace.records} == {"pooled"}  # auto: CAD in place pools
    assert {r["pipeline_schedule"] for r in local.records} == {"1f1b"}  # auto: nothing to pool
    # pooled ticks with ping-pong: in every tick where a stage computes, every rank (computing or serving) ran the
    # stage's one block's attention call as two rounds, one per nano-batch, forward or backward
    for r in inplace.records:
        assert r["plan_trainers"] == cfg.cluster.n_trainers
        for tl in r["timeline_per_rank"]:
            assert {e[6] for e in tl if e[1] != "-" and e[2] != "idle"} == {2}
    assert_same_curve(local.losses, inplace.losses)
    assert max(r["attn_load_max_over_mean_planned"] for r in inplace.records) < 1.1
    # every rank's own server did work every step (busy seconds of 4 in-place servers)
    assert all(len(r["server_busy_s"]) == cfg.cluster.n_trainers and min(r["server_busy_s"]) > 0
               for r in inplace.records)
    assert all(r["exchange_s_per_rank"] and max(r["exchange_s_per_rank"]) >= 0 for r in inplace.records)
    # exposed communication is also reported without the rounds a rank waits in while its stage idles (warm-up and
    # cool-down ticks): every rank idles in some tick of every step, and its wait there is part of blocked_s
    for r in inplace.records:
        assert all(0 < i <= b for i, b in zip(r["blocked_idle_s_per_rank"], r["blocked_s_per_rank"], strict=True))
        assert 0 <= r["exposed_comm_active_pct"] < r["exposed_comm_pct"]


def test_pooled_ticks_with_checkpointing_match_local_loss_every_step(local_run, tmp_path):
    """The pooled, tick-aligned schedule (issue 14) in place, with activation checkpointing: every stage runs the same
    phase in each tick, one plan per tick spans all 4 trainers, stages idle in warm-up and cool-down serve the tick's
    rounds, and each block's forward is recomputed in its B tick under that tick's plan. Loss = 1F1B's, every step.
    Without ping-pong (``inplace_run`` covers pooled ticks with ping-pong). With deferred weight gradients: the
    backward the plan names keeps its linear layers' weight gradients, and the stage computes them in a later tick
    it only serves in, between that tick's rounds."""
    from distca.train.schedule import weight_grad_plan

    _, local = local_run
    cfg = tiny(tmp_path, **{"train.core_attention": "cad", "cluster.data_plane": "inplace",
                            "train.pipeline_schedule": "pooled", "train.activation_checkpointing": True,
                            "train.pingpong": False, "train.defer_weight_grads": True})
    res = train(cfg, run_steps=SHORT)  # the first SHORT steps of the same 20-step schedule
    assert [r["step"] for r in res.records] == list(range(SHORT))
    assert_same_curve(local.losses[:SHORT], res.losses)
    P, M = cfg.train.pipeline_parallel, cfg.train.micro_batches
    last = 2 * (M + 2 * P - 2) - 1  # ticks 0 .. last; tick 2k is pair k's F tick, 2k + 1 its B tick
    for r in res.records:
        assert r["pipeline_schedule"] == "pooled" and r["plan_trainers"] == cfg.cluster.n_trainers  # pooled plans
        ticks = [{e[0]: e for e in tl if e[1] != "-"} for tl in r["timeline_per_rank"]]
        assert all(sorted(t) == list(range(last + 1)) for t in ticks)
        for t in range(last + 1):
            entries = [rank[t] for rank in ticks]
            assert {e[1] for e in entries} == {"F" if t % 2 == 0 else "B"}
            # every rank took part in the same rounds: 1 block per stage, one attention call (F tick); with
            # checkpointing a B tick recomputes the block's forward, then runs its backward (2 rounds)
            rounds = {0} if {e[2] for e in entries} == {"idle"} else {1 if t % 2 == 0 else 2}
            assert {e[6] for e in entries} == rounds, (t, entries)
        stage = r["stage_per_rank"]
        for rank, t in enumerate(ticks):
            # warm-up (tick 0): stage 0 computes micro-batch 0 and stage 1 serves; cool-down (the last B tick):
            # stage 0 runs micro-batch M-1 backward and stage 1 serves; nobody computes in ticks 1 and last - 1
            assert t[0][2] == ("compute" if stage[rank] == 0 else "serve")
            assert t[last][2] == ("compute" if stage[rank] == 0 else "serve")
            assert t[1][2] == t[last - 1][2] == "idle"
            assert all(t[k][5] > 0 for k in (0, last))  # this rank's server worked in those ticks
            assert sum(e[2] == "compute" for e in t.values()) == 2 * M
        # deferred weight gradients: per deferred backward, one job per linear layer of the stage (7 per block, the
        # head on the last stage), run inside the serving tick the plan names, before the optimizer's tail
        plan, per = weight_grad_plan(P, M), cfg.model.n_layers // P
        want = [len(plan.defer[s]) * (7 * per + (s == P - 1)) for s in stage]
        assert r["weight_grads_deferred_per_rank"] == want and sum(want) > 0
        for rank, (spans, tl) in enumerate(zip(r["spans_per_rank"], r["timeline_per_rank"], strict=True)):
            ticks = {e[0]: e for e in tl if e[1] != "-"}
            runs = [ticks[u] for u in plan.runs[stage[rank]]]
            w = [(a, b) for what, a, b in spans if what == "W"]
            assert all(any(e[3] <= a <= b <= e[4] for e in runs) for a, b in w)  # only in those ticks ...
            assert all(any(e[3] <= a <= b <= e[4] for a, b in w) for e in runs)  # ... and in each of them


def test_collective_data_plane_matches_local_every_step(local_run, pools, tmp_path):
    """CAD on the dedicated pool with the rows moving by all-to-all in each stage's data-plane group (the stage's
    trainers and the pool's servers in one gloo group; ZeroMQ only for control): the colocated run's loss at every
    one of its steps. Without ping-pong: each block's attention is one round per micro-batch (the other runs
    cover ping-pong on). On DeepSpeed's 1F1B with deferred weight gradients: stage 1 keeps its last backward's
    (one job per linear layer: its block's 7 and the head) for after its last backward."""
    _, local = local_run
    cfg = tiny(tmp_path, **{"train.core_attention": "cad", "cluster.data_plane": "collective",
                            "cluster.placement": "dedicated", "train.pingpong": False,
                            "train.defer_weight_grads": True})
    res = run(cfg, pools, run_steps=SHORT)  # the first SHORT steps of the same 20-step schedule
    assert [r["data_plane"] for r in res.records] == ["collective"] * SHORT  # no silent fallback
    assert not any(r["pingpong"] for r in res.records)
    assert {r["pipeline_schedule"] for r in res.records} == {"1f1b"}
    assert all(r["weight_grads_deferred_per_rank"] == [0, 0, 8, 8] for r in res.records)
    assert all(sum(what == "W" for what, _, _ in spans) == (stage == 1)  # one flush, before the optimizer
               for r in res.records for spans, stage in zip(r["spans_per_rank"], r["stage_per_rank"], strict=True))
    assert_same_curve(local.losses[:SHORT], res.losses)
    assert max(r["attn_load_max_over_mean_planned"] for r in res.records) < 1.1
    assert all(r["attn_load_max_over_mean_measured"] for r in res.records)  # the servers' busy time, by PING


def test_unequal_stages_on_the_pool_send_nothing_at_the_positions_they_lack(pools, tmp_path):
    """A 3-block model split 2/1 (``train.stage_blocks``) on the pooled ticks over the module's pool (shared memory,
    ping-pong): block position 1's plans hold stage 0's rows only, the servers wait for no one else, and the loss
    equals colocated attention's on the same split (``tests/test_train_split.py`` runs the in-place cases)."""
    over = {"model.n_layers": 3, "train.steps": SHORT, "train.stage_blocks": [2, 1]}
    local = train(tiny(tmp_path / "local", **over, **{"train.core_attention": "local"}))
    cfg = tiny(tmp_path / "cad", **over, **{"train.core_attention": "cad", "cluster.data_plane": "shm",
                                            "train.pipeline_schedule": "pooled"})
    res = run(cfg, pools)
    assert len(set(local.losses)) > SHORT // 2, "the loss must move, or parity proves nothing"
    assert {r["pipeline_schedule"] for r in res.records} == {"pooled"} and {r["data_plane"] for r in res.records} \
        == {"shm"}
    assert all(r["plan_trainers"] == cfg.cluster.n_trainers for r in res.records)
    assert_same_curve(local.losses, res.losses)


def test_resume_from_a_mid_run_checkpoint_continues_the_same_curve_exactly(local_run, tmp_path):
    cfg, straight = local_run
    assert straight.checkpoints == ["step00000007", "step00000014", f"step{STEPS:08d}"]
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(Path(cfg.output_dir) / "checkpoints", ckpt)
    (ckpt / "latest").write_text("step00000014")  # as if the run had stopped after step 14
    resumed = train(tiny(tmp_path, **{"train.core_attention": "local", "train.resume": True,
                                      "train.checkpoint_dir": str(ckpt)}))
    assert (resumed.start_step, resumed.end_step) == (14, STEPS)
    assert resumed.losses == straight.losses[14:]  # bit for bit


def test_pooled_pingpong_resume_continues_the_same_curve_exactly(inplace_run, tmp_path):
    """CAD in place on pooled ticks with ping-pong (the defaults there): resumed from the step-14 checkpoint, the
    run continues bit for bit (the prefetched plans of a resumed run are drawn from the restored data position)."""
    cfg, straight = inplace_run
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(Path(cfg.output_dir) / "checkpoints", ckpt)
    (ckpt / "latest").write_text("step00000014")
    resumed = train(tiny(tmp_path, **{"train.core_attention": "cad", "cluster.data_plane": "inplace",
                                      "train.resume": True, "train.checkpoint_dir": str(ckpt)}))
    assert (resumed.start_step, resumed.end_step) == (14, STEPS)
    assert {r["pipeline_schedule"] for r in resumed.records} == {"pooled"}
    assert all(r["pingpong"] for r in resumed.records)
    assert resumed.losses == straight.losses[14:]  # bit for bit


def test_export_of_a_pipeline_checkpoint_loads_in_transformers(local_run, tmp_path):
    """``distca export`` turns the PP=2 × DP=2 run's last checkpoint into a folder ``transformers`` loads; its
    tensors are the checkpoint's, bit for bit, and its logits on text the run never saw equal ours."""
    import torch
    import transformers

    from distca.cli import main
    from distca.model.core import DocLayout, LocalCoreAttention
    from distca.model.llama import LlamaModel

    cfg, _ = local_run
    ckpt = Path(cfg.output_dir) / "checkpoints"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()

    # ours: the run's model with the tensors of the checkpoint's layer files, read here without the exporter
    tag = ckpt / (ckpt / "latest").read_text().strip()
    assert tag.name == f"step{STEPS:08d}"
    ours = LlamaModel(cfg.model).eval()
    prefixes = ["embed", *(f"blocks.{i}" for i in range(cfg.model.n_layers)), "norm", "head"]
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for i, prefix in enumerate(prefixes):
            for name, t in torch.load(tag / f"layer_{i:02d}-model_states.pt", weights_only=True).items():
                params[f"{prefix}.{name}"].copy_(t)
    assert torch.equal(theirs.model.layers[1].mlp.down_proj.weight, params["blocks.1.mlp.down.weight"])
    assert torch.equal(theirs.lm_head.weight, params["head.weight"])

    text = b"def held_out(x):\n    return sorted(set(x), key=len)[::-1]  # not in the embedded corpus\n"
    tokens = torch.tensor(list(text))
    lay = DocLayout.from_lengths([len(text)])
    with torch.no_grad():
        mine = ours(tokens, lay, LocalCoreAttention(lay))
        hf = theirs(input_ids=tokens[None]).logits[0]
    assert float((mine - hf).abs().max() / hf.abs().max()) <= 1e-5


def test_metrics_files(local_run):
    cfg, _ = local_run
    out = Path(cfg.output_dir)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(STEPS))
    for key in ("loss", "tokens_per_s", "mfu", "exposed_comm_pct", "plan_ms", "peak_rss_mb",
                "attn_load_max_over_mean_planned"):
        assert all(x[key] is not None and x[key] >= 0 for x in lines), key
    assert all(x["tokens"] == 2 * 2 * 256 for x in lines)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"


def test_shortswa_parity_over_windowed_plans(shortswa_local, tmp_path, pools):
    """CAD over windowed plans: the first 4 steps of the shortswa variant's run (``shortswa_local``, colocated),
    again with CAD on the pool."""
    _, local = shortswa_local
    # the bound on open rounds the 4 trainers of the other CAD runs give their servers: the same shared pool
    cad = run(variant_cfg(tmp_path, "shortswa", **{"train.core_attention": "cad", "train.max_server_rounds": 16}),
              pools, run_steps=4)
    assert [r["step"] for r in cad.records] == list(range(4))
    assert_same_curve(local.losses[:4], cad.losses)
    # auto on the CPU is shared memory with the pool (every server on this host); local runs say "local"
    assert [r["data_plane"] for r in cad.records] == ["shm"] * len(cad.records)
    assert all(r["data_plane"] == "local" for r in local.records)


def test_two_node_torchrun_trains_like_a_single_launch(tmp_path, inplace_run):
    """Two torchrun invocations (``--nnodes 2``, node ranks 0 and 1, rendezvous on 127.0.0.1) training with in-place
    attention servers — the GPU cluster's default data plane: no server processes, rows by all-to-all — told the node
    size (``cluster.devices_per_node``), so key rows that both trainers of a node need from the other node cross
    once and are relayed inside the node (the single launch sent every row directly: the same curve)."""
    cad_cfg, single = inplace_run
    result = tmp_path / "rank0.json"
    env = {"NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    cmd = ["bash", "launch/torchrun.sh", same_config(cad_cfg, tmp_path), f"--output_dir={tmp_path / 'tr'}",
           "--cluster.devices_per_node=2", "--run-steps", "4"]
    nodes = [subprocess.Popen([*cmd, *(["--result-json", str(result)] if i == 0 else [])], cwd=ROOT,
                              env={**env, "NODE_RANK": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [n.communicate(timeout=400)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outs)
    assert "| core attention" in outs[0] and "cad in-place" in outs[0]
    assert any(x.startswith("| data plane (as run)") and x.endswith("| inplace |") for x in outs[0].splitlines())
    # pooled ticks in place: the summary also gives exposed communication without the bubble's waits
    assert any(x.startswith("| exposed communication") and "in the ticks where a rank computes" in x
               for x in outs[0].splitlines())
    assert_same_curve(single.losses[:4], json.loads(result.read_text())["losses"])
    records = [json.loads(x) for x in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kv_rows_relayed"] for r in records) > 0, "the run must have relayed key rows"
    assert all(r["kv_rows_relayed"] == 0 for r in single.records)


def same_config(cfg, tmp: Path) -> str:
    """``cfg`` as a YAML file for a launcher's ``--config`` (the very run the launcher is compared with)."""
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def _token_files(tmp: Path) -> str:
    """The embedded corpus written as a token file (the ``tokens`` data source)."""
    from distca.data import EmbeddedCorpus, tokenize_to_file

    tokenize_to_file(EmbeddedCorpus(max_files=400), tmp / "tok")
    return str(tmp / "tok")


def variant_cfg(tmp: Path, residual: str, **over):
    """The variants' run: 24 colocated steps of 2 × 512 tokens on PP=1 × DP=2."""
    return tiny(tmp, **{"model.residual": residual, "model.shortswa_window": 32, "train.steps": 24,
                        "train.tokens_per_rank": 512, "train.core_attention": "local", "cluster.n_trainers": 2,
                        "train.pipeline_parallel": 1, **over})


@pytest.fixture(scope="module")
def shortswa_local(tmp_path_factory):
    """The shortswa variant's run, checked by the variant test (it learns) and the windowed-plan parity test."""
    cfg = variant_cfg(tmp_path_factory.mktemp("shortswa"), "shortswa")
    return cfg, train(cfg)


@pytest.mark.parametrize("residual", ["standard", "shortswa", "ddl"])
def test_each_variant_learns(residual, tmp_path, request):
    """Every residual variant learns. The standard one reads the corpus through a token file, so the
    ``tokens`` data source is shown to feed training too (the embedded corpus feeds the others)."""
    if residual == "shortswa":
        _, res = request.getfixturevalue("shortswa_local")  # shared with the windowed-plan parity test
    else:
        data = {"data.source": "tokens", "data.path": _token_files(tmp_path)} if residual == "standard" else {}
        res = train(variant_cfg(tmp_path, residual, **data))
    # per-step losses are noisy (each step sees different files); compare the start with the last quarter
    first, last = sum(res.losses[:2]) / 2, sum(res.losses[-6:]) / 6
    print(residual, [round(x, 3) for x in res.losses])
    assert first > 4.5  # ~ln(256): bytes start near uniform
    assert last < first - 0.8, f"{residual}: loss {first:.3f} -> {last:.3f}"


def test_activation_checkpointing_trains_exactly_like_without_in_bf16_with_a_tied_head(tmp_path, pools):
    """bf16 CAD training with a tied head: recomputing the blocks in backward (activation checkpointing) gives
    the very same losses as keeping their activations, and the model learns from its N(0, 0.02) start."""
    # 1F1B: a block's recomputation then runs under the very plan of its forward (the pooled schedule recomputes it
    # in the B tick under that tick's plan: the same math, rounded by other kernel calls)
    over = {"train.precision": "bf16", "model.tie_embeddings": True, "train.steps": 4, "train.core_attention": "cad",
            "train.pipeline_schedule": "1f1b"}
    plain = run(tiny(tmp_path / "plain", **over), pools)
    ckpt = run(tiny(tmp_path / "ckpt", **over, **{"train.activation_checkpointing": True}), pools)
    assert ckpt.losses == plain.losses
    assert 4.5 < plain.losses[0] < 6.5 and plain.losses[-1] < plain.losses[0]


def test_bad_data_path_fails_before_anything_starts(tmp_path):
    """A missing token file is a config error naming the key, raised before the attention-server pool or any
    rank starts: the run points at a Ray address where nothing listens, and that is never reached."""
    cfg = tiny(tmp_path, **{"data.source": "tokens", "data.path": str(tmp_path / "missing"),
                            "train.core_attention": "cad", "cluster.ray_address": f"127.0.0.1:{free_port()}"})
    with pytest.raises(ConfigError, match=r"data\.path") as err:
        train(cfg)
    assert "missing" in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unreachable_servers_fail_the_run_not_hang(tmp_path):
    from distca.train.launch import _run_ranks

    cfg = tiny(tmp_path, **{"train.core_attention": "cad", "transport.timeout_s": 3, "train.steps": 2,
                            "cluster.n_trainers": 2, "train.pipeline_parallel": 1})  # 2 ranks are enough to fail
    dead = [f"ipc://{tmp_path}/nobody-{i}.sock" for i in range(4)]
    # in-step recovery (the default) is for servers lost after they served: one that never answers is a setup
    # error, reported at once rather than worked around for the whole run
    with pytest.raises(TrainError, match=r"attention server \d \(ipc://.*nobody-\d\.sock\) never answered within 3 s"):
        _run_ranks(cfg, 2, dead, 0, timeout_s=120, t_start=0.0)


def test_training_from_a_transformers_folder_starts_at_transformers_loss(tmp_path):
    """End to end against the real thing: a Llama 3.1-style model built and saved by Hugging Face
    ``transformers`` (GQA, llama3 rope scaling, 5.x config layout, a shape unlike the run's YAML) starts PP=2 ×
    DP=2 training through ``train.init_from_hf``. The run takes its model from the folder, and the first step's
    loss equals the mean per-replica, per-micro-batch loss ``transformers`` computes over the same packed
    documents, each document on its own — no pipeline, no data parallelism, no splitting at rank boundaries."""
    import torch
    import transformers

    from distca.data import PackedStream
    from distca.data.sources import open_source

    hf_cfg = transformers.LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    torch.manual_seed(11)
    theirs = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    theirs.save_pretrained(tmp_path / "hf")
    cfg = tiny(tmp_path, **{"train.core_attention": "local", "train.steps": 1,
                            "train.init_from_hf": str(tmp_path / "hf")})
    res = train(cfg)

    stream = PackedStream(open_source("embedded"), cfg.data_parallel, cfg.train.tokens_per_rank, cfg.seed)
    per_micro = []
    with torch.no_grad():
        for _ in range(cfg.train.micro_batches):
            mb = stream.next_micro_batch()
            tokens = torch.from_numpy(np.concatenate(mb.tokens)).long()
            labels = torch.from_numpy(np.concatenate(mb.labels)).long()
            logits = torch.cat([theirs(input_ids=doc[None]).logits[0]
                                for doc in tokens.split(list(mb.packed.doc_lengths))])
            ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
            ranks = zip(ce.split(cfg.train.tokens_per_rank), labels.split(cfg.train.tokens_per_rank), strict=True)
            per_micro.append(sum(float(c[y != -100].mean()) for c, y in ranks) / cfg.data_parallel)
    expected = sum(per_micro) / len(per_micro)
    assert abs(res.losses[0] - expected) <= 1e-5 * expected, (res.losses[0], expected)
