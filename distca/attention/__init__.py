"""Core attention as pure math: task shapes, kernels (backends) and the cost model. No networking."""

from distca.attention.backends import BACKEND_NAMES, available_backends, get_backend_reason, resolve_backend
from distca.attention.backends.base import lse_dtype
from distca.attention.cost import (
    AttentionShape,
    CalibrationTable,
    CostModel,
    attention_flops,
    cum_pairs,
    pair_count,
    tile_count,
)
from distca.attention.masked import RectCall, document_call, masked_attention
from distca.attention.tasks import FULL, CATask, key_range, shard_document, uniform_cuts, varlen_metadata
from distca.attention.varlen import backward, forward, varlen_attention

__all__ = [
    "BACKEND_NAMES",
    "FULL",
    "AttentionShape",
    "CATask",
    "CalibrationTable",
    "CostModel",
    "RectCall",
    "attention_flops",
    "available_backends",
    "backward",
    "cum_pairs",
    "document_call",
    "forward",
    "get_backend_reason",
    "key_range",
    "lse_dtype",
    "masked_attention",
    "pair_count",
    "resolve_backend",
    "shard_document",
    "tile_count",
    "uniform_cuts",
    "varlen_attention",
    "varlen_metadata",
]
