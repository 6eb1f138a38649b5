"""Ping-pong in training: every block of a stage runs its micro-batch as nano-batches whose attention rounds
overlap each other's linear work, forward and backward (DistCA §4, Fig. 7).

A nano-batch is a range of this rank's rows (the first half, the second half). Its plan holds the tasks of
*its queries* only (:meth:`~distca.scheduler.BatchLayout.query_rows`); their keys may sit in any row of the
micro-batch, on any rank — a document does not care where the nano-batch cut fell. So every round sends the
keys of the whole micro-batch that its tasks need, and every nano-batch's queries, keys and values of a layer
are computed before that layer's first round starts.

The model's blocks are written as steps (:meth:`distca.model.llama.Block.steps`): compute, a core-attention
call, compute. Everything but the call is row-wise, so each nano-batch runs the block's steps on its own rows.
One layer, forward, with nano-batches A and B::

    pre(A), pre(B) | start A's round, start B's round | wait A → post(A) | wait B → post(B)
                                                        ^ B's attention runs here

and backward, in reverse::

    post-grad(A) → start A's round | post-grad(B) → start B's round | wait both → pre-grad(A, B)
                                     ^ A's attention gradients run here

With independent nano-batches (``train.nano_split: repack``: the micro-batch packed as two halves no document
spans) a round needs only its own nano-batch's rows, so it starts right after that nano-batch's pre-attention work
and each nano-batch runs on as soon as its own round is back::

    pre(A) → start A's round | pre(B) → start B's round | wait A → post(A) | wait B → post(B)
                               ^ A's attention runs here  ^ B's attention runs here

and in a block with two calls (ShortSWA) A's second round starts while B's first is out. Backward, per call from
the last: each nano-batch's gradients down to the call, then its round; the next call below starts as soon as
that nano-batch's round is back. Each plan covers its nano-batch's rows only, counted from its first row.

A block with two attention calls (ShortSWA) repeats this per call. The block is one autograd function whose
backward runs these rounds explicitly (the autograd engine would wait on each call in turn). With
``checkpoint`` it keeps only the block's input and each call's attention output and log-sum-exp — no server
round is repeated — and recomputes the linear work in its backward (selective recomputation).

Every trainer of a plan issues the same rounds in the same order (A then B, layer by layer), so the in-place
all-to-all and the collective data plane stay matched, and any client that speaks ``start_forward`` /
``start_backward`` works: the pool over ZeroMQ or shared memory, its collective group, in-place servers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distca.runtime.plan_exec import RankTensors
from distca.scheduler import BatchLayout, Plan


def nano_batches(batch: BatchLayout) -> tuple[BatchLayout, BatchLayout]:
    """A batch's two nano-batches: the queries of the first and of the second half of every rank's rows (plan
    each with ``make_plan(nano, ..., keys=batch)``: their keys are anywhere in the batch)."""
    tokens = batch.rank_tokens
    return batch.query_rows(0 * tokens, tokens // 2), batch.query_rows(tokens // 2, tokens)


def nano_rows(n: int) -> tuple[slice, slice]:
    """A rank's rows of the two nano-batches when it holds ``n`` rows, as :func:`nano_batches` cuts them."""
    return slice(0, n // 2), slice(n // 2, n)


@dataclass(frozen=True)
class NanoPlans:
    """One micro-batch's nano-batches on this rank: their rows and, per attention window, one plan each.
    ``independent``: the nano-batches are independent halves of the micro-batch (``train.nano_split: repack``),
    each plan over its own rows only, counted from its first row (see :class:`PingPongBlocks`)."""

    rows: tuple[slice, ...]
    plans: dict[int, tuple[Plan, ...]]
    independent: bool = False

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("a micro-batch needs at least one nano-batch")
        for w, plans in self.plans.items():
            if len(plans) != len(self.rows):
                raise ValueError(f"window {w}: {len(plans)} plans for {len(self.rows)} nano-batches")

    def plan(self, window: int, nano: int, backward: bool = False) -> Plan:
        """The plan of nano-batch ``nano``'s calls with ``window`` (the same for both passes here; under the pooled
        schedule the backward's plan is another tick's, :class:`distca.runtime.pooled_attention.TickNanoPlans`)."""
        got = self.plans.get(window)
        if got is None:
            raise KeyError(f"no CAD plan for window {window}; planned windows: {sorted(self.plans, key=str)}")
        return got[nano]


@dataclass
class _Level:
    """One attention call of a block, over all nano-batches."""

    window: int
    # per nano-batch, the call its steps yielded (the model's ``AttentionCall``: q, k, v, window), with the
    # graph back to the block input when it is kept
    calls: list
    attn: list[torch.Tensor] = field(default_factory=list)  # per nano-batch: its output rows, a leaf
    out: torch.Tensor | None = None  # every row's output and lse (each row from its own nano-batch's round)
    lse: torch.Tensor | None = None
    # independent nano-batches: each one's own round's output and lse (its rows only)
    outs: list[torch.Tensor] = field(default_factory=list)
    lses: list[torch.Tensor] = field(default_factory=list)

    def saved(self):
        """What a recomputation needs of this call: the rows' outputs and lse."""
        return (self.outs, self.lses) if self.outs else (self.out, self.lse)

    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.cat([getattr(c, n).detach() for c in self.calls]) for n in "qkv")


class PingPongBlocks:
    """Runs a stage's blocks for one micro-batch as ping-pong nano-batches over ``client``
    (the ``MicroContext.run_block`` of the training pipeline). ``nano``: the nano-batches' ``rows`` and
    ``plan(window, nano, backward)`` — a :class:`NanoPlans`, or the pooled schedule's tick-following
    :class:`~distca.runtime.pooled_attention.TickNanoPlans`."""

    def __init__(self, client, nano, checkpoint: bool = False):
        self.client, self.nano, self.checkpoint = client, nano, checkpoint

    def __call__(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        params = [p for p in block.parameters() if p.requires_grad]
        run = self
        at = getattr(self.nano, "at", None)
        if at is not None:  # plans that depend on the block's position (the pooled schedule with unequal stages)
            run = PingPongBlocks(self.client, at(getattr(block, "index", None)), self.checkpoint)
        return _PingPong.apply(run, block, x, cos, sin, len(params), *params)

    @property
    def independent(self) -> bool:
        return bool(getattr(self.nano, "independent", False))

    # -- forward --------------------------------------------------------------------------------
    def run(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[list[torch.Tensor], list[_Level]]:
        """The block over the nano-batches: ``(each nano-batch's output rows, levels)``. Without ``saved`` each
        attention call is a round per nano-batch, A's and B's in flight together; with ``saved``
        (recomputation) the calls are answered from it and nothing is sent."""
        if self.independent:
            return self._run_independent(block, x, cos, sin, saved)
        rows = self.nano.rows
        steps = [block.steps(x[r], cos[r], sin[r]) for r in rows]
        calls = [next(s) for s in steps]  # every nano-batch's pre-attention work
        outs: list[torch.Tensor | None] = [None] * len(rows)
        levels: list[_Level] = []
        while calls:
            windows = {c.window for c in calls}
            if len(windows) != 1:
                raise RuntimeError(f"nano-batches of one block asked for different attention windows {windows}")
            lvl = _Level(windows.pop(), calls)
            if saved is None:
                q, k, v = lvl.qkv()
                t = RankTensors(q, k, v)
                pending = [self.client.start_forward(self.nano.plan(lvl.window, i), t) for i in range(len(rows))]
            else:
                lvl.out, lvl.lse = saved[len(levels)]
            nxt = []
            for i, r in enumerate(rows):
                if saved is None:
                    out, lse = pending[i].wait()  # this round's own tensors: the leaf below views them
                    if lvl.out is None:  # every nano-batch's rows are copied into one pair for the backward
                        lvl.out, lvl.lse = torch.empty_like(out), torch.empty_like(lse)
                    lvl.out[r], lvl.lse[r] = out[r], lse[r]
                else:
                    out = lvl.out
                a = out[r].detach().requires_grad_(torch.is_grad_enabled())
                lvl.attn.append(a)
                try:  # this nano-batch's post-attention work, while the next one's round is still out
                    nxt.append(steps[i].send(a))
                except StopIteration as done:
                    outs[i] = done.value
            if nxt and len(nxt) != len(rows):
                raise RuntimeError("nano-batches of one block made different numbers of attention calls")
            levels.append(lvl)
            calls = nxt
        return outs, levels

    # -- backward -------------------------------------------------------------------------------
    def backward(self, x: torch.Tensor, ys: list[torch.Tensor], levels: list[_Level], params: list[torch.Tensor],
                 dy: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """d(block input) and the parameters' gradients, given d(output): per attention call from the last,
        each nano-batch's post-attention gradients and then its backward round, so one round is on the servers
        while the next nano-batch's linear gradients are computed."""
        if self.independent:
            return self._backward_independent(x, ys, levels, params, dy)
        rows, n = self.nano.rows, len(self.nano.rows)
        gx: torch.Tensor | None = None
        gp: list[torch.Tensor | None] = [None] * len(params)
        gattn = [[None] * n for _ in levels]  # d(attention output) per call and nano-batch

        def add(got, nano: int) -> None:
            nonlocal gx
            gx = _plus(gx, got[0])
            for j, g in enumerate(got[1:1 + len(params)]):
                gp[j] = _plus(gp[j], g)
            for lv, g in enumerate(got[1 + len(params):]):
                gattn[lv][nano] = _plus(gattn[lv][nano], g)

        def grads(outputs, grad_outputs, nano: int, upto: int) -> None:
            inputs = [x, *params, *(levels[lv].attn[nano] for lv in range(upto))]
            got = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)
            add(got, nano)

        back: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for lv in range(len(levels) - 1, -1, -1):
            lvl = levels[lv]
            q, k, v = lvl.qkv()
            t = RankTensors(q, k, v)
            pending = []
            for i, r in enumerate(rows):
                if back is None:  # the block's output
                    grads([ys[i]], [dy[r]], i, lv + 1)
                else:  # the next call's q, k, v: its round's gradients on this nano-batch's rows
                    nxt = levels[lv + 1].calls[i]
                    grads([nxt.q, nxt.k, nxt.v], [g[r] for g in back], i, lv + 1)
                dout = torch.zeros_like(lvl.out)
                g = gattn[lv][i]
                if g is not None:
                    dout[r] = g
                pending.append(self.client.start_backward(self.nano.plan(lvl.window, i, backward=True), t, lvl.out,
                                                          lvl.lse, dout))
            dq, dk, dv = (None,) * 3
            for p in pending:  # keys are shared: every nano-batch's round adds to dk, dv of any row
                a, b, c = p.wait()
                dq, dk, dv = _plus(dq, a), _plus(dk, b), _plus(dv, c)
            back = (dq, dk, dv)
        for i, r in enumerate(rows):
            first = levels[0].calls[i]
            grads([first.q, first.k, first.v], [g[r] for g in back], i, 0)
        return gx, gp

    # -- independent nano-batches (train.nano_split: repack) ------------------------------------------------------
    def _run_independent(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         saved=None) -> tuple[list[torch.Tensor], list[_Level]]:
        """The block over independent nano-batches: each round starts right after its own nano-batch's
        pre-attention work and each nano-batch goes on as soon as its round is back. Rounds are issued in the
        order ``(call, nano-batch)`` on every rank, as the rows-split ones are."""
        rows = self.nano.rows
        n = len(rows)
        steps = [block.steps(x[r], cos[r], sin[r]) for r in rows]
        levels: list[_Level] = []
        pending: list = [None] * n
        depth = [0] * n  # the call each nano-batch is at
        outs: list[torch.Tensor | None] = [None] * n

        def reach(i: int, call) -> None:  # nano-batch i asks for its call number depth[i]: record it, start the round
            lv = depth[i]
            if lv == len(levels):
                levels.append(_Level(call.window, [None] * n, [None] * n, outs=[None] * n, lses=[None] * n))
            lvl = levels[lv]
            if call.window != lvl.window:
                raise RuntimeError(f"nano-batches of one block asked for different attention windows "
                                   f"{{{lvl.window}, {call.window}}}")
            lvl.calls[i] = call
            if saved is None:
                t = RankTensors(call.q.detach(), call.k.detach(), call.v.detach())
                pending[i] = self.client.start_forward(_own_rows(self.nano.plan(lvl.window, i), t.q.shape[0], i), t)

        for i in range(n):  # each nano-batch's pre-attention work, then its round
            reach(i, next(steps[i]))
        live = list(range(n))
        while live:
            going = []
            for i in live:
                lvl = levels[depth[i]]
                if saved is None:
                    out, lse = pending[i].wait()
                    pending[i] = None
                else:
                    out, lse = saved[depth[i]][0][i], saved[depth[i]][1][i]
                lvl.outs[i], lvl.lses[i] = out, lse
                a = out.detach().requires_grad_(torch.is_grad_enabled())
                lvl.attn[i] = a
                try:  # this nano-batch's post-attention work, up to its next call, while the other's round is out
                    call = steps[i].send(a)
                except StopIteration as done:
                    outs[i] = done.value
                    continue
                depth[i] += 1
                reach(i, call)
                going.append(i)
            live = going
        if len(set(depth)) != 1:
            raise RuntimeError(f"nano-batches of one block made different numbers of attention calls: "
                               f"{[d + 1 for d in depth]}")
        return outs, levels

    def _backward_independent(self, x: torch.Tensor, ys: list[torch.Tensor], levels: list[_Level],
                              params: list[torch.Tensor], dy: torch.Tensor):
        """d(block input) and the parameters' gradients over independent nano-batches: per nano-batch, its
        gradients down to the last call, then its round; each next call below starts as soon as that nano-batch's
        round is back (its keys are its own)."""
        rows, n = self.nano.rows, len(self.nano.rows)
        gx: torch.Tensor | None = None
        gp: list[torch.Tensor | None] = [None] * len(params)
        gattn = [[None] * n for _ in levels]

        def grads(outputs, grad_outputs, nano: int, upto: int) -> None:
            nonlocal gx
            inputs = [x, *params, *(levels[lv].attn[nano] for lv in range(upto))]
            got = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)
            gx = _plus(gx, got[0])
            for j, g in enumerate(got[1:1 + len(params)]):
                gp[j] = _plus(gp[j], g)
            for lv, g in enumerate(got[1 + len(params):]):
                gattn[lv][nano] = _plus(gattn[lv][nano], g)

        def start(lv: int, i: int):
            lvl, call = levels[lv], levels[lv].calls[i]
            g = gattn[lv][i]
            dout = torch.zeros_like(lvl.outs[i]) if g is None else g
            t = RankTensors(call.q.detach(), call.k.detach(), call.v.detach())
            plan = _own_rows(self.nano.plan(lvl.window, i, backward=True), t.q.shape[0], i)
            return self.client.start_backward(plan, t, lvl.outs[i], lvl.lses[i], dout)

        top = len(levels) - 1
        pending = []
        for i, r in enumerate(rows):
            grads([ys[i]], [dy[r]], i, top + 1)
            pending.append(start(top, i))
        for lv in range(top, -1, -1):
            for i in range(n):
                dq, dk, dv = pending[i].wait()
                call = levels[lv].calls[i]
                grads([call.q, call.k, call.v], [dq, dk, dv], i, lv)
                if lv:
                    pending[i] = start(lv - 1, i)
        return gx, gp


def _own_rows(plan: Plan, rows: int, nano: int) -> Plan:
    """``plan``, after checking it reads no row past an independent nano-batch's ``rows`` (every trainer's half
    holds as many rows as this one's, or none): a plan of the whole micro-batch would read the other half's."""
    top = max((int((x.src_row + x.n).max()) for x in (plan.q_xfer, plan.kv_xfer) if x.n.size), default=0)
    if top > rows:
        raise ValueError(f"independent nano-batch {nano}: its plan reads trainer rows up to {top}, but the nano-batch "
                         f"holds {rows} rows (plan each half on its own rows: train.nano_split: repack)")
    return plan


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class _PingPong(torch.autograd.Function):
    """One block over the nano-batches; its backward runs the rounds (see the module docstring)."""

    @staticmethod
    def forward(ctx, run: PingPongBlocks, block: nn.Module, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, n_params: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.block, ctx.n_params = run, block, n_params
        if run.checkpoint:  # keep the input and the attention outputs only; the linear work is recomputed
            ys, levels = run.run(block, x, cos, sin)
            ctx.saved = [lvl.saved() for lvl in levels]
            ctx.save_for_backward(x, cos, sin)
            return torch.cat(ys)
        with torch.enable_grad():
            xl = x.detach().requires_grad_()
            ys, levels = run.run(block, xl, cos, sin)
        ctx.graph = (xl, ys, levels)
        return torch.cat([y.detach() for y in ys])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        run, params = ctx.run, [p for p in ctx.block.parameters() if p.requires_grad]
        if run.checkpoint:
            x, cos, sin = ctx.saved_tensors
            with torch.enable_grad():
                xl = x.detach().requires_grad_()
                ys, levels = run.run(ctx.block, xl, cos, sin, saved=ctx.saved)
            ctx.saved = None
        else:
            xl, ys, levels = ctx.graph
            ctx.graph = None
        gx, gp = run.backward(xl, ys, levels, params, dy.contiguous())
        if len(gp) != ctx.n_params:
            raise RuntimeError(f"the block has {len(gp)} trainable parameters, {ctx.n_params} at forward")
        return (None, None, gx, None, None, None, *gp)
