"""Calibrate the simulator on this machine: time the pieces a step is made of, with the threads a rank
uses, and return a :class:`~distca.sim.hardware.Hardware` for it.

Measured (medians after a warm-up):

- **linear**: one decoder block forward and backward with a no-op core attention, at two token
  counts; a line ``overhead + flops / rate`` through them gives the per-call overhead and the achieved
  rate (backward is charged twice the forward FLOPs, so its own overhead absorbs the rest);
- **attention**: single tasks over a small grid of ``(q_len, kv_len)`` through the graph-free kernels,
  as a :class:`~distca.attention.CalibrationTable` (what ``benchmarks/kernels.py calibrate`` writes);
- **optimizer**: one AdamW step over a flat parameter tensor, per parameter;
- **links**: a ZeroMQ ``ipc`` round trip between two sockets of this process (latency) and a stream of
  1 MiB messages (bandwidth) — the path trainers and servers use on one host;
- **pool rounds**: forward and backward attention rounds between this process (a ``CADClient``) and one
  real attention-server process over ZeroMQ frames, over a sweep of row counts and task counts. The
  server's processor time per round (all its threads, from ``/proc/<pid>/task/*/schedstat``) less the
  kernel time the attention table predicts for the round's tasks is fitted as ``fixed + per_row * rows``
  (rows: q rows plus k/v rows the server receives), per pass; likewise the trainer's processor time per
  round (packing rows, sending, receiving, unpacking; no local tasks) over the rows it sends
  (:func:`measure_pool_rounds`, :func:`fit_round_costs`). The server's own ``busy_s`` (last arrival to last
  reply, wall) is recorded beside it.

- **ping-pong**: one decoder block forward and backward through the trainer's ping-pong runner
  (:class:`~distca.runtime.nano.PingPongBlocks`: two nano-batches, one custom autograd function whose
  backward runs each nano-batch's gradients with an explicit ``torch.autograd.grad``) against the same block
  run plainly, both with an attention client that answers at once (no kernel, no transfer): the difference
  per pass, per row, is the trainer's processor time ping-pong adds to a block beyond its linear work
  (:func:`measure_pingpong`; the linear layers run as two half-size calls, the nano-batches' rows are split
  and concatenated, attention outputs are gathered, and backward takes two graph traversals, each with
  full-size input-gradient buffers).

``cores`` is what the machine's processors deliver to ``ranks`` single-threaded processes running at
once (measured; every rank and server of the simulated cluster shares it). On this project's 2-vCPU
VM four such processes get about 1.7–1.95 cores' worth, not 2.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from distca.attention import CalibrationTable
from distca.attention import backward as attn_backward
from distca.attention import forward as attn_forward
from distca.config import ModelConfig
from distca.sim.hardware import Hardware, Link
from distca.train.flops import block_linear_params


def _median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _median_cpu(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median processor seconds of this process per call (less sensitive to other tenants than wall time)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return statistics.median(out)


def _no_attention(q, k, v, window=-1):
    return q


def measure_linear(cfg: ModelConfig, tokens: tuple[int, ...], dtype: torch.dtype, reps: int) -> dict[str, float]:
    """Per-call overhead and FLOP rate of one block's non-attention work, forward and backward: a
    least-squares line ``overhead + flops / rate`` through the token counts measured."""
    from distca.model.layers import rope_cos_sin
    from distca.model.llama import Block

    torch.manual_seed(0)
    block = Block(cfg, 0).to(dtype)
    _, per_block = block_linear_params(cfg)
    fwd, bwd = [], []
    for t in tokens:
        x = torch.randn(t, cfg.hidden, dtype=dtype, requires_grad=True)
        cos, sin = rope_cos_sin(torch.arange(t), cfg.head_dim, cfg.rope_theta, dtype)

        def run_fwd(x=x, cos=cos, sin=sin):
            with torch.no_grad():
                return block(x, _no_attention, cos, sin)

        def run_both(x=x, cos=cos, sin=sin):
            y = block(x, _no_attention, cos, sin)
            y.sum().backward()

        f = _median_time(run_fwd, reps)
        fb = _median_time(run_both, reps)
        fwd.append(f)
        bwd.append(max(fb - f, 1e-9))
    flops = np.array([2.0 * per_block * t for t in tokens])
    slope, icept = np.polyfit(flops, np.array(fwd), 1)
    rate = 1.0 / max(float(slope), 1e-18)
    over_f = max(float(icept), 0.0)
    over_b = max(float(np.mean(np.array(bwd) - 2 * flops / rate)), 0.0)
    return {"linear_flops": rate, "linear_overhead_s": over_f, "linear_bwd_overhead_s": over_b,
            "fwd_s": fwd, "bwd_s": bwd, "bwd_over_fwd": [b / f for b, f in zip(bwd, fwd, strict=True)]}


class _InstantRound:
    """An attention round that is already answered (``wait`` returns at once)."""

    def __init__(self, result):
        self.result = result

    def wait(self):
        return self.result


class _InstantClient:
    """A CAD client whose rounds cost nothing: zeros of the right shapes (cached), so that timing
    :class:`~distca.runtime.nano.PingPongBlocks` against it leaves the runner's own work alone."""

    def __init__(self):
        self.cache: dict = {}

    def _zeros(self, like: torch.Tensor, shape=None) -> torch.Tensor:
        shape = tuple(like.shape if shape is None else shape)
        key = (shape, like.dtype)
        if key not in self.cache:
            self.cache[key] = torch.zeros(shape, dtype=like.dtype)
        return self.cache[key]

    def start_forward(self, plan, t):
        return _InstantRound((self._zeros(t.q), self._zeros(t.q, t.q.shape[:2]).float()))

    def start_backward(self, plan, t, out, lse, dout):
        return _InstantRound((self._zeros(t.q), self._zeros(t.k), self._zeros(t.v)))


class _NanoRows:
    """Two nano-batches of a rank's ``n`` rows, as the trainer cuts them; no plans (the client needs none)."""

    def __init__(self, n: int):
        from distca.runtime.nano import nano_rows

        self.rows = nano_rows(n)

    def plan(self, window, nano, backward=False):
        return None


def measure_pingpong(cfg: ModelConfig, tokens: int, dtype: torch.dtype, reps: int = 15) -> dict[str, float]:
    """Trainer processor seconds ping-pong adds per block and row, forward and backward: one block over ``tokens``
    rows through :class:`~distca.runtime.nano.PingPongBlocks` (two nano-batches) minus the same block run plainly,
    both with attention answered at once, each pass timed with autograd recording (as a trainer's forward
    does), in processor time of this process, interleaved; the median of the paired differences over ``tokens``
    (``pingpong_{fwd,bwd}_row_s``; clamped at 0). Per row: the work it adds is row-wise (split and concatenated
    rows, full-size gradient buffers per nano-batch), about 7-8 us per row and block backward at both 1024 and
    2048 rows of the tiny model on this project's VM."""
    from distca.model.layers import rope_cos_sin
    from distca.model.llama import Block
    from distca.runtime.nano import PingPongBlocks

    torch.manual_seed(0)
    block = Block(cfg, 0).to(dtype)
    x = torch.randn(tokens, cfg.hidden, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(tokens), cfg.head_dim, cfg.rope_theta, dtype)
    runner = PingPongBlocks(_InstantClient(), _NanoRows(tokens))
    client = _InstantClient()

    def attend(q, k, v, window=-1):  # the plain block's attention, answered at once like the rounds
        return q + client._zeros(q)

    plain = lambda: block(x, attend, cos, sin)  # noqa: E731
    pingpong = lambda: runner(block, x, cos, sin)  # noqa: E731
    both = {"plain": (plain, lambda: plain().sum().backward()),
            "pingpong": (pingpong, lambda: pingpong().sum().backward())}
    for f, fb in both.values():  # warm-up
        f()
        fb()
    t: dict[str, list[float]] = {f"{n}_{w}": [] for n in both for w in ("f", "fb")}
    for _ in range(reps):  # interleaved, so that drift in what the host gives us hits both alike
        for name, (f, fb) in both.items():
            for w, fn in (("f", f), ("fb", fb)):
                c0 = time.process_time()
                fn()
                t[f"{name}_{w}"].append(time.process_time() - c0)
    out: dict[str, float] = {}
    for name in both:
        out[f"{name}_block_fwd_s"] = statistics.median(t[f"{name}_f"])
        out[f"{name}_block_bwd_s"] = max(statistics.median(t[f"{name}_fb"]) - out[f"{name}_block_fwd_s"], 0.0)
    # paired differences (same repetition), halved: two nano-batches per block
    d_f = [a - b for a, b in zip(t["pingpong_f"], t["plain_f"], strict=True)]
    d_b = [(a - a0) - (b - b0) for a, a0, b, b0 in zip(t["pingpong_fb"], t["pingpong_f"], t["plain_fb"], t["plain_f"],
                                                       strict=True)]
    out["pingpong_fwd_row_s"] = max(statistics.median(d_f) / tokens, 0.0)
    out["pingpong_bwd_row_s"] = max(statistics.median(d_b) / tokens, 0.0)
    out["tokens"] = tokens
    return out


def measure_attention(cfg: ModelConfig, dtype: torch.dtype, reps: int, backend: str = "auto",
                      q_lens=(128, 512, 2048), prefixes=(0, 1024, 4096)) -> CalibrationTable:
    """Single-task forward/backward times over a grid, as a calibration table."""
    g = torch.Generator().manual_seed(0)
    entries = []
    hq, hk, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for q_len in q_lens:
        for p in prefixes:
            kv_len = q_len + p
            q = torch.randn(q_len, hq, d, generator=g, dtype=dtype)
            k = torch.randn(kv_len, hk, d, generator=g, dtype=dtype)
            v = torch.randn(kv_len, hk, d, generator=g, dtype=dtype)
            cq, ck = torch.tensor([0, q_len], dtype=torch.int32), torch.tensor([0, kv_len], dtype=torch.int32)
            out, lse = attn_forward(q, k, v, cq, ck, q_len, kv_len, backend=backend)
            dout = torch.randn_like(out)
            f = _median_time(lambda q=q, k=k, v=v, cq=cq, ck=ck, ql=q_len, kl=kv_len:
                             attn_forward(q, k, v, cq, ck, ql, kl, backend=backend), reps)
            b = _median_time(lambda q=q, k=k, v=v, out=out, lse=lse, dout=dout, cq=cq, ck=ck, ql=q_len, kl=kv_len:
                             attn_backward(q, k, v, out, lse, dout, cq, ck, ql, kl, backend=backend), reps)
            entries.append({"q_len": q_len, "kv_len": kv_len, "window": -1, "fwd_s": f, "bwd_s": b})
    from distca.attention import resolve_backend

    name = resolve_backend(backend, torch.device("cpu"), dtype).name
    return CalibrationTable(name, "cpu", str(dtype).removeprefix("torch."), hq, hk, d, entries=entries)


def measure_optimizer(n_params: int = 1 << 20, reps: int = 5) -> float:
    p = torch.nn.Parameter(torch.randn(n_params))
    p.grad = torch.randn(n_params)
    opt = torch.optim.AdamW([p], lr=1e-3, foreach=False)
    return _median_time(opt.step, reps) / n_params


def _matmul_worker(queue, barrier, reps: int) -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    for _ in range(20):
        a @ b
    barrier.wait(timeout=120)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    queue.put(time.perf_counter() - t0)


def _concurrent_time(n: int, reps: int) -> float:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(n)
    procs = [ctx.Process(target=_matmul_worker, args=(queue, barrier, reps), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        return max(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def measure_effective_cores(n_procs: int, reps: int = 1500, trials: int = 3) -> float:
    """Throughput of ``n_procs`` single-threaded compute processes running at once, in units of one
    process alone: the cores a cluster of that many ranks really gets (a VM's vCPUs may share
    physical cores or be contended by its host, so this can be below ``os.cpu_count()``)."""
    alone = statistics.median(_concurrent_time(1, reps) for _ in range(trials))
    together = statistics.median(_concurrent_time(n_procs, reps) for _ in range(trials))
    return min(float(n_procs), n_procs * alone / together)


def measure_ipc_link(nbytes: int = 1 << 20, n: int = 20) -> Link:
    """Latency and bandwidth of ZeroMQ ipc between two sockets (a sender thread and this thread)."""
    import zmq

    ctx = zmq.Context.instance()
    with tempfile.TemporaryDirectory() as tmp:
        addr = f"ipc://{os.path.join(tmp, 'cal')}"
        pull = ctx.socket(zmq.PAIR)
        pull.bind(addr)
        push = ctx.socket(zmq.PAIR)
        push.connect(addr)
        try:
            small, big = b"x" * 64, np.random.default_rng(0).bytes(nbytes)

            def echo(k: int) -> None:
                for _ in range(k):
                    push.send(push.recv())

            for sock in (pull, push):  # a calibration must never hang
                sock.setsockopt(zmq.RCVTIMEO, 10_000)
                sock.setsockopt(zmq.SNDTIMEO, 10_000)
            th = threading.Thread(target=echo, args=(n + 1,), daemon=True)
            pull.send(small)  # warm
            th.start()
            rtts = []
            for _ in range(n):
                t0 = time.perf_counter()
                pull.send(small)
                pull.recv()
                rtts.append(time.perf_counter() - t0)
            pull.recv()
            th.join()
            t0 = time.perf_counter()
            for _ in range(n):
                push.send(big, copy=True)
                pull.recv(copy=True)
            per = (time.perf_counter() - t0) / n
        finally:
            push.close(0)
            pull.close(0)
    lat = statistics.median(rtts) / 2
    return Link(bandwidth=nbytes / max(per - lat, 1e-9), latency_s=lat)


def fit_round_costs(rows, extra_s) -> tuple[float, float]:
    """Least-squares line ``extra_s = fixed + per_row * rows`` (both clamped at 0): the per-round cost a
    round adds on top of its attention kernels, from ``rows`` and the measured time beyond the kernels."""
    x, y = np.asarray(rows, dtype=float), np.asarray(extra_s, dtype=float)
    if x.size < 2 or np.ptp(x) == 0:
        return max(float(np.mean(y)) if y.size else 0.0, 0.0), 0.0
    per_row, fixed = np.polyfit(x, y, 1)
    if per_row < 0:  # no growth with rows: all of it per round
        return max(float(np.mean(y)), 0.0), 0.0
    if fixed < 0:  # through the origin
        return 0.0, max(float(np.dot(x, y) / np.dot(x, x)), 0.0)
    return float(fixed), float(per_row)


def _proc_cpu_s(pid: int) -> float:
    """Processor seconds of every thread of process ``pid`` so far (nanosecond schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def measure_pool_rounds(cfg: ModelConfig, table: CalibrationTable, dtype: torch.dtype = torch.float32,
                        rows: tuple[int, ...] = (64, 256, 1024, 4096), tasks: tuple[int, ...] = (1, 4),
                        reps: int = 12, backend: str = "auto") -> dict:
    """Time attention rounds between this process and one real attention-server process (ZeroMQ frames):
    per (rows, tasks, pass), the server's processor time, its reported ``busy_s`` and the trainer's
    processor time per round, and the kernel time ``table`` predicts for the round's tasks. Returns the
    samples and the fitted per-round costs (see :func:`fit_round_costs`)."""
    import dataclasses

    from distca.attention.cost import AttentionShape, CostModel
    from distca.config import config_from_dict
    from distca.parts import server_settings, transport_settings
    from distca.runtime.client import CADClient
    from distca.runtime.plan_exec import RankTensors
    from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
    from distca.server.processes import server_processes

    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    run = config_from_dict({"model": dataclasses.asdict(cfg), "attention": {"backend": backend},
                            "cluster": {"n_trainers": 1},
                            "train": {"precision": precision, "pipeline_parallel": 1, "tokens_per_rank": max(rows)}})
    scfg = server_settings(run)
    esize = torch.tensor([], dtype=dtype).element_size()
    model = CostModel.from_table(table, AttentionShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, esize))
    sched = SchedulerConfig(eps=0.05, granularity=128, window=-1, min_offload_pairs=0)  # every task remote
    g = torch.Generator().manual_seed(0)
    samples = []
    with server_processes(1, scfg) as running:
        pid = running.processes[0].pid
        client = CADClient(0, running.addresses, transport_settings(run), backend=backend)
        try:
            for n_rows in rows:
                for n_tasks in tasks:
                    if n_tasks > n_rows:
                        continue
                    docs = [n_rows // n_tasks] * n_tasks
                    docs[-1] += n_rows - sum(docs)
                    plan, _ = make_plan(BatchLayout.from_ranks([docs]), Placement(1, 1, "dedicated"), sched)
                    q_len, kv_len = plan.task_q1 - plan.task_q0, plan.task_k1 - plan.task_k0
                    srv_rows = int(plan.server_q_rows[0] + plan.server_kv_rows[0])
                    sent = int(plan.q_xfer.n.sum() + plan.kv_xfer.n.sum())
                    t = RankTensors(*(torch.randn(n_rows, h, cfg.head_dim, generator=g, dtype=dtype)
                                      for h in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)))
                    dout = torch.randn(n_rows, cfg.n_heads, cfg.head_dim, generator=g, dtype=dtype)
                    out, lse = client.forward(plan, t)  # registers the plan, warms the buffers
                    client.backward(plan, t, out, lse, dout)
                    for which in ("fwd", "bwd"):
                        def one(which=which, plan=plan, t=t, out=out, lse=lse, dout=dout):
                            return (client.forward(plan, t) if which == "fwd"
                                    else client.backward(plan, t, out, lse, dout))
                        one()
                        busy0 = client.ping(0)["busy_s"]
                        s0, c0, w0 = _proc_cpu_s(pid), time.process_time(), time.perf_counter()
                        for _ in range(reps):
                            one()
                        s1, c1, w1 = _proc_cpu_s(pid), time.process_time(), time.perf_counter()
                        busy1 = client.ping(0)["busy_s"]
                        kernel = float(model.time_s(q_len, kv_len, -1, which).sum())
                        samples.append({"pass": which, "rows": n_rows, "tasks": int(q_len.size),
                                        "server_rows": srv_rows, "trainer_rows": sent, "kernel_s": kernel,
                                        "server_cpu_s": (s1 - s0) / reps, "server_busy_s": (busy1 - busy0) / reps,
                                        "trainer_cpu_s": (c1 - c0) / reps, "round_wall_s": (w1 - w0) / reps})
        finally:
            client.close()
    fit = {}
    for which in ("fwd", "bwd"):
        ss = [x for x in samples if x["pass"] == which]
        fit[f"server_{which}"] = fit_round_costs([x["server_rows"] for x in ss],
                                                 [x["server_cpu_s"] - x["kernel_s"] for x in ss])
        fit[f"server_busy_{which}"] = fit_round_costs([x["server_rows"] for x in ss],
                                                      [x["server_busy_s"] - x["kernel_s"] for x in ss])
        fit[f"trainer_{which}"] = fit_round_costs([x["trainer_rows"] for x in ss], [x["trainer_cpu_s"] for x in ss])
    return {"samples": samples, "fit": fit}


POOL_FIELDS = tuple(f"pool_{side}_{which}{row}_s" for side in ("server", "trainer") for which in ("fwd", "bwd")
                    for row in ("", "_row"))
PINGPONG_FIELDS = ("pingpong_fwd_row_s", "pingpong_bwd_row_s")


def round_fields(fit: dict) -> dict[str, float]:
    """Hardware fields from :func:`measure_pool_rounds`'s fit (server processor time, trainer processor time)."""
    out = {}
    for side in ("server", "trainer"):
        for which in ("fwd", "bwd"):
            fixed, per_row = fit[f"{side}_{which}"]
            out[f"pool_{side}_{which}_s"] = fixed
            out[f"pool_{side}_{which}_row_s"] = per_row
    return out


def average_hardware(parts: list[Hardware], name: str | None = None, weights: list[float] | None = None) -> Hardware:
    """The (weighted) mean of several calibrations of the same host: e.g. one before and one after a
    measured run, weighted by how close in time each is to the run, so that a noisy machine's drift is
    interpolated rather than frozen at one moment."""
    if not parts:
        raise ValueError("no calibrations to average")
    import dataclasses

    w = [1.0] * len(parts) if weights is None else [float(x) for x in weights]
    if len(w) != len(parts) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"need {len(parts)} non-negative weights with a positive sum, got {weights}")
    w = [x / sum(w) for x in w]
    mean = lambda xs: float(sum(a * b for a, b in zip(w, xs, strict=True)))  # noqa: E731
    first = parts[0]
    table = dict(first.attention_table or {})
    if table:
        entries = []
        for i, e in enumerate(table["entries"]):
            entries.append({**e, "fwd_s": mean([p.attention_table["entries"][i]["fwd_s"] for p in parts]),
                            "bwd_s": mean([p.attention_table["entries"][i]["bwd_s"] for p in parts])})
        table["entries"] = entries
    link = Link(mean([p.intra.bandwidth for p in parts]), mean([p.intra.latency_s for p in parts]))
    how = f"mean of {len(parts)} calibrations" + ("" if weights is None else
                                                  " weighted " + "/".join(f"{x:.2f}" for x in w))
    return dataclasses.replace(
        first, name=name or first.name, linear_flops=mean([p.linear_flops for p in parts]),
        linear_overhead_s=mean([p.linear_overhead_s for p in parts]),
        linear_bwd_overhead_s=mean([p.linear_bwd_overhead_s for p in parts]),
        optimizer_s_per_param=mean([p.optimizer_s_per_param for p in parts]), attention_table=table or None,
        **{f: mean([getattr(p, f) for p in parts]) for f in (*POOL_FIELDS, *PINGPONG_FIELDS)},
        intra=link, inter=link, p2p=link, cores=mean([p.cores for p in parts]),
        sources={**first.sources, "averaged": how})


def fastest_hardware(parts: list[Hardware], name: str | None = None) -> Hardware:
    """Several calibrations of the same host, each component at its fastest: the highest rates (linear FLOP/s,
    link bandwidth, effective cores) and the shortest times (overheads, optimizer, attention table entries, pool
    and ping-pong costs) any of them measured.

    Another tenant or a cold start can only slow a calibration down, and one calibration is a few seconds: a slow
    moment moves every run replayed on it, while the measured runs (minutes) average such moments out. Of the
    calibrations taken around a run, the fastest reading of each component is the least disturbed one; what other
    tenants took from the run itself is measured separately (:class:`~distca.sim.hostload.HostLoad`)."""
    if not parts:
        raise ValueError("no calibrations to combine")
    import dataclasses

    first = parts[0]
    table = dict(first.attention_table or {})
    if table:
        table["entries"] = [{**e, "fwd_s": min(p.attention_table["entries"][i]["fwd_s"] for p in parts),
                             "bwd_s": min(p.attention_table["entries"][i]["bwd_s"] for p in parts)}
                            for i, e in enumerate(table["entries"])]
    link = Link(max(p.intra.bandwidth for p in parts), min(p.intra.latency_s for p in parts))
    return dataclasses.replace(
        first, name=name or first.name, linear_flops=max(p.linear_flops for p in parts),
        linear_overhead_s=min(p.linear_overhead_s for p in parts),
        linear_bwd_overhead_s=min(p.linear_bwd_overhead_s for p in parts),
        optimizer_s_per_param=min(p.optimizer_s_per_param for p in parts), attention_table=table or None,
        **{f: min(getattr(p, f) for p in parts) for f in (*POOL_FIELDS, *PINGPONG_FIELDS)},
        intra=link, inter=link, p2p=link, cores=max(p.cores for p in parts),
        sources={**first.sources, "combined": f"fastest of {len(parts)} calibrations, per component"})


def calibrate_host(cfg: ModelConfig, tokens: tuple[int, ...] = (1024, 2048, 4096), dtype: torch.dtype = torch.float32,
                   threads: int = 1, cores: float | None = None, reps: int = 5, backend: str = "auto",
                   name: str = "this host", ranks: int = 4, pool_rounds: bool = True) -> tuple[Hardware, dict]:
    """Measure this machine; returns the hardware model and the raw measurements. ``pool_rounds``: also
    time attention rounds against a real server process (:func:`measure_pool_rounds`, a few seconds)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lin = measure_linear(cfg, tokens, dtype, reps)
        table = measure_attention(cfg, dtype, reps, backend)
        opt = measure_optimizer()
        link = measure_ipc_link()
        rounds = measure_pool_rounds(cfg, table, dtype, backend=backend) if pool_rounds else None
        pp = measure_pingpong(cfg, max(tokens), dtype) if pool_rounds else None
    finally:
        torch.set_num_threads(old)
    measured_cores = cores is None
    if cores is None:
        cores = measure_effective_cores(max(ranks, 1))
    hw = Hardware(
        name=name, linear_flops=lin["linear_flops"], linear_overhead_s=lin["linear_overhead_s"],
        linear_bwd_overhead_s=lin["linear_bwd_overhead_s"], optimizer_s_per_param=opt,
        attention_table=table.__dict__, attention_fused=False, intra=link, inter=link, p2p=link,
        devices_per_node=1 << 20, cores=cores, **(round_fields(rounds["fit"]) if rounds else {}),
        **({k: pp[k] for k in PINGPONG_FIELDS} if pp else {}),
        sources={"linear": f"measured: one block fwd/bwd at {tokens} tokens, {threads} thread(s), {dtype}",
                 "attention": f"measured: {len(table.entries)} single-task shapes, {table.backend}",
                 "optimizer": "measured: AdamW step, 1M parameters", "links": "measured: ZeroMQ ipc in-process",
                 "cores": f"measured: {ranks} concurrent single-thread processes" if measured_cores else "given",
                 "pool": ("measured: fwd/bwd rounds with one server process over ZeroMQ frames, server and trainer "
                          "processor time beyond the table's kernels, fixed + per row" if rounds else "not measured"),
                 "pingpong": (f"measured: one block through PingPongBlocks vs plainly at {max(tokens)} rows, attention "
                              "answered at once, processor time per row" if pp else "not measured")})
    return hw, {"linear": lin, "optimizer_s_per_param": opt, "link": link.__dict__, "cores": cores,
                "pool_rounds": rounds, "pingpong": pp}
