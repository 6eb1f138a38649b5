"""Hugging Face Llama safetensors weights: name mapping, equivalence with HF's Llama math, save/load."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distca.config import ModelConfig
from distca.model import (
    DocLayout,
    LlamaModel,
    LocalCoreAttention,
    hf_state_dict_mapping,
    load_hf_weights,
    save_hf_weights,
)
from distca.model.hf import hf_config

TINY = dict(n_layers=2, hidden=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=61, shortswa_window=4)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def _model(seed: int, **kw) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(_cfg(**kw))


def _load(model: LlamaModel, folder, **kw) -> list[str]:
    """Load into a whole model: its config and every parameter under its own name."""
    return load_hf_weights(model.cfg, dict(model.named_parameters()), folder, **kw)


def _logits(model: LlamaModel, lengths=(9, 14)) -> torch.Tensor:
    lay = DocLayout.from_lengths(list(lengths))
    tokens = torch.randint(0, model.cfg.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(tokens, lay, LocalCoreAttention(lay, backend="reference"))


def _hf_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face names and shapes, written down from HF's LlamaForCausalLM layout."""
    g = torch.Generator().manual_seed(seed)
    d, kv = cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def w(*shape, scale=None):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * (scale or 1 / math.sqrt(shape[-1]))

    out = {"model.embed_tokens.weight": w(cfg.vocab_size, cfg.hidden, scale=1.0)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": w(cfg.n_heads * d, cfg.hidden, scale=0.5),
                p + "self_attn.k_proj.weight": w(kv, cfg.hidden, scale=0.5),
                p + "self_attn.v_proj.weight": w(kv, cfg.hidden),
                p + "self_attn.o_proj.weight": w(cfg.hidden, cfg.n_heads * d),
                p + "mlp.gate_proj.weight": w(cfg.ffn_hidden, cfg.hidden),
                p + "mlp.up_proj.weight": w(cfg.ffn_hidden, cfg.hidden),
                p + "mlp.down_proj.weight": w(cfg.hidden, cfg.ffn_hidden),
                p + "input_layernorm.weight": 1 + 0.3 * w(cfg.hidden, scale=1.0),
                p + "post_attention_layernorm.weight": 1 + 0.3 * w(cfg.hidden, scale=1.0)}
    out["model.norm.weight"] = 1 + 0.3 * w(cfg.hidden, scale=1.0)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w(cfg.vocab_size, cfg.hidden)
    return out


def _hf_llama_logits(sd: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Hugging Face Llama's forward for one document, dense and causal, in fp64 — written out plainly."""
    t, h, hkv, d = tokens.numel(), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    def rotate_half(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((-x2, x1), dim=-1)

    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None], emb.sin()[None]  # [1, T, D], broadcast over heads
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)

    x = sd["model.embed_tokens.weight"][tokens]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        a = rms(x, sd[p + "input_layernorm.weight"])
        q = (a @ sd[p + "self_attn.q_proj.weight"].T).view(t, h, d).transpose(0, 1)  # [H, T, D]
        k = (a @ sd[p + "self_attn.k_proj.weight"].T).view(t, hkv, d).transpose(0, 1)
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(t, hkv, d).transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(h // hkv, dim=0), v.repeat_interleave(h // hkv, dim=0)  # HF's repeat_kv
        probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + mask, dim=-1)
        x = x + (probs @ v).transpose(0, 1).reshape(t, h * d) @ sd[p + "self_attn.o_proj.weight"].T
        m = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = m @ sd[p + "mlp.gate_proj.weight"].T, m @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    head = sd["model.embed_tokens.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    return rms(x, sd["model.norm.weight"]) @ head.T


def _write(folder, tensors: dict[str, torch.Tensor], name="model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name, metadata={"format": "pt"})


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_mapping_covers_exactly_the_standard_models_parameters():
    for tied in (False, True):
        cfg = _cfg(tie_embeddings=tied)
        mapping = hf_state_dict_mapping(cfg)
        assert sorted(mapping.values()) == sorted(n for n, _ in LlamaModel(cfg).named_parameters())
        assert ("lm_head.weight" in mapping) is not tied
        assert len(mapping) == 2 + 9 * cfg.n_layers + (not tied)
    mapping = hf_state_dict_mapping(_cfg())
    assert mapping["model.layers.1.self_attn.k_proj.weight"] == "blocks.1.attn.k.weight"
    assert mapping["model.layers.0.post_attention_layernorm.weight"] == "blocks.0.mlp_norm.weight"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loaded_model_computes_hugging_face_llama(tmp_path, tied):
    """Our model loaded from HF-named weights gives HF Llama's logits: rotate-half RoPE needs no q/k
    permutation, and GQA groups query heads over kv heads as HF's repeat_kv does."""
    cfg = _cfg(rope_theta=10.0, tie_embeddings=tied)  # a small theta: every rotary pair turns a lot
    sd = _hf_tensors(cfg)
    _write(tmp_path, sd)
    model = LlamaModel(cfg).double()
    assert _load(model, tmp_path) == []
    tokens = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    lay = DocLayout.from_lengths([20])
    with torch.no_grad():
        ours = model(tokens, lay, LocalCoreAttention(lay, backend="reference"))
    want = _hf_llama_logits(sd, cfg, tokens)
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-9)

    # Negative control: Meta's interleaved layout (what HF's conversion script permutes away) differs.
    perm = torch.arange(cfg.head_dim).view(2, -1).T.reshape(-1)  # [0, d/2, 1, d/2+1, ...]
    bad = dict(sd)
    for i in range(cfg.n_layers):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        bad[name] = sd[name].view(cfg.n_heads, cfg.head_dim, -1)[:, perm].reshape_as(sd[name])
    assert not torch.allclose(_hf_llama_logits(bad, cfg, tokens), want, atol=1e-3)


def test_round_trip_gives_identical_outputs(tmp_path):
    src = _model(0)
    files = save_hf_weights(src, tmp_path)
    assert [f.name for f in files] == ["model.safetensors", "config.json"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(hf_state_dict_mapping(src.cfg))
        assert f.metadata() == {"format": "pt"}
    raw = json.loads((tmp_path / "config.json").read_text())
    assert (raw["architectures"], raw["model_type"], raw["hidden_act"], raw["torch_dtype"]) == \
        (["LlamaForCausalLM"], "llama", "silu", "float32")
    assert LlamaModel.config_from_hf(tmp_path, shortswa_window=4) == src.cfg  # the window is ours

    dst = _model(1)
    assert not torch.equal(_logits(dst), _logits(src))
    assert _load(dst, tmp_path) == []
    assert torch.equal(_logits(dst), _logits(src))


def test_sharded_round_trip(tmp_path):
    src = _model(0)
    largest = src.embed.weight.numel() * 4
    files = save_hf_weights(src, tmp_path, max_shard_bytes=largest + 1)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_state_dict_mapping(src.cfg))
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in src.parameters())
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            keys = f.keys()
            assert sum(f.get_tensor(k).numel() * 4 for k in keys) <= largest + 1
    assert set(files) == {*shards, tmp_path / "model.safetensors.index.json", tmp_path / "config.json"}

    dst = _model(1)
    assert _load(dst, tmp_path) == []
    assert torch.equal(_logits(dst), _logits(src))

    # Saving again unsharded replaces the shards (no stale, ambiguous files are left behind).
    save_hf_weights(src, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_part_of_the_model_loads_only_its_tensors(tmp_path):
    """One pipeline stage's parameters (here block 1, the final norm and the head, by LlamaModel names)
    take their tensors; the rest keep their values; the checkpoint is still judged as a whole."""
    src = _model(0)
    save_hf_weights(src, tmp_path)
    dst = _model(1)
    before = _params(dst)
    part = {n: p for n, p in dst.named_parameters() if n.startswith(("blocks.1.", "norm.", "head."))}
    assert load_hf_weights(dst.cfg, part, tmp_path) == []
    for name, p in dst.named_parameters():
        want = dict(src.named_parameters())[name] if name in part else before[name]
        assert torch.equal(p, want), name
    with pytest.raises(ValueError, match=r"\['block\.0\.attn\.q\.weight'\] are not parameter names"):
        load_hf_weights(dst.cfg, {"block.0.attn.q.weight": dst.blocks[0].attn.q.weight}, tmp_path)
    _write(tmp_path / "short", {k: v for k, v in _hf_tensors(dst.cfg).items() if "layers.0.mlp.up" not in k})
    with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        load_hf_weights(dst.cfg, part, tmp_path / "short")  # block 0 is not in the part, yet it is checked


def test_strict_errors_name_the_tensor_and_file(tmp_path):
    cfg = _cfg()
    sd = {k: v.float() for k, v in _hf_tensors(cfg).items()}
    model = _model(0)
    before = _params(model)

    name = "model.layers.1.mlp.up_proj.weight"
    _write(tmp_path / "missing", {k: v for k, v in sd.items() if k != name})
    with pytest.raises(ValueError, match=rf"missing/model.safetensors lacks tensor '{name}' for blocks.1.mlp.up"):
        _load(model, tmp_path / "missing")

    _write(tmp_path / "shape", {**sd, "model.norm.weight": torch.ones(cfg.hidden + 1)})
    with pytest.raises(ValueError, match=r"'model.norm.weight' in .*shape/model.safetensors has shape \[33\]"):
        _load(model, tmp_path / "shape", strict=False)  # a wrong shape is an error even non-strict

    extra = "model.layers.0.self_attn.q_proj.bias"
    _write(tmp_path / "extra", {**sd, extra: torch.zeros(cfg.hidden)})
    with pytest.raises(ValueError, match=rf"'{extra}' in .*extra/model.safetensors has no place"):
        _load(model, tmp_path / "extra")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # checked before loading

    # Non-strict: the extra tensor is ignored, the missing one is reported and keeps its initialisation.
    assert _load(model, tmp_path / "extra", strict=False) == []
    model = _model(0)
    assert _load(model, tmp_path / "missing", strict=False) == ["blocks.1.mlp.up.weight"]
    assert torch.equal(model.blocks[1].mlp.up.weight, before["blocks.1.mlp.up.weight"])
    assert torch.equal(model.blocks[1].mlp.down.weight, sd["model.layers.1.mlp.down_proj.weight"])


def test_index_and_config_problems(tmp_path, caplog):
    cfg = _cfg()
    sd = {k: v.float() for k, v in _hf_tensors(cfg).items()}
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        _load(_model(0), tmp_path)

    _write(tmp_path, sd, "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(sd, "model-00001-of-00001.safetensors")
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' in shard 'model-00002-of-00002\.safetensors'"):
        _load(_model(0), tmp_path)

    # Old checkpoints carry RoPE's inv_freq buffer: skipped, not unexpected.
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg.head_dim // 2)
    _write(tmp_path / "ok", sd)
    assert _load(_model(0), tmp_path / "ok") == []

    # config.json: a head count that shapes cannot see is an error, and so is a rope scaling the model lacks
    # (it used to be only a warning), an incomplete one, or a rope type not implemented.
    raw = hf_config(cfg)
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**raw, "num_attention_heads": 8}))
    with pytest.raises(ValueError, match="n_heads: checkpoint 8, model 4"):
        _load(_model(0), tmp_path / "ok")
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": cfg.rope_theta}
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**raw, "rope_scaling": llama3}))
    with pytest.raises(ValueError, match=r"describes another model \(rope_scaling.type: checkpoint 'llama3', "
                       r"model 'default'; rope_scaling.factor: checkpoint 8.0, model 1.0;"):
        _load(_model(0), tmp_path / "ok")
    with caplog.at_level(logging.WARNING, logger="distca.model.hf"):
        _load(_model(0), tmp_path / "ok", strict=False)
    assert "rope_scaling.type: checkpoint 'llama3', model 'default'" in caplog.text
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**raw, "rope_scaling": {"rope_type": "llama3",
                                                                                     "factor": 8.0}}))
    with pytest.raises(ValueError, match="rope type 'llama3' needs 'low_freq_factor'"):
        _load(_model(0), tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**raw, "rope_scaling": {"rope_type": "dynamic",
                                                                                     "factor": 2.0}}))
    with pytest.raises(ValueError, match=r"rope type 'dynamic' \(implemented: default, linear, llama3, yarn\) is not"):
        _load(_model(0), tmp_path / "ok")


def test_tied_embeddings(tmp_path):
    src = _model(0, tie_embeddings=True)
    save_hf_weights(src, tmp_path / "tied")
    with safe_open(tmp_path / "tied" / "model.safetensors", framework="pt") as f:
        keys = f.keys()
    assert "lm_head.weight" not in keys
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    dst = _model(1, tie_embeddings=True)
    assert _load(dst, tmp_path / "tied") == []
    assert dst.head.weight is dst.embed.weight and torch.equal(_logits(dst), _logits(src))

    # A tied checkpoint into an untied model: the head is missing, with a hint.
    with pytest.raises(ValueError, match=r"lacks tensor 'lm_head.weight' .*set model.tie_embeddings"):
        _load(_model(1), tmp_path / "tied")

    # A tied checkpoint that also stores its head: accepted when equal to the embeddings, else unexpected.
    sd = {k: v.float() for k, v in _hf_tensors(_cfg(tie_embeddings=True)).items()}
    _write(tmp_path / "with_head", {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    assert _load(dst, tmp_path / "with_head") == []
    _write(tmp_path / "untied", {**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match=r"'lm_head\.weight' .* ties embeddings but this head differs"):
        _load(dst, tmp_path / "untied")


@pytest.mark.parametrize("variant", [dict(residual="shortswa"), dict(residual="shortswa", shortswa_every=2),
                                     dict(residual="ddl")], ids=["shortswa", "shortswa-interleaved", "ddl"])
def test_variants_load_a_standard_checkpoint_and_report_their_extras(tmp_path, variant, caplog):
    src = _model(0)
    save_hf_weights(src, tmp_path)
    model = _model(1, **variant)
    before = _params(model)
    with caplog.at_level(logging.INFO, logger="distca.model.hf"):
        left = _load(model, tmp_path)
    shared = set(hf_state_dict_mapping(model.cfg).values())
    assert left == [n for n in before if n not in shared]
    assert bool(left) is (variant != dict(residual="shortswa", shortswa_every=2))
    if left:
        assert all(n.split(".")[2] in ("swa", "swa_norm", "attn_delta", "mlp_delta") for n in left)
        assert f"not in checkpoint {tmp_path / 'model.safetensors'}" in caplog.text and left[0] in caplog.text
    got = dict(model.named_parameters())
    src_params = dict(src.named_parameters())
    assert all(torch.equal(got[n], src_params[n]) for n in shared)
    assert all(torch.equal(got[n], before[n]) for n in left)

    with pytest.raises(ValueError, match="is not a Hugging Face Llama"):
        save_hf_weights(model, tmp_path / "out")


def test_dtype_is_converted_to_the_models(tmp_path):
    src = _model(0).to(torch.bfloat16)
    save_hf_weights(src, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    dst = _model(1).double()
    _load(dst, tmp_path)
    assert dst.embed.weight.dtype == torch.float64
    assert torch.equal(dst.embed.weight, src.embed.weight.double())


def test_malformed_config_and_index_json_are_one_named_error(tmp_path):
    """A config.json or index nested 100k deep, or not an object, is a ValueError naming the file (it used to be a
    RecursionError or a TypeError from deep inside)."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(ValueError, match=r"config\.json: JSON nested too deeply"):
        LlamaModel.config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json is not a JSON object"):
        LlamaModel.config_from_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(deep)
    with pytest.raises(ValueError, match=r"index\.json: JSON nested too deeply"):
        _load(_model(0), tmp_path)
