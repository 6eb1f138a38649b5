"""Pre-tokenised token files: write once, memory-map for training.

Format (``<prefix>`` is any path prefix, e.g. ``data/train``):

- ``<prefix>.tokens.bin``   every document's token ids back to back, one flat array of ``dtype``
  (native little-endian), no header.
- ``<prefix>.offsets.npy``  int64, ``n_docs + 1`` entries: document ``i`` is ``bin[offsets[i]:offsets[i+1]]``;
  ``offsets[0] == 0``, strictly increasing (documents hold >= 1 token), ``offsets[-1] == n_tokens``.
- ``<prefix>.meta.json``    ``{"format": "distca-tokens", "version": 1, "dtype": ..., "n_docs": ...,
  "n_tokens": ..., "vocab_size": ...}``.

Pinned choices: without an explicit ``dtype`` the writer picks ``uint16`` when every id is below 65,536,
else ``uint32`` (ids of 2**32 and more need ``dtype="int64"``). ``vocab_size`` defaults to max id + 1.
Writing goes to temporary files in the target directory which are renamed into place; an existing
``meta.json`` is removed first and the new one renamed last, so a reader sees either no dataset or a
complete one. ``TokenFileSource`` validates the metadata, the offsets and the file size when opened,
and each document's ids against ``vocab_size`` when it is read (one min/max per document).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

from distca.data.distributions import DataError, _is_int
from distca.data.document_source import DocumentSource, check_index
from distca.limits import MAX_DOC_TOKENS, parse_json, pow2_text, read_json_text, short_repr

FORMAT = "distca-tokens"
VERSION = 1
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
_AUTO_SMALL, _AUTO_LARGE = np.dtype("uint16"), np.dtype("uint32")
_CONVERT_CHUNK = 1 << 22  # tokens per chunk when narrowing the auto-dtype temp file


def token_file_paths(path_prefix: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(<prefix>.tokens.bin, <prefix>.offsets.npy, <prefix>.meta.json)``."""
    p = os.fspath(path_prefix)
    return Path(p + ".tokens.bin"), Path(p + ".offsets.npy"), Path(p + ".meta.json")


def write_token_file(path_prefix: str | os.PathLike[str], documents: Iterable[np.ndarray | list[int]],
                     dtype: str | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """Write ``documents`` (1-D int arrays, each >= 1 token) in the token-file format; return the metadata."""
    bin_path, off_path, meta_path = token_file_paths(path_prefix)
    parent = bin_path.parent
    if not parent.is_dir():
        raise DataError(f"cannot write token file {bin_path}: directory {parent} does not exist")
    if dtype is not None and dtype not in TOKEN_DTYPES:
        raise DataError(f"token dtype must be one of {list(TOKEN_DTYPES)}, got {dtype!r}")
    if vocab_size is not None and not (_is_int(vocab_size) and vocab_size >= 1):
        raise DataError(f"vocab_size must be an int >= 1 or None, got {vocab_size!r}")
    write_dt = np.dtype(dtype) if dtype is not None else _AUTO_LARGE
    limit = int(np.iinfo(write_dt).max)
    temps: list[Path] = []
    try:
        offsets = [0]
        max_id = -1
        with _temp_file(parent, bin_path.name, temps) as f:
            for k, doc in enumerate(documents):
                arr = _check_doc(doc, k, bin_path)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < 0 or hi > limit:
                    hint = "" if dtype is not None else "; pass dtype='int64'"
                    raise DataError(f"writing {bin_path}: document {k} has token id {lo if lo < 0 else hi} outside "
                                    f"[0, {limit}] for dtype {write_dt.name}{hint}")
                max_id = max(max_id, hi)
                f.write(arr.astype(write_dt).tobytes())
                offsets.append(offsets[-1] + arr.size)
            _sync(f)
        if len(offsets) == 1:
            raise DataError(f"writing {bin_path}: no documents given")
        if vocab_size is None:
            vocab_size = max_id + 1
        elif max_id >= vocab_size:
            raise DataError(f"writing {bin_path}: token id {max_id} >= vocab_size {vocab_size}")
        bin_temp = temps[0]
        if dtype is None and max_id < 65_536:
            bin_temp = _narrow(bin_temp, parent, bin_path.name, temps, offsets[-1])
            write_dt = _AUTO_SMALL
        meta = {"format": FORMAT, "version": VERSION, "dtype": write_dt.name, "n_docs": len(offsets) - 1,
                "n_tokens": offsets[-1], "vocab_size": int(vocab_size)}
        with _temp_file(parent, off_path.name, temps) as f:
            np.save(f, np.asarray(offsets, dtype=np.int64), allow_pickle=False)
            _sync(f)
        off_temp = temps[-1]
        with _temp_file(parent, meta_path.name, temps) as f:
            f.write((json.dumps(meta, indent=1) + "\n").encode())
            _sync(f)
        meta_temp = temps[-1]
        meta_path.unlink(missing_ok=True)
        os.replace(bin_temp, bin_path)
        os.replace(off_temp, off_path)
        os.replace(meta_temp, meta_path)
        return meta
    finally:
        for t in temps:
            t.unlink(missing_ok=True)


def _check_doc(doc: np.ndarray | list[int], k: int, bin_path: Path) -> np.ndarray:
    arr = np.asarray(doc)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"writing {bin_path}: document {k} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"writing {bin_path}: document {k} must hold integer token ids, got dtype {arr.dtype}")
    return arr


@contextlib.contextmanager
def _temp_file(parent: Path, final_name: str, temps: list[Path]) -> Iterator[IO[bytes]]:
    fd, name = tempfile.mkstemp(dir=parent, prefix=f".{final_name}.", suffix=".tmp")
    temps.append(Path(name))
    with os.fdopen(fd, "wb") as f:
        yield f


def _sync(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _narrow(src: Path, parent: Path, final_name: str, temps: list[Path], n_tokens: int) -> Path:
    """Rewrite the uint32 temp file ``src`` as uint16 (all ids are known to fit)."""
    wide = np.memmap(src, dtype=_AUTO_LARGE, mode="r", shape=(n_tokens,))
    with _temp_file(parent, final_name, temps) as f:
        for a in range(0, n_tokens, _CONVERT_CHUNK):
            f.write(np.asarray(wide[a: a + _CONVERT_CHUNK]).astype(_AUTO_SMALL).tobytes())
        _sync(f)
    del wide
    src.unlink()
    return temps[-1]


class TokenFileSource:
    """A token file (see the module docstring) opened read-only through ``np.memmap``."""

    def __init__(self, path_prefix: str | os.PathLike[str]) -> None:
        self.bin_path, self.offsets_path, self.meta_path = token_file_paths(path_prefix)
        meta = _read_meta(self.meta_path)
        self.dtype = np.dtype(meta["dtype"])
        self._vocab_size = meta["vocab_size"]
        n_docs, n_tokens = meta["n_docs"], meta["n_tokens"]
        self._offsets = _read_offsets(self.offsets_path, n_docs, n_tokens)
        if not self.bin_path.is_file():
            raise DataError(f"token file {self.bin_path} is missing")
        size = self.bin_path.stat().st_size
        want = n_tokens * self.dtype.itemsize
        if size != want:
            raise DataError(f"token file {self.bin_path} has {size} bytes, expected {want} ({n_tokens} tokens of "
                            f"{self.dtype.name} per {self.meta_path.name}); truncated or mismatched")
        self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(n_tokens,))
        self._name = f"tokens:{self.bin_path.name.removesuffix('.tokens.bin')}"

    @property
    def name(self) -> str:
        """``tokens:<prefix file name>``."""
        return self._name

    @property
    def vocab_size(self) -> int:
        """From the metadata."""
        return self._vocab_size

    @property
    def n_tokens(self) -> int:
        """Tokens in the whole file."""
        return int(self._offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """Every document's length, int64."""
        return np.diff(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def length(self, i: int) -> int:
        """From the offsets."""
        i = check_index(self, i)
        return int(self._offsets[i + 1] - self._offsets[i])

    def document(self, i: int) -> np.ndarray:
        """Copy of document ``i`` as int64; ids checked against ``vocab_size``."""
        i = check_index(self, i)
        doc = np.asarray(self._tokens[self._offsets[i]: self._offsets[i + 1]], dtype=np.int64)
        lo, hi = int(doc.min()), int(doc.max())
        if lo < 0 or hi >= self._vocab_size:
            raise DataError(f"token file {self.bin_path}: document {i} has token id {lo if lo < 0 else hi} outside "
                            f"[0, {self._vocab_size}) (vocab_size from {self.meta_path.name})")
        return doc


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"token file metadata {path} is missing (write it with write_token_file)")
    meta = parse_json(read_json_text(path, "token file metadata", DataError),
                      f"token file metadata {path} is not readable", DataError)
    if not isinstance(meta, dict):
        raise DataError(f"token file metadata {path} must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{path}: expected format {FORMAT!r} version {VERSION}, got format {meta.get('format')!r} "
                        f"version {meta.get('version')!r}")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise DataError(f"{path}: dtype must be one of {list(TOKEN_DTYPES)}, got {meta.get('dtype')!r}")
    for key, lo in (("n_docs", 1), ("n_tokens", 1), ("vocab_size", 1)):
        v = meta.get(key)
        if not (_is_int(v) and v >= lo):
            raise DataError(f"{path}: {key!r} must be an int >= {lo}, got {v!r}")
    return meta


def _read_offsets(path: Path, n_docs: int, n_tokens: int) -> np.ndarray:
    """The offsets array, its ``.npy`` header checked against ``n_docs`` and the file's size before anything
    is allocated (a header may claim any shape)."""
    if not path.is_file():
        raise DataError(f"token file offsets {path} is missing")
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
            if dtype != np.dtype("<i8") or len(shape) != 1:
                raise DataError(f"{path}: offsets must be a 1-D int64 array (little-endian), got dtype {dtype}, "
                                f"shape {short_repr(shape)}")
            if shape[0] != n_docs + 1:
                raise DataError(f"{path}: {short_repr(shape[0])} offsets for {n_docs} documents (need n_docs + 1)")
            if data_bytes != shape[0] * 8:
                raise DataError(f"{path}: the header promises {shape[0]} int64 offsets ({shape[0] * 8} bytes) but "
                                f"the file holds {data_bytes} bytes after it; truncated or mismatched")
            off = np.fromfile(f, dtype=np.int64, count=shape[0])
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # read_magic / read_array_header: ValueError on a bad header
        raise DataError(f"token file offsets {path} is not a readable .npy array: {' '.join(str(e).split())}") \
            from None
    if off[0] != 0:
        raise DataError(f"{path}: offsets must start at 0, got {int(off[0])}")
    bad = np.flatnonzero(np.diff(off) <= 0)
    if bad.size:
        j = int(bad[0])
        raise DataError(f"{path}: offsets must be strictly increasing (documents hold >= 1 token); "
                        f"offsets[{j}] = {int(off[j])}, offsets[{j + 1}] = {int(off[j + 1])}")
    if off[-1] != n_tokens:
        raise DataError(f"{path}: last offset {int(off[-1])} != n_tokens {n_tokens} in the metadata")
    lengths = np.diff(off)
    if lengths.max() > MAX_DOC_TOKENS:
        j = int(np.argmax(lengths))
        raise DataError(f"{path}: document {j} holds {int(lengths[j])} tokens, over the cap of "
                        f"{pow2_text(MAX_DOC_TOKENS)} tokens per document")
    return off


def tokenize_to_file(source: DocumentSource, path_prefix: str | os.PathLike[str],
                     dtype: str | None = None) -> TokenFileSource:
    """Write every document of ``source`` (in index order) as a token file; return it opened."""
    docs = (source.document(i) for i in range(len(source)))
    write_token_file(path_prefix, docs, dtype=dtype, vocab_size=source.vocab_size)
    return TokenFileSource(path_prefix)
