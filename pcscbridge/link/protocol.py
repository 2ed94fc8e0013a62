"""The bridge's own link protocol (protocol/link.md), without I/O.

A frame is a 4-byte big-endian length, then one msgpack array:
    [0, hello]                      Hello: both sides, first, once
    [1, id, method, args]           Request: guest -> host, a PC/SC call (link/calls.py)
    [2, id, rv, result]             Response: host -> guest, rv 0 or a PC/SC error code
    [3, topic, data]                Push: host -> guest, unsolicited (reader states)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import PeerError
from ..pcsclite.readers import ReaderEntry
from .calls import U32_MAX, Call, InvalidCall, decode_call

LINK_PROTOCOL = 1
DEFAULT_MAX_MESSAGE = 1 << 20  # 64 KiB APDUs and 16+ reader tables fit with room to spare
_LENGTH = struct.Struct(">I")

HELLO, REQUEST, RESPONSE, PUSH = 0, 1, 2, 3


class LinkProtocolError(PeerError):
    """The peer sent something that is not the link protocol; the link must be closed."""


@dataclass(frozen=True)
class Hello:
    role: str  # "guest" or "host"
    protocol: int = LINK_PROTOCOL
    software: str = ""
    # The largest payload this side accepts; the peer sends nothing larger.
    max_message_size: int = DEFAULT_MAX_MESSAGE
    # This side answers `ping` requests (hosts always have; guests since they are asked).
    answers_pings: bool = True


@dataclass(frozen=True)
class Request:
    id: int
    call: Call | InvalidCall  # InvalidCall: a method or arguments the host cannot take


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
                    "max_message_size": message.max_message_size,
                    "answers_pings": message.answers_pings,
                },
            ]
        case Request(call=Call() as call):
            body = [REQUEST, message.id, call.method, call.to_args()]
        case Request():
            raise TypeError(f"cannot send {message.call!r}")
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
            max_message_size=_typed(hello.get("max_message_size", DEFAULT_MAX_MESSAGE), int),
            answers_pings=_typed(hello.get("answers_pings", False), bool),
        )
    if kind == REQUEST and len(body) == 4:
        request_id, method, args = _typed(body[1], int), _typed(body[2], str), _typed(body[3], list)
        return Request(request_id, decode_call(method, args))
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


# --- the readers push -------------------------------------------------------------------------
READERS_TOPIC = "readers"


def readers_push(entries: Iterable[ReaderEntry]) -> Push:
    """The full table of the readers the guest may see, as pcscd's table entries."""
    return Push(
        READERS_TOPIC,
        [[e.name, e.event_counter, e.state, e.sharing, e.atr, e.protocol] for e in entries],
    )


def decode_readers(push: Push) -> list[ReaderEntry]:
    """The entries of a readers push; LinkProtocolError when one is malformed."""
    if not isinstance(push.data, list):
        raise LinkProtocolError(f"readers push of {type(push.data).__name__}, expected a list")
    entries = []
    for item in push.data:
        if not isinstance(item, list) or len(item) != 6:
            raise LinkProtocolError(f"malformed reader row {str(item)[:80]!r}")
        name, event_counter, state, sharing, atr, protocol = item
        if not isinstance(name, str) or not isinstance(atr, bytes):
            raise LinkProtocolError("a reader row's name must be str and its ATR bytes")
        if not (
            all(_is_int(v) and 0 <= v <= U32_MAX for v in (event_counter, state, protocol))
            and _is_int(sharing)
            and -(2**31) <= sharing < 2**31
        ):
            # Checked here: a row pcscd's table cannot hold would fail every client reading it.
            raise LinkProtocolError(
                "a reader row's counter, state and protocol are 32-bit unsigned ints, its "
                "sharing a 32-bit signed int"
            )
        entries.append(ReaderEntry(name, event_counter, state, sharing, atr, protocol))
    return entries


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
