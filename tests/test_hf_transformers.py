"""Parity with the real thing: tiny random ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM``
built by Hugging Face ``transformers`` (pinned in the ``dev`` extra; nothing is downloaded), saved with
``save_pretrained`` in the 5.x config layout and rewritten into the 4.x one, loaded through the documented path
(``LlamaModel.config_from_hf`` + ``load_hf_weights``, strict) and compared: logits and every gradient, fp32,
relative 1e-5, single and packed documents, GQA, tied and untied, each rope type, biases, windows. Also the
round trip ours -> folder -> transformers -> folder -> ours, and the refusals.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the dev extra pins it; importorskip names it if absent

from distca.model import DocLayout, LlamaModel, LocalCoreAttention, load_hf_weights, save_hf_weights  # noqa: E402
from distca.model.hf import hf_state_dict_mapping  # noqa: E402
from distca.model.llama import next_token_labels  # noqa: E402

TOL = 1e-5
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=61, max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
LINEAR = {"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.5}

# name -> (transformers model class name, config kwargs)
CASES = {
    "llama-default": ("Llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama-tied-mha": ("Llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama-linear": ("Llama", dict(rope_parameters=LINEAR)),
    "llama3.1-scaling": ("Llama", dict(rope_parameters=LLAMA3)),
    "llama-yarn": ("Llama", dict(rope_parameters=YARN)),
    "llama-biases-head_dim": ("Llama", dict(attention_bias=True, mlp_bias=True, head_dim=16)),
    "mistral-window": ("Mistral", dict(sliding_window=5, rope_parameters={"rope_type": "default",
                                                                         "rope_theta": 1e6})),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen2-sliding-layers": ("Qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}
LENGTHS = [(23,), (9, 14, 3, 30)]  # one document; packed documents, longer than the windows and the orig. context


def _build(case: str, seed: int = 0):
    family, kw = CASES[case]
    cfg = getattr(transformers, f"{family}Config")(**{**SHAPE, **kw})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).float().eval()
    # Random norms and biases too, so a misplaced one shows. Biases at 0.05: at 0.2 the gradient of layer 1's k
    # projection nearly cancels (softmax ignores a bias shared by all keys), and fp32 rounding alone moves it by
    # 4e-5 relative (ours in fp32 vs ours in fp64), which no fp32 comparison at 1e-5 could pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def _to_4x_layout(folder: Path) -> None:
    """Rewrite a 5.x ``config.json`` (``rope_parameters``) in the 4.x layout (``rope_theta`` + ``rope_scaling``)."""
    raw = json.loads((folder / "config.json").read_text())
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    (folder / "config.json").write_text(json.dumps(raw))


def _save(model, folder: Path, layout: str) -> Path:
    model.save_pretrained(folder)
    if layout == "4.x":
        _to_4x_layout(folder)
    return folder


def _ours(folder: Path) -> LlamaModel:
    cfg = LlamaModel.config_from_hf(folder)
    torch.manual_seed(1)
    model = LlamaModel(cfg)
    assert load_hf_weights(cfg, dict(model.named_parameters()), folder) == []
    return model


def _tokens(lengths) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (sum(lengths),), generator=torch.Generator().manual_seed(5))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _our_pass(model: LlamaModel, tokens, lengths):
    lay = DocLayout.from_lengths(list(lengths))
    model.zero_grad()
    logits = model(tokens, lay, LocalCoreAttention(lay))
    loss = torch.nn.functional.cross_entropy(logits, next_token_labels(tokens, lay), ignore_index=-100,
                                             reduction="sum")
    loss.backward()
    return logits.detach(), float(loss.detach())


def _their_pass(model, tokens, lengths):
    """transformers' forward over each document on its own (its own causal/sliding masks and positions), the
    same summed next-token loss."""
    model.zero_grad()
    out, total = [], 0.0
    for doc in tokens.split(list(lengths)):
        logits = model(input_ids=doc[None]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], doc[1:], reduction="sum")
        if loss.requires_grad:
            loss.backward()
        out.append(logits.detach())
        total += float(loss.detach())
    return torch.cat(out), total


@pytest.mark.parametrize("layout", ["5.x", "4.x"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_match_transformers(case, layout, tmp_path):
    theirs = _build(case)
    ours = _ours(_save(theirs, tmp_path / "hf", layout))
    if layout == "4.x":  # transformers reads the 4.x layout to the same model
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
        theirs = theirs.float().eval()
    params = dict(ours.named_parameters())
    their_params = dict(theirs.named_parameters())
    for lengths in LENGTHS:
        tokens = _tokens(lengths)
        our_logits, our_loss = _our_pass(ours, tokens, lengths)
        their_logits, their_loss = _their_pass(theirs, tokens, lengths)
        assert _rel(our_logits, their_logits) <= TOL, (case, lengths)
        assert our_loss == pytest.approx(their_loss, rel=TOL)
        for hf, mine in hf_state_dict_mapping(ours.cfg).items():
            assert _rel(params[mine].grad, their_params[hf].grad) <= TOL, (case, lengths, hf)


def test_what_each_family_reads(tmp_path):
    """The fields that change the math land where they should (the parity test above proves they are used)."""
    cfg = LlamaModel.config_from_hf(_save(_build("mistral-window"), tmp_path / "m", "5.x"))
    assert cfg.layer_windows == [5, 5] and cfg.rope_theta == 1e6 and cfg.norm_eps == 1e-6
    cfg = LlamaModel.config_from_hf(_save(_build("qwen2-sliding-layers"), tmp_path / "q", "4.x"))
    assert cfg.layer_windows == [-1, 4] and (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (True, False, False)
    cfg = LlamaModel.config_from_hf(_save(_build("llama3.1-scaling"), tmp_path / "l", "4.x"))
    assert (cfg.rope_theta, cfg.rope_scaling.type, cfg.rope_scaling.factor) == (500000.0, "llama3", 8.0)
    assert cfg.rope_scaling.original_max_position == 16
    cfg = LlamaModel.config_from_hf(_save(_build("llama-biases-head_dim"), tmp_path / "b", "5.x"))
    assert cfg.head_dim == 16 and cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias


@pytest.mark.parametrize("case", ["llama3.1-scaling", "mistral-window", "qwen2-sliding-layers", "llama-yarn"])
def test_round_trip_through_transformers(case, tmp_path):
    """ours -> folder -> transformers -> folder -> ours: the same model, bit for bit; transformers computes the
    same logits as ours on the folder we wrote."""
    ours = _ours(_save(_build(case), tmp_path / "src", "5.x"))
    save_hf_weights(ours, tmp_path / "ours")
    # the folder also carries the 4.x fields, so a reader of only those (transformers 4) gets the same rope
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    raw.pop("rope_parameters")
    (tmp_path / "4x").mkdir()
    (tmp_path / "4x" / "config.json").write_text(json.dumps(raw))
    assert LlamaModel.config_from_hf(tmp_path / "4x") == ours.cfg
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(theirs).__name__ == f"{CASES[case][0]}ForCausalLM"
    tokens = _tokens(LENGTHS[1])
    our_logits, _ = _our_pass(ours, tokens, LENGTHS[1])
    with torch.no_grad():
        their_logits, _ = _their_pass(theirs.float().eval(), tokens, LENGTHS[1])
    assert _rel(our_logits, their_logits) <= TOL
    theirs.save_pretrained(tmp_path / "back")
    again = _ours(tmp_path / "back")
    assert again.cfg == ours.cfg
    for (n, a), (_, b) in zip(ours.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def _config(tmp_path: Path, case: str = "llama-default", **changes) -> Path:
    folder = _save(_build(case), tmp_path / "c", "5.x")
    raw = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("changes, refusal", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     r"rope type 'dynamic' \(implemented: default, linear, llama3, yarn\) is not supported"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope type 'longrope'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    (dict(attention_dropout=0.1), "attention_dropout 0.1 is not supported"),
    (dict(model_type="gemma"), "model_type 'gemma' is not supported"),
])
def test_refusals_name_the_field(tmp_path, caplog, changes, refusal):
    folder = _config(tmp_path, **changes)
    with pytest.raises(ValueError, match=refusal):
        LlamaModel.config_from_hf(folder)
    if "model_type" in changes:
        return  # an unknown model type is refused even without strict: nothing of it is known
    with caplog.at_level(logging.WARNING, logger="distca.model.hf_config"):
        LlamaModel.config_from_hf(folder, strict=False)
    assert refusal.split(" is not")[0].replace("\\", "") in caplog.text and "computes" in caplog.text


def test_the_5x_layout_theta_is_read_not_defaulted(tmp_path):
    """The audit's finding: a 5.x folder (``rope_parameters``, no top-level θ) loaded with θ = 10000 silently."""
    folder = _config(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == 500000.0
    assert LlamaModel.config_from_hf(folder).rope_theta == 500000.0
