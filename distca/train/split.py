"""How many decoder blocks each pipeline stage holds.

``even`` gives every stage ``n_layers / P`` blocks (the remainder to the first stages). ``balanced`` evens out each
stage's linear work, LM head included: the last stage also multiplies every token by the ``hidden × vocab`` head,
which at Llama-3-8B's shape (128K vocabulary) is the linear work of 2.4 blocks. With an even split the last stage
is the slowest of every tick and the others wait for it; ``balanced`` gives it fewer blocks (8B, 32 blocks: PP 2
→ 17/15, PP 4 → 9/9/8/6). Only linear work is weighed: under CAD a stage's core attention runs on the whole
pool, balanced by the scheduler, so it does not depend on which stage a block is on (and under local attention
every block's attention costs the same, so it does not move the balance point much). The embedding is a lookup,
weighed as nothing. An explicit ``train.stage_blocks`` list overrides both.

Pure arithmetic: the trainer (:func:`distca.train.pipe.build_pipeline`), the pooled schedule's rounds
(:mod:`distca.train.pooled`), the config's checks and the simulator all take the split from here.
"""

from __future__ import annotations

import math

from distca.config import ModelConfig


def head_blocks(model: ModelConfig) -> float:
    """The LM head's linear work in blocks' linear work (tokens × weights: ``hidden × vocab`` over a block's)."""
    from distca.train.flops import block_linear_params

    return model.hidden * model.vocab_size / block_linear_params(model)[1]


def even_blocks(n_layers: int, stages: int) -> tuple[int, ...]:
    """``n_layers`` blocks over ``stages`` as evenly as possible, the first stages taking the remainder."""
    base, extra = divmod(n_layers, stages)
    return tuple(base + (1 if s < extra else 0) for s in range(stages))


def balanced_blocks(n_layers: int, stages: int, head: float) -> tuple[int, ...]:
    """The split that minimises the slowest stage's linear work when the last stage also runs a head worth
    ``head`` blocks: the last stage takes ``k`` blocks, the others share the rest evenly; the smallest maximum
    wins, ties to the larger ``k`` (the split closest to even)."""
    if stages < 1 or n_layers < stages:
        raise ValueError(f"cannot split {n_layers} blocks over {stages} stages (at least one block per stage)")
    if stages == 1:
        return (n_layers,)
    best, best_k = math.inf, n_layers // stages
    for k in range(1, n_layers - stages + 2):
        cost = max(math.ceil((n_layers - k) / (stages - 1)), k + head)
        if cost <= best + 1e-12:
            best, best_k = min(best, cost), k
    return (*even_blocks(n_layers - best_k, stages - 1), best_k)


def stage_blocks(model: ModelConfig, stages: int, split: str = "even", explicit: tuple[int, ...] | list[int] = ()
                 ) -> tuple[int, ...]:
    """Blocks per stage: ``explicit`` when given (checked: ``stages`` entries, each >= 1, summing to
    ``model.n_layers``), else the ``split`` rule (``even`` | ``balanced``)."""
    if stages < 1 or model.n_layers < stages:
        raise ValueError(f"cannot split model.n_layers={model.n_layers} blocks over {stages} pipeline stages (at least "
                         "one block per stage)")
    if explicit:
        blocks = tuple(int(b) for b in explicit)
        if len(blocks) != stages or min(blocks) < 1 or sum(blocks) != model.n_layers:
            raise ValueError(f"train.stage_blocks {list(blocks)} must give each of the {stages} stages at least one "
                             f"block and sum to model.n_layers ({model.n_layers})")
        return blocks
    if split == "even":
        return even_blocks(model.n_layers, stages)
    if split == "balanced":
        return balanced_blocks(model.n_layers, stages, head_blocks(model))
    raise ValueError(f"unknown stage split {split!r} (even | balanced)")


def stage_ranges(blocks: tuple[int, ...]) -> list[range]:
    """Each stage's block indices."""
    out, start = [], 0
    for b in blocks:
        out.append(range(start, start + b))
        start += b
    return out
