"""Seeded document-length workloads and their packing into per-rank token budgets."""

from distca.data.distributions import (
    DISTRIBUTIONS,
    LONG_THRESHOLD,
    DataError,
    LengthDistribution,
    elongate_to,
    length_stats,
    long_token_share,
    sample_lengths,
)
from distca.data.packing import PackedBatch, pack_into_ranks, sample_batch

__all__ = [
    "DISTRIBUTIONS",
    "LONG_THRESHOLD",
    "DataError",
    "LengthDistribution",
    "PackedBatch",
    "elongate_to",
    "length_stats",
    "long_token_share",
    "pack_into_ranks",
    "sample_batch",
    "sample_lengths",
]
