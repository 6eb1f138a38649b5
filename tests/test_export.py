"""``distca export`` and the atomic Hugging Face folder write, on checkpoint folders in DeepSpeed's pipeline layout
written here (the cluster test in test_train.py exports a real run's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distca.model.hf as hf
from distca.cli import main
from distca.config import ModelConfig
from distca.model import LlamaModel, load_hf_weights, save_hf_weights
from distca.train.export import MODEL_FILE, export_checkpoint, write_model_config

TINY = dict(n_layers=2, hidden=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=61)


def _checkpoint(root: Path, cfg: ModelConfig, seed: int = 0, with_config: bool = True) -> LlamaModel:
    """A checkpoint as the trainer writes it: ``latest``, a tag, one state dict per pipeline layer (none for a tied
    head), and the model's config."""
    torch.manual_seed(seed)
    model = LlamaModel(cfg)
    tag = root / "step00000010"
    tag.mkdir(parents=True)
    (root / "latest").write_text("step00000010")
    parts = [model.embed, *model.blocks, model.norm] + ([] if cfg.tie_embeddings else [model.head])
    for i, part in enumerate(parts):
        torch.save(part.state_dict(), tag / f"layer_{i:02d}-model_states.pt")
    if with_config:
        write_model_config(tag, cfg)
    return model


def _same(a: LlamaModel, b: LlamaModel) -> None:
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("tie", [False, True])
def test_export_writes_the_checkpoint_exactly(tmp_path, tie):
    cfg = ModelConfig(**TINY, tie_embeddings=tie, qkv_bias=True)
    model = _checkpoint(tmp_path / "ckpt", cfg)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw["model_type"] == "qwen2" and raw["tie_word_embeddings"] is tie
    again = LlamaModel(LlamaModel.config_from_hf(tmp_path / "hf"))
    assert again.cfg == cfg
    assert load_hf_weights(cfg, dict(again.named_parameters()), tmp_path / "hf") == []
    _same(model, again)


def test_export_casts_shards_and_names_what_is_wrong(tmp_path, capsys):
    cfg = ModelConfig(**TINY)
    _checkpoint(tmp_path / "ckpt", cfg)
    written = export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", dtype=torch.bfloat16, max_shard_bytes=20_000)
    assert [p.name for p in written][-2:] == ["model.safetensors.index.json", "config.json"] and len(written) > 3
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for p in written[:-2] for t in load_file(p).values())

    # an older checkpoint without the model's config needs the run's YAML
    _checkpoint(tmp_path / "old", cfg, with_config=False)
    assert main(["export", "--checkpoint", str(tmp_path / "old"), "--out", str(tmp_path / "x")]) == 2
    assert f"has no {MODEL_FILE}" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "run.yaml").write_text(json.dumps({"model": TINY}))
    assert main(["export", "--checkpoint", str(tmp_path / "old"), "--out", str(tmp_path / "x"),
                 "--config", str(tmp_path / "run.yaml")]) == 0

    # a layer missing, or shaped for another model: named, nothing written
    (tmp_path / "ckpt" / "step00000010" / "layer_02-model_states.pt").unlink()
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "y")]) == 2
    assert "lacks layer_02-model_states.pt (blocks.1)" in capsys.readouterr().err
    _checkpoint(tmp_path / "wide", ModelConfig(**{**TINY, "ffn_hidden": 64}), with_config=False)
    assert main(["export", "--checkpoint", str(tmp_path / "wide"), "--out", str(tmp_path / "y"),
                 "--config", str(tmp_path / "run.yaml")]) == 2
    assert "blocks.0.mlp.gate.weight has shape [64, 32], the config says [48, 32]" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    assert "holds no DeepSpeed pipeline layer files" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_a_crash_midway_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    """A write that dies after its first shard leaves the folder as it was (weights, index and the tokenizer
    beside them) and no temporary folder; a later write replaces the weights and keeps the tokenizer."""
    old = LlamaModel(ModelConfig(**TINY))
    save_hf_weights(old, tmp_path / "hf", max_shard_bytes=20_000)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())

    real, calls = hf.save_file, []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "save_file", dies_on_the_second_shard)
    torch.manual_seed(1)
    new = LlamaModel(ModelConfig(**TINY))
    with pytest.raises(OSError, match="disk full"):
        save_hf_weights(new, tmp_path / "hf", max_shard_bytes=20_000)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    check = LlamaModel(ModelConfig(**TINY))
    load_hf_weights(check.cfg, dict(check.named_parameters()), tmp_path / "hf")
    _same(old, check)

    monkeypatch.setattr(hf, "save_file", real)
    save_hf_weights(new, tmp_path / "hf")  # now one file: the old shards and index go, the tokenizer stays
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                    "tokenizer.json"]
    load_hf_weights(check.cfg, dict(check.named_parameters()), tmp_path / "hf")
    _same(new, check)
