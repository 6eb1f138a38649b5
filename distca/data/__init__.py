"""Seeded document-length workloads, their packing into per-rank token budgets, and the training data pipeline
(document sources and the resumable packing stream)."""

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
from distca.data.document_source import DocumentSource
from distca.data.embedded_corpus import ByteTokenizer, EmbeddedCorpus
from distca.data.packing import PackedBatch, pack_into_ranks, sample_batch
from distca.data.sources import SOURCE_KINDS, open_source
from distca.data.stream import IGNORE_INDEX, DocSlice, MicroBatch, PackedStream
from distca.data.synthetic_source import SyntheticSource
from distca.data.text_source import TextSource, load_tokenizer
from distca.data.token_files import TokenFileSource, token_file_paths, tokenize_to_file, write_token_file

__all__ = [
    "DISTRIBUTIONS",
    "IGNORE_INDEX",
    "LONG_THRESHOLD",
    "SOURCE_KINDS",
    "ByteTokenizer",
    "DataError",
    "DocSlice",
    "DocumentSource",
    "EmbeddedCorpus",
    "LengthDistribution",
    "MicroBatch",
    "PackedBatch",
    "PackedStream",
    "SyntheticSource",
    "TextSource",
    "TokenFileSource",
    "elongate_to",
    "length_stats",
    "load_tokenizer",
    "long_token_share",
    "open_source",
    "pack_into_ranks",
    "sample_batch",
    "sample_lengths",
    "token_file_paths",
    "tokenize_to_file",
    "write_token_file",
]
