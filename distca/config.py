"""Typed run configuration, loaded strictly from YAML with dotted command-line overrides.

Every knob of a run lives here and is logged with it; nothing is read from environment variables
deep in the code. Loading is strict: an unknown key, a wrong type or an invalid value is a
:class:`~distca.errors.ConfigError` that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distca.errors import ConfigError, InputError
from distca.limits import (
    INT64_MAX,
    MAX_BATCH_PAIRS,
    MAX_DIM,
    MAX_DOC_TOKENS,
    MAX_DOCS,
    MAX_RANKS,
    MAX_VOCAB,
    pow2_text,
    short_repr,
)
from distca.masks import AttentionKey, Mask, attention_key, layer_masks


@dataclass
class RopeScaling:
    """RoPE frequency scaling, as Llama-family checkpoints use it (Hugging Face's ``rope_parameters``).

    ``default``: none. ``linear``: every frequency divided by ``factor``. ``llama3`` (Llama 3.1+): low
    frequencies (wavelength above ``original_max_position / low_freq_factor``) divided by ``factor``, high
    ones (below ``original_max_position / high_freq_factor``) kept, a smooth blend between. ``yarn``: NTK-by-parts
    interpolation over the band set by ``beta_fast``/``beta_slow``, with cos/sin scaled by ``attention_factor``
    (0: derived from ``factor``, ``mscale`` and ``mscale_all_dim`` as YaRN does). Other rope types are refused.
    """

    type: Literal["default", "linear", "llama3", "yarn"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3, yarn: the pre-training context
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn; 0: derived
    mscale: float = 0.0  # yarn; 0: unset
    mscale_all_dim: float = 0.0  # yarn; 0: unset
    truncate: bool = True  # yarn: round the correction band to whole dimensions

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"model.rope_scaling.{name} must be a finite number > 0, got {v}")
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"model.rope_scaling.{name} must be a finite number >= 0, got {v}")
        if not 1 <= self.original_max_position <= MAX_DOC_TOKENS:
            raise ConfigError(f"model.rope_scaling.original_max_position must be in [1, {pow2_text(MAX_DOC_TOKENS)}], "
                              f"got {short_repr(self.original_max_position)}")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("model.rope_scaling: llama3 needs high_freq_factor > low_freq_factor, got "
                              f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclass
class ModelConfig:
    """Decoder shape (Llama-style); only the attention shape is used by the attention core."""

    n_layers: int = 2
    hidden: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn_hidden: int = 688
    vocab_size: int = 256
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_head_dim: int = 0  # per-head width; 0: hidden // n_heads (HF's ``head_dim``)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # a bias on the attention output projection (Llama's attention_bias)
    mlp_bias: bool = False  # biases on the MLP's gate/up/down projections (Llama's mlp_bias)
    # Per-layer window of the (standard or DDL) attention, -1 = full causal; empty: every layer full.
    # Mistral's sliding_window is this with every layer windowed; the scheduler plans them like ShortSWA's.
    layer_windows: list[int] = field(default_factory=list)
    # Per-layer mask pattern, repeated over the layers: ["window:128", "causal"] alternates windowed and full
    # layers (gpt-oss), ["window:1024"] * 5 + ["causal"] is Gemma 3's 5 local : 1 global, ["chunked:8192"] * 3 +
    # ["causal"] Llama 4's chunked 3 : 1. Entries: causal | window:W | chunked:C | sink_window:S:W |
    # prefix_lm:P | bidirectional (see distca.masks). Empty: layer_windows (or every layer causal).
    layer_masks: list[str] = field(default_factory=list)
    # Residual variant: "standard" pre-norm; "shortswa" adds a sliding-window attention sublayer before
    # full attention in every block (or, with shortswa_every = k > 1, makes every k-th layer's attention
    # windowed instead); "ddl" uses Deep Delta Learning residual updates (scalar value state, d_v = 1).
    residual: Literal["standard", "shortswa", "ddl"] = "standard"
    shortswa_window: int = 128  # keys per query, the query itself included
    shortswa_every: int = 1  # 1: a ShortSWA sublayer in every block; k > 1: every k-th layer windowed
    ddl_beta_init: float = 1.0  # β at initialisation (the DDL code's default: exact overwrite)

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
            cap = MAX_VOCAB if name == "vocab_size" else MAX_DIM
            if getattr(self, name) > cap:
                raise ConfigError(f"model.{name} must be <= {pow2_text(cap)}, got {short_repr(getattr(self, name))}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0 and math.isfinite(self.norm_eps)
                and self.norm_eps > 0):
            raise ConfigError(f"model.rope_theta and model.norm_eps must be finite numbers > 0, got "
                              f"{self.rope_theta} and {self.norm_eps}")
        if self.attention_head_dim > MAX_DIM:
            raise ConfigError(f"model.attention_head_dim must be <= {pow2_text(MAX_DIM)}, got "
                              f"{short_repr(self.attention_head_dim)}")
        if self.attention_head_dim < 0 or self.attention_head_dim % 2:
            raise ConfigError(f"model.attention_head_dim must be 0 (derived) or an even number > 0, got "
                              f"{self.attention_head_dim}")
        if not self.attention_head_dim and self.hidden % self.n_heads:
            raise ConfigError(f"model.hidden ({self.hidden}) must be a multiple of model.n_heads ({self.n_heads}) "
                              "unless model.attention_head_dim is set")
        if self.head_dim % 2:
            raise ConfigError(f"the head dimension ({self.head_dim}) must be even for RoPE")
        if self.layer_windows:
            if len(self.layer_windows) != self.n_layers:
                raise ConfigError(f"model.layer_windows has {len(self.layer_windows)} entries for "
                                  f"{self.n_layers} layers")
            bad = [w for w in self.layer_windows if w != -1 and not 1 <= w <= MAX_DOC_TOKENS]
            if bad:
                raise ConfigError(f"model.layer_windows entries must be -1 (full) or in [1, "
                                  f"{pow2_text(MAX_DOC_TOKENS)}], got {short_repr(bad[0])}")
            if self.residual == "shortswa":
                raise ConfigError("model.layer_windows cannot combine with residual 'shortswa', which sets the "
                                  "windows itself")
        if self.layer_masks:
            self._check_layer_masks()
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if not (1 <= self.shortswa_window <= MAX_DOC_TOKENS and 1 <= self.shortswa_every <= MAX_DIM):
            raise ConfigError(f"model.shortswa_window must be in [1, {pow2_text(MAX_DOC_TOKENS)}] and "
                              f"model.shortswa_every in [1, {pow2_text(MAX_DIM)}], got "
                              f"{short_repr(self.shortswa_window)} and {short_repr(self.shortswa_every)}")
        if not 0.0 <= self.ddl_beta_init < 2.0:
            raise ConfigError(f"model.ddl_beta_init must be in [0, 2), got {self.ddl_beta_init}")

    def _check_layer_masks(self) -> None:
        if not isinstance(self.layer_masks, list | tuple):
            raise ConfigError(f"model.layer_masks must be a list of mask specs, got {short_repr(self.layer_masks)}")
        if len(self.layer_masks) > self.n_layers:
            raise ConfigError(f"model.layer_masks has {len(self.layer_masks)} entries for {self.n_layers} layers "
                              "(a pattern repeats over the layers; it cannot be longer than them)")
        for i, spec in enumerate(self.layer_masks):
            try:
                Mask.parse(spec)
            except InputError as exc:
                raise ConfigError(f"model.layer_masks[{i}]: {exc}") from None
        if self.layer_windows:
            raise ConfigError("model.layer_masks and model.layer_windows both set: use layer_masks alone "
                              "('window:W' / 'causal' entries are windows)")
        if self.residual == "shortswa" and self.shortswa_every != 1:
            raise ConfigError("model.layer_masks cannot combine with residual 'shortswa' with shortswa_every > 1, "
                              "which sets the layers' masks itself")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden // self.n_heads

    def layer_keys(self) -> list[AttentionKey]:
        """Each layer's own attention mask key (int window, or a Mask for the other families)."""
        if self.layer_masks:
            return [attention_key(m) for m in layer_masks(self.layer_masks, self.n_layers)]
        return list(self.layer_windows) or [-1] * self.n_layers

    def block_windows(self) -> list[tuple[AttentionKey, ...]]:
        """The mask key of each block's core-attention calls, in call order: an int window (-1 = full causal)
        or a :class:`~distca.masks.Mask` for the other families (chunked, sink + window, prefix-LM,
        bidirectional).

        The one source of the layer masks: the model builds its attention sublayers from it, the FLOPs
        counter and the simulator count from it. ``standard``/``ddl``: the layer's key per block
        (``layer_masks``, else ``layer_windows``, else ``-1``). ``shortswa`` with ``shortswa_every == 1``:
        ``(w, key)``, the sliding-window sublayer before the layer's own attention (full causal unless
        ``layer_masks`` says otherwise). ``shortswa_every = k > 1``: every k-th block's attention is
        windowed, ``(w,)``, the others ``(-1,)``.
        """
        if self.residual != "shortswa":
            return [(key,) for key in self.layer_keys()]
        if self.shortswa_every == 1:
            return [(self.shortswa_window, key) for key in self.layer_keys()]
        k = self.shortswa_every
        return [(self.shortswa_window,) if i % k == k - 1 else (-1,) for i in range(self.n_layers)]

    def attention_windows(self) -> list[AttentionKey]:
        """The mask key of every core-attention call of one forward pass, in order (see ``block_windows``)."""
        return [w for block in self.block_windows() for w in block]


@dataclass
class AttentionConfig:
    """How core attention runs: kernel backend, precision, mask and shard granularity."""

    backend: Literal["auto", "reference", "sdpa", "flash", "torch_varlen"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    window: int = -1  # -1: full causal; w > 0: each query sees w keys including itself
    shard_tokens: int = 128  # granularity of query shards

    def __post_init__(self) -> None:
        if self.window != -1 and not 1 <= self.window <= MAX_DOC_TOKENS:
            raise ConfigError(f"attention.window must be -1 or >= 1 (at most {pow2_text(MAX_DOC_TOKENS)}), got "
                              f"{short_repr(self.window)}")
        if not 1 <= self.shard_tokens <= MAX_DOC_TOKENS:
            raise ConfigError(f"attention.shard_tokens must be in [1, {pow2_text(MAX_DOC_TOKENS)}], got "
                              f"{short_repr(self.shard_tokens)}")


@dataclass
class DataConfig:
    """Where training documents come from, and (for ``distca demo``) one fixed batch of lengths.

    Training: ``source`` picks the documents — ``embedded`` (Python's standard library sources, one
    document per file, byte tokens; needs no download), ``tokens`` (a pre-tokenised memory-mapped token
    file, ``path`` is its prefix), ``text`` (jsonl/parquet at ``path`` with a local Hugging Face
    ``tokenizer``) or ``synthetic`` (random tokens, lengths drawn from ``distribution``, transformed by
    ``upsample_long`` then ``elongate`` as in :mod:`distca.data.distributions`, capped at ``max_len``).
    Documents are packed into per-rank budgets of ``train.tokens_per_rank`` and split at rank boundaries.
    Demo: ``doc_lengths`` packed in order into equal per-trainer budgets.
    """

    doc_lengths: list[int] = field(default_factory=lambda: [2048, 1024, 512, 300, 128, 60])
    source: Literal["embedded", "tokens", "text", "synthetic"] = "embedded"
    path: str = ""
    tokenizer: str = ""  # tokenizer.json for source: text
    text_key: str = "text"
    distribution: str = "pretrain"  # synthetic: a length distribution of distca.data.DISTRIBUTIONS
    n_docs: int = 10000  # synthetic: documents per epoch
    upsample_long: float = 1.0  # synthetic: sampling weight of documents > 16K (before elongation), >= 1
    elongate: float = 1.0  # synthetic: every length × this factor (> 0; < 1 shrinks the family to fit small runs)
    max_len: int = 0  # synthetic: > 0 caps every length at this many tokens (after elongation)
    max_doc_tokens: int = 0  # > 0: longer documents are cut into chunks of at most this many tokens
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not self.doc_lengths or any(n < 1 for n in self.doc_lengths):
            raise ConfigError(f"data.doc_lengths must be a non-empty list of positive ints, got "
                              f"{short_repr(self.doc_lengths)}")
        big = next((i for i, n in enumerate(self.doc_lengths) if n > MAX_DOC_TOKENS), None)
        if big is not None:
            raise ConfigError(f"data.doc_lengths[{big}] = {short_repr(self.doc_lengths[big])} exceeds the cap of "
                              f"{pow2_text(MAX_DOC_TOKENS)} tokens per document")
        if sum(n * (n + 1) // 2 for n in self.doc_lengths) > MAX_BATCH_PAIRS:
            raise ConfigError(f"data.doc_lengths attend more than {pow2_text(MAX_BATCH_PAIRS)} (query, key) pairs "
                              "in one batch (int64 pair counts would overflow)")
        if self.source in ("tokens", "text") and not self.path:
            raise ConfigError(f"data.path is required for data.source: {self.source}")
        if self.source == "text" and not self.tokenizer:
            raise ConfigError("data.tokenizer (a local tokenizer.json) is required for data.source: text")
        if self.max_doc_tokens < 0 or self.n_docs < 1:
            raise ConfigError("data.max_doc_tokens must be >= 0 and data.n_docs >= 1")
        for name, cap in (("max_doc_tokens", MAX_DOC_TOKENS), ("max_len", MAX_DOC_TOKENS), ("n_docs", MAX_DOCS)):
            if getattr(self, name) > cap:
                raise ConfigError(f"data.{name} must be <= {pow2_text(cap)}, got {short_repr(getattr(self, name))}")
        if not (math.isfinite(self.upsample_long) and math.isfinite(self.elongate)):
            raise ConfigError(f"data.upsample_long and data.elongate must be finite, got {self.upsample_long} and "
                              f"{self.elongate}")
        if not (self.upsample_long >= 1 and self.elongate > 0 and self.max_len >= 0):
            raise ConfigError(f"data.upsample_long must be >= 1, data.elongate > 0 and data.max_len >= 0, got "
                              f"{self.upsample_long}, {self.elongate}, {self.max_len}")


@dataclass
class ClusterConfig:
    """The (simulated) cluster: trainers, attention servers and where the servers sit."""

    n_trainers: int = 4
    n_servers: int = 4
    placement: Literal["colocated", "dedicated"] = "colocated"
    # How attention rows move between trainers and servers (DESIGN §2):
    #   inplace    - every trainer is also an attention server in its own process; rows move by one
    #                torch.distributed all-to-all per round over the stage's data-parallel group (NCCL on
    #                GPUs, gloo on the CPU cluster); no server pool is started, n_servers is not used
    #   collective - the Ray pool's servers and the trainers form a separate data-plane process group
    #                (all-to-all there); ZeroMQ carries only control (plans, rounds, errors, health)
    #   shm        - pool servers on the trainer's host read and write rows in shared memory, ZeroMQ
    #                carries the headers; a server on another host falls back to zmq (metrics say so)
    #   zmq        - rows as ZeroMQ frames (host staging; any host)
    #   auto       - inplace on CUDA, shm on the CPU
    data_plane: Literal["auto", "inplace", "collective", "shm", "zmq"] = "auto"
    ray_address: str = ""  # "": start a local Ray on 127.0.0.1; "auto": join the running cluster
    cpus_per_server: float = 0.0  # Ray CPUs each attention-server actor reserves
    # Ray GPUs each attention-server actor reserves on a CUDA run with dedicated placement (its server computes
    # on that GPU); colocated actors and CPU runs reserve none
    gpus_per_server: float = 1.0
    # What a lost attention server (dead, or silent for lost_after_s in a round) costs, on the zmq/shm data planes:
    #   in_step - the trainers finish its rounds themselves (exactly: the same fused call over the same rows), agree
    #             on the lost servers at the step boundary and send them nothing more; no step is lost
    #   restart - the step fails and the run restarts from its last checkpoint (train.max_restarts)
    # Other data planes (inplace, collective) always restart.
    server_loss: Literal["in_step", "restart"] = "in_step"
    lost_after_s: float = 10.0  # a round's reply later than this: the server is lost (in_step); < transport.timeout_s
    # Devices per node (the local world size of a torchrun launch): global ranks [k*n, (k+1)*n) share node k. On the
    # inplace data plane, key/value rows that several trainers of one node need from a trainer of another node cross
    # the inter-node link once, to a gateway trainer there, which forwards them inside the node and sums their
    # gradients on the way back (distca.scheduler.relay). 0: one flat network, every row sent directly.
    devices_per_node: int = 0

    def __post_init__(self) -> None:
        if self.server_loss not in ("in_step", "restart"):
            raise ConfigError(f"cluster.server_loss must be 'in_step' or 'restart', got {self.server_loss!r}")
        if not self.lost_after_s > 0:
            raise ConfigError(f"cluster.lost_after_s must be > 0, got {self.lost_after_s}")
        if not 1 <= self.n_trainers <= MAX_RANKS:
            raise ConfigError(f"cluster.n_trainers must be in [1, {pow2_text(MAX_RANKS)}], got "
                              f"{short_repr(self.n_trainers)}")
        if not 1 <= self.n_servers <= MAX_RANKS:
            raise ConfigError(f"cluster.n_servers must be in [1, {pow2_text(MAX_RANKS)}], got "
                              f"{short_repr(self.n_servers)}")
        if self.cpus_per_server < 0 or self.gpus_per_server < 0:
            raise ConfigError("cluster.cpus_per_server and cluster.gpus_per_server must be >= 0")
        if isinstance(self.devices_per_node, bool) or not isinstance(self.devices_per_node, int) or not (
                0 <= self.devices_per_node <= MAX_RANKS):
            raise ConfigError(f"cluster.devices_per_node must be an integer in [0, {pow2_text(MAX_RANKS)}] (0: one "
                              f"flat network), got {short_repr(self.devices_per_node)}")

    def node_of(self, rank: int) -> int | None:
        """The node of global rank ``rank`` (None: one flat network, ``devices_per_node`` 0)."""
        return rank // self.devices_per_node if self.devices_per_node else None


@dataclass
class TransportSection:
    """How trainers reach attention servers, and the key that authenticates them.

    The key itself is never part of a config (it would be printed, saved with the run and visible on command
    lines): ``secret_file`` names a file of this user, mode 0600 or stricter, that holds it in hex, or
    ``secret_env`` names an environment variable that does (e.g. ``DISTCA_SECRET``). They are read where a
    run's parts are built (:func:`distca.parts.transport_settings`). tcp without a key is refused unless
    ``insecure: true`` says so (then any peer that reaches the port can use and stop the servers).
    """

    kind: Literal["ipc", "tcp"] = "ipc"
    host: str = "127.0.0.1"  # servers bind here; another interface is an explicit choice
    timeout_s: float = 30.0
    secret_file: str = ""  # a file (mode 0600) holding the shared key in hex (>= 16 bytes); "" = none
    secret_env: str = ""  # or the name of an environment variable holding it; "" = none
    insecure: bool = False  # tcp without a key: allowed only when true, with a loud WARNING
    checksum: bool = False  # CRC32 of every tensor frame (with a key, SHA-256 digests under the MAC cover this)
    # Shared-memory data plane (cluster.data_plane: shm): the largest segment a trainer creates for one round
    # to one server, and the largest a server maps (it refuses bigger ones); a larger round goes as ZeroMQ
    # frames. 0 turns shared memory off on both sides.
    shm_max_mb: int = 1024
    # The largest message (and ZeroMQ frame) a socket accepts: a larger frame disconnects its sender inside
    # libzmq, a header announcing more tensor bytes is refused before a frame is read.
    max_message_mb: int = 4096
    # Frames per message, header included (a header and up to 64 tensors: wire.MAX_TENSORS); a message with
    # more is refused and drained without copying.
    max_frames: int = 65

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"transport.timeout_s must be > 0, got {self.timeout_s}")
        if not 0 <= self.shm_max_mb <= 1 << 20:
            raise ConfigError(f"transport.shm_max_mb must be in [0, 1048576], got {self.shm_max_mb}")
        if not 1 <= self.max_message_mb <= 1 << 20:
            raise ConfigError(f"transport.max_message_mb must be in [1, 1048576], got {self.max_message_mb}")
        if not 2 <= self.max_frames <= 65:
            raise ConfigError(f"transport.max_frames must be in [2, 65], got {self.max_frames}")
        if self.secret_file and self.secret_env:
            raise ConfigError("transport.secret_file and transport.secret_env are both set: name one source of the key")
        if self.secret_env and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", self.secret_env)
                                or re.fullmatch(r"[0-9a-fA-F]{32,}", self.secret_env)):
            raise ConfigError("transport.secret_env must name an environment variable (a letter or '_', then letters, "
                              "digits, '_'), not hold the key itself")
        if self.kind == "tcp" and not (self.secret_file or self.secret_env or self.insecure):
            raise ConfigError("transport.kind tcp needs a key: set transport.secret_file (a mode-0600 file holding it "
                              "in hex) or transport.secret_env (an environment variable holding it), or say "
                              "transport.insecure: true to serve any peer that reaches the port")


@dataclass
class SchedulerSection:
    """CAD scheduler knobs (shard granularity is ``attention.shard_tokens``)."""

    eps: float = 0.02  # every server's attention work <= (1 + eps) * mean

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and self.eps >= 0):  # 0 is allowed: the tightest balance the planner can cut
            raise ConfigError(f"scheduler.eps must be a finite number >= 0, got {self.eps}")


@dataclass
class TrainConfig:
    """A training run: parallelism, batch, optimiser, precision, checkpoints and logging.

    ``cluster.n_trainers`` ranks form ``pipeline_parallel`` stages × ``n_trainers / pipeline_parallel``
    data-parallel replicas. One step = ``micro_batches`` micro-batches per replica (1F1B), each holding
    ``tokens_per_rank`` tokens per replica, so a step trains on
    ``micro_batches × tokens_per_rank × data_parallel`` tokens.
    """

    steps: int = 20
    core_attention: Literal["local", "cad"] = "cad"
    pipeline_parallel: int = 2
    micro_batches: int = 2
    tokens_per_rank: int = 1024
    precision: Literal["fp32", "bf16"] = "fp32"
    # Where trainers compute: "cuda" (each rank takes its local GPU; NCCL; DeepSpeed's CUDA accelerator),
    # "cpu" (gloo, DeepSpeed's CPU accelerator) or "auto" (cuda when torch sees a GPU, else cpu).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    zero_stage: int = 1
    activation_checkpointing: bool = False
    # CAD only: every block of a stage runs each micro-batch as two nano-batches (the first and second half of a
    # rank's rows) whose attention rounds overlap each other's linear work, forward and backward
    # (distca.runtime.nano). The loss is the same either way. It pays where a round runs beside the trainer (GPUs
    # and their network); on a CPU host whose cores all processes share it only doubles the rounds: set false.
    pingpong: bool = True
    # How a micro-batch is cut into ping-pong's two nano-batches. "rows": the first and the second half of every
    # rank's rows of one packing; a document keeps all its attention, so the first nano-batch's round needs the
    # second's keys and starts only after both halves' pre-attention work. "repack" (DistCA's split): the
    # micro-batch is packed as two independent halves (the data stream cuts a document at the half as at a
    # micro-batch boundary; rank r holds its rows of the first half, then of the second), so each nano-batch's round
    # starts right after its own pre-attention work and needs no keys of the other. It changes the data (a document
    # cut at the half restarts its positions), so it holds under local attention and without ping-pong too: compare
    # runs with the same nano_split. The price: a document longer than half a micro-batch (data_parallel ×
    # tokens_per_rank / 2 tokens) is cut once more, so the longest context trained halves and so does the
    # attention work of such documents; "rows" keeps the full context (the default for that reason).
    nano_split: Literal["rows", "repack"] = "rows"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    checkpoint_dir: str = ""  # "": output_dir/checkpoints
    checkpoint_every: int = 0  # 0: only at the end of the run
    checkpoint_at_end: bool = True  # save when the run ends or is stopped (false: short benchmark runs keep no state)
    resume: bool = False  # continue from the latest checkpoint in checkpoint_dir
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True  # progress bar on rank 0
    peak_tflops: float = 0.0  # per trainer, for MFU; 0: measure the GEMM rate at start (training device and precision)
    step_timeout_s: float = 600.0  # a rank silent this long fails the run (collectives, servers)
    max_server_plans: int = 256  # plan layouts each attention server keeps
    # Hard limits of each attention server against any peer: the most q or k/v rows one round may bring (0: one
    # micro-batch on every trainer, cluster.n_trainers * tokens_per_rank), the rounds it holds open at once (0: 4 per
    # trainer; a trainer has at most two in flight, ping and pong, and the rest is slack for abandoned ones), and
    # the receive-buffer MiB it may hold (pinned host memory on a GPU server; 0: max_server_rounds full rounds).
    max_server_rows: int = 0
    max_server_rounds: int = 0
    server_buffer_mb: int = 0
    init_from_hf: str = ""  # a local Hugging Face Llama folder (safetensors) to start from; "": random init
    malloc_arena_max: int = 2  # glibc malloc arenas per trainer/server process started here (0: glibc default)
    # Draw the next step's micro-batches and compute its CAD plans on a background thread while a step trains
    # (the same batches and plans; checkpoints keep the data position from before them).
    prefetch: bool = True
    max_restarts: int = 0  # after a failure (e.g. a lost server): replace dead servers, resume from a checkpoint
    # The pipeline schedule. "1f1b": DeepSpeed's. "pooled": tick-aligned (every stage runs the same phase in each
    # tick; a tick's attention tasks of all stages form one CAD plan over all servers; idle warm-up/cool-down
    # stages serve attention). "auto": pooled for CAD on a data plane that supports it with more than one stage,
    # else 1f1b (distca.parts.pipeline_schedule says which and why).
    pipeline_schedule: Literal["auto", "1f1b", "pooled"] = "auto"
    # Deferred weight gradients (distca.train.wgrad; zero-bubble style, ZB-H1's amount): some backward passes leave
    # their linear layers' weight gradients for later. Pooled: the stage computes them in a later tick it would only
    # serve attention in; 1F1B: stage s keeps its last s and computes them after its last backward. The same
    # gradients up to summation order, less work on the pipeline's critical path; more memory held (the kept
    # layers' inputs and output gradients). Not with bf16 and zero_stage 0 (DeepSpeed's bf16 optimizer).
    defer_weight_grads: bool = False
    # Blocks per pipeline stage (stage_blocks below): "even" (n_layers / P each) or "balanced" (the last stage gets
    # fewer blocks so that its blocks plus the LM head cost about what the other stages' blocks do). stage_blocks,
    # when given, lists them per stage and overrides stage_split.
    stage_split: Literal["even", "balanced"] = "even"
    stage_blocks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("steps", "pipeline_parallel", "micro_batches", "tokens_per_rank", "log_every",
                     "max_server_plans"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.tokens_per_rank > MAX_DOC_TOKENS:
            raise ConfigError(f"train.tokens_per_rank must be <= {pow2_text(MAX_DOC_TOKENS)}, got "
                              f"{short_repr(self.tokens_per_rank)}")
        if self.nano_split == "repack" and self.tokens_per_rank % 2:
            raise ConfigError(f"train.nano_split: repack packs each rank's tokens as two equal halves; "
                              f"train.tokens_per_rank must be even, got {self.tokens_per_rank}")
        if not (0 <= self.max_server_rows < MAX_DOC_TOKENS and 0 <= self.server_buffer_mb <= 1 << 30
                and 0 <= self.max_server_rounds <= 1 << 16):
            raise ConfigError(f"train.max_server_rows must be in [0, 2**31), server_buffer_mb in [0, 2**30] and "
                              f"max_server_rounds in [0, 65536], got {short_repr(self.max_server_rows)}, "
                              f"{short_repr(self.server_buffer_mb)}, {short_repr(self.max_server_rounds)}")
        if self.zero_stage not in (0, 1):
            raise ConfigError(f"train.zero_stage must be 0 or 1 (pipeline parallelism), got {self.zero_stage}")
        if self.defer_weight_grads and self.precision == "bf16" and self.zero_stage == 0:
            raise ConfigError("train.defer_weight_grads cannot run with precision bf16 and zero_stage 0: DeepSpeed's "
                              "bf16 optimizer then clears the model's gradients before every backward pass, so "
                              "weight gradients computed later would be lost (use zero_stage 1)")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.grad_clip < 0 or self.max_restarts < 0:
            raise ConfigError("train.warmup_steps, checkpoint_every, grad_clip and max_restarts must be >= 0")


@dataclass
class DistCAConfig:
    """A whole run."""

    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    output_dir: str = "out/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    transport: TransportSection = field(default_factory=TransportSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        pp = self.train.pipeline_parallel
        if self.cluster.n_trainers % pp:
            raise ConfigError(f"cluster.n_trainers ({self.cluster.n_trainers}) must be a multiple of "
                              f"train.pipeline_parallel ({pp})")
        if pp > self.model.n_layers:
            raise ConfigError(f"train.pipeline_parallel ({pp}) exceeds model.n_layers ({self.model.n_layers})")
        try:
            self.stage_blocks()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.cluster.data_plane == "inplace" and self.cluster.placement != "colocated":
            raise ConfigError("cluster.data_plane: inplace makes every trainer an attention server; it needs "
                              f"cluster.placement: colocated, got {self.cluster.placement!r}")

        if self.train.pipeline_schedule == "pooled":
            why = self.pooled_obstacle()
            if why:
                raise ConfigError(f"train.pipeline_schedule: pooled is not possible here: {why}")

    @property
    def data_parallel(self) -> int:
        return self.cluster.n_trainers // self.train.pipeline_parallel

    def stage_blocks(self) -> tuple[int, ...]:
        """Decoder blocks per pipeline stage (:func:`stage_blocks`)."""
        return stage_blocks(self.model, self.train.pipeline_parallel, self.train.stage_split, self.train.stage_blocks)

    def pooled_obstacle(self) -> str:
        """Why this run cannot use the pooled, tick-aligned pipeline schedule ("" when it can).

        In every tick the stages issue their blocks' core-attention rounds position by position (block ``j`` of
        every stage together; a stage with fewer blocks serves the later positions' rounds without rows of its
        own), so at each position the stages' blocks must call attention with the same windows in the same order;
        the ``collective`` data plane's process group holds one stage's trainers only."""
        windows = self.model.block_windows()
        stages = [[tuple(windows[b]) for b in r] for r in stage_ranges(self.stage_blocks())]
        for j in range(max(len(s) for s in stages)):
            here = {s[j] for s in stages if j < len(s)}
            if len(here) > 1:
                return (f"the stages' blocks at position {j} call attention with different windows "
                        f"({sorted(here, key=str)}): a tick's rounds must use one window at a time on every stage")
        if self.train.core_attention == "cad" and self.cluster.data_plane == "collective":
            return ("cluster.data_plane: collective moves rows in one process group per pipeline stage; a pooled "
                    "tick needs every stage's trainers in one plan (use inplace, shm or zmq)")
        return ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Pipeline stages: how many decoder blocks each holds
# ----------------------------------------------------------------------------------------------
# ``even`` gives every stage ``n_layers / P`` blocks (the remainder to the first stages). ``balanced`` evens out each
# stage's linear work, LM head included: the last stage also multiplies every token by the ``hidden × vocab`` head,
# which at Llama-3-8B's shape (128K vocabulary) is the linear work of 2.4 blocks. With an even split the last stage
# is the slowest of every tick and the others wait for it; ``balanced`` gives it fewer blocks (8B, 32 blocks: PP 2
# → 17/15, PP 4 → 9/9/8/6). Only linear work is weighed: under CAD a stage's core attention runs on the whole
# pool, balanced by the scheduler, so it does not depend on which stage a block is on (and under local attention
# every block's attention costs the same, so it does not move the balance point much). The embedding is a lookup,
# weighed as nothing. An explicit ``train.stage_blocks`` list overrides both.
#
# Pure arithmetic, here with the model's shape: the trainer (distca.train.pipe.build_pipeline), the pooled
# schedule's rounds (distca.train.pooled), the config's checks and the simulator all take the split from here.


def block_linear_params(cfg: ModelConfig) -> tuple[int, int]:
    """Matmul weights of one block: ``(q/k/v projections of one attention sublayer, all of the block's)``.

    The one parameter counter (with :func:`distca.train.flops.model_params`): the FLOPs counter, the stage split
    and the simulator read it.
    """
    d, hd = cfg.hidden, cfg.head_dim
    qkv = d * hd * (cfg.n_heads + 2 * cfg.n_kv_heads)
    attn = qkv + d * hd * cfg.n_heads  # and the output projection
    # Every block has the same attention sublayers: a ShortSWA sublayer has projections of its own.
    total = len(cfg.block_windows()[0]) * attn + 3 * d * cfg.ffn_hidden
    if cfg.residual == "ddl":
        total += 2 * 2 * d  # the β and value gates (one d-vector each) of both residual updates
    return qkv, total


def head_blocks(model: ModelConfig) -> float:
    """The LM head's linear work in blocks' linear work (tokens × weights: ``hidden × vocab`` over a block's)."""
    return model.hidden * model.vocab_size / block_linear_params(model)[1]


def even_blocks(n_layers: int, stages: int) -> tuple[int, ...]:
    """``n_layers`` blocks over ``stages`` as evenly as possible, the first stages taking the remainder."""
    base, extra = divmod(n_layers, stages)
    return tuple(base + (1 if s < extra else 0) for s in range(stages))


def balanced_blocks(n_layers: int, stages: int, head: float) -> tuple[int, ...]:
    """The split that minimises the slowest stage's linear work when the last stage also runs a head worth
    ``head`` blocks: the last stage takes ``k`` blocks, the others share the rest evenly; the smallest maximum
    wins, ties to the larger ``k`` (the split closest to even)."""
    if stages < 1 or n_layers < stages:
        raise ValueError(f"cannot split {n_layers} blocks over {stages} stages (at least one block per stage)")
    if stages == 1:
        return (n_layers,)
    best, best_k = math.inf, n_layers // stages
    for k in range(1, n_layers - stages + 2):
        cost = max(math.ceil((n_layers - k) / (stages - 1)), k + head)
        if cost <= best + 1e-12:
            best, best_k = min(best, cost), k
    return (*even_blocks(n_layers - best_k, stages - 1), best_k)


def stage_blocks(model: ModelConfig, stages: int, split: str = "even", explicit: tuple[int, ...] | list[int] = ()
                 ) -> tuple[int, ...]:
    """Blocks per stage: ``explicit`` when given (checked: ``stages`` entries, each >= 1, summing to
    ``model.n_layers``), else the ``split`` rule (``even`` | ``balanced``)."""
    if stages < 1 or model.n_layers < stages:
        raise ValueError(f"cannot split model.n_layers={model.n_layers} blocks over {stages} pipeline stages (at least "
                         "one block per stage)")
    if explicit:
        blocks = tuple(int(b) for b in explicit)
        if len(blocks) != stages or min(blocks) < 1 or sum(blocks) != model.n_layers:
            raise ValueError(f"train.stage_blocks {list(blocks)} must give each of the {stages} stages at least one "
                             f"block and sum to model.n_layers ({model.n_layers})")
        return blocks
    if split == "even":
        return even_blocks(model.n_layers, stages)
    if split == "balanced":
        return balanced_blocks(model.n_layers, stages, head_blocks(model))
    raise ValueError(f"unknown stage split {split!r} (even | balanced)")


def stage_ranges(blocks: tuple[int, ...]) -> list[range]:
    """Each stage's block indices."""
    out, start = [], 0
    for b in blocks:
        out.append(range(start, start + b))
        start += b
    return out


# ----------------------------------------------------------------------------------------------
# Strict construction from plain data
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting int → float), or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}: {short_repr(value)}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, list | dict) or value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {short_repr(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {short_repr(value)} matches none of {_type_name(tp)} ({'; '.join(errors)})")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}: {short_repr(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__}: {short_repr(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {short_repr(value)}")
        return number
    if tp in (int, str, bool):
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
            shown = "" if key in _NO_ECHO else f": {short_repr(value)}"  # a key put where its source belongs: unprinted
            raise ConfigError(f"{key} must be {tp.__name__}, got {type(value).__name__}{shown}")
        if tp is int and not -INT64_MAX <= value <= INT64_MAX:
            raise ConfigError(f"{key} must fit in 64 bits, got {short_repr(value)}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


# Fields whose wrong values are not quoted in errors: someone may have put the key itself there.
_NO_ECHO = {"transport.secret_file", "transport.secret_env"}

# Keys that no longer exist, with what replaced them (the value is never echoed: it may be a secret).
_REMOVED = {"transport.secret_hex": "a key never goes in a config or on a command line (it is printed, saved with "
                                    "the run and visible in `ps`); put it in a mode-0600 file named by "
                                    "transport.secret_file, or an environment variable named by transport.secret_env"}


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields, key=str)  # YAML keys may be ints or None as well as strings
    for key in unknown:
        if f"{prefix}.{key}" in _REMOVED:
            raise ConfigError(f"{prefix}.{key} was removed: {_REMOVED[f'{prefix}.{key}']}")
    if unknown:
        where = f"{prefix}." if prefix else ""
        first = unknown[0][:80] if isinstance(unknown[0], str) else short_repr(unknown[0])
        raise ConfigError(
            f"unknown config key {where}{first}"
            + (f" (and {short_repr(unknown[1:])})" if len(unknown) > 1 else "")
            + f"; valid keys here: {sorted(fields)}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def config_from_dict(data: dict[str, Any] | None) -> DistCAConfig:
    """Build a :class:`DistCAConfig` from nested plain data, strictly."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config root must be a mapping, got {type(data).__name__}")
    return _build(DistCAConfig, data)


_MAX_KEY_DEPTH = 8  # section.sub.key is the deepest a config goes today
_MAX_FLOW_DEPTH = 64  # [ ] and { } nesting in YAML text; PyYAML takes seconds to fail on ~1000 levels


def _safe_load(text: str, what: str) -> Any:
    """``yaml.safe_load`` with nesting bounded before parsing (flow brackets outside quotes are counted: PyYAML's
    scanner is quadratic in the depth and its composer recursive), so deep input is one quick ConfigError."""
    depth = 0
    for bracket in _BRACKETS.finditer(_QUOTED.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > _MAX_FLOW_DEPTH:
            raise ConfigError(f"{what}: YAML nested deeper than {_MAX_FLOW_DEPTH} levels")
    try:
        return yaml.safe_load(text)
    except RecursionError:  # block-style nesting (indentation) deep enough for the composer's recursion
        raise ConfigError(f"{what}: YAML nested too deeply") from None


_QUOTED = re.compile(r"'[^']*'|\"(?:[^\"\\]|\\.)*\"")
_BRACKETS = re.compile(r"[\[\]{}]")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--model.n_layers", "4", "--attention.window=128"]`` → nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --section.key VALUE, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        parts = key.split(".")
        if len(parts) > _MAX_KEY_DEPTH:
            raise ConfigError(f"override --{key[:80]}: a key has at most {_MAX_KEY_DEPTH} dotted parts")
        try:
            value = _safe_load(raw, f"override --{key}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"override --{key}: cannot parse {short_repr(raw)}: {' '.join(str(exc).split())}") \
                from exc
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override of {part}")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DistCAConfig:
    """Load ``path`` (YAML) strictly, then apply dotted ``overrides``; defaults where absent."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = _safe_load(Path(path).read_text(), f"config file {path}") or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return config_from_dict(data)


def save_config(cfg: DistCAConfig, path: str | Path) -> None:
    """Write ``cfg`` resolved (every default filled in) as YAML that :func:`load_config` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
