"""The DistCA wire format: one header frame, then one raw frame per tensor. No pickle on the wire.

Header frame::

    struct "<4sBBBBQQI": magic b"DCA1", version, kind, flags, n_tensors, request_id, plan_id, meta_len
    meta (msgpack, meta_len bytes): {"t": [[name, dtype, shape, nbytes, crc32 or 0], ...], "x": {...}}
    mac (32 bytes, only with FLAG_HMAC): HMAC-SHA256(secret, struct prefix + meta)

Tensor frames carry the raw bytes (bf16 as its uint8 view), sent zero-copy. ``x`` holds small
scalars and strings (row offsets, error text). A decoder checks everything before a byte is used:
magic, version, kind, sizes, dtype whitelist, shape × itemsize == nbytes, frame lengths, the MAC
(constant-time compare) and, with FLAG_CRC, a CRC32 per tensor. Any violation is a ``WireError``
that says what was wrong.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from distca.errors import DistCAError

MAGIC = b"DCA1"
VERSION = 1
_PREFIX = struct.Struct("<4sBBBBQQI")
MAC_BYTES = 32
MAX_TENSORS = 64
MAX_META_BYTES = 1 << 20
FLAG_CRC = 1
FLAG_HMAC = 2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(DistCAError, ValueError):
    """A message that does not follow the wire format (or fails authentication)."""


class Kind(enum.IntEnum):
    PING = 1
    PONG = 2
    PLAN = 3  # register a plan's server-side layout
    FWD = 4  # q, k, v rows for one plan round
    FWD_OUT = 5  # out, lse rows back
    BWD = 6  # q, out, dout, lse, k, v rows
    BWD_OUT = 7  # dq rows, dk and dv rows back
    ERROR = 8
    ACK = 9
    SHUTDOWN = 10
    # the pool's collective data plane (distca.server.group_plane): rows move by all-to-all, these stay small
    GROUP = 20  # extra["op"]: "store" (where the group store is), "join" or "leave" a data-plane group
    ROUND = 21  # header-only notice: the next round of a data-plane group is plan_id's forward or backward


@dataclass
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    crc: int = 0


@dataclass
class Message:
    """A decoded header: kind, ids, tensor specs and extra fields (tensor bytes are separate frames)."""

    kind: Kind
    request_id: int = 0
    plan_id: int = 0
    tensors: list[TensorSpec] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (bf16 through its uint8 view)."""
    if not t.is_contiguous():
        raise WireError("tensors must be contiguous to go on the wire")
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def encode(kind: Kind, tensors: list[tuple[str, torch.Tensor]] | None = None, *, request_id: int = 0,
           plan_id: int = 0, extra: dict[str, Any] | None = None, secret: bytes | None = None,
           checksum: bool = False) -> list[Any]:
    """Frames of one message: ``[header, tensor bytes...]`` (tensors must be contiguous CPU tensors)."""
    tensors = tensors or []
    if len(tensors) > MAX_TENSORS:
        raise WireError(f"at most {MAX_TENSORS} tensors per message, got {len(tensors)}")
    frames = [tensor_bytes(t) for _, t in tensors]
    specs = []
    for (name, t), buf in zip(tensors, frames, strict=True):
        if t.dtype not in DTYPE_NAMES:
            raise WireError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        specs.append([name, DTYPE_NAMES[t.dtype], list(t.shape), buf.nbytes, zlib.crc32(buf) if checksum else 0])
    meta = msgpack.packb({"t": specs, "x": extra or {}}, use_bin_type=True)
    flags = (FLAG_CRC if checksum else 0) | (FLAG_HMAC if secret else 0)
    prefix = _PREFIX.pack(MAGIC, VERSION, int(kind), flags, len(tensors), request_id, plan_id, len(meta))
    header = prefix + meta
    if secret:
        header += hmac.new(secret, header, hashlib.sha256).digest()
    return [header, *frames]


def decode_header(frame: bytes | memoryview, secret: bytes | None = None) -> tuple[Message, int]:
    """Parse and check a header frame; returns the message and its flags. ``secret`` makes a MAC mandatory."""
    data = bytes(frame)
    if len(data) < _PREFIX.size:
        raise WireError(f"header frame of {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, kind, flags, n_tensors, request_id, plan_id, meta_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not a DistCA message")
    if version != VERSION:
        raise WireError(f"protocol version {version} is not supported (this peer speaks {VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise WireError(f"unknown message kind {kind}") from None
    if n_tensors > MAX_TENSORS or meta_len > MAX_META_BYTES:
        raise WireError(f"header announces {n_tensors} tensors and {meta_len} meta bytes: over the limits")
    end = _PREFIX.size + meta_len
    expected = end + (MAC_BYTES if flags & FLAG_HMAC else 0)
    if len(data) != expected:
        raise WireError(f"header frame is {len(data)} bytes, its prefix announces {expected}")
    if secret is not None:
        if not flags & FLAG_HMAC:
            raise WireError("unauthenticated message refused: this server requires an HMAC")
        mac = hmac.new(secret, data[:end], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, data[end:]):
            raise WireError("message authentication failed: wrong HMAC (unknown peer or tampered header)")
    try:
        meta = msgpack.unpackb(data[_PREFIX.size:end], raw=False, strict_map_key=True)
    except Exception as exc:
        raise WireError(f"header meta is not valid msgpack: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("t"), list) or not isinstance(meta.get("x", {}), dict):
        raise WireError("header meta must be a map with a tensor list 't' and an extra map 'x'")
    if len(meta["t"]) != n_tensors:
        raise WireError(f"header announces {n_tensors} tensors but describes {len(meta['t'])}")
    specs = [_spec(i, raw) for i, raw in enumerate(meta["t"])]
    return Message(kind, request_id, plan_id, specs, meta.get("x", {})), flags


def _spec(i: int, raw: Any) -> TensorSpec:
    if not (isinstance(raw, list) and len(raw) == 5):
        raise WireError(f"tensor {i}: expected [name, dtype, shape, nbytes, crc], got {raw!r}"[:200])
    name, dtype, shape, nbytes, crc = raw
    if not isinstance(name, str) or dtype not in DTYPES:
        raise WireError(f"tensor {i} ({name!r}): dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise WireError(f"tensor {i} ({name}): bad shape {shape!r}")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    if not isinstance(nbytes, int) or nbytes != numel * itemsize:
        raise WireError(f"tensor {i} ({name}): {nbytes!r} bytes do not match shape {shape} of {dtype}")
    return TensorSpec(name, DTYPES[dtype], tuple(shape), nbytes, int(crc))


def check_frame(spec: TensorSpec, frame_len: int, flags: int, payload: memoryview | None = None) -> None:
    """A tensor frame must have exactly the announced length (and CRC when the sender set FLAG_CRC)."""
    if frame_len != spec.nbytes:
        raise WireError(f"tensor {spec.name}: frame has {frame_len} bytes, header announced {spec.nbytes}")
    if flags & FLAG_CRC and payload is not None and zlib.crc32(payload) != spec.crc:
        raise WireError(f"tensor {spec.name}: CRC32 mismatch (corrupted payload)")


def frame_tensor(spec: TensorSpec, buf: Any) -> torch.Tensor:
    """A tensor viewing a received frame's bytes (no copy)."""
    raw = torch.frombuffer(buf, dtype=torch.uint8) if spec.nbytes else torch.empty(0, dtype=torch.uint8)
    return raw.view(spec.dtype).view(spec.shape)
