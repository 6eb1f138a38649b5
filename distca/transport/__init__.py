"""Wire format, ZeroMQ channels and same-host shared-memory segments: bytes and tensors, nothing about
models or plans."""

from distca.transport.wire import AuthError, Kind, Message, WireError, decode_header, encode

__all__ = ["AuthError", "Kind", "Message", "WireError", "decode_header", "encode"]
