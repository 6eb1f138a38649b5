"""Caps on the sizes a user can hand DistCA, and the checks that enforce them at the edges.

Every count that reaches int64 arithmetic is capped where it enters (CLI flags, config, lengths files,
data loaders), so the planner, the cost model and the byte counts never overflow:

- a document holds at most ``MAX_DOC_TOKENS = 2**31`` tokens, so its pair count ``l(l+1)/2`` stays
  below 2**62 and ``l(l+1)`` below 2**63;
- one batch's attended pairs (Σ over documents) stay at most ``MAX_BATCH_PAIRS = 2**62``, leaving
  headroom for the planner's sums;
- attention-shape dimensions are at most ``MAX_DIM`` and a token's q row at most ``MAX_ROW_BYTES``,
  so bytes = tokens × row bytes fits int64 for any batch within the caps;
- ``MAX_RANKS`` trainers or servers, ``MAX_JSON_BYTES`` per JSON input file.

A bad value raises :class:`~distca.errors.InputError` (or the caller's subclass of it) with a one-line
message that names the field, what was expected and what came.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

import numpy as np

from distca.errors import InputError

MAX_DOC_TOKENS = 2**31
MAX_BATCH_PAIRS = 2**62
MAX_DIM = 2**20  # heads, head dimension, hidden width, layers
MAX_VOCAB = 2**31
MAX_DTYPE_BYTES = 8
MAX_ROW_BYTES = 2**24  # n_heads × head_dim × dtype_bytes of one token's q row
MAX_RANKS = 2**20  # trainers, servers
MAX_DOCS = 2**31  # documents a synthetic epoch draws (its lengths array: 16 GiB at the cap)
MAX_JSON_BYTES = 1 << 28  # a lengths file of a million documents is ~8 MB
INT64_MAX = 2**63 - 1


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_int(value: Any, name: str, lo: int = 1, hi: int = INT64_MAX, error: type[Exception] = InputError,
              allow: tuple[int, ...] = ()) -> int:
    """``value`` as an int in ``[lo, hi]`` (or one of ``allow``), else ``error`` naming ``name``."""
    if not is_int(value):
        raise error(f"{name} must be an integer, got {type(value).__name__}: {short_repr(value)}")
    v = int(value)
    if v in allow or lo <= v <= hi:
        return v
    also = "".join(f" or {a}" for a in allow)
    raise error(f"{name} must be in [{lo}, {pow2_text(hi)}]{also}, got {short_repr(v)}")


def check_float(value: Any, name: str, lo: float = -math.inf, hi: float = math.inf,
                error: type[Exception] = InputError) -> float:
    """``value`` as a finite float in ``[lo, hi]``, else ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{name} must be a number, got {type(value).__name__}: {short_repr(value)}")
    try:
        v = float(value)
    except OverflowError:
        raise error(f"{name} must be a finite number, got {short_repr(value)}") from None
    if not math.isfinite(v):
        raise error(f"{name} must be a finite number, got {v}")
    if not lo <= v <= hi:
        raise error(f"{name} must be in [{lo:g}, {hi:g}], got {v:g}")
    return v


def check_shape(n_heads: int, n_kv_heads: int, head_dim: int, dtype_bytes: int,
                names: tuple[str, str, str, str] = ("n_heads", "n_kv_heads", "head_dim", "dtype_bytes"),
                error: type[Exception] = InputError) -> None:
    """Attention-shape fields: each > 0 and capped, ``n_heads`` a multiple of ``n_kv_heads``, and one q row
    within ``MAX_ROW_BYTES``."""
    h = check_int(n_heads, names[0], 1, MAX_DIM, error)
    kv = check_int(n_kv_heads, names[1], 1, MAX_DIM, error)
    d = check_int(head_dim, names[2], 1, MAX_DIM, error)
    b = check_int(dtype_bytes, names[3], 1, MAX_DTYPE_BYTES, error)
    if h % kv:
        raise error(f"{names[0]} ({h}) must be a multiple of {names[1]} ({kv})")
    if h * d * b > MAX_ROW_BYTES:
        raise error(f"{names[0]} × {names[2]} × {names[3]} = {h * d * b} bytes per token exceeds {MAX_ROW_BYTES}")


def read_json_text(path: Any, name: str, error: type[Exception] = InputError, kind: str = "file") -> str:
    """The text of a JSON input file of at most ``MAX_JSON_BYTES``; a larger one (or ``/dev/zero``) is refused
    after reading one chunk past the cap, never whole."""
    chunks: list[bytes] = []
    size = 0
    try:
        with open(path, "rb") as f:
            while size <= MAX_JSON_BYTES:
                chunk = f.read(1 << 16)  # read(n) reserves n bytes up front: read in small pieces
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except OSError as exc:
        raise error(f"{name}: cannot read {kind} {path}: {exc.strerror or exc}") from None
    if size > MAX_JSON_BYTES:
        raise error(f"{name}: {kind} {path} is larger than {MAX_JSON_BYTES >> 20} MiB")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{name}: {kind} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def parse_json(text: str | bytes, name: str, error: type[Exception] = InputError) -> Any:
    """``json.loads`` whose every failure (syntax, nesting too deep, an integer of too many digits) is one
    ``error`` naming ``name``."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{name}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise error(f"{name}: not valid JSON: {exc}") from None


def pow2_text(v: int) -> str:
    """2**k for powers of two above 2**16 (readable caps), else the number."""
    return f"2**{v.bit_length() - 1}" if v > 1 << 16 and v & (v - 1) == 0 else str(v)


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` cut to about ``limit`` characters and a few levels of nesting: a 100k-digit number, a huge list
    or a structure nested 100k deep stays one short line (and never recurses deeply)."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr of a huge int is slow or refused
        return f"{'-' if value < 0 else ''}~2**{value.bit_length() - 1}"
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, limit, limit, limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 6
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
