"""Text datasets (``.jsonl`` / ``.parquet``) tokenised lazily with a local Hugging Face ``tokenizer.json``.

Pinned choices:

- ``.jsonl``: one JSON object per line, the text under ``text_key``. Blank lines are skipped. Every
  line is parsed once when the source is opened, so a malformed line fails at open with
  ``file:line`` (not hours into training); only each record's byte offset is kept, and
  ``document(i)`` re-reads that line.
- ``.parquet`` (needs ``pyarrow``, the ``parquet`` extra): column ``text_key`` must be a string
  column without nulls; the column is held in memory as an Arrow array.
- Records whose text is the empty string are skipped (``n_skipped`` counts them), so indices run
  over non-empty records only. A non-empty text that still tokenises to no token (e.g. only
  whitespace for some tokenizers, without ``append_eos``) raises ``DataError`` naming its record.
- Tokenisation: ``Tokenizer.encode(text, add_special_tokens=False)``, then ``append_eos`` (a token
  string of the vocabulary) if given. ``vocab_size`` is ``get_vocab_size(with_added_tokens=True)``.
  ``length(i)`` tokenises (and caches the count per instance).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from distca.data.distributions import DataError
from distca.data.document_source import check_index
from distca.limits import MAX_DOC_TOKENS, parse_json, pow2_text

TEXT_SUFFIXES = (".jsonl", ".parquet")


def load_tokenizer(tokenizer_json: str | os.PathLike[str]) -> Tokenizer:
    """Load a local Hugging Face ``tokenizer.json``; a missing or invalid file raises ``DataError``."""
    path = Path(tokenizer_json)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust binding raises a bare Exception
        raise DataError(f"cannot load tokenizer {path}: {e}") from e


class TextSource:
    """Documents from a ``.jsonl`` or ``.parquet`` file, tokenised on demand (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], tokenizer_json: str | os.PathLike[str], text_key: str = "text",
                 append_eos: str | None = None) -> None:
        self.path = Path(path)
        self.text_key = text_key
        if self.path.suffix not in TEXT_SUFFIXES:
            raise DataError(f"text dataset {self.path} must end in one of {list(TEXT_SUFFIXES)}")
        if not self.path.is_file():
            raise DataError(f"text dataset {self.path} does not exist")
        self.tokenizer = load_tokenizer(tokenizer_json)
        self._vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        self._eos: int | None = None
        if append_eos is not None:
            eos = self.tokenizer.token_to_id(append_eos)
            if eos is None:
                raise DataError(f"append_eos token {append_eos!r} is not in the vocabulary of {tokenizer_json}")
            self._eos = int(eos)
        self._parquet: Any = None
        if self.path.suffix == ".jsonl":
            self._line_offsets, self._line_numbers, self.n_skipped = _index_jsonl(self.path, text_key)
            n = len(self._line_offsets)
        else:
            self._parquet, self._rows, self.n_skipped = _load_parquet(self.path, text_key)
            n = len(self._rows)
        if n == 0:
            raise DataError(f"text dataset {self.path} has no record with a non-empty {text_key!r}")
        self._lengths = np.full(n, -1, dtype=np.int64)
        self._name = f"text:{self.path.name}"

    @property
    def name(self) -> str:
        """``text:<file name>``."""
        return self._name

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, added tokens included."""
        return self._vocab_size

    def __len__(self) -> int:
        return len(self._lengths)

    def where(self, i: int) -> str:
        """``file:line`` (jsonl) or ``file row N`` (parquet) of document ``i``."""
        i = check_index(self, i)
        if self._parquet is None:
            return f"{self.path}:{int(self._line_numbers[i])}"
        return f"{self.path} row {int(self._rows[i])}"

    def text(self, i: int) -> str:
        """The raw text of document ``i``."""
        i = check_index(self, i)
        if self._parquet is not None:
            return str(self._parquet[int(self._rows[i])].as_py())
        with open(self.path, "rb") as f:
            f.seek(int(self._line_offsets[i]))
            line = f.readline()
        return _parse_line(line, self.path, int(self._line_numbers[i]), self.text_key)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (int64, >= 1 token)."""
        i = check_index(self, i)
        ids = self.tokenizer.encode(self.text(i), add_special_tokens=False).ids
        if self._eos is not None:
            ids.append(self._eos)
        if not ids:
            raise DataError(f"{self.where(i)}: text tokenises to no token; drop the record or set append_eos")
        if len(ids) > MAX_DOC_TOKENS:
            raise DataError(f"{self.where(i)}: {len(ids)} tokens, over the cap of {pow2_text(MAX_DOC_TOKENS)} tokens "
                            "per document; split the record")
        doc = np.asarray(ids, dtype=np.int64)
        self._lengths[i] = doc.size
        return doc

    def length(self, i: int) -> int:
        """Token count of document ``i`` (tokenises on first use, then cached)."""
        i = check_index(self, i)
        if self._lengths[i] < 0:
            self.document(i)
        return int(self._lengths[i])


def _parse_line(line: bytes, path: Path, lineno: int, text_key: str) -> str:
    obj = parse_json(line, f"{path}:{lineno}", DataError)  # syntax, bad UTF-8, nesting too deep: one DataError
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if text_key not in obj:
        raise DataError(f"{path}:{lineno}: no key {text_key!r} (keys: {sorted(obj)[:10]})")
    text = obj[text_key]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: {text_key!r} must be a string, got {type(text).__name__}")
    return text


def _index_jsonl(path: Path, text_key: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Byte offset and 1-based line number of every record with non-empty text; count of skipped ones."""
    offsets: list[int] = []
    lines: list[int] = []
    skipped = 0
    pos = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                if _parse_line(line, path, lineno, text_key):
                    offsets.append(pos)
                    lines.append(lineno)
                else:
                    skipped += 1
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64), skipped


def _load_parquet(path: Path, text_key: str) -> tuple[Any, np.ndarray, int]:
    """The text column as an Arrow array, the rows with non-empty text, and the count of skipped rows."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow: pip install 'distca[parquet]'") from e
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read parquet file {path}: {e}") from e
    if text_key not in schema.names:
        raise DataError(f"{path}: no column {text_key!r} (columns: {schema.names})")
    typ = schema.field(text_key).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"{path}: column {text_key!r} must hold strings, got {typ}")
    try:
        column = pq.read_table(path, columns=[text_key]).column(text_key).combine_chunks()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read column {text_key!r} of parquet file {path}: {e}") from e
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: column {text_key!r} has {column.null_count} null(s), the first at row {first}")
    nonempty = pc.binary_length(column).to_numpy(zero_copy_only=False) > 0
    rows = np.flatnonzero(nonempty).astype(np.int64)
    return column, rows, len(column) - int(rows.size)
