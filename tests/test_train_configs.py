"""The shipped configs load, describe the models they name, and the FLOPs convention is what it says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distca.config import load_config
from distca.train.flops import model_params, step_flops

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name,params", [("llama3-8b-128k", 8.03e9), ("llama-34b-512k", 34.4e9)])
def test_paper_configs_are_the_paper_models(name, params):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert abs(model_params(cfg.model) - params) / params < 0.02
    assert cfg.train.tokens_per_rank == (128 if "128k" in name else 512) * 1024
    for residual in ("standard", "shortswa", "ddl"):  # every variant is a switch away
        load_config(CONFIGS / f"{name}.yaml", [f"--model.residual={residual}"])


def test_tiny_config_is_pp2_dp2_cad_on_the_embedded_corpus():
    cfg = load_config(CONFIGS / "tiny-cpu.yaml")
    assert (cfg.train.pipeline_parallel, cfg.data_parallel) == (2, 2)
    assert cfg.train.core_attention == "cad" and cfg.data.source == "embedded"


def test_model_params_counts_the_real_module():
    from distca.model.llama import LlamaModel

    for residual in ("standard", "shortswa", "ddl"):
        cfg = load_config(None, ["--model.n_layers=3", f"--model.residual={residual}"]).model
        assert model_params(cfg) == sum(p.numel() for p in LlamaModel(cfg).parameters())


def test_attention_flops_follow_exact_pairs():
    cfg = load_config(None, ["--model.n_layers=2"]).model
    one, two = step_flops(cfg, [1000]), step_flops(cfg, [500, 500])
    assert one["linear"] == two["linear"]
    # full causal: l(l+1)/2 pairs per document, 2 layers, fwd 4·d·h per pair, x3 for training
    assert one["attention"] == 3 * 4 * cfg.head_dim * cfg.n_heads * 2 * 1000 * 1001 // 2
    assert two["attention"] == 3 * 4 * cfg.head_dim * cfg.n_heads * 2 * 2 * 500 * 501 // 2
    swa = load_config(None, ["--model.n_layers=2", "--model.residual=shortswa", "--model.shortswa_window=8"]).model
    assert swa.attention_windows() == [8, -1, 8, -1]


def test_linear_flops_match_a_counted_forward():
    """6 × params-per-token × tokens is the forward's counted matmul FLOPs × 3."""
    from torch.utils.flop_counter import FlopCounterMode

    from distca.model.core import DocLayout, LocalCoreAttention
    from distca.model.llama import LlamaModel

    cfg = load_config(None, ["--model.n_layers=2", "--model.hidden=64", "--model.n_heads=4",
                             "--model.ffn_hidden=96", "--model.vocab_size=100"]).model
    model, n = LlamaModel(cfg), 40
    layout = DocLayout.from_lengths([n])
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 100, (n,)), layout, LocalCoreAttention(layout, backend="reference"))
    counted = counter.get_total_flops()
    ours = step_flops(cfg, [n])
    attention_dense = 2 * 2 * 2 * n * n * cfg.head_dim * cfg.n_heads  # the reference kernel does dense QK^T, PV
    assert abs(3 * (counted - attention_dense) - ours["linear"]) / ours["linear"] < 1e-6
