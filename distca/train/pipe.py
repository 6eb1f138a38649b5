"""The Llama decoder as a DeepSpeed ``PipelineModule``: :class:`~distca.model.llama.LlamaModel`'s own parts
(embedding, one layer per block, final norm, head), each as one pipeline layer.

The stage classes here subclass those parts and change only what ``forward`` takes and returns, so a
stage holds the same parameters under the same names (after the layer index) and is initialised the
same way (:mod:`distca.model.init`); :func:`llama_parameters` gives a stage's parameters their
``LlamaModel`` names.

Activations between stages are ``(hidden [T, d], micro [1])``: ``micro`` is the micro-batch's index
in the step, which every stage uses to find that micro-batch's document layout (per-document RoPE
positions) and its core attention in the :class:`StepContext` the trainer fills before each step.
That is how the model's one core-attention call reaches local attention or the attention servers
without the model knowing which — and without sending document metadata down the pipeline.

On a GPU, DeepSpeed's pipeline engine moves the first stage's ``(tokens, micro)`` and the last stage's
labels to the rank's device as it loads a micro-batch, and sends the ``(hidden, micro)`` tuple to the
next stage over the process group (NCCL); the backward pass sends gradients for the floating tensor only.
The micro-batch contexts (document layouts, RoPE tables, core attention) are built on the device.

Layer seeds are ``seed + layer index`` (DeepSpeed's ``seed_layers``), so initial weights do not
depend on the pipeline degree or on which attention the run uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distca.config import ModelConfig
from distca.model.core import CoreAttention, DocLayout
from distca.model.layers import RMSNorm, rope_cos_sin
from distca.model.llama import Block, LMHead, TokenEmbedding

# ``run_block(block, x, cos, sin) -> block output``: how a micro-batch runs each block when it is not simply
# ``block(x, core, cos, sin)`` (ping-pong nano-batches, :class:`distca.runtime.nano.PingPongBlocks`).
BlockRunner = Callable[[Block, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def runner_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
    """The core attention of a micro-batch whose blocks all go through its ``run_block``: never called."""
    raise RuntimeError("this micro-batch runs its blocks through its block runner, never a single core-attention call")


@dataclass
class MicroContext:
    """One micro-batch on this rank: its documents, the core attention to use for it and, optionally, a runner
    of its blocks."""

    layout: DocLayout
    core: CoreAttention
    run_block: BlockRunner | None = None
    # called with a block's index after the block's forward (the pooled schedule's hook: a stage with fewer blocks
    # serves the later block positions' attention rounds once its own are done)
    after_block: Callable[[int], None] | None = None
    _rope: dict = field(default_factory=dict)

    def core_at(self, block: int) -> CoreAttention:
        """The core attention of ``block``'s calls: ``core``, or its view for that block when the plans depend on
        the block's position in its stage (``core.at``, the pooled schedule with unequal stages)."""
        at = getattr(self.core, "at", None)
        return at(block) if at is not None else self.core

    def rope(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, device)
        if key not in self._rope:
            cos, sin = rope_cos_sin(self.layout.position_ids, cfg.head_dim, cfg.rope_theta, dtype, cfg.rope_scaling)
            self._rope[key] = cos.to(device), sin.to(device)
        return self._rope[key]


def _micro_index(index: torch.Tensor | int) -> int:
    """The micro-batch index a ``micro`` tensor carries. On a GPU reading it waits for the device to catch up,
    so it is read once per tensor and kept on the tensor object: every block of a stage passes the same
    object on (recomputation under activation checkpointing too), so a stage reads it once per micro-batch."""
    if not isinstance(index, torch.Tensor):
        return int(index)
    known = getattr(index, "_distca_micro", None)
    if known is None:
        known = int(index.reshape(-1)[0])
        index._distca_micro = known
    return known


class StepContext:
    """The current step's micro-batches, indexed by the ``micro`` tensor that travels with activations."""

    def __init__(self) -> None:
        self.micro: list[MicroContext] = []

    def set(self, micro: list[MicroContext]) -> None:
        self.micro = list(micro)

    def __getitem__(self, index: torch.Tensor | int) -> MicroContext:
        i = _micro_index(index)
        if not 0 <= i < len(self.micro):
            raise IndexError(f"micro-batch {i} is not in this step ({len(self.micro)} micro-batches set)")
        return self.micro[i]


class EmbedStage(TokenEmbedding):
    """The model's embedding, passing the micro-batch index on. Its ``weight`` is the tied head's too."""

    def forward(self, inputs):
        tokens, micro = inputs
        return super().forward(tokens), micro


def tied_head(stage: EmbedStage, x: torch.Tensor) -> torch.Tensor:
    """The LM head through the embedding weight (``tie_embeddings``)."""
    return F.linear(x, stage.weight)


class BlockStage(Block):
    """One decoder block; finds its micro-batch's layout and core attention in the step context."""

    def __init__(self, cfg: ModelConfig, index: int, ctx: StepContext):
        super().__init__(cfg, index)
        self.ctx, self.index = ctx, index

    def forward(self, inputs):
        x, micro = inputs
        m = self.ctx[micro]
        cos, sin = m.rope(self.cfg, x.dtype, x.device)
        if m.run_block is not None:
            y = m.run_block(self, x, cos, sin)
        else:
            y = super().forward(x, m.core_at(self.index), cos, sin)
        if m.after_block is not None:
            m.after_block(self.index)
        return y, micro


class NormStage(RMSNorm):
    """The final norm; the micro-batch index stops here (the head and the loss take plain tensors)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden, cfg.norm_eps)

    def forward(self, inputs):
        x, _micro = inputs
        return super().forward(x)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over this micro-batch's tokens that have a target (fp32)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def pipeline_layers(cfg: ModelConfig, ctx: StepContext) -> list:
    """Layer specs in order: embedding, blocks, final norm, head (tied to the embedding if configured)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    # the tie key is the embedding's LlamaModel name, which llama_parameters relies on
    first = TiedLayerSpec("embed", EmbedStage, cfg) if cfg.tie_embeddings else LayerSpec(EmbedStage, cfg)
    last = (TiedLayerSpec("embed", EmbedStage, cfg, forward_fn=tied_head) if cfg.tie_embeddings
            else LayerSpec(LMHead, cfg))
    return [first, *(LayerSpec(BlockStage, cfg, i, ctx) for i in range(cfg.n_layers)), LayerSpec(NormStage, cfg),
            last]


def llama_parameters(pipe: nn.Module, cfg: ModelConfig) -> dict[str, nn.Parameter]:
    """This stage's parameters under their :class:`LlamaModel` names. ``PipelineModule`` names layer ``i``
    of :func:`pipeline_layers` ``"i"`` and a tied module ``tied_modules.<key>``; the rest of each name is
    the part's own, the same as inside ``LlamaModel``."""
    prefixes = ["embed", *(f"blocks.{i}" for i in range(cfg.n_layers)), "norm", "head"]  # pipeline_layers' order
    out = {}
    for name, p in pipe.named_parameters():
        layer, rest = name.split(".", 1)
        out[rest if layer == "tied_modules" else f"{prefixes[int(layer)]}.{rest}"] = p
    return out


def _seed_layer(seed) -> None:
    torch.manual_seed(int(seed))  # DeepSpeed may hand numpy ints, which ``random.seed`` refuses


def layer_parts(blocks: tuple[int, ...]) -> list[int]:
    """DeepSpeed's ``parts`` (stage ``s`` builds pipeline layers ``parts[s]:parts[s+1]``) for ``blocks`` decoder
    blocks per stage over :func:`pipeline_layers`: the embedding goes with the first stage, the final norm and
    the head with the last."""
    parts, start = [0], 1  # layer 0 is the embedding
    for b in blocks[:-1]:
        start += b
        parts.append(start)
    parts.append(1 + sum(blocks) + 2)  # the final norm and the head
    return parts


def build_pipeline(cfg: ModelConfig, ctx: StepContext, n_stages: int, seed: int, checkpointing: bool,
                   blocks: tuple[int, ...] | None = None):
    """The ``PipelineModule`` (built after ``torch.distributed`` is initialised): ``blocks`` decoder blocks per
    stage (distca.config.stage_blocks; default even), per-layer seeds, optional activation checkpointing of every
    block."""
    from deepspeed.pipe import PipelineModule

    from distca.config import even_blocks

    parts = layer_parts(tuple(blocks) if blocks else even_blocks(cfg.n_layers, n_stages))
    if len(parts) != n_stages + 1:
        raise ValueError(f"{len(parts) - 1} stages' blocks given for {n_stages} pipeline stages")

    class _SplitPipeline(PipelineModule):
        """DeepSpeed's module with the stage boundaries given (its own partition methods balance counts or
        parameters, not the linear work of blocks and head)."""

        def _partition_layers(self, method="uniform"):
            self.parts = list(parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return _SplitPipeline(pipeline_layers(cfg, ctx), num_stages=n_stages, loss_fn=lm_loss, seed_layers=True,
                          base_seed=seed, seed_fn=_seed_layer, partition_method="type:BlockStage",
                          activation_checkpoint_interval=1 if checkpointing else 0,
                          activation_checkpoint_func=ckpt, checkpointable_layers=["BlockStage"])
