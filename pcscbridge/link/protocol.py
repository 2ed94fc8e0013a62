"""The bridge's own link protocol (protocol/link.md), without I/O.

A frame is a 4-byte big-endian length, then one msgpack array:
    [0, hello]                      Hello: both sides, first, once
    [1, id, method, args]           Request: guest -> host, a PC/SC call
    [2, id, rv, result]             Response: host -> guest, rv 0 or a PC/SC error code
    [3, topic, data]                Push: host -> guest, unsolicited (reader states)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

LINK_PROTOCOL = 1
DEFAULT_MAX_MESSAGE = 1 << 20  # 64 KiB APDUs and 16+ reader tables fit with room to spare
_LENGTH = struct.Struct(">I")

HELLO, REQUEST, RESPONSE, PUSH = 0, 1, 2, 3


class LinkProtocolError(Exception):
    """The peer sent something that is not the link protocol; the link must be closed."""


@dataclass(frozen=True)
class Hello:
    role: str  # "guest" or "host"
    protocol: int = LINK_PROTOCOL
    software: str = ""
    capabilities: tuple[str, ...] = ()
    max_message_size: int = DEFAULT_MAX_MESSAGE


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    args: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Response:
    id: int
    rv: int
    result: list[Any] | None = None


@dataclass(frozen=True)
class Push:
    topic: str
    data: Any


Message = Hello | Request | Response | Push


def encode(message: Message) -> bytes:
    match message:
        case Hello():
            body: list[Any] = [
                HELLO,
                {
                    "protocol": message.protocol,
                    "role": message.role,
                    "software": message.software,
                    "capabilities": list(message.capabilities),
                    "max_message_size": message.max_message_size,
                },
            ]
        case Request():
            body = [REQUEST, message.id, message.method, message.args]
        case Response():
            body = [RESPONSE, message.id, message.rv, message.result]
        case Push():
            body = [PUSH, message.topic, message.data]
    payload = msgpack.packb(body, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


class LinkConnection:
    """Frames out of a byte stream; validates shape and size before anything acts on it."""

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> Message | None:
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > self.max_message_size:
            raise LinkProtocolError(f"frame of {length} bytes exceeds {self.max_message_size}")
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_LENGTH.size : end])
        del self._buffer[:end]
        return decode_payload(payload)


def decode_payload(payload: bytes) -> Message:
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:
        raise LinkProtocolError(f"undecodable frame: {exc}") from None
    try:
        return _decode_body(body)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise LinkProtocolError(f"malformed message {str(body)[:80]!r}: {exc}") from None


def _decode_body(body: Any) -> Message:
    if not isinstance(body, list) or not body:
        raise ValueError("not a non-empty array")
    kind = body[0]
    if kind == HELLO and len(body) == 2 and isinstance(body[1], dict):
        hello = body[1]
        return Hello(
            role=_typed(hello["role"], str),
            protocol=_typed(hello["protocol"], int),
            software=_typed(hello.get("software", ""), str),
            capabilities=tuple(_typed(c, str) for c in hello.get("capabilities", [])),
            max_message_size=_typed(hello.get("max_message_size", DEFAULT_MAX_MESSAGE), int),
        )
    if kind == REQUEST and len(body) == 4:
        return Request(_typed(body[1], int), _typed(body[2], str), _typed(body[3], list))
    if kind == RESPONSE and len(body) == 4:
        result = body[3]
        if result is not None:
            _typed(result, list)
        return Response(_typed(body[1], int), _typed(body[2], int) & 0xFFFFFFFF, result)
    if kind == PUSH and len(body) == 3:
        return Push(_typed(body[1], str), body[2])
    raise ValueError("unknown message kind or length")


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
