"""The wire format: round trips for every dtype (bf16 included) and a clear error for each malformation."""

from __future__ import annotations

import hashlib
import hmac
import random

import msgpack
import pytest
import torch
import zmq
from hypothesis import given
from hypothesis import strategies as st

from distca.transport.channel import Endpoint, TransportConfig
from distca.transport.wire import (
    _PREFIX,
    DTYPES,
    FLAG_CRC,
    FLAG_HMAC,
    MAGIC,
    VERSION,
    Kind,
    WireError,
    check_frame,
    decode_header,
    encode,
)


@pytest.fixture()
def pair():
    ctx = zmq.Context()
    cfg = TransportConfig(timeout_s=5.0, secret=b"k", checksum=True, transport="ipc", host="127.0.0.1",
                          shm_max_bytes=0)
    srv = Endpoint.server(ctx, cfg, "wire-test")
    cli = Endpoint.client(ctx, cfg, srv.address)
    yield srv, cli
    cli.close()
    srv.close()
    ctx.term()


@given(dtype=st.sampled_from(sorted(DTYPES)), shape=st.lists(st.integers(0, 7), min_size=1, max_size=3),
       extra=st.dictionaries(st.text(max_size=5), st.integers(-(2**40), 2**40), max_size=3))
def test_round_trip_every_dtype(dtype, shape, extra):
    t = (torch.randn(shape) * 100).to(DTYPES[dtype])
    ctx = zmq.Context()
    cfg = TransportConfig(timeout_s=5.0, secret=b"k", checksum=True, transport="ipc", host="127.0.0.1",
                          shm_max_bytes=0)
    srv = Endpoint.server(ctx, cfg, "wire-rt")
    cli = Endpoint.client(ctx, cfg, srv.address)
    try:
        cli.send(Kind.FWD, [("x", t)], request_id=3, plan_id=9, extra=extra)
        _, msg, got = srv.recv()
        assert (msg.kind, msg.request_id, msg.plan_id, msg.extra) == (Kind.FWD, 3, 9, extra)
        assert got[0].dtype == t.dtype and torch.equal(got[0], t)
    finally:
        cli.close()
        srv.close()
        ctx.term()


def test_receive_straight_into_a_preallocated_buffer(pair):
    srv, cli = pair
    x = torch.randn(4096, 8, 16).to(torch.bfloat16)
    buf = torch.empty(8192, 8, 16, dtype=torch.bfloat16)
    cli.send(Kind.FWD, [("q", x)])
    _, _, got = srv.recv(into=lambda m, s: buf[100:4196])
    assert got[0].data_ptr() == buf[100:4196].data_ptr() and torch.equal(buf[100:4196], x)


def test_corrupted_payload_is_caught_by_the_checksum():
    frames = encode(Kind.FWD, [("q", torch.ones(64))], checksum=True)
    msg, flags = decode_header(frames[0])
    payload = bytearray(frames[1])
    check_frame(msg.tensors[0], len(payload), flags, payload)
    payload[5] ^= 0xFF
    with pytest.raises(WireError, match="CRC32 mismatch"):
        check_frame(msg.tensors[0], len(payload), flags, payload)


def test_a_tampered_payload_under_the_mac_is_refused(pair):
    """Audit finding: the HMAC covered only the header and a changed q payload was accepted. The header now
    carries every frame's SHA-256 under the MAC."""
    srv, cli = pair
    frames = cli.frames(Kind.FWD, [("q", torch.ones(64))])
    payload = bytearray(frames[1])
    payload[5] ^= 0x01  # a forger can also fix up a CRC32: only a digest under the MAC catches this
    cli.sock.send_multipart([frames[0], bytes(payload)])
    with pytest.raises(WireError, match="SHA-256 of the frame does not match"):
        srv.recv()
    cli.send(Kind.FWD, [("q", torch.ones(64))])  # the socket is in step: the next message is fine
    _, _, got = srv.recv()
    assert torch.equal(got[0], torch.ones(64))


def _header(meta: dict, kind: Kind = Kind.FWD, n_tensors: int = 1, flags: int = 0, secret: bytes | None = None,
            version: int = VERSION) -> bytes:
    """A header frame with any meta a peer could send (a valid MAC when ``secret`` is given)."""
    body = msgpack.packb(meta, use_bin_type=True)
    header = _PREFIX.pack(MAGIC, version, int(kind), flags | (FLAG_HMAC if secret else 0), n_tensors, 1, 2,
                          len(body)) + body
    return header + hmac.new(secret, header, hashlib.sha256).digest() if secret else header


_S = [bytes(16), bytes(16), 1]
_T = ["q", "float32", [2, 3], 24, 0]


@pytest.mark.parametrize(("meta", "flags", "match"), [
    ({"t": [["q", ["float32"], [2, 3], 24, 0]], "s": _S}, 0, "dtype"),  # a dtype sent as a list (was TypeError)
    ({"t": [["q", {"a": 1}, [2, 3], 24, 0]], "s": _S}, 0, "dtype"),  # ... or a map
    ({"t": [["q", "float32", [2, 3], 24, "abc"]], "s": _S}, FLAG_CRC, "CRC32"),  # CRC as a string (ValueError)
    ({"t": [["q", "float32", [2, 3], 24, None]], "s": _S}, FLAG_CRC, "CRC32"),  # ... None (TypeError)
    ({"t": [["q", "float32", [2, 3], 24, float("inf")]], "s": _S}, FLAG_CRC, "CRC32"),  # ... inf (OverflowError)
    ({"t": [["q", "float32", [2, 3], 24, 2**40]], "s": _S}, FLAG_CRC, "CRC32"),
    ({"t": [["q", "float32", [True, 6], 24, 0]], "s": _S}, 0, "shape"),  # a bool dimension
    ({"t": [["q", "uint8", [2**63], 2**63, 0]], "s": _S}, 0, "shape"),  # 2**63
    ({"t": [["q", "float32", [-2, -3], 24, 0]], "s": _S}, 0, "shape"),  # negative
    ({"t": [["q", "float32", [1] * 9, 4, 0]], "s": _S}, 0, "shape"),  # too many dimensions
    ({"t": [["q", "float32", [2, 3], 24.0, 0]], "s": _S}, 0, "do not match"),  # nbytes as a float
    ({"t": [[["q"], "float32", [2, 3], 24, 0]], "s": _S}, 0, "name"),  # a name that is not a string
    ({"t": [_T], "s": _S, "x": {"rank": [0]}}, 0, "'rank' must be int"),  # extra.rank as a list (loop crashed)
    ({"t": [_T], "s": _S, "x": {"rank": True}}, 0, "'rank' must be int"),
    ({"t": [_T], "s": _S, "x": {"rank": -1}}, 0, "'rank' must be in"),
    ({"t": [_T], "s": _S, "x": {"error": 7}}, 0, "'error' must be str"),
    ({"t": [_T], "s": _S, "x": {"shm_max": "1"}}, 0, "'shm_max' must be int"),
    ({"t": [_T]}, 0, "'s' must be"),  # no session binding
    ({"t": [_T], "s": [b"x", bytes(16), 1]}, 0, "16-byte"),
    ({"t": [_T], "s": [bytes(16), bytes(16), -1]}, 0, "counter"),
    ({"t": [_T], "s": [bytes(16), bytes(16), "1"]}, 0, "counter"),
    ({"t": [_T], "s": _S}, FLAG_HMAC, "prefix announces"),  # the flag says a MAC follows: none does
])
def test_every_field_has_a_strict_type(meta, flags, match):
    with pytest.raises(WireError, match=match):
        decode_header(_header(meta, flags=flags))


def test_an_authenticated_header_needs_sha256_digests():
    meta = {"t": [["q", "float32", [2, 3], 24, 12345]], "s": _S}  # a CRC where the MAC needs a digest
    with pytest.raises(WireError, match="32-byte SHA-256"):
        decode_header(_header(meta, secret=b"k"), secret=b"k")


def test_decode_raises_only_wire_error_for_any_bytes():
    """Seeded mutations of valid headers (bit flips, truncations, splices, random meta values): decoding
    raises WireError or succeeds, nothing else (before: TypeError, KeyError, OverflowError escaped)."""
    rng = random.Random(16)
    valid = [encode(Kind.FWD, [("q", torch.ones(2, 3)), ("k", torch.zeros(4, dtype=torch.bfloat16))],
                    extra={"rank": 3}, secret=key, checksum=crc)[0]
             for key in (None, b"k") for crc in (False, True)]
    values = [None, True, -1, 2**63, 2**64 - 1, 1.5, float("inf"), float("nan"), "", "float32", b"\x00" * 16,
              [], [1, 2], {}, {"a": [1]}, [True], [[[]]], msgpack.ExtType(5, b"x")]
    outcomes = {"ok": 0, "wire": 0}
    for i in range(3000):
        base = bytearray(rng.choice(valid))
        op = i % 3
        if op == 0:
            for _ in range(rng.randint(1, 4)):
                base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
            data = bytes(base)
        elif op == 1:
            data = bytes(base[:rng.randrange(len(base))]) + rng.randbytes(rng.randrange(8))
        else:  # a well-formed prefix around a meta with random values in random places
            spec = [rng.choice([*values, "q"]), rng.choice([*values, "float32"]), rng.choice([*values, [2, 3]]),
                    rng.choice([*values, 24]), rng.choice([*values, 0])]
            meta = {"t": [spec], "s": rng.choice([_S, *values]), "x": rng.choice([{}, {"rank": rng.choice(values)},
                                                                                   *values])}
            data = _header(meta, flags=rng.choice([0, FLAG_CRC, 4]))
        try:
            decode_header(data, secret=rng.choice([None, b"k"]))
            outcomes["ok"] += 1
        except WireError:
            outcomes["wire"] += 1
    assert outcomes["wire"] > 2000  # almost every mutation is refused, and always as a WireError


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda h: h[:10], "shorter than"),
    (lambda h: h + b"x", "prefix announces"),
    (lambda h: h[:4] + bytes([7]) + h[5:], "protocol version 7"),
])
def test_malformed_headers(mutate, match):
    header = encode(Kind.PING)[0]
    with pytest.raises(WireError, match=match):
        decode_header(mutate(header))


def test_tampered_header_fails_authentication():
    header = bytearray(encode(Kind.PING, request_id=1, secret=b"k")[0])
    header[12] ^= 1  # flip a bit of the request id
    with pytest.raises(WireError, match="authentication failed"):
        decode_header(bytes(header), secret=b"k")


def test_unsupported_dtype_and_noncontiguous_are_refused():
    with pytest.raises(WireError, match="unsupported dtype"):
        encode(Kind.FWD, [("x", torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(WireError, match="contiguous"):
        encode(Kind.FWD, [("x", torch.zeros(4, 4).t())])
