"""``AttentionServerPool``: attention servers as Ray actors — start, collect addresses, health-check,
restart the dead, shut down cleanly.

Each actor runs the ZeroMQ server loop (``distca.server.loop``) on a thread of its own, so the actor
stays responsive to Ray calls (address, pid, stop). Trainers talk to servers over ZeroMQ (rows through
shared memory when both are on one host), never through Ray: Ray only manages lifetimes and placement.

Local mode starts Ray on demand bound to 127.0.0.1 (every Ray listener on loopback: Ray ignores a
loopback node address given to ``ray.init``, so the environment is set before Ray starts, see
``local_ray_on_loopback``); ``address="auto"`` joins an existing cluster. Plain server processes without Ray:
:mod:`distca.server.processes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from typing import Literal

import zmq

from distca.server.control import answers_ping, remove_ipc_socket, request_shutdown
from distca.server.loop import AttentionServer, ServerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """How many servers, where they run, and how the pool reaches Ray. The fields a run's ``cluster``
    section decides have no default here; :mod:`distca.parts` builds them from the config."""

    n_servers: int
    placement: Literal["colocated", "dedicated"]
    cpus_per_server: float  # Ray resources each actor reserves (0: no reservation)
    gpus_per_server: float  # Ray GPUs each actor reserves (0: none; its server then must compute on the host)
    address: str | None  # None: start a local Ray on 127.0.0.1; "auto": join the running cluster
    server: ServerConfig
    local_cpus: int = 4  # CPUs a local Ray advertises (this machine reports 2; actors must not pend)
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.n_servers < 1:
            raise ValueError(f"n_servers must be >= 1, got {self.n_servers}")
        if self.placement not in ("colocated", "dedicated"):
            raise ValueError(f"placement must be 'colocated' or 'dedicated', got {self.placement!r}")
        if self.server.device != "cpu" and self.gpus_per_server <= 0:
            raise ValueError(f"servers on {self.server.device!r} need a GPU reservation (gpus_per_server > 0): a Ray "
                             "actor without one sees no GPU")


class _ServerActor:
    """A Ray actor hosting one attention server loop on a background thread."""

    def __init__(self, cfg: ServerConfig):
        import torch

        torch.set_num_threads(1)
        self._ready = threading.Event()
        self._error: BaseException | None = None  # why the server did not start
        self._loop_error: BaseException | None = None  # why its loop died
        self._thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self._thread.start()
        self._ready.wait(timeout=60)

    def _run(self, cfg: ServerConfig) -> None:
        try:
            self.server = AttentionServer(cfg, ctx=zmq.Context())
        except BaseException as exc:  # reported through address()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self.server.serve_forever()
        except BaseException as exc:  # the loop died (not from a message: it survives those); health() says so
            self._loop_error = exc

    def health(self) -> bool:
        """True while the server loop serves; raises naming why once its thread has ended (a loop that died, or
        SHUTDOWN), so a live actor whose server is gone never passes for healthy."""
        if self._error is not None:
            raise RuntimeError(f"attention server failed to start: {self._error!r}")
        if self._thread.is_alive():
            return True
        why = self._loop_error
        raise RuntimeError(f"attention server loop ended: {why!r}" if why else "attention server loop ended (SHUTDOWN)")

    def address(self) -> str:
        if self._error is not None:
            raise RuntimeError(f"attention server failed to start: {self._error!r}")
        return self.server.address

    def pid(self) -> int:
        return os.getpid()


def local_ray_on_loopback() -> None:
    """Make a Ray started by this process bind every service to 127.0.0.1.

    Ray ignores its own node-ip option for localhost; the switch below works, and Ray reads it when it
    is imported, so this must run before the first ``import ray`` of the process.
    """
    import sys

    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        log.warning("ray was imported before local_ray_on_loopback(): its services may bind a public interface")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray's own token authentication stays on (Ray's default for a new local cluster, made explicit; a user who
    # sets RAY_AUTH_MODE themselves keeps their choice): loopback binding alone would leave Ray's ports open
    # to every local user, and a Ray client can run arbitrary code.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token":
        _private_ray_token()


def _private_ray_token() -> None:
    """Make sure the token a local Ray uses is readable by this user only: Ray would create ~/.ray/auth_token
    with the umask's mode (0644 by default), so create it first (0600), or tighten one that is there."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the user manages the token
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # Ray's own token format (256 bits, hex)


class AttentionServerPool:
    """N attention servers as Ray actors; a context manager that always shuts them down."""

    def __init__(self, cfg: PoolConfig, trainer_nodes: list[str] | None = None):
        if cfg.address is None:
            local_ray_on_loopback()
        import ray

        self.cfg = cfg
        self.ray = ray
        self.started_ray = False
        if not ray.is_initialized():
            if cfg.address is None:  # "local": a Ray of our own, even where a `ray start` cluster runs here
                ray.init(address="local", num_cpus=cfg.local_cpus, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            else:
                ray.init(address=cfg.address, log_to_driver=False, logging_level=logging.WARNING)
            self.started_ray = True
        self.actor_cls = ray.remote(_ServerActor)
        self.trainer_nodes = trainer_nodes
        self.actors = [self._start(i) for i in range(cfg.n_servers)]
        self.addresses = ray.get([a.address.remote() for a in self.actors], timeout=cfg.start_timeout_s)
        self.ctx = zmq.Context()

    def _start(self, i: int):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts = {"num_cpus": self.cfg.cpus_per_server, "name": None, "max_restarts": 0}
        if self.cfg.gpus_per_server > 0:  # Ray then shows the actor its GPU(s) alone: "cuda" is the reserved one
            opts["num_gpus"] = self.cfg.gpus_per_server
        if self.cfg.placement == "colocated":
            nodes = self.trainer_nodes or [self.ray.get_runtime_context().get_node_id()]
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)], soft=False)
        else:
            opts["scheduling_strategy"] = "SPREAD"
        cfg = dataclasses.replace(self.cfg.server, name=f"{self.cfg.server.name}{i}")
        return self.actor_cls.options(**opts).remote(cfg)

    def __enter__(self) -> AttentionServerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def health(self, timeout_s: float = 2.0) -> list[bool]:
        """Whether each server's actor says its loop serves and the server answers a PING within ``timeout_s``."""
        return [self._actor_serves(i, timeout_s) and answers_ping(self.ctx, self.cfg.server.transport, a, timeout_s)
                for i, a in enumerate(self.addresses)]

    def _actor_serves(self, i: int, timeout_s: float) -> bool:
        try:
            return bool(self.ray.get(self.actors[i].health.remote(), timeout=timeout_s))
        except Exception as exc:  # a dead actor, a dead loop (its reason), or no answer in time
            log.warning("attention server %d is not serving: %s", i, exc)
            return False

    def restart_dead(self, timeout_s: float = 2.0) -> list[int]:
        """Replace servers that do not answer; returns their indices (addresses change)."""
        dead = self.lost(timeout_s)
        for i in dead:
            self.replace(i)
        return dead

    def lost(self, timeout_s: float = 2.0) -> list[int]:
        """The servers that do not answer a PING within ``timeout_s``."""
        return [i for i, alive in enumerate(self.health(timeout_s)) if not alive]

    def replace(self, i: int) -> str:
        """Start a new server ``i`` in place of the one there (killed first, its socket file removed); returns its
        address (a new one). In-step recovery calls it in the background for a server the trainers lost, and
        :meth:`restart_dead` for each server that does not answer."""
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[i], no_restart=True)
        remove_ipc_socket(self.addresses[i])
        self.actors[i] = self._start(i)
        self.addresses[i] = self.ray.get(self.actors[i].address.remote(), timeout=self.cfg.start_timeout_s)
        log.warning("replaced attention server %d: now at %s", i, self.addresses[i])
        return self.addresses[i]

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors], timeout=30)

    def shutdown(self) -> None:
        """Stop every server loop, kill the actors, and stop Ray if this pool started it."""
        request_shutdown(self.ctx, self.cfg.server.transport, list(self.addresses), timeout_s=2.0)
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a, no_restart=True)
        self.actors = []
        self.ctx.term()
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False
