"""How many blocks each pipeline stage holds (distca.config.stage_blocks), and DeepSpeed's layer boundaries from it."""

from __future__ import annotations

import pytest

from distca.config import balanced_blocks, even_blocks, head_blocks, load_config, stage_blocks, stage_ranges
from distca.errors import ConfigError
from distca.train.pipe import layer_parts


def test_even_gives_the_remainder_to_the_first_stages():
    assert even_blocks(32, 4) == (8, 8, 8, 8)
    assert even_blocks(7, 3) == (3, 2, 2)


def test_balanced_takes_blocks_off_the_last_stage_by_the_heads_linear_work():
    """Llama-3-8B's shape: the 128K-vocabulary head is 2.4 blocks of linear work. The split minimises the slowest
    stage (blocks, plus the head on the last): 9/9/8/6 has max(9, 6 + 2.4) = 9 against the even split's 10.4;
    no other split of 32 blocks does better (checked by brute force)."""
    import itertools

    m = load_config("configs/llama3-8b-128k.yaml", []).model
    h = head_blocks(m)
    assert 2.3 < h < 2.5
    for P in (2, 4):
        got = stage_blocks(m, P, "balanced")
        cost = lambda b: max(*b[:-1], b[-1] + h)  # noqa: E731
        best = min(cost(b) for b in itertools.product(range(1, 33), repeat=P) if sum(b) == 32)
        assert sum(got) == 32 and cost(got) == pytest.approx(best)
        assert cost(got) < cost(even_blocks(32, P))
    assert stage_blocks(m, 4, "balanced") == (9, 9, 8, 6) and stage_blocks(m, 2, "balanced") == (17, 15)
    assert balanced_blocks(8, 2, 0.0) == (4, 4) and balanced_blocks(5, 1, 3.0) == (5,)


def test_explicit_blocks_override_and_are_checked():
    m = load_config(None, ["--model.n_layers=3"]).model
    assert stage_blocks(m, 2, "balanced", [1, 2]) == (1, 2)
    with pytest.raises(ValueError, match=r"sum to model\.n_layers"):
        stage_blocks(m, 2, "even", [2, 2])
    with pytest.raises(ConfigError, match=r"train.stage_blocks \[3, 0\]"):
        load_config(None, ["--model.n_layers=3", "--train.stage_blocks=[3, 0]"])


def test_deepspeed_parts_put_the_embedding_first_and_the_norm_and_head_last():
    """``pipeline_layers`` is [embedding, blocks..., final norm, head]; stage s builds ``parts[s]:parts[s+1]``."""
    assert layer_parts((9, 9, 8, 6)) == [0, 10, 19, 27, 35]
    assert layer_parts((2,)) == [0, 5]
    assert [list(r) for r in stage_ranges((1, 2))] == [[0], [1, 2]]
