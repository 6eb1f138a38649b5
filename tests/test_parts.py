"""The one translation from a run's config to its running parts' settings (``distca.parts``)."""

from __future__ import annotations

import dataclasses

import pytest

from distca.config import config_from_dict, load_config
from distca.errors import InputError
from distca.parts import (
    attention_shape,
    client_settings,
    pool_settings,
    scheduler_settings,
    server_settings,
    transport_settings,
)


def _cfg(**sections):
    return config_from_dict(sections)


def test_bf16_precision_gives_a_bfloat16_server_and_fp32_a_float32_one():
    assert server_settings(_cfg(train={"precision": "bf16"})).dtype == "bfloat16"
    assert server_settings(_cfg(train={"precision": "fp32"})).dtype == "float32"


def test_server_settings_follow_model_attention_and_train_sections():
    cfg = _cfg(model={"hidden": 384, "n_heads": 6, "n_kv_heads": 3}, attention={"backend": "sdpa"},
               train={"max_server_plans": 17})
    s = server_settings(cfg)
    assert (s.n_heads, s.n_kv_heads, s.head_dim) == (6, 3, 64)
    assert s.backend == "sdpa" and s.max_plans == 17 and s.device == "cpu"
    assert s.max_rows == cfg.cluster.n_trainers * cfg.train.tokens_per_rank  # a micro-batch on every trainer
    assert s.transport == transport_settings(cfg)


def test_serve_and_train_get_identical_server_settings():
    """``distca serve`` and every training launcher start servers from the same pool settings."""
    cfg = _cfg(train={"precision": "bf16", "max_server_plans": 32}, transport={"timeout_s": 12.5})
    assert pool_settings(cfg).server == server_settings(cfg)
    assert pool_settings(cfg, local_cpus=6).server == pool_settings(cfg).server
    assert pool_settings(cfg, local_cpus=6).local_cpus == 6


def test_transport_settings_from_the_transport_section(tmp_path):
    key = tmp_path / "key"
    key.write_text("ab" * 16 + "\n")
    key.chmod(0o600)
    cfg = _cfg(transport={"kind": "tcp", "host": "10.0.0.7", "timeout_s": 7.0, "secret_file": str(key),
                          "checksum": True, "max_message_mb": 64, "max_frames": 9})
    t = transport_settings(cfg)
    assert (t.transport, t.host, t.timeout_s, t.secret, t.checksum) == ("tcp", "10.0.0.7", 7.0, b"\xab" * 16, True)
    assert (t.max_message_bytes, t.max_frames) == (64 << 20, 9)
    assert transport_settings(_cfg()).secret is None  # no key named: no authentication (ipc only)
    assert transport_settings(_cfg(transport={"shm_max_mb": 3})).shm_max_bytes == 3 << 20
    assert transport_settings(_cfg()).shm_max_bytes == _cfg().transport.shm_max_mb << 20  # the default: the config's


def test_scheduler_eps_granularity_and_window_flow_from_the_config():
    cfg = _cfg(scheduler={"eps": 0.125}, attention={"shard_tokens": 64})
    s = scheduler_settings(cfg, window=256)
    assert (s.eps, s.granularity, s.window) == (0.125, 64, 256)
    assert scheduler_settings(_cfg(), -1).eps == _cfg().scheduler.eps  # the default lives in the config


@pytest.mark.parametrize("placement", ["colocated", "dedicated"])
def test_pool_placement_and_ray_settings_flow_from_the_cluster_section(placement):
    cfg = _cfg(cluster={"n_trainers": 4, "n_servers": 3, "placement": placement, "cpus_per_server": 0.5,
                        "ray_address": "auto"})
    p = pool_settings(cfg)
    assert (p.n_servers, p.placement, p.cpus_per_server, p.address) == (3, placement, 0.5, "auto")
    assert pool_settings(_cfg()).address is None  # "": start a local Ray


def test_dedicated_servers_of_a_cuda_run_reserve_gpus_and_compute_there_everything_else_on_the_host():
    dedicated = {"placement": "dedicated", "n_servers": 2}
    p = pool_settings(_cfg(cluster=dedicated), device="cuda")
    assert (p.gpus_per_server, p.server.device) == (1.0, "cuda")  # Ray shows the actor its reserved GPU as cuda
    half = pool_settings(_cfg(cluster={**dedicated, "gpus_per_server": 0.5}), device="cuda")
    assert (half.gpus_per_server, half.server.device) == (0.5, "cuda")  # two servers share a GPU
    none = pool_settings(_cfg(cluster={**dedicated, "gpus_per_server": 0.0}), device="cuda")
    assert (none.gpus_per_server, none.server.device) == (0.0, "cpu")
    # colocated actors cannot be shown their trainer's GPU (the trainers hold theirs whole): host servers
    colocated = pool_settings(_cfg(cluster={"placement": "colocated"}), device="cuda")
    assert (colocated.gpus_per_server, colocated.server.device) == (0.0, "cpu")
    # a CPU run never reserves a GPU, whatever the cluster has; without a device the run's own is resolved
    assert pool_settings(_cfg(cluster=dedicated), device="cpu").gpus_per_server == 0.0
    assert pool_settings(_cfg(cluster=dedicated, train={"device": "cpu"})).server.device == "cpu"
    # an explicit cuda needs no GPU where the pool is set up (`distca serve` on a CPU head of a GPU cluster)
    assert pool_settings(_cfg(cluster=dedicated, train={"device": "cuda"})).server.device == "cuda"
    assert server_settings(_cfg(), "cuda:1").device == "cuda:1"


def test_a_pool_refuses_gpu_servers_without_a_gpu_reservation():
    from distca.server.pool import PoolConfig

    p = pool_settings(_cfg(cluster={"placement": "dedicated"}), device="cuda")
    with pytest.raises(ValueError, match="gpus_per_server"):
        PoolConfig(**{**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)}, "gpus_per_server": 0.0})


def test_client_settings_share_the_servers_transport(monkeypatch):
    monkeypatch.setenv("DISTCA_TEST_KEY", "00ff" * 8)
    cfg = _cfg(attention={"backend": "reference"}, transport={"secret_env": "DISTCA_TEST_KEY"})
    c, s = client_settings(cfg), server_settings(cfg)
    assert c.backend == "reference" and c.transport == s.transport and c.transport.secret == bytes.fromhex("00ff" * 8)
    # only the process that starts servers holds the key that stops them
    assert c.transport.owner_secret is None and s.transport.owner_secret is not None


def test_client_uses_shared_memory_exactly_when_the_resolved_data_plane_is_shm():
    assert client_settings(_cfg(), "cpu").shm  # auto on the CPU: shm
    assert not client_settings(_cfg(cluster={"data_plane": "zmq"}), "cpu").shm
    assert client_settings(_cfg(cluster={"data_plane": "shm"}), "cuda").shm
    assert not client_settings(_cfg(cluster={"data_plane": "collective", "placement": "dedicated"}), "cpu").shm
    assert client_settings(_cfg(train={"device": "cpu"})).shm  # the device from train.device when not given


def test_library_settings_have_no_defaults_of_their_own_for_config_knobs():
    """Each default lives in the config: the library dataclasses require what the config decides."""
    from distca.scheduler import SchedulerConfig
    from distca.server.loop import ServerConfig
    from distca.server.pool import PoolConfig
    from distca.transport.channel import TransportConfig

    def required(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}

    assert {"eps", "granularity"} <= required(SchedulerConfig)
    with pytest.raises(InputError, match="window"):  # the layer's attention: window= or mask=, never a default
        SchedulerConfig(eps=0.02, granularity=128)
    assert {"n_heads", "n_kv_heads", "head_dim", "dtype", "backend", "max_plans", "max_rows",
            "transport"} <= required(ServerConfig)
    assert {"n_servers", "placement", "cpus_per_server", "gpus_per_server", "address", "server"} <= required(PoolConfig)
    assert {"transport", "host", "timeout_s", "secret", "checksum", "shm_max_bytes"} <= required(TransportConfig)


def test_attention_shape_counts_bytes_in_the_training_precision():
    fp32 = attention_shape(load_config(None, ["--model.hidden=256", "--model.n_heads=8", "--model.n_kv_heads=2"]))
    bf16 = attention_shape(load_config(None, ["--model.hidden=256", "--model.n_heads=8", "--model.n_kv_heads=2",
                                              "--train.precision=bf16"]))
    assert (fp32.n_heads, fp32.n_kv_heads, fp32.head_dim, fp32.dtype_bytes) == (8, 2, 32, 4)
    assert bf16.dtype_bytes == 2


def test_train_device_auto_follows_torch_and_cuda_without_a_gpu_is_refused():
    from distca.errors import ConfigError
    from distca.parts import train_device

    assert train_device(_cfg(train={"device": "auto"}), cuda_available=False) == "cpu"
    assert train_device(_cfg(train={"device": "auto"}), cuda_available=True) == "cuda"
    assert train_device(_cfg(train={"device": "cpu"}), cuda_available=True) == "cpu"
    with pytest.raises(ConfigError, match=r"train\.device"):
        train_device(_cfg(train={"device": "cuda"}), cuda_available=False)


def test_a_cluster_driver_takes_an_explicit_cuda_without_a_gpu_of_its_own():
    from distca.parts import cluster_device, train_device

    for device in ("cpu", "cuda"):
        assert cluster_device(_cfg(train={"device": device})) == device
    assert cluster_device(_cfg(train={"device": "auto"})) == train_device(_cfg(train={"device": "auto"}))


def test_data_plane_auto_is_inplace_on_cuda_and_shm_on_cpu_and_inplace_needs_colocated():
    from distca.errors import ConfigError
    from distca.parts import data_plane, uses_pool

    assert data_plane(_cfg(), "cuda") == "inplace" and data_plane(_cfg(), "cpu") == "shm"
    assert data_plane(_cfg(cluster={"data_plane": "zmq"}), "cuda") == "zmq"
    assert not uses_pool(_cfg(cluster={"data_plane": "inplace"}), "cpu")
    assert uses_pool(_cfg(cluster={"data_plane": "collective", "placement": "dedicated"}), "cpu")
    assert not uses_pool(_cfg(train={"core_attention": "local"}), "cpu")
    with pytest.raises(ConfigError, match="colocated"):
        _cfg(cluster={"data_plane": "inplace", "placement": "dedicated"})
