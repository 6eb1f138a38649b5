"""Deferred weight gradients (:mod:`distca.train.wgrad`) on one process, and where the pooled schedule defers them
(:func:`distca.train.schedule.weight_grad_plan`). The training run with them is in ``tests/test_train.py``."""

from __future__ import annotations

import pytest
import torch

from distca.config import ModelConfig
from distca.model import DocLayout, LlamaModel, LocalCoreAttention
from distca.train.schedule import F, n_ticks, tick_micros, tick_phase, weight_grad_plan
from distca.train.wgrad import StageWeightGrads, WeightGradQueue, install, linears

TINY = dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=97)


def _model(**kw) -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(ModelConfig(**{**TINY, **kw})).double()


def _loss(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lay = DocLayout.from_lengths([11, 20])
    tokens = torch.randint(0, 97, (31,), generator=g)
    logits = model(tokens, lay, LocalCoreAttention(lay, backend="reference"))
    return torch.nn.functional.cross_entropy(logits, torch.roll(tokens, -1))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("residual", ["standard", "ddl"])
def test_deferred_weight_gradients_equal_immediate_ones_and_input_gradients_come_at_once(residual):
    ref, model = _model(residual=residual), _model(residual=residual)
    for seed in (1, 2):
        _loss(ref, seed).backward()
    queue = WeightGradQueue()
    routed = install(model, queue)
    assert routed == len(list(linears(model))) == 7 * 2 + 1 + (4 * 2 if residual == "ddl" else 0)
    queue.tag = 5  # the first micro-batch's backward keeps its weight gradients ...
    _loss(model, 1).backward()
    kept = queue.pending
    assert kept == routed
    assert all(p.grad is None for p in (lin.weight for lin in linears(model)))  # ... none reached the weights
    assert model.embed.weight.grad is not None  # the input gradients did flow down to the embedding
    queue.tag = None  # the second is immediate; the first's run afterwards (a different order of the two sums)
    _loss(model, 2).backward()
    assert queue.pending == kept
    WeightGradQueue.run(queue.take([5]))
    assert queue.pending == 0
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)


def test_a_deferred_gradient_reaches_the_parameter_through_its_hooks():
    """DeepSpeed's optimizers hook a parameter's gradient accumulation: a deferred gradient must pass them too."""
    model = _model()
    queue = WeightGradQueue()
    install(model, queue)
    heard = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: heard.append(name))
    queue.tag = 0
    _loss(model, 1).backward()
    deferred = {n for n, p in model.named_parameters() if p.grad is None}
    assert deferred and not deferred & set(heard)
    WeightGradQueue.run(queue.take_all())
    assert deferred <= set(heard)


def test_installing_twice_is_refused_and_the_state_dict_is_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    install(model, WeightGradQueue())
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(RuntimeError, match="installed twice"):
        install(model, WeightGradQueue())
    with pytest.raises(RuntimeError, match="not collecting"):
        WeightGradQueue().keep(None)


def test_a_stage_drops_jobs_left_by_a_failed_step_and_runs_due_jobs_once():
    model = _model()
    plan = weight_grad_plan(2, 4)
    stage = StageWeightGrads(model, plan, 1)
    (t,) = sorted(plan.defer[1])[:1]
    stage.enter(t)
    _loss(model, 1).backward()
    assert stage.queue.pending
    stage.enter(None)  # the step ended without its flush (it failed): nothing stale survives into the next
    assert stage.queue.pending == 0 and stage.queue.tag is None
    stage.enter(t)
    _loss(model, 1).backward()
    (u,) = [u for u, ts in plan.runs[1].items() if t in ts]
    jobs = stage.due(u)
    assert jobs and stage.due(u) == []
    stage.run(jobs)
    assert stage.jobs_run == len(jobs) and stage.flush() == 0


PLANS = [(2, 1), (2, 2), (2, 3), (2, 8), (3, 3), (3, 5), (4, 4), (4, 7), (4, 16), (8, 8), (8, 15), (1, 4)]


@pytest.mark.parametrize("P,M", PLANS)
def test_the_plan_defers_whole_ticks_into_later_ticks_the_stage_only_serves(P, M):
    plan = weight_grad_plan(P, M)
    total = n_ticks(P, M)
    micros = [tick_micros(t, P, M) for t in range(total)]
    deferred = set().union(*plan.defer)
    for t in deferred:
        assert tick_phase(t) != F
        active = {s for s in range(P) if micros[t][s] is not None}
        assert {s for s in range(P) if t in plan.defer[s]} == active  # every active stage of the tick, or none
    for s in range(P):
        ran = [t for u, ts in plan.runs[s].items() for t in ts]
        assert sorted(ran) == sorted(plan.defer[s])  # each deferred backward's weight gradients run exactly once
        for u, ts in plan.runs[s].items():
            assert micros[u][s] is None and any(m is not None for m in micros[u])  # a tick it only serves
            assert all(u > t for t in ts) and len(ts) == 1
    if M >= 2 * P - 1 and P > 1:  # enough steady-state ticks: P - 1 ticks per stage leave the critical path
        assert all(len(d) == P - 1 for d in plan.defer)
    # memory: the most micro-batches' jobs a stage holds at once, checked tick by tick
    held = [max((sum(1 for t in plan.defer[s] for u, ts in plan.runs[s].items() if t in ts and t <= x < u)
                 for x in range(total)), default=0) for s in range(P)]
    assert plan.peak_kept() == held and max(held, default=0) <= max(P - 1, 0)


def test_a_rank_that_serves_no_rounds_runs_its_weight_gradients_at_once():
    """On the pool data planes a stage idle in a tick has no rounds of its own to take part in: the tick's weight
    gradients run in one go (in place, the training test checks they run between the rounds)."""
    from distca.config import load_config
    from distca.train.pooled import PooledCAD, pooled_placement

    cfg = load_config(None, ["--train.core_attention=cad", "--cluster.data_plane=shm", "--cluster.n_trainers=4",
                             "--cluster.n_servers=2", "--train.pipeline_parallel=2"])
    pooled = PooledCAD(cfg, 1, None, pooled_placement(cfg, "shm"), None, serves=False)
    ran: list[list] = []
    assert pooled.serve(0, F, ["a", "b", "c"], ran.append) is False
    assert ran == [["a", "b", "c"]]
    assert pooled.serve(0, F) is False and ran == [["a", "b", "c"]]


def test_spread_cuts_jobs_into_equal_shares_whose_gradients_add_up():
    """A serving tick spreads its jobs over the gaps before its rounds in shares of equal work, cutting a big job
    (the LM head's) at token rows; the cut jobs give the same gradients."""
    from distca.train.wgrad import spread

    model, ref = _model(vocab_size=1024), _model(vocab_size=1024)
    queue = WeightGradQueue()
    install(model, queue)
    queue.tag = 0
    _loss(model, 1).backward()
    jobs = queue.take_all()
    _loss(ref, 1).backward()
    head = next(j for j in jobs if j.layer is model.head)
    assert head.flops > 5 * max(j.flops for j in jobs if j.layer is not model.head)  # the big one
    for gaps in (1, 2, 3, 7):
        groups = spread(jobs, gaps)
        assert len(groups) == gaps
        work = [sum(j.flops for j in g) for g in groups]
        assert abs(sum(work) - sum(j.flops for j in jobs)) < 1e-6 * sum(work)
        row = max(j.flops / j.rows for j in jobs)
        assert all(abs(w - sum(work) / gaps) <= row + 1e-6 for w in work[:-1])  # equal shares, to one row
    for p in model.parameters():
        p.grad = None
    _loss(model, 1).backward()  # the input gradients again (the queue is still collecting: weights wait)
    queue.take_all()
    WeightGradQueue.run([j for g in spread(jobs, 7) for j in g])
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        if name.startswith("embed") or "norm" in name:
            continue  # their gradients came from both backward passes
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13, msg=name)
    with pytest.raises(ValueError, match="cannot split"):
        head.split_at(0)


@pytest.mark.parametrize("P,M", [(2, 2), (3, 5), (4, 8), (4, 2)])
def test_on_1f1b_stage_s_defers_its_last_s_backward_passes(P, M):
    from deepspeed.runtime.pipe.schedule import TrainSchedule

    from distca.train.schedule import one_f_one_b_weight_grad_plan

    plan = one_f_one_b_weight_grad_plan(P, M)
    for s in range(P):
        sched = TrainSchedule(micro_batches=M, stages=P, stage_id=s)
        backward = {t: m for t in range(2 * (M + P - 1))
                    for m, fwd in [sched._step_to_micro_batch(t)] if not fwd and sched._valid_micro_batch(m)}
        assert sorted(backward[t] for t in plan.defer[s]) == list(range(max(0, M - s), M))
        assert plan.runs[s] == {}  # all flushed before the optimizer
