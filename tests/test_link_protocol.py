"""The link protocol, pure: frames in, messages out; bad frames are errors, never crashes."""

from __future__ import annotations

import struct

import msgpack
import pytest

from pcscbridge.link.calls import Connect, Transmit
from pcscbridge.link.protocol import (
    Hello,
    LinkConnection,
    LinkProtocolError,
    Push,
    Request,
    Response,
    encode,
)

MESSAGES = [
    Hello("guest", software="pcscbridge test", max_message_size=4096),
    Request(1, Transmit(123, 2, b"\x00\xa4\x04\x00")),
    Request(2**40, Connect(1, 2, "Virtual PCD 00 00", 2, 3)),
    Response(1, 0, [b"\x90\x00"]),
    Response(2, 0x80100069, None),
    Push("readers", [["Virtual PCD 00 00", 3, 0x34, 0, b"\x3b\x00", 0]]),
]


@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_messages_round_trip_in_any_fragmentation(chunk: int) -> None:
    data = b"".join(encode(message) for message in MESSAGES)
    conn = LinkConnection()
    received = []
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for piece in pieces:
        conn.receive_data(piece)
        while (message := conn.next_message()) is not None:
            received.append(message)
    assert received == MESSAGES


def test_large_apdu_fits() -> None:
    message = Request(9, Transmit(1, 2, bytes(65548)))
    conn = LinkConnection()
    conn.receive_data(encode(message))
    assert conn.next_message() == message


def test_oversize_frame_is_refused_before_it_is_buffered() -> None:
    conn = LinkConnection(max_message_size=1000)
    conn.receive_data(struct.pack(">I", 1001))
    with pytest.raises(LinkProtocolError, match="exceeds"):
        conn.next_message()


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never used by msgpack
        msgpack.packb({"not": "an array"}),
        msgpack.packb([]),
        msgpack.packb([9, 1, 2]),
        msgpack.packb([1, "one", "transmit", []]),
        msgpack.packb([1, 1, "transmit", "args"]),
        msgpack.packb([2, 1, "rv", None]),
        msgpack.packb([2, 1, 0, "result"]),
        msgpack.packb([0, {"role": "host"}]),
        msgpack.packb([1, True, "transmit", []]),
    ],
)
def test_malformed_messages_are_protocol_errors(payload: bytes) -> None:
    conn = LinkConnection()
    conn.receive_data(frame(payload))
    with pytest.raises(LinkProtocolError):
        conn.next_message()
