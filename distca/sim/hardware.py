"""What a simulated device and its links cost: a calibrated kernel table plus network figures.

A :class:`Hardware` holds everything the simulator charges time for:

- **linear layers** (projections, MLP, norms, LM head): ``overhead + flops / rate`` per call, fitted
  from measured layer times (``distca.sim.calibrate``) or, where nothing was measured, the published
  dense bf16 peak times an assumed efficiency — every number says which in ``sources``;
- **core attention**: a :class:`~distca.attention.CostModel` over task shapes (a calibrated table from
  ``benchmarks/kernels.py``, or exact pair counts at a stated rate);
- **links**: bandwidth and latency inside a node (NVLink, or loopback sockets on a CPU host) and
  across nodes (InfiniBand); collectives are ring algorithms over them;
- **cores**: a CPU host's processor count shared by every rank and server (``inf`` for GPUs);
- **pool rounds**: what one attention round costs beyond its kernels when servers are separate processes
  reached over ZeroMQ (``SimOptions.server_streams``): on the server, receiving and unpacking frames,
  rebatching rows into the fused call, packing and sending outputs; on the trainer, gathering and sending
  its rows and unpacking the replies. Each is ``fixed + per_row * rows`` per round and pass (server rows:
  q plus k/v rows it receives; trainer rows: those it sends), measured by ``distca.sim.calibrate`` on a
  CPU host; 0 (not charged) in the published-GPU figures;
- **ping-pong**: what the trainer's ping-pong runner (``distca.runtime.nano.PingPongBlocks``) adds to a block's
  linear work, per row of the rank's micro-batch and pass (``pingpong_{fwd,bwd}_row_s``), measured by
  ``distca.sim.calibrate`` on a CPU host; 0 (not charged) in the GPU figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from distca.attention.cost import AttentionShape, CalibrationTable, CostModel


@dataclass(frozen=True)
class Link:
    """A point-to-point path: ``latency_s + bytes / bandwidth`` (bytes/s, one direction)."""

    bandwidth: float
    latency_s: float = 0.0

    def time_s(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class Hardware:
    name: str
    linear_flops: float  # FLOP/s a real layer's matmuls achieve forward (backward charged 2x the FLOPs)
    linear_overhead_s: float = 0.0  # per layer call, forward (launches, norms, elementwise, Python)
    linear_bwd_overhead_s: float = 0.0
    optimizer_s_per_param: float = 0.0  # optimizer step + gradient bookkeeping, per local parameter
    step_overhead_s: float = 0.0  # per training step (engine, data, metrics)
    micro_overhead_s: float = 0.0  # per micro-batch per stage (pipeline engine instruction loop)
    attention_table: dict | None = None  # CalibrationTable fields; None: pairs at attention_flops
    attention_flops: float = 0.0  # FLOP/s for the pairs fallback
    attention_task_s: float = 0.0  # per fused varlen call (launch + loop), added to the pairs fallback
    # GPU varlen kernels run a server's tasks in one launch: the calibrated per-task overhead is paid
    # once per call. CPU backends loop over documents, paying it per task.
    attention_fused: bool = True
    intra: Link = field(default_factory=lambda: Link(450e9, 3e-6))  # inside a node
    inter: Link = field(default_factory=lambda: Link(50e9, 6e-6))  # across nodes
    p2p: Link | None = None  # pipeline send/recv; None: same as the node links
    devices_per_node: int = 8
    cores: float = math.inf  # processors shared by all ranks and servers (CPU hosts)
    # per attention round on the ZeroMQ server pool, beyond the kernels (processor seconds; 0: not charged)
    pool_server_fwd_s: float = 0.0
    pool_server_fwd_row_s: float = 0.0
    pool_server_bwd_s: float = 0.0
    pool_server_bwd_row_s: float = 0.0
    pool_trainer_fwd_s: float = 0.0
    pool_trainer_fwd_row_s: float = 0.0
    pool_trainer_bwd_s: float = 0.0
    pool_trainer_bwd_row_s: float = 0.0
    # per block and row of a rank's micro-batch: the ping-pong runner's work beyond the block's (processor seconds)
    pingpong_fwd_row_s: float = 0.0
    pingpong_bwd_row_s: float = 0.0
    sources: dict[str, str] = field(default_factory=dict)  # what each number came from

    # -- costs ---------------------------------------------------------------------------------
    def attention_model(self, shape: AttentionShape) -> CostModel:
        """Cost model for ``shape`` (per device: pass the per-device head counts under TP)."""
        if self.attention_table:
            return CostModel.from_table(CalibrationTable(**self.attention_table), shape)
        return CostModel(shape=shape, mode="pairs", peak_flops=self.attention_flops)

    def attention_call_s(self, model: CostModel, q: np.ndarray, kv: np.ndarray, window: int, which: str) -> float:
        """One server's tasks ``(q, kv)`` under ``window`` as one call on this device, in seconds: the sum of
        the cost model's task times, plus one call's overhead in the pairs fallback, or, for fused GPU
        varlen kernels under a calibrated table, the per-task overhead paid once for the call."""
        q = np.asarray(q)
        if q.size == 0:
            return 0.0
        t = float(model.time_s(q, kv, window, which).sum())
        if model.mode == "pairs":
            t += self.attention_task_s
        elif self.attention_fused and q.size > 1:  # one launch for the fused call, not one per task
            coef = model.coef_fwd if which == "fwd" else model.coef_bwd
            t -= (q.size - 1) * float(coef[0])
        return t

    def attention_rects_s(self, model: CostModel, nq: np.ndarray, nk: np.ndarray, full: np.ndarray,
                          window: np.ndarray, which: str) -> float:
        """One server's kernel rectangles (a masked plan's tasks, :func:`distca.scheduler.calls.server_rects`) as
        one call on this device, in seconds: as :meth:`attention_call_s`, each rectangle costed by its kind
        (:meth:`CostModel.rects_time_s`)."""
        nq = np.asarray(nq)
        if nq.size == 0:
            return 0.0
        t = float(model.rects_time_s(nq, nk, full, window, which).sum())
        if model.mode == "pairs":
            t += self.attention_task_s
        elif self.attention_fused and nq.size > 1:
            coef = model.coef_fwd if which == "fwd" else model.coef_bwd
            t -= (nq.size - 1) * float(coef[0])
        return t

    def linear_s(self, flops: float, which: str = "fwd", calls: float = 1.0) -> float:
        if flops <= 0:
            return 0.0
        if which == "fwd":
            return calls * self.linear_overhead_s + flops / self.linear_flops
        return calls * self.linear_bwd_overhead_s + 2.0 * flops / self.linear_flops

    def pool_round_s(self, side: str, which: str, rows: float) -> float:
        """One pool round's cost beyond the kernels on ``side`` (``server``/``trainer``) for ``rows`` rows;
        0 for a party with no rows in the round (it gets no request)."""
        if rows <= 0:
            return 0.0
        return getattr(self, f"pool_{side}_{which}_s") + rows * getattr(self, f"pool_{side}_{which}_row_s")

    def link(self, same_node: bool) -> Link:
        return self.intra if same_node else self.inter

    def allreduce_s(self, nbytes: float, n: int, same_node: bool) -> float:
        """Ring all-reduce of ``nbytes`` over ``n`` devices."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        link = self.link(same_node)
        return 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * nbytes / link.bandwidth

    def allgather_s(self, nbytes_per_rank: float, n: int, same_node: bool) -> float:
        """Ring all-gather: every rank ends with all ``n`` ranks' ``nbytes_per_rank``."""
        if n <= 1 or nbytes_per_rank <= 0:
            return 0.0
        link = self.link(same_node)
        return (n - 1) * (link.latency_s + nbytes_per_rank / link.bandwidth)

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d["cores"] = None if math.isinf(self.cores) else self.cores
        return json.dumps(d, indent=1, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Hardware:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read hardware file {path}: {exc}") from exc
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"hardware file {path} has unknown keys {unknown}")
        for k in ("intra", "inter", "p2p"):
            if d.get(k) is not None:
                d[k] = Link(**d[k])
        d["cores"] = math.inf if d.get("cores") is None else float(d["cores"])
        return cls(**d)


# Published figures (vendor datasheets), used where no measurement exists; marked in ``sources``.
H100_BF16_DENSE = 989.4e12  # H100 SXM, dense bf16 tensor-core peak
H200_BF16_DENSE = 989.4e12  # H200 has H100's compute
H100_HBM = 3.35e12  # H100 SXM HBM3, bytes/s
H200_HBM = 4.8e12  # H200 HBM3e, bytes/s
NVLINK4_PER_DIR = 450e9  # 900 GB/s bidirectional per GPU
IB_NDR_PER_GPU = 50e9  # one 400 Gb/s NDR NIC per GPU (the paper's Appendix A assumes 50 GB/s)
# Assumed efficiencies for the published fallback only (no measurement behind them; see sources).
ASSUMED_LINEAR_EFFICIENCY = 0.6
ASSUMED_ATTENTION_EFFICIENCY = 0.5


def published(name: str) -> Hardware:
    """An H100 or H200 node from published figures only (every number marked ``published``/``assumed``)."""
    peak = {"h100": H100_BF16_DENSE, "h200": H200_BF16_DENSE}.get(name)
    if peak is None:
        raise ValueError(f"no published figures for {name!r}; known: h100, h200")
    return Hardware(
        name=f"{name} (published)", linear_flops=peak * ASSUMED_LINEAR_EFFICIENCY, linear_overhead_s=20e-6,
        linear_bwd_overhead_s=40e-6, optimizer_s_per_param=16 / 3.0e12,
        attention_flops=peak * ASSUMED_ATTENTION_EFFICIENCY, attention_task_s=20e-6,
        intra=Link(NVLINK4_PER_DIR, 3e-6), inter=Link(IB_NDR_PER_GPU, 6e-6), devices_per_node=8,
        sources={"linear_flops": f"published bf16 dense peak {peak / 1e12:.0f} TFLOP/s x assumed "
                                 f"{ASSUMED_LINEAR_EFFICIENCY}",
                 "attention": f"pairs at published peak x assumed {ASSUMED_ATTENTION_EFFICIENCY}",
                 "intra": "published NVLink 4: 450 GB/s per direction",
                 "inter": "published NDR InfiniBand: 400 Gb/s = 50 GB/s per GPU",
                 "optimizer": "assumed: 16 bytes per parameter over ~3 TB/s HBM"})



MEASURED_H200 = Path(__file__).parent / "data" / "h200-measured.json"


def h100_with_h200_kernels(path: str | Path = MEASURED_H200) -> Hardware:
    """An H100 SXM node: published peak, HBM and links, with core attention from the kernel table measured
    on an H200 (``distca/sim/data/h200-measured.json``, ``torch_varlen`` bf16, 32 query / 8 kv heads, head
    dim 128; the cost model scales its compute terms by ``n_heads * head_dim`` for other shapes).

    Published H100 SXM figures: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 at 900 GB/s per GPU
    (450 GB/s per direction) inside an 8-GPU node, one 400 Gb/s NDR NIC per GPU (50 GB/s) across nodes.

    Assumption behind reusing the H200 kernel table: H100 SXM and H200 are the same GH100 chip (132 SMs,
    same clocks, same 989 TFLOP/s), and the H200 differs in HBM only (4.8 vs 3.35 TB/s, 141 vs 80 GB).
    Flash-style attention at head dim 128 does ~2·128 FLOPs per byte of k/v streamed per query tile of 128
    rows, above the H100's ~295 FLOP/byte ridge, so long tasks are compute-bound and cost the same on
    both; short tasks (a few hundred tokens) lean on memory and launch overhead and may run a few percent
    slower on the H100 than the table says. The table's kernel is torch's FlashAttention-2-class varlen
    kernel (~330 TFLOP/s forward at 16K causal on the H200), not a FlashAttention-3-class one
    (~500-600 TFLOP/s forward on an H100); :func:`published` ``("h100")``'s pairs fallback at
    0.5 x peak (495 TFLOP/s, assumed) stands in for the latter. Linear-layer figures are those of
    :func:`published` (attention-only benchmarks do not use them).
    """
    measured = Hardware.load(path)
    base = published("h100")
    sources = dict(base.sources)
    sources.update(attention=f"measured on an H200 ({measured.sources.get('attention', 'calibration table')}), "
                             "reused for the H100: same GH100 compute, attention compute-bound (assumed)",
                   hbm="published H100 SXM HBM3: 3.35 TB/s",
                   optimizer="assumed: 16 bytes per parameter over published 3.35 TB/s HBM")
    return dataclasses.replace(base, name="h100 (published; attention: H200-measured kernel table)",
                               attention_table=measured.attention_table, attention_fused=measured.attention_fused,
                               optimizer_s_per_param=16 / H100_HBM, sources=sources)
