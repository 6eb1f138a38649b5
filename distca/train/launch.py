"""``distca train`` on one machine: a local Ray with the attention-server pool, and one spawned process
per trainer rank joined on 127.0.0.1 — by gloo on the CPU, the simulated cluster the tests and ``make
train`` run; by NCCL on a machine with GPUs (``train.device`` ``cuda``, or ``auto`` there), rank ``r`` on
GPU ``r``.

The driver owns the user-facing side (:class:`~distca.train.metrics.MetricsSink`): progress bar,
per-step lines, the metrics JSONL file, TensorBoard and the resolved config. Trainer rank 0 streams its
records to the driver over a queue. A rank that fails reports its traceback and the driver stops the
others; a rank that goes silent for ``train.step_timeout_s`` fails the run — nothing hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from distca.config import DistCAConfig, config_from_dict
from distca.errors import DistCAError
from distca.train.export import check_pipeline_layout, run_checkpoint_dir
from distca.train.metrics import MetricsSink, TrainResult, collect

log = logging.getLogger(__name__)


class TrainError(DistCAError, RuntimeError):
    """A training run failed: a rank raised, died or went silent."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer_process(cfg_dict: dict, rank: int, world: int, port: int, addresses: list[str], run_steps: int,
                     out: Any, verbose: bool = False, device: str = "cpu", inbox: Any = None) -> None:
    """Entry of a spawned trainer (``device``: the run's resolved device, ``cpu`` or ``cuda``): the environment
    DeepSpeed reads, then the :class:`Trainer`. ``inbox`` (rank 0, in-step recovery): the driver's replaced
    servers, ``{index: address}`` per message."""
    from distca.train.rank import RankInfo, deepspeed_env, rank_device

    info = RankInfo(rank, world, "127.0.0.1", port, local_rank=rank, device=rank_device(device, rank))
    os.environ.update({**deepspeed_env(info), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the driver asks for stacks when a run hangs
    _limit_malloc_arenas(cfg_dict["train"]["malloc_arena_max"])
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        from distca.train.quiet import quiet_libraries
        from distca.train.trainer import Trainer

        quiet_libraries(verbose)
        cfg = config_from_dict(cfg_dict)
        trainer = Trainer(cfg, info, addresses, report=lambda rec: out.put(("report", rank, rec)), verbose=verbose,
                          replacements=(lambda: _drain(inbox)) if inbox is not None else None)
        trainer.install_signal_handlers()
        res = trainer.run(run_steps)
        out.put(("done", rank, {k: v for k, v in res.items() if k != "records"} if rank else res))
    except BaseException:
        out.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None


def _drain(inbox) -> dict[int, str]:
    """Every ``{index: address}`` waiting in ``inbox``, merged (later wins)."""
    got: dict[int, str] = {}
    while True:
        try:
            got.update(inbox.get_nowait())
        except queue_mod.Empty:
            return got


class _Replacer:
    """In-step recovery's other half, in the driver: when a step record says the trainers lost servers, the pool
    replaces them on a thread of its own (the run goes on meanwhile) and the new addresses go to rank 0's inbox;
    the trainers take them back at a step boundary they agree on (:meth:`Trainer.run`)."""

    def __init__(self, pool, inbox):
        self.pool, self.inbox = pool, inbox
        self.asked: set[int] = set()
        self.threads: list = []

    def saw(self, rec: dict[str, Any]) -> None:
        import threading

        for i in rec.get("servers_lost") or []:
            if i in self.asked:
                continue
            self.asked.add(i)
            t = threading.Thread(target=self._replace, args=(i,), daemon=True, name=f"distca-replace{i}")
            t.start()
            self.threads.append(t)
        for i in rec.get("rejoined_after") or []:
            self.asked.discard(i)  # back in the run: lost again later means replaced again

    def _replace(self, i: int) -> None:
        t0 = time.perf_counter()
        try:
            self.inbox.put({i: self.pool.replace(i)})
            log.warning("attention server %d replaced in %.1f s; the trainers take it back at a step boundary", i,
                        time.perf_counter() - t0)
        except Exception as exc:  # the run goes on without it; the run-level restart still replaces the dead
            log.warning("could not replace attention server %d: %s", i, exc)

    def join(self, timeout_s: float = 120.0) -> None:
        for t in self.threads:
            t.join(timeout=timeout_s)


def train(cfg: DistCAConfig, run_steps: int = 0, timeout_s: float | None = None, verbose: bool = False,
          pool=None) -> TrainResult:
    """Run training on a simulated cluster on this machine; returns rank 0's per-step records.
    ``verbose`` lets the libraries (DeepSpeed, torch.distributed) in the trainer ranks log and print.

    With ``core_attention: cad`` the run starts its own attention-server pool, unless ``pool`` (a running
    :class:`~distca.server.pool.AttentionServerPool` with this run's server settings) is given: then the run
    uses it and leaves it running (several runs, e.g. a test module's, share one pool and its Ray)."""
    from distca.model.hf_config import with_checkpoint_model
    from distca.parts import train_device, uses_pool

    t_start = time.perf_counter()
    cfg = with_checkpoint_model(cfg)  # a run from a Hugging Face folder takes its model from there
    world = cfg.cluster.n_trainers
    # longer than the collectives' own timeout, so a rank's own error is what usually surfaces
    timeout_s = timeout_s or 1.5 * cfg.train.step_timeout_s + 30
    own_pool = None
    device = train_device(cfg)  # resolved once here; every rank gets it
    _check_source(cfg)  # bad data settings fail here, before any server or rank starts
    if cfg.train.resume:  # so does a resume from a checkpoint of other pipeline stages
        check_pipeline_layout(run_checkpoint_dir(cfg), cfg.stage_blocks())
    restore = _child_malloc_arenas(cfg.train.malloc_arena_max)
    try:
        needs_pool = uses_pool(cfg, device)
        if needs_pool and pool is None:
            from distca.parts import pool_settings
            from distca.server.pool import AttentionServerPool

            pool = own_pool = AttentionServerPool(pool_settings(cfg, device=device))
        if not needs_pool:
            pool = None  # in-place servers (or local attention): the trainers are all there is
        addresses = list(pool.addresses) if pool is not None else []
        return _with_restarts(cfg, world, pool, addresses, run_steps, timeout_s, t_start, verbose, device)
    finally:
        if own_pool is not None:
            own_pool.shutdown()
        restore()


def _limit_malloc_arenas(n: int) -> None:
    """This process uses at most ``n`` glibc malloc arenas from now on (``mallopt(M_ARENA_MAX)``; 0 or a libc
    without it: unchanged). A rank forked from the fork server does not read ``MALLOC_ARENA_MAX`` again."""
    if n > 0:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX


def _child_malloc_arenas(n: int):
    """Processes started from here (trainer ranks, and the local Ray that hosts the servers) inherit
    ``MALLOC_ARENA_MAX=n``. With glibc's default (8 × cores arenas), the many threads of a trainer
    (gloo, ZeroMQ, torch) fragment memory across arenas and RSS kept rising through a 300-step soak;
    with 2 it levels off (BENCHMARKS.md, Soak). Returns a function restoring this process's setting."""
    if n <= 0 or "MALLOC_ARENA_MAX" in os.environ:  # 0, or the user chose already
        return lambda: None
    os.environ["MALLOC_ARENA_MAX"] = str(n)
    return lambda: os.environ.pop("MALLOC_ARENA_MAX", None)


def _with_restarts(cfg: DistCAConfig, world: int, pool, addresses: list[str], run_steps: int, timeout_s: float,
                   t_start: float, verbose: bool, device: str = "cpu") -> TrainResult:
    """Run the ranks; when a run fails and ``train.max_restarts`` allows, replace dead attention servers
    and start the ranks again from the latest checkpoint (resume is exact, so the loss curve is the one
    an undisturbed run draws; steps after that checkpoint are trained again)."""
    ckpt = run_checkpoint_dir(cfg)
    # run_steps counts from where this call starts; a restart resumes earlier, so it gets the steps left
    stop_at = (_checkpoint_step(ckpt) if cfg.train.resume else 0) + run_steps if run_steps > 0 else 0
    attempt, done = cfg, []
    for restart in range(cfg.train.max_restarts + 1):
        try:
            res = _run_ranks(attempt, world, addresses, run_steps, timeout_s, t_start, verbose, device, pool=pool)
        except TrainError as exc:
            if restart == cfg.train.max_restarts:
                raise
            log.warning("run failed (%s); restart %d of %d from the latest checkpoint", str(exc).splitlines()[0],
                        restart + 1, cfg.train.max_restarts)
            if pool is not None:
                replaced = pool.restart_dead()
                addresses = list(pool.addresses)
                log.warning("replaced attention servers %s", replaced)
            resume = (ckpt / "latest").exists()
            attempt = config_from_dict({**attempt.to_dict(), "train": {**attempt.to_dict()["train"],
                                                                        "resume": resume or cfg.train.resume}})
            if stop_at:
                run_steps = stop_at - (_checkpoint_step(ckpt) if resume else 0)
            done = _records_so_far(Path(cfg.output_dir) / "metrics.jsonl")
            continue
        if restart:
            res.records = [r for r in done if r["step"] < res.start_step] + res.records
            res.restarts = restart
        return res
    raise AssertionError("unreachable")


def _checkpoint_step(ckpt: Path) -> int:
    """The step of the latest checkpoint in ``ckpt`` (its ``latest`` tag, ``stepNNNNNNNN``); 0 if there is none."""
    try:
        return int((ckpt / "latest").read_text().strip().removeprefix("step"))
    except (OSError, ValueError):
        return 0


def _records_so_far(path: Path) -> list[dict[str, Any]]:
    """Step records already written (the last line per step wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def _check_source(cfg: DistCAConfig) -> None:
    from distca.train.data import make_source

    source = make_source(cfg)
    if source.vocab_size > cfg.model.vocab_size:
        raise TrainError(f"data source {source.name} uses {source.vocab_size} token ids but model.vocab_size is "
                         f"{cfg.model.vocab_size}")


def rank_context():
    """How trainer ranks are started: from a fork server that has imported torch (and its compiler stack, which
    every rank's first optimizer imports) once, so a rank starts in well under a second instead of importing them
    for seconds on every start — a restart after a failure, or one run after another, pays it once. The fork
    server is a fresh interpreter (never a fork of this possibly multi-threaded driver) and lives as long as this
    process; DeepSpeed itself is imported in each rank, after the rank has set its accelerator."""
    ctx = mp.get_context("forkserver")
    # the compiler stack: DeepSpeed's optimizer check imports a module that calls ``torch.compile`` at import time,
    # which imports inductor and AOT autograd (seconds per rank when each rank imports them itself)
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch._inductor.compile_fx",
                                "torch._dynamo.repro.after_dynamo", "functorch.compile"])
    return ctx


def _run_ranks(cfg: DistCAConfig, world: int, addresses: list[str], run_steps: int, timeout_s: float,
               t_start: float, verbose: bool = False, device: str = "cpu", pool=None) -> TrainResult:
    ctx = rank_context()
    out = ctx.Queue()
    port = free_port()
    # in-step recovery: the pool replaces lost servers while the run goes on (rank 0 hears of them)
    replacer = _Replacer(pool, ctx.Queue()) if pool is not None and cfg.cluster.server_loss == "in_step" else None
    inbox = [replacer.inbox if replacer is not None and r == 0 else None for r in range(world)]
    procs = [ctx.Process(target=_trainer_process, args=(cfg.to_dict(), r, world, port, addresses, run_steps, out,
                                                        verbose, device, inbox[r]), daemon=True,
                         name=f"distca-trainer{r}")
             for r in range(world)]
    metrics_path = Path(cfg.output_dir) / "metrics.jsonl"
    sink = MetricsSink(cfg, metrics_path)
    result = TrainResult([], 0, 0, metrics_path=str(metrics_path))
    done: set[int] = set()
    signals = _GracefulStop(procs)
    try:
        for p in procs:
            p.start()
        signals.install()
        last = time.monotonic()
        while len(done) < world:
            msg = _get(out, 1.0)
            if msg is None:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in done]
                if dead:
                    late = _get(out, 5.0)  # give a dying rank's error report a moment to arrive
                    if late is not None and late[0] == "error":
                        raise TrainError(_errors(out, late[1], late[2], procs))
                    raise TrainError(f"trainer rank(s) {dead} exited without a result "
                                     f"(exit codes {[procs[r].exitcode for r in dead]})")
                if time.monotonic() - last > timeout_s:
                    _dump_stacks(procs)
                    raise TrainError(f"no progress from the trainers for {timeout_s:.0f} s "
                                     f"(train.step_timeout_s); finished ranks: {sorted(done)}")
                continue
            kind, rank, payload = msg
            last = time.monotonic()
            if kind == "error":
                _dump_stacks(procs)
                raise TrainError(_errors(out, rank, payload, procs))
            if kind == "report":
                if replacer is not None and payload.get("event") == "step":
                    replacer.saw(payload)
                collect(result, sink, payload)
            elif kind == "done":
                done.add(rank)
        for p in procs:
            p.join(timeout=60)
    finally:
        signals.restore()
        sink.close()
        if replacer is not None:
            replacer.join()  # the pool is the caller's again
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    result.wall_s = time.perf_counter() - t_start
    return result


class _GracefulStop:
    """SIGTERM/SIGINT on the driver: ask every rank to stop after the current step (they checkpoint and
    leave together); a second signal stops at once (the ``finally`` blocks still kill the ranks and
    shut the server pool down)."""

    def __init__(self, procs):
        self.procs, self.asked, self.saved = procs, False, {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}

    def _handle(self, signum, _frame) -> None:
        if self.asked:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.asked = True
        log.warning("%s: finishing the current step, checkpointing, stopping", signal.Signals(signum).name)
        for p in self.procs:
            if p.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGTERM)


def _get(out, timeout_s: float):
    try:
        return out.get(timeout=timeout_s)
    except queue_mod.Empty:
        return None


def _dump_stacks(procs) -> None:
    """Ask every live rank to print its Python stacks to stderr (a hang shows where each rank waits)."""
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGUSR1)
    time.sleep(1.0)


def _errors(out, rank: int, payload: str, procs, grace_s: float = 5.0) -> str:
    """The first failure, plus whatever other ranks report within ``grace_s`` (a hang on one rank
    usually shows as a timeout on its peers: both sides help); done early once every other rank has
    reported or exited."""
    msgs = [f"trainer rank {rank} failed:\n{payload}"]
    reported = {rank}
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if all(r in reported or not proc.is_alive() for r, proc in enumerate(procs)):
            break
        try:
            kind, r, text = out.get(timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
        except queue_mod.Empty:
            continue
        if kind == "error":
            msgs.append(f"trainer rank {r} failed:\n{text}")
            reported.add(r)
    return "\n".join(msgs)
