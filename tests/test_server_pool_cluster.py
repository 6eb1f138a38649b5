"""The attention-server pool joining a Ray cluster that was started outside it (``address="auto"``)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from distca.server.loop import ServerConfig
from distca.server.pool import AttentionServerPool, PoolConfig
from distca.transport.channel import TransportConfig

pytestmark = pytest.mark.cluster  # spawns trainer/server processes (left out of `make test-fast`)

TCFG = TransportConfig(transport="ipc", host="127.0.0.1", timeout_s=30.0, secret=None, checksum=False,
                       shm_max_bytes=1 << 30)
SERVER = ServerConfig(n_heads=4, n_kv_heads=2, head_dim=8, dtype="float32", backend="sdpa", max_plans=8,
                      max_rows=1 << 16, transport=TCFG)


def test_pool_joins_an_existing_cluster_with_address_auto():
    """A Ray head started outside the pool (as on a real cluster), bound to loopback; the pool joins it
    with ``address="auto"``, serves, and leaves the cluster running when it shuts down."""
    import subprocess
    import sys

    from distca.server.pool import local_ray_on_loopback

    local_ray_on_loopback()  # this simulated cluster lives on loopback: the driver must agree (before import ray)
    import ray

    assert not ray.is_initialized()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Ray's own token authentication stays on (as the pool keeps it): local_ray_on_loopback() set RAY_AUTH_MODE=token
    # and made this user's token file private; the head reads the same file as this driver (a driver process loads
    # its token once, so a test-only token file would not reach a driver that an earlier test already connected)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    token = Path.home() / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o077 == 0
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # --block: the head lives as long as this one process, and ending it stops exactly that head's processes
    # (`ray stop` would stop every Ray on the machine, other runs' included)
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus", "4", "--disable-usage-stats",
                             "--include-dashboard", "false", "--port", "0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # `ray start` writes the head's address where `address="auto"` finds it; `ray stop` would remove the file,
    # ending the head does not, and a stale file sends a later plain `ray.init()` to a cluster that is gone
    from ray._common.utils import get_ray_address_file

    address_file, ours = Path(get_ray_address_file(None)), None
    try:
        deadline = time.monotonic() + 120
        def up() -> bool:
            return (address_file.exists() and bool(address_file.read_text().strip())
                    and subprocess.run([ray_bin, "status"], env=env, capture_output=True, timeout=60).returncode == 0)

        while not up():
            assert head.poll() is None, head.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not come up within 120 s"
            time.sleep(0.5)
        ours = address_file.read_text()
        cfg = PoolConfig(n_servers=2, placement="dedicated", cpus_per_server=0.0, gpus_per_server=0.0, address="auto",
                         server=SERVER)
        with AttentionServerPool(cfg) as p:
            assert p.health(timeout_s=30.0) == [True, True]
        assert not ray.is_initialized()  # the driver disconnected ...
        status = subprocess.run([ray_bin, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0  # ... and the cluster is still up
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        with contextlib.suppress(OSError):
            if ours is not None and address_file.read_text() == ours:
                address_file.unlink()
