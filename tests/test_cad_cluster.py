"""CAD attention on a real simulated cluster: trainer processes and attention-server processes talking
ZeroMQ over loopback. Results must equal the in-process plan execution (itself tested against
per-document attention), including documents spanning trainer ranks and sliding windows, on both data
planes: rows as ZeroMQ frames, and rows through shared memory (ZeroMQ carrying the headers), whose
results must be identical to the frames' bit for bit.

Two module-scoped server sets serve every test: float64 reference servers on ipc, and float32 sdpa
servers on tcp (both authenticated and checksummed). Each trainer process runs its step over both
planes, one after the other, so the second plane costs rounds, not processes."""

from __future__ import annotations

import dataclasses
import glob

import numpy as np
import pytest
import torch

from distca.runtime.client import CADClient
from distca.runtime.plan_exec import execute_plan
from distca.server.loop import ServerConfig
from distca.server.processes import server_processes
from distca.transport.channel import TransportConfig
from distca.transport.shm import PREFIX, SHM_DIR

pytestmark = pytest.mark.cluster  # spawns trainer/server processes (left out of `make test-fast`)

IPC = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=60.0, secret=b"test-secret", checksum=True,
                      shm_max_bytes=64 << 20)
TCP = dataclasses.replace(IPC, transport="tcp")


def _server(cad_case, dtype: str, backend: str, transport: TransportConfig) -> ServerConfig:
    return ServerConfig(n_heads=cad_case.heads, n_kv_heads=cad_case.kv_heads, head_dim=cad_case.dim, dtype=dtype,
                        backend=backend, max_plans=8, max_rows=1 << 16, transport=transport)


@pytest.fixture(scope="module")
def f64_servers(cad_case) -> list[str]:
    """Three float64 reference servers on ipc; a test with fewer servers uses the first ones."""
    with server_processes(3, _server(cad_case, "float64", "reference", IPC)) as running:
        yield running.addresses


@pytest.fixture(scope="module")
def f32_servers(cad_case) -> list[str]:
    """Three float32 sdpa servers on tcp."""
    with server_processes(3, _server(cad_case, "float32", "sdpa", TCP)) as running:
        yield running.addresses


def _servers_for(spec: dict, f64_servers, f32_servers) -> tuple[list[str], TransportConfig]:
    addresses, tcfg = (f64_servers, IPC) if spec["dtype"] == "float64" else (f32_servers, TCP)
    return addresses[:spec["servers"]], tcfg


CASES = {
    "dedicated-spanning-docs": dict(ranks=[[300, 200], [500], [100, 250, 150]], continues=[False, True, True],
                                    servers=2, placement="dedicated", eps=0.0, window=-1, seed=1, dtype="float64",
                                    backend="reference"),
    "colocated-window": dict(ranks=[[600, 20, 10], [90, 540]], continues=[False, False], servers=2,
                             placement="colocated", eps=0.02, window=48, seed=2, dtype="float64",
                             backend="reference"),
    "sdpa-fp32-four-trainers": dict(ranks=[[900, 124], [1024], [512, 512], [64] * 16], continues=[False, True, False,
                                    False], servers=3, placement="dedicated", eps=0.05, window=-1, seed=3,
                                    dtype="float32", backend="sdpa"),
}


KEYS = ("out", "lse", "dq", "dk", "dv")


def _trainer_both_planes(rank: int, addresses: list[str], spec: dict, tcfg: TransportConfig, make_case, q) -> None:
    """Spawned trainer: one CAD forward and backward of ``spec``'s plan over ZeroMQ frames, then the same over
    shared memory; puts ``{plane: tensors}`` and the plane each client reports, or its error."""
    torch.set_num_threads(1)
    plan, ranks, douts = make_case(spec)
    res = {}
    try:
        for plane in ("zmq", "shm"):
            client = CADClient(rank, addresses, tcfg, backend=spec["backend"], shm=plane == "shm")
            try:
                out, lse = client.forward(plan, ranks[rank])
                dq, dk, dv = client.backward(plan, ranks[rank], out, lse, douts[rank])
                res[plane] = {k: v.numpy() for k, v in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items()}
                res[plane]["data_plane"], res[plane]["stem"] = client.data_plane, client.stem
            finally:
                client.close()
        q.put((rank, res))
    except Exception as exc:  # report, never hang the parent
        q.put((rank, repr(exc)))


def _check_both_planes(got: dict, want: dict, n_ranks: int, tol: float, keys=KEYS) -> None:
    """Both planes equal the in-process execution within ``tol``, and shared memory equals the frames exactly."""
    for r in range(n_ranks):
        assert isinstance(got[r], dict), f"trainer {r} failed: {got[r]}"
        assert (got[r]["zmq"]["data_plane"], got[r]["shm"]["data_plane"]) == ("zmq", "shm")
        for key in keys:
            a, b = got[r]["zmq"][key], want[key][r].numpy()
            finite = np.isfinite(b)
            assert np.array_equal(finite, np.isfinite(a)), f"rank {r} {key}: -inf pattern differs"
            err = np.abs(a[finite] - b[finite]).max(initial=0.0)
            assert err <= tol * max(1.0, np.abs(b[finite]).max(initial=0.0)), f"rank {r} {key}: error {err:.2e}"
            assert np.array_equal(got[r]["shm"][key], a), f"rank {r} {key}: shared memory differs from frames"


def _segments_left(stem: str) -> list[str]:
    """Names of a client's segments still in /dev/shm (its names start with its ``stem``)."""
    assert stem.startswith(PREFIX)
    return glob.glob(str(SHM_DIR / f"{stem}-*"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_cad_over_zeromq_and_shared_memory_equals_in_process_plan_execution(name, cad_case, run_trainers,
                                                                            f64_servers, f32_servers):
    spec = CASES[name]
    addresses, tcfg = _servers_for(spec, f64_servers, f32_servers)
    plan, ranks, douts = cad_case.make(spec)
    got = run_trainers(_trainer_both_planes, [(r, addresses, spec, tcfg, cad_case.make) for r in range(len(ranks))])
    want = execute_plan(plan, ranks, douts, backend=spec["backend"])
    _check_both_planes(got, want, len(ranks), 1e-10 if spec["dtype"] == "float64" else 1e-5)
    for r in range(len(ranks)):  # every name was unlinked once its server had mapped it
        assert _segments_left(got[r]["shm"]["stem"]) == []


def _trainer_two_in_flight(rank: int, addresses: list[str], specs: list[dict], tcfg: TransportConfig, make_case,
                           q) -> None:
    torch.set_num_threads(1)
    cases = [make_case(s) for s in specs]
    res = {}
    try:
        for plane in ("zmq", "shm"):
            client = CADClient(rank, addresses, tcfg, backend=specs[0]["backend"], shm=plane == "shm")
            try:
                for plan, _, _ in cases:
                    client.register(plan)
                # Ping and pong in flight at once: the servers must keep the two rounds' rows apart (and on
                # shared memory each round has its own segment).
                pending = [client.start_forward(plan, ranks[rank]) for plan, ranks, _ in cases]
                outs = [p.wait() for p in pending]
                pending = [client.start_backward(plan, ranks[rank], o, lse, douts[rank])
                           for (plan, ranks, douts), (o, lse) in zip(cases, outs, strict=True)]
                grads = [p.wait() for p in pending]
                res[plane] = [{"out": o.numpy(), "dq": g[0].numpy(), "dk": g[1].numpy()} for (o, _), g in
                              zip(outs, grads, strict=True)]
                assert client.data_plane == plane, client.data_plane
            finally:
                client.close()
        q.put((rank, res))
    except Exception as exc:
        q.put((rank, repr(exc)))


def test_two_rounds_in_flight_from_several_trainers_stay_apart(cad_case, run_trainers, f64_servers):
    base = dict(servers=2, placement="dedicated", eps=0.02, window=-1, dtype="float64", backend="reference")
    specs = [dict(base, ranks=[[400, 100], [500]], continues=[False, True], seed=7),
             dict(base, ranks=[[250, 250], [120, 380]], continues=[False, False], seed=8)]
    got = run_trainers(_trainer_two_in_flight, [(r, f64_servers[:2], specs, IPC, cad_case.make) for r in range(2)])
    for i, spec in enumerate(specs):
        plan, ranks, douts = cad_case.make(spec)
        want = execute_plan(plan, ranks, douts, backend="reference")
        for r in range(2):
            assert isinstance(got[r], dict), f"trainer {r} failed: {got[r]}"
            for key in ("out", "dq", "dk"):
                assert np.abs(got[r]["zmq"][i][key] - want[key][r].numpy()).max() < 1e-10, (i, r, key)
                assert np.array_equal(got[r]["shm"][i][key], got[r]["zmq"][i][key]), (i, r, key)


@pytest.mark.parametrize("seed", [11, 12])
def test_random_documents_over_the_cluster(seed, cad_case, run_trainers, f64_servers, f32_servers):
    """Seeded random long-tailed documents packed over 3 trainers (spanning ranks), 2 servers."""
    from distca.data import sample_batch

    packed = sample_batch("pretrain", 3, 1024, seed=seed, elongate=0.05)
    window = [-1, 64][seed % 2]
    spec = dict(ranks=packed.ranks, continues=packed.continues, servers=2, placement="colocated" if seed % 2 else
                "dedicated", eps=0.02, window=window, seed=seed, dtype="float64", backend="reference")
    if spec["placement"] == "colocated":
        spec["servers"] = 3
    addresses, tcfg = _servers_for(spec, f64_servers, f32_servers)
    plan, ranks, douts = cad_case.make(spec)
    assert any(packed.continues), "the sample should hold a document spanning trainer ranks"
    got = run_trainers(_trainer_both_planes, [(r, addresses, spec, tcfg, cad_case.make) for r in range(3)])
    want = execute_plan(plan, ranks, douts, backend="reference")
    _check_both_planes(got, want, 3, 1e-10, keys=("out", "dq", "dk", "dv"))


@pytest.mark.parametrize("plane", ["zmq", "shm"])
def test_server_memory_stays_flat_over_many_rounds(plane, cad_case, f32_servers):
    """100 forward rounds of one plan: receive buffers (and on shared memory the trainer's segment) are reused,
    so peak RSS, buffer bytes and mapped segments stay put; closing the client unmaps its segment."""
    spec = dict(ranks=[[1024, 1024]], continues=[False], servers=1, placement="dedicated", eps=0.0, window=-1,
                seed=3, dtype="float32", backend="sdpa")
    plan, ranks, _ = cad_case.make(spec)
    client = CADClient(0, f32_servers[:1], TCP, backend="sdpa", shm=plane == "shm")
    try:
        for _ in range(10):
            client.forward(plan, ranks[0])
        warm = client.ping(0)
        for _ in range(100):
            client.forward(plan, ranks[0])
        after = client.ping(0)
        assert client.data_plane == plane
    finally:
        client.close()
    assert after["served"] - warm["served"] == 100
    assert after["buffer_bytes"] == warm["buffer_bytes"]
    assert after["shm_segments"] == warm["shm_segments"] and after["shm_bytes"] == warm["shm_bytes"]
    assert after["peak_rss_kb"] - warm["peak_rss_kb"] < 16 * 1024, (warm, after)
    probe = CADClient(0, f32_servers[:1], TCP)
    try:  # the closing client named its one segment: the server unmapped it
        assert probe.ping(0)["shm_segments"] == warm["shm_segments"] - (plane == "shm")
    finally:
        probe.close()
    assert _segments_left(client.stem) == []


FAMILIES = ("chunked:96", "sink_window:8:48", "prefix_lm:120", "bidirectional")


def _trainer_families(rank: int, addresses: list[str], specs: list[dict], tcfg: TransportConfig, make_case,
                      q) -> None:
    """Spawned trainer: each spec's plan (one mask family each) forward and backward over ZeroMQ frames and over
    shared memory, in one client per plane: ``{plane: [tensors per spec]}``."""
    torch.set_num_threads(1)
    cases = [make_case(s) for s in specs]
    res = {}
    try:
        for plane in ("zmq", "shm"):
            client = CADClient(rank, addresses, tcfg, backend=specs[0]["backend"], shm=plane == "shm")
            try:
                res[plane] = []
                for plan, ranks, douts in cases:
                    out, lse = client.forward(plan, ranks[rank])
                    dq, dk, dv = client.backward(plan, ranks[rank], out, lse, douts[rank])
                    res[plane].append({k: v.numpy() for k, v in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items()})
            finally:
                client.close()
        q.put((rank, res))
    except Exception as exc:  # report, never hang the parent
        q.put((rank, repr(exc)))


def test_every_mask_family_and_per_document_slices_over_zeromq_and_shared_memory(cad_case, run_trainers,
                                                                                 f64_servers):
    """One set of trainer processes runs: chunked, sink + window, prefix-LM and bidirectional plans, and per-document
    masks (MagiAttention-style slices of every type next to a prefix-LM document), colocated and dedicated. Servers
    run kernel rectangles over exact key hulls, merged by lse; every plan equals the in-process execution — itself
    checked against dense masked attention — on both data planes, with a document spanning all three trainers."""
    from distca.masks import Mask, Slice

    base = dict(ranks=[[300, 140], [440], [200, 240]], continues=[False, True, True], servers=3,
                placement="dedicated", eps=0.02, seed=21, dtype="float64", backend="reference")
    doc0 = Mask.from_slices([Slice(0, 150, 0, 150, "causal"), Slice(150, 300, 0, 60, "full"),
                             Slice(150, 300, 100, 300, "bi_causal")])
    doc1 = Mask.from_slices([Slice(0, 400, 0, 400, "causal"), Slice(400, 780, 0, 200, "inv_causal"),
                             Slice(400, 780, 300, 780, "causal"), Slice(100, 400, 500, 700, "full")])
    sliced = dict(base, seed=31, window="causal", doc_masks=[doc0, doc1, Mask.prefix_lm(50)])
    specs = [*(dict(base, window=f, seed=21 + i) for i, f in enumerate(FAMILIES)), sliced,
             dict(sliced, placement="colocated", seed=32)]
    got = run_trainers(_trainer_families, [(r, f64_servers, specs, IPC, cad_case.make) for r in range(3)])
    for i, spec in enumerate(specs):
        plan, ranks, douts = cad_case.make(spec)
        assert plan.masked and (plan.doc_masks is not None if "doc_masks" in spec else
                                plan.mask.spec() == spec["window"])
        want = execute_plan(plan, ranks, douts, backend="reference")
        per = {r: {"zmq": dict(got[r]["zmq"][i], data_plane="zmq"), "shm": dict(got[r]["shm"][i], data_plane="shm")}
               if isinstance(got[r], dict) else got[r] for r in range(3)}
        _check_both_planes(per, want, 3, 1e-10)
