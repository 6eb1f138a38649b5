"""Shared fixtures and hypothesis profiles for the DistCA test suite.

Functions that spawned processes run live at module level here (a spawned child imports them by
name); tests reach them through fixtures, never by importing this file."""

from __future__ import annotations

import contextlib
import os
import queue as queue_mod
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, settings

from distca.masks import attention_key, key_mask
from distca.runtime.client import CADClient
from distca.runtime.plan_exec import RankTensors
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.train.launch import rank_context
from distca.transport.channel import Endpoint, TransportConfig

# Two cores: keep torch from oversubscribing them (pytest may run beside other processes).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile(
    "default", max_examples=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("DISTCA_HYPOTHESIS_PROFILE", "default"))

# `make test` runs whole modules on two pytest-xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`), handing
# them out in collection order: the longest modules go first so that the two workers finish together (longest
# first; measured serially on the 2-core VM, 2026-12-02: test_train ~140 s, the benchmark smoke tests ~80 s, then
# 10-17 s each). Every other module keeps its place after them; tests keep their order inside a module.
SLOW_MODULES_FIRST = ("test_train.py", "test_train_ops.py", "test_benchmarks_smoke.py", "test_e2e_benchmark.py",
                      "test_train_split.py", "test_train_repack.py", "test_cad_group.py",
                      "test_cli.py", "test_recovery.py", "test_train_masks.py", "test_cad_cluster.py",
                      "test_server_pool.py", "test_server_hardening.py", "test_inplace.py", "test_server_faults.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


def _run_processes(target: Callable, args_per_rank: list[tuple], timeout_s: float = 180.0) -> dict[int, object]:
    """Start one process per entry of ``args_per_rank`` (from the trainers' fork server, as training starts its
    ranks); each calls ``target(*args, queue)`` and puts ``(rank, result)``; returns the results by rank, failing
    the test if any is missing in time."""
    ctx = rank_context()
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, q), daemon=True) for a in args_per_rank]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, res = q.get(timeout=timeout_s)
            results[rank] = res
    except queue_mod.Empty:
        raise AssertionError(f"processes did not finish within {timeout_s} s; got ranks {sorted(results)}") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


@pytest.fixture(scope="session")
def run_trainers() -> Callable[..., dict[int, object]]:
    """``run_trainers(target, args_per_rank, timeout_s=180)``: one spawned process per rank, results by rank."""
    return _run_processes


# -- one CAD step from trainer processes (the server tests and the pool tests run the same case) --------

CAD_HEADS, CAD_KV_HEADS, CAD_DIM = 4, 2, 8


def _make_cad_case(spec: dict):
    """A plan and per-rank q/k/v and output gradients for ``spec`` (ranks, continues, servers, placement,
    eps, window, seed, dtype); ``window`` may be a mask spec such as ``"sink_window:4:32"``; ``doc_masks`` (optional):
    one :class:`~distca.masks.Mask` (or ``None``) per document (``BatchLayout.with_masks``)."""
    batch = BatchLayout.from_ranks(spec["ranks"], spec["continues"])
    if spec.get("doc_masks") is not None:
        batch = batch.with_masks(spec["doc_masks"])
    placement = Placement(batch.n_ranks, spec["servers"], spec["placement"])
    key = attention_key(spec["window"])
    cfg = SchedulerConfig(eps=spec["eps"], mask=key_mask(key), granularity=16, min_offload_pairs=300)
    plan, _ = make_plan(batch, placement, cfg)
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    ranks = [RankTensors(*(torch.randn(int(n), h, CAD_DIM, generator=gen).to(dtype)
                           for h in (CAD_HEADS, CAD_KV_HEADS, CAD_KV_HEADS))) for n in batch.rank_tokens]
    douts = [torch.randn(t.q.shape, generator=gen).to(dtype) for t in ranks]
    return plan, ranks, douts


def _cad_trainer(rank: int, addresses: list[str], spec: dict, tcfg: TransportConfig, q) -> None:
    """Spawned trainer: one CAD forward and backward of ``spec``'s plan; puts its tensors or its error."""
    torch.set_num_threads(1)
    plan, ranks, douts = _make_cad_case(spec)
    client = CADClient(rank, addresses, tcfg, backend=spec["backend"])
    try:
        out, lse = client.forward(plan, ranks[rank])
        dq, dk, dv = client.backward(plan, ranks[rank], out, lse, douts[rank])
        q.put((rank, {k: v.numpy() for k, v in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items()}))
    except Exception as exc:  # report, never hang the parent
        q.put((rank, repr(exc)))
    finally:
        client.close()


def _inplace_trainer(rank: int, world: int, port: int, spec: dict, q) -> None:
    """Spawned in-place trainer: joins a gloo group of ``world`` trainers and runs ``spec``'s plan forward and
    backward with every trainer also its plan server (``devices_per_node``: ranks grouped into nodes, key/value rows
    relayed between them; ``also_direct``: then again without the node map, under ``"direct"``); puts its tensors or
    its error."""
    import datetime

    import torch.distributed as dist

    from distca.runtime.inplace import InPlaceClient
    from distca.scheduler.relay import nodes_of
    from distca.server.exchange import GroupRoles, RowExchange, RowFormat

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=spec.get("timeout_s", 60)))
        if spec.get("absent") == rank:  # a peer that never joins a round: the others must fail, not hang
            import time

            time.sleep(spec["timeout_s"] + 3)
            q.put((rank, "absent"))
            return
        plan, ranks, douts = _make_cad_case(spec)
        fmt = RowFormat(CAD_HEADS, CAD_KV_HEADS, CAD_DIM, getattr(torch, spec["dtype"]))

        def step(nodes) -> dict:
            client = InPlaceClient(RowExchange(dist.group.WORLD, GroupRoles.inplace(world, rank), fmt, "cpu",
                                               nodes=nodes), backend=spec["backend"])
            got = {}
            for rep in range(spec.get("repeat", 1)):  # buffers are reused across rounds
                out, lse = client.forward(plan, ranks[rank])
                dq, dk, dv = client.backward(plan, ranks[rank], out, lse, douts[rank])
                got[rep] = {k: v.numpy() for k, v in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items()}
            return {**got[0], "stats": client.server_stats()[0], "same_each_repeat": all(
                all((got[i][k] == got[0][k]).all() for k in got[0]) for i in got)}

        res = step(nodes_of(world, spec.get("devices_per_node")))
        if spec.get("also_direct"):  # the same step again in the same group, every row sent directly
            res["direct"] = step(None)
        q.put((rank, res))
    except Exception as exc:  # report, never hang the parent
        q.put((rank, repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="session")
def cad_case() -> SimpleNamespace:
    """The CAD step case: ``make(spec)`` -> (plan, ranks, douts); ``trainer``, a spawnable target
    ``trainer(rank, addresses, spec, tcfg, queue)``; ``inplace_trainer(rank, world, port, spec, queue)``, the same
    step with in-place servers over a gloo group; and the attention shape ``heads``, ``kv_heads``, ``dim``."""
    return SimpleNamespace(make=_make_cad_case, trainer=_cad_trainer, inplace_trainer=_inplace_trainer,
                           heads=CAD_HEADS, kv_heads=CAD_KV_HEADS, dim=CAD_DIM)


@contextlib.contextmanager
def client_endpoint(tcfg: TransportConfig, address: str) -> Iterator[Endpoint]:
    """A trainer-side socket to ``address`` in a fresh ZeroMQ context, closed (and the context ended) after."""
    import zmq

    ctx = zmq.Context()
    ep = Endpoint.client(ctx, tcfg, address)
    try:
        yield ep
    finally:
        ep.close()
        ctx.term()

