"""One source per derived quantity: the real model, the FLOPs counter and the simulator agree with the one
home of the layer windows (``ModelConfig.block_windows``), of the parameter count (``distca.train.flops``),
of the pair count (``distca.attention.cost.cum_pairs``) and of the lse dtype (``distca.attention.lse_dtype``),
each checked against something computed independently of it (the real modules, a brute-force mask count)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distca.attention import BACKEND_NAMES, forward, get_backend_reason, lse_dtype
from distca.attention.cost import cum_pairs, pair_count
from distca.config import ModelConfig
from distca.model import DocLayout, LlamaModel, LocalCoreAttention
from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan
from distca.scheduler.work import key_start
from distca.sim import Hardware, Link, MicroBatch, Parallelism, SimOptions, simulate_step
from distca.train.flops import linear_params_per_token, model_params, step_flops

SMALL = dict(n_layers=3, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=97, shortswa_window=8)
VARIANTS = [dict(residual="standard"), dict(residual="shortswa"), dict(residual="shortswa", shortswa_every=3,
                                                                       n_layers=6),
            dict(residual="ddl"), dict(residual="standard", tie_embeddings=True)]
DOCS = [300, 77, 1]


def _ids(v: dict) -> str:
    return "-".join(f"{k}={x}" for k, x in v.items())


def brute_pairs(q0: int, q1: int, window: int) -> int:
    """Attended pairs of queries ``[q0, q1)`` of a document, counted from the mask definition: query ``i``
    sees key ``j`` iff ``j <= i`` and (no window, or ``i - j < window``)."""
    i = np.arange(q0, q1)[:, None]
    j = np.arange(q1)[None, :]
    seen = j <= i
    if window >= 0:
        seen &= i - j < window
    return int(seen.sum())


def brute_task_pairs(q_len: int, kv_len: int, window: int) -> int:
    """A task shape's pairs: query ``j`` sits at key position ``kv_len - q_len + j`` (bottom-right)."""
    pos = kv_len - q_len + np.arange(q_len)[:, None]
    t = np.arange(kv_len)[None, :]
    seen = t <= pos
    if window >= 0:
        seen &= pos - t < window
    return int(seen.sum())


def model_windows(cfg: ModelConfig) -> list[int]:
    """The window of every core-attention call the real model makes in one forward pass, in order."""
    seen: list[int] = []

    class Spy(LocalCoreAttention):
        def __call__(self, q, k, v, window=-1):
            seen.append(window)
            return super().__call__(q, k, v, window)

    lay = DocLayout.from_lengths([12])
    LlamaModel(cfg)(torch.zeros(12, dtype=torch.long), lay, Spy(lay, backend="reference"))
    return seen


def _hw(**kw) -> Hardware:
    return Hardware(name="test", linear_flops=1e12, attention_flops=1e12, intra=Link(1e11, 1e-6),
                    inter=Link(1e10, 5e-6), **kw)


# -- layer windows and parameter counts: model == config == FLOPs counter == simulator ------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_model_flops_and_simulator_use_the_configured_windows_and_parameter_count(variant):
    cfg = ModelConfig(**{**SMALL, **variant})
    windows = model_windows(cfg)
    assert windows == cfg.attention_windows() == [w for block in cfg.block_windows() for w in block]
    assert len(cfg.block_windows()) == cfg.n_layers

    model = LlamaModel(cfg)
    params = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    assert model_params(cfg) == params
    # Every token multiplies through each matrix but the embedding lookup (the LM head always, tied or not).
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    untied_embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden
    assert linear_params_per_token(cfg) == matrices - untied_embedding

    # FLOPs counter: 6 FLOPs per weight per token; 4·d_head·heads per pair forward, x3 with the backward.
    pairs = sum(brute_pairs(0, n, w) for w in windows for n in DOCS)
    flops = step_flops(cfg, DOCS)
    per_pair = 4 * cfg.head_dim * cfg.n_heads
    assert flops["linear"] == 6 * (matrices - untied_embedding) * sum(DOCS)
    assert flops["attention"] == 3 * per_pair * pairs

    # Simulator (one device, pairs at 1e12 FLOP/s): the same weights and pairs (backward 2.5x forward), and
    # its optimizer step charges exactly the model's parameters.
    mb = [MicroBatch([DOCS], [False])]
    step = simulate_step(cfg, _hw(), Parallelism(), SimOptions(system="colocated"), mb).step_s
    want = (6 * (matrices - untied_embedding) * sum(DOCS) + 3.5 * per_pair * pairs) / 1e12
    assert math.isclose(step, want, rel_tol=1e-9), (step, want)
    with_optimizer = simulate_step(cfg, _hw(optimizer_s_per_param=1.0), Parallelism(), SimOptions(system="colocated"),
                                   mb).step_s
    assert math.isclose(with_optimizer - step, params, rel_tol=1e-9)


# -- pair counts: the closed form == a brute-force mask count, wherever it is used -----------------------
@st.composite
def query_ranges(draw):
    n = draw(st.integers(1, 300))
    q0 = draw(st.integers(0, n - 1))
    q1 = draw(st.integers(q0 + 1, n))
    window = draw(st.one_of(st.just(-1), st.integers(1, n + 5)))
    return q0, q1, window


@given(query_ranges())
def test_closed_form_pair_counts_equal_brute_force(case):
    q0, q1, w = case
    want = brute_pairs(q0, q1, w)
    assert cum_pairs(q1, w) - cum_pairs(q0, w) == want  # Python ints: the planner's path
    arr = cum_pairs(np.array([q0, q1]), np.int64(w))  # arrays: the plan compiler's path
    assert int(arr[1] - arr[0]) == want
    assert int(pair_count(q1 - q0, q1 - key_start(q0, w), w)) == want  # the task's own key range
    assert int(pair_count(q1 - q0, q1, w)) == want  # every earlier key sent along


@given(st.integers(0, 200), st.integers(0, 200), st.one_of(st.just(-1), st.integers(1, 250)))
def test_task_shape_pair_count_equals_brute_force(q_len, kv_len, w):
    assert int(pair_count(q_len, kv_len, w)) == brute_task_pairs(q_len, kv_len, w)  # also q_len > kv_len
    many = pair_count(np.array([q_len, kv_len]), np.array([kv_len, kv_len]), np.array([w, -1]))
    assert many.tolist() == [brute_task_pairs(q_len, kv_len, w), brute_task_pairs(kv_len, kv_len, -1)]


@pytest.mark.parametrize("window", [-1, 1, 50, 700])
def test_plan_task_pairs_equal_brute_force(window):
    batch = BatchLayout.from_ranks([[900, 124], [1024], [300, 300, 424]], [False, True, False])
    plan, _ = make_plan(batch, Placement(3, 3), SchedulerConfig(eps=0.0, granularity=16, window=window))
    got = plan.task_pairs.tolist()
    assert got == [brute_pairs(int(a), int(b), window) for a, b in zip(plan.task_q0, plan.task_q1, strict=True)]
    docs = [900, 124 + 1024, 300, 300, 424]  # rank 1 continues rank 0's last document
    assert plan.server_pairs.sum() == sum(brute_pairs(0, n, window) for n in docs)


# -- the lse dtype rule --------------------------------------------------------------------------------
def test_every_backend_returns_its_lse_in_the_one_lse_dtype():
    assert {d: lse_dtype(d) for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)} == {
        torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
        torch.float16: torch.float32}
    cu = torch.tensor([0, 5], dtype=torch.int32)
    ran = 0
    for name in BACKEND_NAMES:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            if get_backend_reason(name, torch.device("cpu"), dtype) is not None:
                continue
            q = torch.randn(5, 2, 8, dtype=dtype)
            kv = q[:, :1].contiguous()
            _, lse = forward(q, kv, kv, cu, cu, 5, 5, backend=name)
            assert lse.dtype == lse_dtype(dtype), (name, dtype)
            ran += 1
    assert ran >= 2  # the reference backend and sdpa run on every CPU
