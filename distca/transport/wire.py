"""The DistCA wire format: one header frame, then one raw frame per tensor. No pickle on the wire.

Header frame::

    struct "<4sBBBBQQI": magic b"DCA1", version, kind, flags, n_tensors, request_id, plan_id, meta_len
    meta (msgpack, meta_len bytes): {"t": [[name, dtype, shape, nbytes, digest], ...], "s": [src, dst, seq],
                                     "x": {...}}
    mac (32 bytes, only with FLAG_HMAC): HMAC-SHA256(key, struct prefix + meta)

Tensor frames carry the raw bytes (bf16 as its uint8 view), sent zero-copy. ``x`` holds small
scalars and strings (row offsets, error text). ``s`` binds a message to a connection: the sender's
16-byte session id, the session id of the endpoint it is meant for (zeros when not yet known) and the
sender's message counter; :class:`~distca.transport.channel.Endpoint` checks them (replay protection).

Authentication covers the whole message: with FLAG_HMAC every tensor's ``digest`` is the SHA-256 of its
frame, and the MAC covers the header, so a frame changed in flight fails its digest and a header changed
in flight fails the MAC. Without a key, FLAG_CRC puts a CRC32 there (corruption, not tampering); else 0.

A decoder checks everything before a byte is used: magic, version, kind, sizes, the MAC (constant-time
compare, before the meta is parsed), the type of every field (a dtype must be one of the names, a shape
a short list of non-negative ints below 2**31, a digest what the flags say, a known ``x`` field its
type), shape × itemsize == nbytes, frame lengths and the digests. Any violation, for any bytes, is a
``WireError`` that says what was wrong -- never another exception.
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
VERSION = 2  # 2: frame digests under the MAC, session binding ("s")
_PREFIX = struct.Struct("<4sBBBBQQI")
MAC_BYTES = 32
DIGEST_BYTES = 32  # SHA-256 of a tensor frame (hashlib uses the CPU's SHA extensions where present)
SESSION_BYTES = 16
NO_SESSION = bytes(SESSION_BYTES)  # "not known" (a reply to a peer that never authenticated)
MAX_TENSORS = 64
MAX_META_BYTES = 1 << 20
MAX_NDIM = 8
MAX_DIM = (1 << 31) - 1  # no tensor dimension on the wire is larger (rows per round are far below)
MAX_NAME = 64
MAX_SEQ = (1 << 63) - 1
FLAG_CRC = 1
FLAG_HMAC = 2

# Fields of ``x`` whose type every decoder checks: those read without a check of their own (the server loop's
# receive target indexes plans by ``rank``; clients read an ERROR's text and a PLAN ACK's host and bound). The
# others (shm, shm_drop, GROUP/ROUND fields) are checked, with their own messages, where they are read.
EXTRA_TYPES: dict[str, tuple[type, ...]] = {"rank": (int,), "error": (str,), "host": (str,), "shm_max": (int,)}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(DistCAError, ValueError):
    """A message that does not follow the wire format (or fails authentication)."""


class AuthError(WireError):
    """A message that is not authenticated for this receiver: no or a wrong MAC, a SHUTDOWN not under the
    owner's key, meant for another session, or replayed. A server may drop these without an answer."""


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
    SHUTDOWN = 10  # only from the pool's owner where the server has an owner key (TransportConfig.owner_secret)
    # the pool's collective data plane (distca.server.group_plane): rows move by all-to-all, these stay small
    GROUP = 20  # extra["op"]: "store" (where the group store is), "join" or "leave" a data-plane group
    ROUND = 21  # header-only notice: the next round of a data-plane group is plan_id's forward or backward


@dataclass
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    digest: int | bytes = 0  # SHA-256 of the frame (FLAG_HMAC), CRC32 (FLAG_CRC only) or 0


@dataclass
class Message:
    """A decoded header: kind, ids, tensor specs and extra fields (tensor bytes are separate frames)."""

    kind: Kind
    request_id: int = 0
    plan_id: int = 0
    tensors: list[TensorSpec] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    src: bytes = NO_SESSION  # the sender's session id
    dst: bytes = NO_SESSION  # the session id the sender meant it for
    seq: int = 0  # the sender's counter (strictly increasing per sender)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (bf16 through its uint8 view)."""
    if not t.is_contiguous():
        raise WireError("tensors must be contiguous to go on the wire")
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def frame_digest(buf: Any) -> bytes:
    """SHA-256 of a tensor frame: what the MAC covers in place of the frame itself."""
    return hashlib.sha256(buf).digest()


def encode(kind: Kind, tensors: list[tuple[str, torch.Tensor]] | None = None, *, request_id: int = 0,
           plan_id: int = 0, extra: dict[str, Any] | None = None, secret: bytes | None = None,
           checksum: bool = False, src: bytes = NO_SESSION, dst: bytes = NO_SESSION, seq: int = 0) -> list[Any]:
    """Frames of one message: ``[header, tensor bytes...]`` (tensors must be contiguous CPU tensors).

    With ``secret`` the header carries an HMAC-SHA256 under that key and every tensor's SHA-256 (so the MAC
    covers the payload too); ``src``/``dst``/``seq`` bind it to a connection (see ``Endpoint``)."""
    tensors = tensors or []
    if len(tensors) > MAX_TENSORS:
        raise WireError(f"at most {MAX_TENSORS} tensors per message, got {len(tensors)}")
    frames = [tensor_bytes(t) for _, t in tensors]
    specs = []
    for (name, t), buf in zip(tensors, frames, strict=True):
        if t.dtype not in DTYPE_NAMES:
            raise WireError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        digest = frame_digest(buf) if secret else zlib.crc32(buf) if checksum else 0
        specs.append([name, DTYPE_NAMES[t.dtype], list(t.shape), buf.nbytes, digest])
    meta = msgpack.packb({"t": specs, "s": [src, dst, seq], "x": extra or {}}, use_bin_type=True)
    flags = (FLAG_CRC if checksum else 0) | (FLAG_HMAC if secret else 0)
    prefix = _PREFIX.pack(MAGIC, VERSION, int(kind), flags, len(tensors), request_id, plan_id, len(meta))
    header = prefix + meta
    if secret:
        header += hmac.new(secret, header, hashlib.sha256).digest()
    return [header, *frames]


def decode_header(frame: bytes | memoryview, secret: bytes | None = None,
                  owner_secret: bytes | None = None) -> tuple[Message, int]:
    """Parse and check a header frame; returns the message and its flags. ``secret`` makes a MAC mandatory;
    ``owner_secret`` makes a SHUTDOWN's MAC mandatory under that key (and no other). Raises only WireError."""
    try:
        data = bytes(frame)
    except Exception as exc:
        raise WireError(f"header frame is not bytes: {type(exc).__name__}") from None
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
    if flags & ~(FLAG_CRC | FLAG_HMAC):
        raise WireError(f"unknown flags {flags:#x}")
    if n_tensors > MAX_TENSORS or meta_len > MAX_META_BYTES:
        raise WireError(f"header announces {n_tensors} tensors and {meta_len} meta bytes: over the limits")
    end = _PREFIX.size + meta_len
    expected = end + (MAC_BYTES if flags & FLAG_HMAC else 0)
    if len(data) != expected:
        raise WireError(f"header frame is {len(data)} bytes, its prefix announces {expected}")
    key = owner_secret if kind == Kind.SHUTDOWN and owner_secret is not None else secret
    if key is not None:
        if not flags & FLAG_HMAC:
            if key is owner_secret:
                raise AuthError("SHUTDOWN refused: only the pool's owner may stop this server (no MAC)")
            raise AuthError("unauthenticated message refused: this server requires an HMAC")
        mac = hmac.new(key, data[:end], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, data[end:]):
            if key is owner_secret:
                raise AuthError("SHUTDOWN refused: only the pool's owner may stop this server (owner MAC "
                                "does not verify)")
            raise AuthError("message authentication failed: wrong HMAC (unknown peer or tampered header)")
    try:
        meta = msgpack.unpackb(data[_PREFIX.size:end], raw=False, strict_map_key=True)
    except Exception as exc:
        raise WireError(f"header meta is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("t"), list) or not isinstance(meta.get("x", {}), dict):
        raise WireError("header meta must be a map with a tensor list 't' and an extra map 'x'")
    if len(meta["t"]) != n_tensors:
        raise WireError(f"header announces {n_tensors} tensors but describes {len(meta['t'])}")
    src, dst, seq = _session(meta.get("s"))
    specs = [_spec(i, raw, flags) for i, raw in enumerate(meta["t"])]
    extra = meta.get("x", {})
    for name, types in EXTRA_TYPES.items():
        value = extra.get(name)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise WireError(f"extra field {name!r} must be {' or '.join(t.__name__ for t in types)}, got "
                            f"{type(value).__name__}")
    rank = extra.get("rank")
    if rank is not None and not 0 <= rank <= MAX_DIM:
        raise WireError(f"extra field 'rank' must be in [0, {MAX_DIM}], got {rank}"[:120])
    return Message(kind, request_id, plan_id, specs, extra, src, dst, seq), flags


def _session(raw: Any) -> tuple[bytes, bytes, int]:
    if not (type(raw) is list and len(raw) == 3):
        raise WireError("header meta 's' must be [source session, destination session, counter]")
    src, dst, seq = raw
    if not (type(src) is bytes and type(dst) is bytes and len(src) == len(dst) == SESSION_BYTES):
        raise WireError(f"header meta 's': sessions must be {SESSION_BYTES}-byte strings")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise WireError(f"header meta 's': the counter must be an int in [0, 2**63), got {type(seq).__name__}")
    return src, dst, seq


def _spec(i: int, raw: Any, flags: int) -> TensorSpec:
    if not (type(raw) is list and len(raw) == 5):
        raise WireError(f"tensor {i}: expected [name, dtype, shape, nbytes, digest], got {type(raw).__name__}")
    name, dtype, shape, nbytes, digest = raw
    if type(name) is not str or not 0 < len(name) <= MAX_NAME:
        raise WireError(f"tensor {i}: the name must be a string of 1-{MAX_NAME} characters")
    if type(dtype) is not str or dtype not in DTYPES:
        raise WireError(f"tensor {i} ({name!r}): dtype {str(dtype)[:40]!r} is not one of {sorted(DTYPES)}")
    if not (type(shape) is list and len(shape) <= MAX_NDIM
            and all(type(s) is int and 0 <= s <= MAX_DIM for s in shape)):
        raise WireError(f"tensor {i} ({name!r}): shape must be a list of at most {MAX_NDIM} ints in [0, {MAX_DIM}], "
                        f"got {str(shape)[:80]}")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = DTYPES[dtype].itemsize
    if type(nbytes) is not int or nbytes != numel * itemsize:
        raise WireError(f"tensor {i} ({name!r}): {str(nbytes)[:24]} bytes do not match shape {shape} of {dtype}")
    if flags & FLAG_HMAC:
        if not (type(digest) is bytes and len(digest) == DIGEST_BYTES):
            raise WireError(f"tensor {i} ({name!r}): an authenticated message needs a {DIGEST_BYTES}-byte SHA-256 "
                            f"digest, got {type(digest).__name__}")
    elif flags & FLAG_CRC:
        if not (type(digest) is int and 0 <= digest < 1 << 32):
            raise WireError(f"tensor {i} ({name!r}): CRC32 must be an int in [0, 2**32), got {type(digest).__name__}")
    elif not (type(digest) is int and digest == 0):
        raise WireError(f"tensor {i} ({name!r}): no checksum flag, so the digest field must be 0")
    return TensorSpec(name, DTYPES[dtype], tuple(shape), nbytes, digest)


def check_frame(spec: TensorSpec, frame_len: int, flags: int, payload: Any = None) -> None:
    """A tensor frame must have exactly the announced length, and the digest (FLAG_HMAC) or CRC32 (FLAG_CRC) the
    header names."""
    if frame_len != spec.nbytes:
        raise WireError(f"tensor {spec.name}: frame has {frame_len} bytes, header announced {spec.nbytes}")
    if payload is None:
        return
    if flags & FLAG_HMAC:
        if not hmac.compare_digest(frame_digest(payload), spec.digest):
            raise WireError(f"tensor {spec.name}: SHA-256 of the frame does not match the authenticated header "
                            "(tampered or corrupted payload)")
    elif flags & FLAG_CRC and zlib.crc32(payload) != spec.digest:
        raise WireError(f"tensor {spec.name}: CRC32 mismatch (corrupted payload)")


def frame_tensor(spec: TensorSpec, buf: Any) -> torch.Tensor:
    """A tensor viewing a received frame's bytes (no copy)."""
    raw = torch.frombuffer(buf, dtype=torch.uint8) if spec.nbytes else torch.empty(0, dtype=torch.uint8)
    return raw.view(spec.dtype).view(spec.shape)
