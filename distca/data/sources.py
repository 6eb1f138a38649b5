"""Pick a document source by name: ``open_source(kind, **kwargs)``.

Every source satisfies :class:`~distca.data.document_source.DocumentSource`. The kinds:

- ``embedded``  ``EmbeddedCorpus`` (``distca.data.embedded_corpus``): the ``*.py`` files of Python's
  standard library, one document per file, byte-level tokens. Needs no download.
- ``tokens``    ``TokenFileSource`` (``distca.data.token_files``): a pre-tokenised, memory-mapped file.
- ``text``      ``TextSource`` (``distca.data.text_source``): ``.jsonl`` / ``.parquet`` text tokenised by a
  local Hugging Face ``tokenizer.json``.
- ``synthetic`` ``SyntheticSource`` (``distca.data.synthetic_source``): random tokens with lengths from a
  ``LengthDistribution``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from distca.data.distributions import DataError
from distca.data.document_source import DocumentSource
from distca.data.embedded_corpus import EmbeddedCorpus
from distca.data.synthetic_source import SyntheticSource
from distca.data.text_source import TextSource
from distca.data.token_files import TokenFileSource

_CONSTRUCTORS: dict[str, Callable[..., DocumentSource]] = {
    "embedded": EmbeddedCorpus, "synthetic": SyntheticSource, "text": TextSource, "tokens": TokenFileSource,
}
SOURCE_KINDS = tuple(_CONSTRUCTORS)


def open_source(kind: str, **kwargs: Any) -> DocumentSource:
    """Build a source from config: ``kind`` in ``SOURCE_KINDS``, ``kwargs`` passed to its constructor.

    ``embedded`` → ``EmbeddedCorpus``, ``tokens`` → ``TokenFileSource``, ``text`` → ``TextSource``,
    ``synthetic`` → ``SyntheticSource``.
    """
    if kind not in _CONSTRUCTORS:
        raise DataError(f"unknown data source kind {kind!r}; valid kinds: {list(SOURCE_KINDS)}")
    ctor = _CONSTRUCTORS[kind]
    sig = inspect.signature(ctor)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise DataError(f"bad arguments for data source {kind!r}: {e}; accepted: {sig}") from e
    return ctor(**kwargs)
