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
    # a mask pattern counts each family's exact pairs: bidirectional l^2, chunked C(C+1)/2 per full chunk
    masked = load_config(None, ["--model.n_layers=3", "--model.layer_masks=[bidirectional, chunked:100, causal]"])
    pairs = 1000 * 1000 + 10 * 100 * 101 // 2 + 1000 * 1001 // 2
    assert step_flops(masked.model, [1000])["attention"] == 3 * 4 * cfg.head_dim * cfg.n_heads * pairs


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


def test_one_gpu_config_is_the_8b_shape_on_one_h200_with_64k_tokens_per_step():
    """configs/llama3-8b-1gpu.yaml loads and validates without a GPU, has the 8B shape with fewer layers, and
    the memory estimate in its comment holds for what it configures."""
    cfg = load_config(CONFIGS / "llama3-8b-1gpu.yaml")
    full = load_config(CONFIGS / "llama3-8b-128k.yaml").model
    m, t = cfg.model, cfg.train
    assert (m.hidden, m.n_heads, m.n_kv_heads, m.ffn_hidden, m.vocab_size, m.rope_theta) == (
        full.hidden, full.n_heads, full.n_kv_heads, full.ffn_hidden, full.vocab_size, full.rope_theta) == (
        4096, 32, 8, 14336, 128256, 500000.0)
    assert m.n_layers < full.n_layers and not m.tie_embeddings
    assert (t.pipeline_parallel, cfg.cluster.n_trainers, t.device, t.precision) == (1, 1, "cuda", "bf16")
    assert t.activation_checkpointing and t.zero_stage == 1 and 6 <= t.steps <= 8 and t.peak_tflops == 989.0
    assert t.micro_batches * t.tokens_per_rank * cfg.data_parallel >= 64 * 1024
    assert cfg.cluster.data_plane == "inplace" and cfg.cluster.placement == "colocated"
    assert not t.checkpoint_at_end and t.checkpoint_every == 0  # a benchmark writes no 45 GB of state

    # the comment's estimate: 16 bytes of training state per parameter, each block's input kept, and the
    # fp32 cross-entropy over one micro-batch's logits (bf16 logits + 3 fp32 T x V tensors at its backward)
    gib = 2**30
    params = model_params(m)
    assert abs(params - 2.796e9) / 2.796e9 < 1e-3
    state = 16 * params / gib
    checkpoints = m.n_layers * t.tokens_per_rank * m.hidden * 2 / gib
    logits = t.tokens_per_rank * m.vocab_size
    loss = (2 * logits + 3 * 4 * logits) / gib
    assert (round(state, 1), round(checkpoints, 1), round(loss, 1)) == (41.7, 2.0, 54.8)
    assert state + checkpoints + loss < 105  # of the H200's ~140 GiB, with room for workspace and one block

    # synthetic long documents, none longer than a micro-batch
    from distca.data.stream import PackedStream
    from distca.train.data import make_source

    source = make_source(cfg)
    assert cfg.data.source == "synthetic" and source.vocab_size <= m.vocab_size
    lengths = source.lengths
    assert lengths.max() <= t.tokens_per_rank and (lengths[lengths > 16384].sum() / lengths.sum()) > 0.5
    mb = PackedStream(source, cfg.data_parallel, t.tokens_per_rank, cfg.seed).next_micro_batch()
    assert sum(mb.packed.doc_lengths) == t.tokens_per_rank
