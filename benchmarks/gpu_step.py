"""One GPU, bf16: a training step of the Llama-3-8B shape (a few layers) with core attention local vs
through an attention server on the same GPU, plus the calibration numbers the cluster simulator needs.

Measurements (each the median of timed iterations after warm-up, the device synchronised around every
call; each one guarded: a failure is recorded and the next one still runs):

``matmul``      achieved bf16 GEMM rate on an 8192³ matmul (1024³ with ``--small``).
``attention``   core attention forward and forward+backward over the packed documents (one layer's
                q/k/v), with exact pair counts → TFLOP/s; with ``--calibration`` also what the fitted
                cost model predicts for the same documents.
``linear``      the N decoder blocks forward+backward with a no-op core attention (projections, MLP,
                norms, RoPE): time per token per layer and the forward FLOP rate the simulator charges.
``local``       the N-layer model (embeddings, blocks, head, cross-entropy) forward+backward, core
                attention local (the varlen kernel on this device).
``model_noop``  the same model with a no-op core attention (so ``local - model_noop`` is N layers of
                attention, and ``model_noop - linear`` the embeddings, head and loss).
``cad_inplace`` the same model with CAD through an IN-PLACE attention server: this process is the plan's
                trainer and its server (``distca.runtime.inplace``; world size 1, so no collective runs:
                rows for the own server are gathered into its buffers, the plan's local tasks run as one
                varlen call). Target: <= 1.05x ``local``.
``cad``         the same model with core attention through ONE attention server process on the SAME
                device (``ServerConfig.device``, ipc transport, host staging), planned by
                ``make_plan`` for 1 trainer and 1 server; with the trainer's blocked time and the
                server's busy time per step.

Correctness: the loss and one weight gradient of ``local`` and ``cad`` (same parameters, same data)
are compared once; the relative differences are printed and recorded.

Documents: ``--tokens`` tokens (default 32768) drawn from the ``pretrain`` length distribution with
``upsample_long`` and ``elongate`` (default 4 × tokens/32768, so a 32K pack holds documents of 8-17K
tokens), seeded, packed as one sequence.

Results: ``$OUT/gpu_step.json`` when ``OUT`` is set, else ``out/gpu_step/gpu_step.json``; a markdown
table is printed last. ``--budget-s`` bounds the run: measurements that would start past it are skipped.

CPU dry run (tiny shape, any machine)::

    python benchmarks/gpu_step.py --device cpu --dtype float32 --small

Kernel benchmarks through the same backend check (used by ``benchmarks/gpu_check.sh``)::

    python benchmarks/gpu_step.py kernels calibrate --device cuda --dtype bfloat16

The backend check runs the resolved attention backend (the library's, unpatched) on a tiny GQA case
(full causal and a window) against the fp64 reference; the JSON records the result and the schemas of
torch's private varlen ops, whose argument lists differ between torch releases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import distca  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO_ROOT, fmt_ms, markdown_table, run_info, synchronize

from distca.attention import backward as attn_backward
from distca.attention import forward as attn_forward
from distca.attention import resolve_backend, varlen_attention
from distca.attention.cost import cum_pairs

GiB = 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# attention backend check
# ----------------------------------------------------------------------------------------------


def _op(namespace: str, name: str):
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def op_schemas() -> dict[str, str]:
    """The schemas of the private varlen ops this torch has (recorded for the record)."""
    out = {}
    for ns, name in (("torch_attn", "_varlen_attn"), ("torch_attn", "_varlen_attn_backward"),
                     ("aten", "_flash_attention_forward"), ("aten", "_flash_attention_backward")):
        op = _op(ns, name)
        try:
            out[f"{ns}::{name}"] = str(op.default._schema) if op is not None else "absent"
        except Exception as exc:
            out[f"{ns}::{name}"] = f"unreadable: {exc}"
    return out


def probe_backend(name: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Run backend ``name`` on a tiny GQA case (full causal and a 64-key window) against fp64 reference
    attention; ``{"full": error or None, "window": error or None, "err": {...}}``."""
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    gen = torch.Generator().manual_seed(0)
    lens = [200, 37, 300]
    total, h, hkv, d = sum(lens), 4, 2, 128
    cu_host = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
    mk = lambda heads: torch.randn(total, heads, d, generator=gen)  # noqa: E731
    q64, k64, v64, do64 = mk(h).double(), mk(hkv).double(), mk(hkv).double(), mk(h).double()
    q, k, v, do = (t.to(device, dtype) for t in (q64, k64, v64, do64))
    cu = cu_host.to(device)
    result: dict[str, Any] = {"err": {}}
    for label, window in (("full", -1), ("window", 64)):
        try:
            args = (cu, cu, max(lens), max(lens))
            out, lse = attn_forward(q, k, v, *args, window=window, backend=name)
            grads = attn_backward(q, k, v, out, lse, do, *args, window=window, backend=name)
            synchronize(device)
            rargs = (cu_host, cu_host, max(lens), max(lens))
            rout, rlse = attn_forward(q64, k64, v64, *rargs, window=window, backend="reference")
            rgrads = attn_backward(q64, k64, v64, rout, rlse, do64, *rargs, window=window, backend="reference")
            errs = {}
            for nm, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (rout, *rgrads), strict=True):
                errs[nm] = float((a.double().cpu() - b).abs().max() / max(float(b.abs().max()), 1.0))
            errs["lse"] = float((lse.double().cpu() - rlse).abs().max())
            result["err"][label] = errs
            worst = max(errs.values())
            result[label] = None if worst <= tol else f"max normwise error {worst:.3g} > {tol:g}"
        except Exception as exc:
            result[label] = f"{type(exc).__name__}: {exc}"[:600]
    return result


def ensure_backend(requested: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Resolve the attention backend and check it against the fp64 reference (``ok``, ``window_ok``)."""
    info: dict[str, Any] = {"requested": requested}
    try:
        name = resolve_backend(requested, device, dtype).name
    except Exception as exc:
        info.update(name=None, error=f"{type(exc).__name__}: {exc}")
        return info
    info["name"] = name
    info["probe"] = probe_backend(name, device, dtype)
    if info["probe"].get("full") is not None and name == "torch_varlen":
        info["schemas"] = op_schemas()
    info["ok"] = info["probe"].get("full") is None
    info["window_ok"] = info["probe"].get("window") is None
    return info


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed


def timed(fn, device: torch.device, warmup: int, reps: int, budget: Budget, cap_s: float,
          after_warmup=None) -> dict[str, Any]:
    """Warm-up then timed calls of ``fn``; stops early when this measurement used ``cap_s`` or the run's
    budget is spent (at least one timed call always runs). ``after_warmup()`` runs between the two."""
    start = time.perf_counter()
    done_warmup = 0
    for _ in range(warmup):
        synchronize(device)
        fn()
        synchronize(device)
        done_warmup += 1
        if time.perf_counter() - start > cap_s / 2 or budget.left < 0:
            break
    if after_warmup is not None:
        after_warmup()
    samples = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
        if time.perf_counter() - start > cap_s or budget.left < 0:
            break
    return {"median_s": statistics.median(samples), "samples_s": samples, "warmup": done_warmup}


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------
# the model and its data
# ----------------------------------------------------------------------------------------------


class NoopCore:
    """A core attention that costs nothing but keeps every projection in the graph: ``out = q`` plus a
    zero that depends on k and v (so their projections get (zero) gradients and run their backward)."""

    def __call__(self, q, k, v, window: int = -1):
        return q + (k.sum() + v.sum()) * 0.0


def model_config(args):
    from distca.config import ModelConfig

    if args.small:
        return ModelConfig(n_layers=args.layers, hidden=256, n_heads=8, n_kv_heads=2, ffn_hidden=688,
                           vocab_size=1024)
    return ModelConfig(n_layers=args.layers, hidden=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                       vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)


def doc_lengths(args) -> list[int]:
    from distca.data.distributions import LengthDistribution

    elongate = args.elongate if args.elongate is not None else 4.0 * args.tokens / 32768
    dist = LengthDistribution(args.dist, upsample_long=args.upsample_long, elongate=elongate)
    return [int(x) for x in dist.sample(total_tokens=args.tokens, seed=args.seed)]


def linear_params_per_layer(cfg) -> int:
    """Weights every token multiplies through in one standard block (the simulator's count)."""
    from distca.train.flops import block_linear_params

    return block_linear_params(cfg)[1]


def pair_total(lengths: list[int]) -> int:
    return sum(cum_pairs(n) for n in lengths)


# ----------------------------------------------------------------------------------------------
# the attention server on the same device
# ----------------------------------------------------------------------------------------------




# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.budget = Budget(args.budget_s)
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []

    def guarded(self, name: str, fn, min_left_s: float = 5.0) -> None:
        """Run measurement ``name``; record its result, its error, or that the budget skipped it."""
        if name in self.args.skip:
            self.results[name] = {"ok": False, "skipped": "--skip"}
            return
        if self.budget.left < min_left_s:
            self.results[name] = {"ok": False, "skipped": f"budget: {self.budget.elapsed:.0f} s of "
                                                          f"{self.args.budget_s:.0f} s used"}
            print(f"[{name}] skipped: over the budget", file=sys.stderr)
            return
        t0 = time.perf_counter()
        print(f"[{name}] start at {self.budget.elapsed:.1f} s", file=sys.stderr, flush=True)
        try:
            res = fn()
            res = {"ok": True, **res}
        except Exception as exc:
            tb = traceback.format_exc()
            print(tb, file=sys.stderr)
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": tb[-4000:]}
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:500])
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        self.results[name] = res
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{name}] {'ok' if res['ok'] else 'FAILED'} after {res['wall_s']} s", file=sys.stderr, flush=True)

    # -- measurements ------------------------------------------------------------------------------
    def matmul(self) -> dict[str, Any]:
        n = self.args.matmul_n or (1024 if self.args.small or self.device.type == "cpu" else 8192)
        gen = torch.Generator(device=self.device).manual_seed(0)
        a = torch.randn(n, n, device=self.device, generator=gen).to(self.dtype)
        b = torch.randn(n, n, device=self.device, generator=gen).to(self.dtype)
        t = timed(lambda: a @ b, self.device, 3, 20, self.budget, 10.0)
        return {"n": n, **t, "tflops": 2 * n**3 / t["median_s"] / 1e12}

    def attention(self) -> dict[str, Any]:
        cfg, lengths, dev = self.cfg, self.lengths, self.device
        total = sum(lengths)
        gen = torch.Generator(device=dev).manual_seed(1)
        mk = lambda h: torch.randn(total, h, cfg.head_dim, device=dev, generator=gen).to(self.dtype)  # noqa: E731
        q, k, v, do = mk(cfg.n_heads), mk(cfg.n_kv_heads), mk(cfg.n_kv_heads), mk(cfg.n_heads)
        cu, m = self.layout.cu_seqlens, self.layout.max_len
        args = (cu, cu, m, m)
        fwd = timed(lambda: attn_forward(q, k, v, *args, backend=self.backend), dev, 2, 10, self.budget, 15.0)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def fwd_bwd():
            out, _ = varlen_attention(qg, kg, vg, *args, backend=self.backend)
            out.backward(do)
            qg.grad = kg.grad = vg.grad = None

        fb = timed(fwd_bwd, dev, 2, 10, self.budget, 20.0)
        pairs = pair_total(lengths)
        flops_fwd = 4 * cfg.head_dim * cfg.n_heads * pairs
        res = {"pairs": pairs, "fwd": fwd, "fwd_bwd": fb, "fwd_s": fwd["median_s"], "fwd_bwd_s": fb["median_s"],
               "bwd_s": fb["median_s"] - fwd["median_s"], "fwd_tflops": flops_fwd / fwd["median_s"] / 1e12,
               "fwd_bwd_tflops": 3.5 * flops_fwd / fb["median_s"] / 1e12,
               "flops_convention": "fwd 4·d·h·pairs, bwd 2.5× fwd"}
        if self.calibration is not None:
            from distca.attention import CostModel
            from distca.attention.cost import AttentionShape, CalibrationTable

            model = CostModel.from_table(CalibrationTable(**self.calibration),
                                         AttentionShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim))
            ql = np.asarray(lengths)
            pf = float(model.time_s(ql, ql, -1, "fwd").sum())
            pb = float(model.time_s(ql, ql, -1, "bwd").sum())
            res.update(predicted_fwd_s=pf, predicted_bwd_s=pb, predicted_fwd_rel_err=(pf - fwd["median_s"])
                       / fwd["median_s"], predicted_fwd_bwd_rel_err=(pf + pb - fb["median_s"]) / fb["median_s"])
        return res

    def linear(self) -> dict[str, Any]:
        from distca.model.layers import rope_cos_sin

        cfg, dev, model = self.cfg, self.device, self.model
        t = sum(self.lengths)
        gen = torch.Generator(device=dev).manual_seed(2)
        x = torch.randn(t, cfg.hidden, device=dev, generator=gen).to(self.dtype).requires_grad_()
        cos, sin = rope_cos_sin(self.layout.position_ids, cfg.head_dim, cfg.rope_theta, self.dtype)
        core = NoopCore()
        reset_peak(dev)

        def step():
            model.zero_grad(set_to_none=True)
            x.grad = None
            h = x
            for block in model.blocks:
                h = block(h, core, cos, sin)
            h.square().mean().backward()

        res = timed(step, dev, self.args.warmup, self.args.reps, self.budget, 30.0)
        fwd_flops = 2 * linear_params_per_layer(cfg) * t * cfg.n_layers
        return {**res, "s_per_token_per_layer": res["median_s"] / (t * cfg.n_layers),
                "fwd_flops_per_token_per_layer": 2 * linear_params_per_layer(cfg),
                "linear_flops": 3 * fwd_flops / res["median_s"], "peak_mem_gib": peak_gib(dev),
                "what": "decoder blocks only (no embeddings/head), no-op core attention, fwd + bwd; linear_flops = "
                        "model forward FLOPs rate with backward charged 2x (the simulator's Hardware.linear_flops)"}

    def model_step(self, core, keep: str | None = None, after_warmup=None) -> dict[str, Any]:
        """Timed full-model forward+backward with ``core``; with ``keep``, also the loss and a weight
        gradient of the first call (for the local-vs-CAD comparison)."""
        model, dev = self.model, self.device
        reset_peak(dev)
        first: dict[str, Any] = {}

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(self.tokens, self.layout, core)
            loss = torch.nn.functional.cross_entropy(logits, self.labels, ignore_index=-100)
            del logits
            loss.backward()
            if keep is not None and not first:
                first["loss"] = float(loss.detach())
                first["grad"] = model.blocks[0].attn.q.weight.grad.detach().float().clone()

        res = timed(step, dev, self.args.warmup, self.args.reps, self.budget, 60.0, after_warmup)
        res["peak_mem_gib"] = peak_gib(dev)
        if keep is not None:
            self.kept[keep] = first
            res["loss"] = first.get("loss")
        return res

    def cad(self) -> dict[str, Any]:
        from distca.attention.cost import AttentionShape
        from distca.config import ClusterConfig, DistCAConfig, TrainConfig, TransportSection
        from distca.parts import scheduler_settings, server_settings
        from distca.runtime.client import CADClient
        from distca.scheduler import BatchLayout, Placement, make_plan
        from distca.server.processes import server_processes

        cfg, args = self.cfg, self.args
        # One trainer and one server on this device, settings built as a training run builds them.
        run = DistCAConfig(model=cfg, cluster=ClusterConfig(n_trainers=1, n_servers=1, placement="colocated"),
                           transport=TransportSection(timeout_s=args.transport_timeout_s),
                           train=TrainConfig(pipeline_parallel=1, tokens_per_rank=sum(self.lengths)))
        esize = torch.empty((), dtype=self.dtype).element_size()
        plan, timing = make_plan(BatchLayout.from_ranks([self.lengths]), Placement(1, 1, "colocated"),
                                 dataclasses.replace(scheduler_settings(run, -1), eps=args.eps),
                                 AttentionShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, esize))
        scfg = dataclasses.replace(server_settings(run), name="gpu-step-server", dtype=args.dtype,
                                   backend=self.backend, device=str(self.device))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with server_processes(1, scfg, args.server_start_timeout_s) as server:
            client = CADClient(0, server.addresses, scfg.transport, backend=self.backend)
            try:
                return self._cad_steps(client, plan, timing, esize, server.start_s)
            finally:
                client.close()

    def cad_inplace(self) -> dict[str, Any]:
        """CAD with an in-place attention server: this process is the plan's trainer and its server (world 1,
        so no collective runs; with more GPUs the rows for other servers move by one NCCL all-to-all)."""
        from distca.attention.cost import AttentionShape
        from distca.config import ClusterConfig, DistCAConfig, TrainConfig
        from distca.parts import scheduler_settings
        from distca.runtime.cad_attention import CADCoreAttention
        from distca.runtime.inplace import InPlaceClient
        from distca.scheduler import BatchLayout, Placement, make_plan
        from distca.server.exchange import GroupRoles, RowExchange, RowFormat

        cfg, args = self.cfg, self.args
        run = DistCAConfig(model=cfg, cluster=ClusterConfig(n_trainers=1, n_servers=1, placement="colocated"),
                           train=TrainConfig(pipeline_parallel=1, tokens_per_rank=sum(self.lengths)))
        esize = torch.empty((), dtype=self.dtype).element_size()
        plan, timing = make_plan(BatchLayout.from_ranks([self.lengths]), Placement(1, 1, "colocated"),
                                 dataclasses.replace(scheduler_settings(run, -1), eps=args.eps),
                                 AttentionShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, esize))
        fmt = RowFormat(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.dtype)
        client = InPlaceClient(RowExchange(None, GroupRoles.inplace(1, 0), fmt, self.device), backend=self.backend)
        mark: dict[str, float] = {}

        def after_warmup():
            mark.update(blocked_s=client.blocked_s, busy_s=client.busy_s, attn_s=client.attn_s)

        res = self.model_step(CADCoreAttention(client, {-1: plan}), keep="cad_inplace", after_warmup=after_warmup)
        calls = len(res["samples_s"])
        res.update(blocked_s=(client.blocked_s - mark["blocked_s"]) / calls,
                   server_busy_s=(client.busy_s - mark["busy_s"]) / calls,
                   attn_s=(client.attn_s - mark["attn_s"]) / calls, buffer_bytes=client.x.nbytes(),
                   per="timed step (all layers), mean over the timed steps",
                   plan={"n_tasks": int(plan.task_server.size), "local_tasks": int((plan.task_server < 0).sum()),
                         "plan_ms": timing.plan_ms, "placement": "in-place, 1 trainer = 1 server", "eps": args.eps})
        return res

    def _cad_steps(self, client, plan, timing, esize: int, server_start_s: float) -> dict[str, Any]:
        from distca.runtime.cad_attention import CADCoreAttention

        cfg, args = self.cfg, self.args
        core = CADCoreAttention(client, {-1: plan})
        mark: dict[str, Any] = {}

        def after_warmup():  # count the timed steps only (the first one registers the plan, grows buffers)
            mark.update(client.ping(0), blocked_s=client.blocked_s)

        res = self.model_step(core, keep="cad", after_warmup=after_warmup)
        after = client.ping(0)
        calls = len(res["samples_s"])
        res.update(
            blocked_s=(client.blocked_s - mark["blocked_s"]) / calls,
            server_busy_s=(after["busy_s"] - mark["busy_s"]) / calls,
            server_stage_s=(after.get("stage_s", 0.0) - mark.get("stage_s", 0.0)) / calls,
            server_rounds=after["served"] - mark["served"], server=after, server_start_s=server_start_s,
            per="timed step (all layers), mean over the timed steps",
            plan={"n_tasks": int(plan.task_server.size), "plan_ms": timing.plan_ms,
                  "compile_ms": timing.compile_ms, "placement": "colocated, 1 trainer, 1 server",
                  "eps": args.eps},
            bytes_per_layer_fwd=int(sum(self.lengths) * esize * cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads)
                                    + sum(self.lengths) * (esize * cfg.head_dim + 4) * cfg.n_heads))
        return res

    # -- driver ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from distca.model import DocLayout, LlamaModel, LocalCoreAttention
        from distca.model.llama import next_token_labels

        args, dev = self.args, self.device
        print(f"gpu_step: device {dev}, dtype {args.dtype}, {args.layers} layers, {args.tokens} tokens, "
              f"budget {args.budget_s:.0f} s", file=sys.stderr, flush=True)
        self.backend_info = ensure_backend(args.backend, dev, self.dtype)
        self.backend = self.backend_info.get("name") or args.backend
        print(f"attention backend: {json.dumps({k: v for k, v in self.backend_info.items() if k != 'schemas'})}",
              file=sys.stderr, flush=True)
        self.calibration = None
        if args.calibration:
            try:
                self.calibration = json.loads(Path(args.calibration).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                self.errors.append(f"calibration table {args.calibration}: {exc}")
        self.cfg = model_config(args)
        self.lengths = doc_lengths(args)
        base = DocLayout.from_lengths(self.lengths)
        self.layout = DocLayout(base.cu_seqlens.to(dev), base.max_len, base.position_ids.to(dev))
        gen = torch.Generator().manual_seed(args.seed)
        self.tokens = torch.randint(0, self.cfg.vocab_size, (args.tokens,), generator=gen).to(dev)
        self.labels = next_token_labels(self.tokens, self.layout)
        self.kept: dict[str, dict] = {}

        self.guarded("matmul", self.matmul)
        self.guarded("attention", self.attention)
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        with torch.device(dev):
            self.model = LlamaModel(self.cfg)
        self.model.to(self.dtype)
        build_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in self.model.parameters())
        self.guarded("linear", self.linear)
        self.guarded("local", lambda: self.model_step(LocalCoreAttention(self.layout, backend=self.backend),
                                                      keep="local"))
        self.guarded("cad_inplace", self.cad_inplace)
        self.guarded("cad", self.cad, min_left_s=20.0)
        self.guarded("model_noop", lambda: self.model_step(NoopCore()))
        return self.report(build_s, n_params)

    def report(self, build_s: float, n_params: int) -> dict[str, Any]:
        args, cfg, r = self.args, self.cfg, self.results
        correctness: dict[str, Any] = {}
        loc, cad = self.kept.get("local", {}), self.kept.get("cad", {})
        inp = self.kept.get("cad_inplace", {})
        if "loss" in loc and "loss" in inp:
            correctness["loss_inplace"] = inp["loss"]
            correctness["loss_rel_diff_inplace"] = abs(inp["loss"] - loc["loss"]) / max(abs(loc["loss"]), 1e-30)
            correctness["grad_rel_diff_inplace"] = float((inp["grad"] - loc["grad"]).norm()
                                                         / loc["grad"].norm().clamp_min(1e-30))
        if "loss" in loc and "loss" in cad:
            correctness["loss_local"], correctness["loss_cad"] = loc["loss"], cad["loss"]
            correctness["loss_rel_diff"] = abs(cad["loss"] - loc["loss"]) / max(abs(loc["loss"]), 1e-30)
            g0, g1 = loc["grad"], cad["grad"]
            correctness["grad_rel_diff"] = float((g1 - g0).norm() / g0.norm().clamp_min(1e-30))
            correctness["grad_param"] = "blocks.0.attn.q.weight"
            tol = 2e-2 if self.dtype in (torch.bfloat16, torch.float16) else 1e-4
            correctness["tolerance"] = tol
            correctness["ok"] = correctness["loss_rel_diff"] <= tol and correctness["grad_rel_diff"] <= tol
            print(f"correctness: loss local {loc['loss']:.6f} cad {cad['loss']:.6f} rel diff "
                  f"{correctness['loss_rel_diff']:.3g}; grad ({correctness['grad_param']}) rel diff "
                  f"{correctness['grad_rel_diff']:.3g} (tolerance {tol:g})", file=sys.stderr)
        derived: dict[str, Any] = {}
        ok = lambda k: r.get(k, {}).get("ok")  # noqa: E731
        if ok("local") and ok("model_noop"):
            derived["attention_in_step_s"] = r["local"]["median_s"] - r["model_noop"]["median_s"]
        if ok("model_noop") and ok("linear"):
            derived["embed_head_loss_s"] = r["model_noop"]["median_s"] - r["linear"]["median_s"]
        if ok("local") and ok("cad_inplace"):
            derived["cad_inplace_over_local"] = r["cad_inplace"]["median_s"] / r["local"]["median_s"]
        if ok("local") and ok("cad"):
            derived["cad_over_local"] = r["cad"]["median_s"] / r["local"]["median_s"]
            derived["cad_exposed_comm_frac"] = r["cad"]["blocked_s"] / r["cad"]["median_s"]
        sim: dict[str, Any] = {"name": f"{run_info(self.device).get('device_name', str(self.device))} (gpu_step)"}
        if ok("linear"):
            sim["linear_flops"] = r["linear"]["linear_flops"]
            sim["linear_source"] = (f"gpu_step.py: {cfg.n_layers} Llama blocks (hidden {cfg.hidden}, ffn "
                                    f"{cfg.ffn_hidden}) fwd+bwd over {sum(self.lengths)} tokens, {args.dtype}")
        if self.calibration is not None:
            sim["attention_table"] = self.calibration
            sim["attention_table_path"] = args.calibration
        if ok("matmul"):
            sim["matmul_tflops"] = r["matmul"]["tflops"]
        if ok("attention"):
            sim["attention_fwd_bwd_tflops"] = r["attention"]["fwd_bwd_tflops"]
        info = run_info(self.device, dtype=args.dtype, layers=cfg.n_layers, tokens=args.tokens, small=args.small,
                        backend=self.backend, budget_s=args.budget_s)
        return {
            "info": info, "backend": self.backend_info,
            "model": {"n_layers": cfg.n_layers, "hidden": cfg.hidden, "n_heads": cfg.n_heads,
                      "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "ffn_hidden": cfg.ffn_hidden,
                      "vocab_size": cfg.vocab_size, "params": n_params, "build_s": build_s},
            "docs": {"distribution": args.dist, "upsample_long": args.upsample_long,
                     "elongate": args.elongate if args.elongate is not None else 4.0 * args.tokens / 32768,
                     "seed": args.seed, "lengths": self.lengths, "n_docs": len(self.lengths),
                     "max_len": max(self.lengths), "pairs": pair_total(self.lengths)},
            "measurements": r, "derived": derived, "correctness": correctness, "sim": sim,
            "errors": self.errors, "elapsed_s": round(self.budget.elapsed, 1),
            "step": "forward + backward (no optimizer step)",
        }


def table(report: dict[str, Any]) -> list[str]:
    r = report["measurements"]
    rows = []

    def ms(res, key="median_s"):
        return fmt_ms(res.get(key)) if res.get("ok") else ("skipped" if res.get("skipped") else "FAILED")

    def row(name, res, what, key="median_s", extra=""):
        res = res or {}
        if not res.get("ok"):
            extra = res.get("skipped") or (res.get("error", "")[:80].replace("|", "/"))
        rows.append([name, ms(res, key), what, extra])

    m = r.get("matmul", {})
    row("matmul", m, f"{m.get('n', '?')}³ GEMM", extra=f"{m.get('tflops', 0):.3g} TFLOP/s" if m.get("ok") else "")
    a = r.get("attention", {})
    row("attention fwd", a, "packed docs, one layer", "fwd_s",
        f"{a.get('fwd_tflops', 0):.3g} TFLOP/s" if a.get("ok") else "")
    pred = ""
    if a.get("ok") and "predicted_fwd_bwd_rel_err" in a:
        pred = f"; cost model {100 * a['predicted_fwd_bwd_rel_err']:+.0f}%"
    row("attention fwd+bwd", a, "packed docs, one layer", "fwd_bwd_s",
        (f"{a.get('fwd_bwd_tflops', 0):.3g} TFLOP/s" + pred) if a.get("ok") else "")
    li = r.get("linear", {})
    row("linear (blocks)", li, "blocks fwd+bwd, no-op attention",
        extra=(f"{1e9 * li['s_per_token_per_layer']:.3g} ns/token/layer, {li['linear_flops'] / 1e12:.3g} TFLOP/s"
               if li.get("ok") else ""))
    lo = r.get("local", {})
    row("step local", lo, "model fwd+bwd, local attention",
        extra=f"loss {lo.get('loss', float('nan')):.4f}" + (f", peak {lo['peak_mem_gib']:.1f} GiB" if
                                                            lo.get("peak_mem_gib") is not None else "")
        if lo.get("ok") else "")
    ci = r.get("cad_inplace", {})
    row("step CAD in-place", ci, "model fwd+bwd, in-place server (this process)",
        extra=(f"server busy {fmt_ms(ci['server_busy_s'])} ms, blocked {fmt_ms(ci['blocked_s'])} ms, "
               f"{ci['plan']['local_tasks']}/{ci['plan']['n_tasks']} tasks local") if ci.get("ok") else "")
    c = r.get("cad", {})
    row("step CAD", c, "model fwd+bwd, 1 server same GPU",
        extra=(f"blocked {fmt_ms(c['blocked_s'])} ms, server busy {fmt_ms(c['server_busy_s'])} ms "
               f"(staging {fmt_ms(c['server_stage_s'])} ms)") if c.get("ok") else "")
    n = r.get("model_noop", {})
    row("step no-op attention", n, "model fwd+bwd, no attention")
    cor = report.get("correctness", {})
    lines = markdown_table(["measurement", "median ms", "what", "notes"], rows)
    if cor:
        lines += ["", f"local vs CAD: loss rel diff {cor['loss_rel_diff']:.3g}, grad rel diff "
                      f"{cor['grad_rel_diff']:.3g} (tolerance {cor['tolerance']:g}): "
                      f"{'OK' if cor['ok'] else 'MISMATCH'}"]
    d = report.get("derived", {})
    if d:
        lines += ["", "derived: " + ", ".join(f"{k}={v:.4g}" for k, v in d.items())]
    return lines


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="benchmarks/gpu_step.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if gpu else "cpu", help="cuda, cuda:N or cpu (default: cuda if any)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", default="auto", help="attention backend (default auto; the resolved one is recorded)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; 1 with --small)")
    p.add_argument("--tokens", type=int, default=None, help="packed tokens (default 32768; 2048 with --small)")
    p.add_argument("--small", action="store_true", help="a tiny model shape (hidden 256, 8/2 heads) for CPU runs")
    p.add_argument("--dist", default="pretrain", help="document length distribution (default pretrain)")
    p.add_argument("--upsample-long", type=float, default=4.0, help="upsample_long of the distribution (4)")
    p.add_argument("--elongate", type=float, default=None, help="elongation factor (default 4 × tokens/32768)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps", type=float, default=0.05, help="scheduler ε of the CAD plan")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model measurement (1)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per model measurement, median kept (3)")
    p.add_argument("--matmul-n", type=int, default=None, help="GEMM size (default 8192; 1024 on CPU/--small)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="skip measurements that would start after this many seconds (240)")
    p.add_argument("--skip", default="", help="comma list of measurements to skip "
                                              "(matmul,attention,linear,local,cad_inplace,cad,model_noop)")
    p.add_argument("--calibration", default=None, help="a CalibrationTable JSON (benchmarks/kernels.py calibrate) "
                                                       "to compare against and embed in the simulator block")
    p.add_argument("--transport-timeout-s", type=float, default=120.0, help="per-reply timeout of the CAD client")
    p.add_argument("--server-start-timeout-s", type=float, default=120.0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_step.json or out/gpu_step/gpu_step.json)")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    args.dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    args.layers = args.layers or (1 if args.small else 2)
    args.tokens = args.tokens or (2048 if args.small else 32768)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.layers < 1 or args.tokens < 2:
        raise SystemExit("--layers must be >= 1 and --tokens >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def out_path(args) -> Path:
    if args.out:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_step.json"
    return REPO_ROOT / "out" / "gpu_step" / "gpu_step.json"


def run_kernels(argv: list[str]) -> int:
    """``gpu_step.py kernels <mode> [flags]``: benchmarks/kernels.py behind the backend check (windowed
    calibration shapes dropped when windows fail)."""
    import kernels

    args = kernels.build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        dtype = DTYPES[args.dtype or "bfloat16"]
        info = ensure_backend(args.backend, device, dtype)
        print(f"backend check: {json.dumps({k: v for k, v in info.items() if k != 'schemas'})}", file=sys.stderr)
        if info.get("schemas"):
            print("op schemas:\n  " + "\n  ".join(f"{k}: {v}" for k, v in info["schemas"].items()), file=sys.stderr)
        if args.mode == "calibrate" and info.get("ok") and not info.get("window_ok") and "--windows" not in argv:
            print("windowed attention fails on this torch: calibrating full-causal shapes only", file=sys.stderr)
            argv = [*argv, "--windows", ""]
    return kernels.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kernels"]:
        return run_kernels(argv[1:])
    if argv[:1] == ["probe"]:
        dev = torch.device(argv[1] if len(argv) > 1 else "cuda")
        info = ensure_backend("auto", dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        info.setdefault("schemas", op_schemas())
        print(json.dumps(info, indent=1))
        return 0 if info.get("ok") else 1
    args = resolve_args(argv)
    run = Run(args)
    try:
        report = run.run()
    except Exception as exc:  # setup failed: still write what we have
        traceback.print_exc()
        report = {"fatal": f"{type(exc).__name__}: {exc}", "measurements": run.results, "errors": run.errors,
                  "backend": getattr(run, "backend_info", None)}
    path = out_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    if "fatal" in report:
        print(f"gpu_step: FATAL {report['fatal']}")
        return 1
    lines = [f"### GPU step — {report['info'].get('device_name', report['info']['device'])}, {args.dtype}, "
             f"{report['model']['n_layers']} layers of hidden {report['model']['hidden']}, {args.tokens} tokens "
             f"({report['docs']['n_docs']} docs, longest {report['docs']['max_len']}), backend {run.backend}", "",
             *table(report)]
    print("\n".join(lines))
    failed = [k for k, v in report["measurements"].items() if not v.get("ok") and not v.get("skipped")]
    bad = report["correctness"] and not report["correctness"].get("ok")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
