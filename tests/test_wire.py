"""The wire format: round trips for every dtype (bf16 included) and a clear error for each malformation."""

from __future__ import annotations

import pytest
import torch
import zmq
from hypothesis import given
from hypothesis import strategies as st

from distca.transport.channel import Endpoint, TransportConfig
from distca.transport.wire import DTYPES, Kind, WireError, decode_header, encode


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


def test_corrupted_payload_is_caught_by_the_checksum(pair):
    srv, cli = pair
    frames = encode(Kind.FWD, [("q", torch.ones(64))], secret=b"k", checksum=True)
    payload = bytearray(frames[1])
    payload[5] ^= 0xFF
    cli.sock.send_multipart([frames[0], bytes(payload)])
    with pytest.raises(WireError, match="CRC32 mismatch"):
        srv.recv()


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
