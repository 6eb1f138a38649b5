"""The Llama-style model and its residual variants, on one process with local core attention."""

from __future__ import annotations

import json

import pytest
import torch

from distca.config import ModelConfig
from distca.model import DocLayout, LlamaModel, LocalCoreAttention
from distca.model.init import INIT_STD
from distca.model.llama import Block, TokenEmbedding, next_token_labels
from distca.model.residual import DeltaResidual

TINY = dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=97, shortswa_window=8)
VARIANTS = [dict(residual="standard"), dict(residual="shortswa"), dict(residual="shortswa", shortswa_every=2),
            dict(residual="ddl"), dict(residual="ddl", ddl_beta_init=0.0)]


def _model(**kw) -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(ModelConfig(**{**TINY, **kw})).double()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_packed_documents_equal_documents_alone(variant):
    """Positions restart per document and attention never crosses documents, in every variant."""
    model = _model(**variant)
    lengths = [13, 30, 5]
    tokens = torch.randint(0, 97, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    packed = DocLayout.from_lengths(lengths)
    logits = model(tokens, packed, LocalCoreAttention(packed, backend="reference"))
    start = 0
    for n in lengths:
        alone = DocLayout.from_lengths([n])
        ref = model(tokens[start:start + n], alone, LocalCoreAttention(alone, backend="reference"))
        torch.testing.assert_close(logits[start:start + n], ref, rtol=0, atol=1e-10)
        start += n


def test_windows_reach_core_attention_as_configured():
    seen = []

    class Spy(LocalCoreAttention):
        def __call__(self, q, k, v, window=-1):
            seen.append(window)
            return super().__call__(q, k, v, window)

    lay = DocLayout.from_lengths([20])
    tokens = torch.zeros(20, dtype=torch.long)
    _model(residual="shortswa", n_layers=2)(tokens, lay, Spy(lay, backend="reference"))
    assert seen == [8, -1, 8, -1]  # a ShortSWA sublayer before full attention in every block
    seen.clear()
    _model(residual="shortswa", shortswa_every=2, n_layers=4)(tokens, lay, Spy(lay, backend="reference"))
    assert seen == [-1, 8, -1, 8]  # interleaved: every second layer windowed
    seen.clear()
    _model(residual="standard")(tokens, lay, Spy(lay, backend="reference"))
    assert seen == [-1, -1]


@pytest.mark.parametrize("variant", [dict(residual="standard"), dict(residual="shortswa"), dict(residual="ddl")],
                         ids=lambda v: v["residual"])
def test_a_per_layer_mask_pattern_reaches_attention_and_masks_what_it_says(variant):
    """``layer_masks`` composes with every residual variant (ShortSWA's window sublayer stays first), and each
    family changes exactly what a query sees: with bidirectional layers the first token's output depends on later
    tokens; with chunked layers a token's output is blind to earlier chunks."""
    from distca.masks import Mask

    seen = []

    class Spy(LocalCoreAttention):
        def __call__(self, q, k, v, window=-1):
            seen.append(window)
            return super().__call__(q, k, v, window)

    lay = DocLayout.from_lengths([24])
    tokens = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(2))
    model = _model(**variant, n_layers=4, layer_masks=["chunked:8", "window:5", "bidirectional"])
    model(tokens, lay, Spy(lay, backend="reference"))
    own = [Mask.chunked(8), 5, Mask.bidirectional(), Mask.chunked(8)]
    assert seen == ([x for m in own for x in (8, m)] if variant["residual"] == "shortswa" else own)

    def out(m, toks):
        return m(toks, lay, LocalCoreAttention(lay, backend="reference"))

    later = tokens.clone()
    later[20] = (later[20] + 1) % 97  # change one late token
    bidi = _model(**variant, layer_masks=["bidirectional"])
    assert not torch.allclose(out(bidi, tokens)[0], out(bidi, later)[0])  # the first token sees it
    causal = _model(**variant)
    torch.testing.assert_close(out(causal, tokens)[:20], out(causal, later)[:20], rtol=0, atol=0)
    if variant["residual"] != "shortswa":  # (its window sublayer would carry earlier chunks' tokens)
        early = tokens.clone()
        early[3] = (early[3] + 1) % 97  # a token of the first chunk
        chunked = _model(**variant, layer_masks=["chunked:8"])
        torch.testing.assert_close(out(chunked, tokens)[8:], out(chunked, early)[8:], rtol=0, atol=0)
        assert not torch.allclose(out(chunked, tokens)[:8], out(chunked, early)[:8])


def test_a_document_continued_from_an_earlier_rank_keeps_its_positions():
    lay = DocLayout.from_lengths([4, 3], first_position=10)
    assert lay.position_ids.tolist() == [10, 11, 12, 13, 0, 1, 2]


def test_delta_residual_update_rule():
    torch.manual_seed(0)
    d = DeltaResidual(8, beta_init=1.0)
    x, h, c = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    k = h / torch.sqrt((h**2).sum(-1, keepdim=True) + 1e-10)
    v = 4 * torch.sigmoid(d.v(x))
    want = x + 1.0 * k * (v - (k * x).sum(-1, keepdim=True))
    torch.testing.assert_close(d(x, h, c), want, rtol=1e-5, atol=1e-6)
    # beta = 1 overwrites the k-component with v exactly; beta = 0 is the identity.
    out = d(x, h, c)
    torch.testing.assert_close((k * out).sum(-1, keepdim=True), v, rtol=1e-5, atol=1e-5)
    assert torch.allclose(DeltaResidual(8, beta_init=0.0)(x, h, c), x, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS[:2] + VARIANTS[3:4], ids=["standard", "shortswa", "ddl"])
def test_each_variant_learns(variant):
    model = LlamaModel(ModelConfig(**{**TINY, **variant}))
    lay = DocLayout.from_lengths([24, 40])
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 97, (64,), generator=gen)
    labels = next_token_labels(tokens, lay)
    core = LocalCoreAttention(lay, backend="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(tokens, lay, core), labels, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def test_next_token_labels_stop_at_document_ends():
    lay = DocLayout.from_lengths([3, 2])
    labels = next_token_labels(torch.tensor([5, 6, 7, 8, 9]), lay)
    assert labels.tolist() == [6, 7, -100, 9, -100]


def test_config_from_hugging_face_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}))
    cfg = LlamaModel.config_from_hf(tmp_path, residual="ddl")
    assert (cfg.n_layers, cfg.hidden, cfg.n_kv_heads, cfg.head_dim, cfg.residual) == (32, 4096, 8, 128, "ddl")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks 'num_hidden_layers'"):
        LlamaModel.config_from_hf(tmp_path)


def test_one_initialisation_for_the_model_and_its_pipeline_stages():
    """Llama's init (Linear and Embedding N(0, 0.02²), norm gains 1, DDL its own), and the pipeline stages,
    subclasses of the model's parts, start exactly as those parts do under the same seed."""
    from distca.train.pipe import BlockStage, EmbedStage, StepContext

    cfg = ModelConfig(**{**TINY, "hidden": 256, "ffn_hidden": 512, "residual": "ddl", "ddl_beta_init": 0.5})
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif "_delta." in name:
            continue
        else:
            assert p.ndim == 2 and abs(p.std().item() - INIT_STD) < 0.1 * INIT_STD, (name, p.std().item())
    delta = model.blocks[0].attn_delta
    assert torch.equal(delta.beta.weight, torch.zeros_like(delta.beta.weight))
    torch.testing.assert_close(2 * torch.sigmoid(delta.beta.bias), torch.tensor([0.5]))
    assert delta.v.weight.abs().max() <= 1 / 16 and delta.v.weight.std() > 0.5 / 16  # U(±1/√d), d = 256

    torch.manual_seed(7)
    want = Block(cfg, 1).state_dict()
    torch.manual_seed(7)
    got = BlockStage(cfg, 1, StepContext()).state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    torch.manual_seed(7)
    want = TokenEmbedding(cfg).weight
    torch.manual_seed(7)
    assert torch.equal(EmbedStage(cfg).weight, want)


def test_no_weight_decay_for_vectors():
    """Two optimiser groups: matrices (the embedding included) decay, vectors (norm gains, biases) do not."""
    from distca.train.trainer import param_groups

    model = LlamaModel(ModelConfig(**{**TINY, "residual": "ddl"}))
    decay, plain = param_groups(model, 0.1)
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in plain["params"]} == {n for n, p in model.named_parameters() if p.ndim < 2}
    assert "embed.weight" in {names[id(p)] for p in decay["params"]}
    assert {"norm.weight", "blocks.0.attn_norm.weight", "blocks.1.mlp_delta.beta.bias"} <= \
        {names[id(p)] for p in plain["params"]}
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))
