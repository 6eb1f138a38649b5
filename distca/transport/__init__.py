"""Wire format and ZeroMQ channels: bytes and tensors, nothing about models or plans."""

from distca.transport.wire import Kind, Message, WireError, decode_header, encode

__all__ = ["Kind", "Message", "WireError", "decode_header", "encode"]
