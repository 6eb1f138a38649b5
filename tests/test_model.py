"""The Llama-style model and its residual variants, on one process with local core attention."""

from __future__ import annotations

import json

import pytest
import torch

from distca.config import ModelConfig
from distca.model import DocLayout, LlamaModel, LocalCoreAttention
from distca.model.llama import next_token_labels
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
