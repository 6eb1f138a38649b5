"""Strict YAML config loading and dotted command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from distca.config import DistCAConfig, load_config, parse_overrides, save_config
from distca.errors import ConfigError

ROOT_CONFIGS = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(ROOT_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), DistCAConfig)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_saved_config_loads_back_equal(path, tmp_path):
    """What a run writes into its output folder (config.yaml) is the same config when read back."""
    cfg = load_config(path, ["--transport.secret_env", "DISTCA_JOB_KEY", "--model.norm_eps", "0.000001",
                             "--data.path", "a b:c"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg


def test_overrides_change_typed_fields(tmp_path):
    cfg = load_config(ROOT_CONFIGS / "tiny-cpu.yaml", ["--model.n_layers", "4",
                                                       "--attention.window=64", "--data.doc_lengths", "[5, 6]"])
    assert cfg.model.n_layers == 4 and cfg.attention.window == 64 and cfg.data.doc_lengths == [5, 6]


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "match"),
    [
        ("model:\n  n_layer: 4\n", [], r"unknown config key model\.n_layer"),
        ("modle: {}\n", [], "unknown config key modle"),
        ("", ["--attention.shard", "3"], r"unknown config key attention\.shard"),
        ("model:\n  n_layers: four\n", [], r"model\.n_layers must be int, got str"),
        ("model:\n  n_layers: true\n", [], r"model\.n_layers must be int, got bool"),
        ("", ["--attention.dtype", "fp8"], r"attention\.dtype must be one of"),
        ("", ["--model.n_heads", "6"], r"model\.hidden \(256\) must be a multiple of model\.n_heads \(6\)"),
        ("", ["--data.doc_lengths", "[1, x]"], r"data\.doc_lengths\[1\] must be int"),
        ("- 1\n", [], "must hold a mapping"),
        ("model: [1]\n", [], "model must be a mapping"),
        ("", ["model.n_layers", "3"], "expected an override like"),
        ("", ["--model.n_layers"], "has no value"),
        ("", ["--attention.window", "0"], r"attention\.window must be -1 or >= 1"),
        ("", ["--cluster.gpus_per_server", "-1"], r"cluster\.cpus_per_server and cluster\.gpus_per_server"),
        ("", ["--train.device", "gpu"], r"train\.device must be one of"),
        ("", ["--transport.shm_max_mb", "-1"], r"transport\.shm_max_mb must be in \[0, 1048576\]"),
        ("", ["--train.defer_weight_grads", "true", "--train.precision", "bf16", "--train.zero_stage", "0"],
         r"train\.defer_weight_grads cannot run with precision bf16 and zero_stage 0"),
        ("", ["--train.nano_split", "halves"], r"train\.nano_split must be one of"),
        ("", ["--train.nano_split", "repack", "--train.tokens_per_rank", "1023"],
         r"train\.nano_split: repack .* train\.tokens_per_rank must be even, got 1023"),
    ],
)
def test_invalid_configs_name_the_offending_key(tmp_path, yaml_text, overrides, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_layers: [}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["--a.b.c", "1", "--a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
