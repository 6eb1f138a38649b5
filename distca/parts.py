"""The one translation from a run's :class:`~distca.config.DistCAConfig` to the settings of its running
parts: the transport, the attention servers, the Ray server pool, the trainer-side CAD client and the
scheduler. Every launcher, ``distca serve``, the trainer and the benchmarks build their parts here, so
a knob means the same thing everywhere and its default lives in one place: the config section. The
library dataclasses built here have no defaults of their own for these knobs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import stat
from dataclasses import dataclass

from distca.attention import AttentionShape
from distca.config import DistCAConfig, TransportSection
from distca.errors import ConfigError
from distca.masks import AttentionKey, key_mask
from distca.scheduler import SchedulerConfig
from distca.server.loop import ServerConfig
from distca.server.pool import PoolConfig
from distca.transport.channel import TransportConfig

# Activation precision of training -> the dtype attention tensors travel and are computed in, and its size.
_SERVER_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSettings:
    """What a trainer's :class:`~distca.runtime.client.CADClient` needs besides its rank and addresses."""

    transport: TransportConfig
    backend: str  # kernel backend for the tasks a trainer runs itself
    shm: bool  # rows through shared memory with the servers on this host (the resolved data plane is shm)


MIN_KEY_BYTES = 16


def _key_of(text: str, where: str) -> bytes:
    """The key held in ``text`` (hex, surrounding whitespace ignored); the text itself is never echoed."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"{where} does not hold a key in hex") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{where} holds a key of {len(key)} bytes: at least {MIN_KEY_BYTES} are needed "
                          "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')")
    return key


def transport_secret(t: TransportSection) -> bytes | None:
    """The shared key named by ``transport.secret_file`` (this user's file, not readable by group or others) or
    ``transport.secret_env``; None when neither is set. The one place a key is read."""
    if t.secret_file:
        where = f"transport.secret_file {t.secret_file}"
        try:
            fd = os.open(t.secret_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot open it ({exc.strerror})") from None
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise ConfigError(f"{where} must be a regular file of this user")
            if st.st_mode & 0o077:
                raise ConfigError(f"{where} is readable or writable by group or others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it")
            try:
                text = f.read(4096)
            except (OSError, UnicodeDecodeError):
                raise ConfigError(f"{where} is not a text file holding a key in hex") from None
        return _key_of(text, where)
    if t.secret_env:
        text = os.environ.get(t.secret_env)
        if text is None:
            raise ConfigError(f"transport.secret_env: the environment variable {t.secret_env} is not set")
        return _key_of(text, f"the environment variable {t.secret_env}")
    return None


_warned_insecure = False


def transport_settings(cfg: DistCAConfig) -> TransportConfig:
    """How trainers and servers talk, from ``cfg.transport`` (the key read from where it names)."""
    global _warned_insecure
    t = cfg.transport
    secret = transport_secret(t)
    if t.kind == "tcp" and secret is None and not _warned_insecure:
        _warned_insecure = True  # one line per process, however many parts are built
        log.warning("INSECURE: transport.kind tcp without a key (transport.insecure: true): any peer that reaches "
                    "%s can send rows into rounds, read results and stop attention servers", t.host)
    return TransportConfig(transport=t.kind, host=t.host, timeout_s=t.timeout_s, secret=secret,
                           checksum=t.checksum, shm_max_bytes=t.shm_max_mb << 20,
                           max_message_bytes=t.max_message_mb << 20, max_frames=t.max_frames)


def server_dtype(cfg: DistCAConfig) -> str:
    """The dtype attention servers compute in: the training precision's activation dtype."""
    return _SERVER_DTYPE[cfg.train.precision]


def attention_shape(cfg: DistCAConfig) -> AttentionShape:
    """The shape of the attention rows that move (heads, kv heads, head dim, bytes per element): what the
    scheduler counts bytes with."""
    m = cfg.model
    return AttentionShape(m.n_heads, m.n_kv_heads, m.head_dim, _DTYPE_BYTES[server_dtype(cfg)])


def server_settings(cfg: DistCAConfig, device: str = "cpu") -> ServerConfig:
    """One attention server's settings (named ``server``; launchers number them ``server0``, ...), computing on
    ``device`` (``cpu``, ``cuda`` or ``cuda:N``; launchers that give a server a GPU say which). A round's rows
    are bounded by one micro-batch's tokens on every trainer (the pooled schedule's tick plans hold one
    micro-batch per stage; 1F1B's plans one stage's replicas): no server ever receives more q rows, or more k/v
    rows (each key token once per document on a server), than that. The bound does not depend on the schedule,
    so runs of either schedule share a pool.

    Every call makes a fresh owner key: the process that starts servers with these settings (and so holds the
    key) is the only one that can SHUTDOWN them; trainers' transport settings do not have it."""
    m, t = cfg.model, cfg.train
    transport = dataclasses.replace(transport_settings(cfg), owner_secret=secrets.token_bytes(32))
    return ServerConfig(n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, dtype=server_dtype(cfg),
                        backend=cfg.attention.backend, max_plans=t.max_server_plans,
                        max_rows=t.max_server_rows or cfg.cluster.n_trainers * t.tokens_per_rank,
                        max_open_rounds=t.max_server_rounds or 4 * cfg.cluster.n_trainers,
                        max_buffer_bytes=t.server_buffer_mb << 20, transport=transport, device=device)


def pool_settings(cfg: DistCAConfig, local_cpus: int | None = None, device: str | None = None) -> PoolConfig:
    """The Ray-managed server pool; ``local_cpus``: what a Ray started here advertises (None: the pool's own
    choice), raised by launchers that also run their trainers on that Ray. ``device``: the run's resolved
    device (None: :func:`cluster_device`).

    On a CUDA run, dedicated servers reserve ``cluster.gpus_per_server`` Ray GPUs each and compute on theirs
    (none reserved: on the host). Colocated servers compute on the host: a Ray actor sees only the GPUs it
    reserves, and the trainers hold theirs whole; the GPU path for colocated attention is
    ``cluster.data_plane: inplace``, which needs no pool.
    """
    c = cfg.cluster
    device = device or cluster_device(cfg)
    on_gpu = device == "cuda" and c.placement == "dedicated" and c.gpus_per_server > 0
    extra = {} if local_cpus is None else {"local_cpus": local_cpus}
    return PoolConfig(n_servers=c.n_servers, placement=c.placement, cpus_per_server=c.cpus_per_server,
                      gpus_per_server=c.gpus_per_server if on_gpu else 0.0, address=c.ray_address or None,
                      server=server_settings(cfg, "cuda" if on_gpu else "cpu"), **extra)


def client_settings(cfg: DistCAConfig, device: str | None = None) -> ClientSettings:
    """A trainer's CAD client settings; shared memory is on when the data plane resolved for ``device``
    (None: :func:`train_device`) is ``shm`` (the client still uses it only with servers on its host)."""
    plane = data_plane(cfg, device or train_device(cfg))
    return ClientSettings(transport=transport_settings(cfg), backend=cfg.attention.backend, shm=plane == "shm")


def scheduler_settings(cfg: DistCAConfig, window: AttentionKey) -> SchedulerConfig:
    """The CAD planner's settings for layers of attention ``window``: an int window (-1: full causal) or a
    :class:`~distca.masks.Mask` of another family (``ModelConfig.block_windows``' keys)."""
    return SchedulerConfig(eps=cfg.scheduler.eps, granularity=cfg.attention.shard_tokens, mask=key_mask(window))


def train_device(cfg: DistCAConfig, cuda_available: bool | None = None) -> str:
    """``"cuda"`` or ``"cpu"``: where this run's trainers compute (``train.device``; ``auto`` asks torch).
    ``cuda`` asked for on a machine without a GPU is a :class:`~distca.errors.ConfigError`."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    want = cfg.train.device
    if want == "cuda" and not cuda_available:
        raise ConfigError("train.device is 'cuda' but torch sees no CUDA device (a CPU build of torch, or no GPU "
                          "visible); use train.device: cpu or auto")
    return "cuda" if want == "cuda" or (want == "auto" and cuda_available) else "cpu"


def cluster_device(cfg: DistCAConfig) -> str:
    """The run's device as a driver that places trainers or servers on a Ray cluster resolves it: an explicit
    ``cuda`` is taken as asked, since the driver (a CPU head, say) need not have a GPU itself — the workers
    check theirs; ``auto`` asks this machine, as :func:`train_device` does."""
    return train_device(cfg, cuda_available=True if cfg.train.device == "cuda" else None)


def data_plane(cfg: DistCAConfig, device: str) -> str:
    """How CAD rows move in this run (``cluster.data_plane``; ``auto``: ``inplace`` on CUDA, ``shm`` on the CPU)."""
    plane = cfg.cluster.data_plane
    if plane != "auto":
        return plane
    return "inplace" if device == "cuda" else "shm"


def pipeline_schedule(cfg: DistCAConfig, device: str) -> tuple[str, str]:
    """``("pooled" | "1f1b", why)``: the pipeline schedule this run's trainers use on ``device`` (``cpu`` or
    ``cuda``) and the reason. ``train.pipeline_schedule: auto`` is pooled for CAD with more than one stage on a
    data plane that pools (in-place, shared memory, ZeroMQ frames), else DeepSpeed's 1F1B."""
    want, pp = cfg.train.pipeline_schedule, cfg.train.pipeline_parallel
    if want == "1f1b":
        return "1f1b", "train.pipeline_schedule: 1f1b"
    if want == "pooled":
        return "pooled", "train.pipeline_schedule: pooled"
    if cfg.train.core_attention != "cad":
        return "1f1b", "auto: core attention is local, there is no attention to pool"
    if pp == 1:
        return "1f1b", "auto: one pipeline stage, nothing to pool"
    why = cfg.pooled_obstacle()
    if why:
        return "1f1b", f"auto: {why}"
    return "pooled", (f"auto: CAD on the {data_plane(cfg, device)} data plane pools the attention of all "
                      f"{pp} stages per tick")


def uses_pool(cfg: DistCAConfig, device: str) -> bool:
    """Whether the run needs the attention-server pool: CAD on any data plane but ``inplace``."""
    return cfg.train.core_attention == "cad" and data_plane(cfg, device) != "inplace"
