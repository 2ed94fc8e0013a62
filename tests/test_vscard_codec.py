"""The VSCard codec on bytes: the spec's example session, every message type, malformed input."""

from __future__ import annotations

import pytest

from pcscbridge.vscard.codec import (
    APDU,
    ATR,
    MAX_PAYLOAD,
    UNDEFINED_READER_ID,
    CardRemove,
    Error,
    Flush,
    FlushComplete,
    Init,
    Message,
    ReaderAdd,
    ReaderRemove,
    VSCardDecoder,
    VSCardError,
    encode,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# The example session of the spec (vscard-protocol.md §7), byte for byte.
SPEC_SESSION: list[tuple[Message, str]] = [
    (Init(0), "00000001 00000000 0000000c 56534344 00000002 00000000"),
    (Init(UNDEFINED_READER_ID), "00000001 ffffffff 0000000c 56534344 00000002 00000000"),
    (ReaderRemove(0), "00000004 00000000 00000000"),
    (Error(0, 0), "00000002 00000000 00000004 00000000"),
    (ReaderAdd(0), "00000003 00000000 00000000"),
    (ATR(0, h("3b951381018073ff01000b")), "00000005 00000000 0000000b 3b951381 018073ff 01000b"),
    (
        APDU(0, h("00a4040007a000000003101000")),
        "00000007 00000000 0000000d 00a40400 07a00000 00031010 00",
    ),
    (APDU(0, h("6a82")), "00000007 00000000 00000002 6a82"),
    (CardRemove(0), "00000006 00000000 00000000"),
]


@pytest.mark.parametrize(("message", "wire"), SPEC_SESSION)
def test_spec_example_bytes(message: Message, wire: str) -> None:
    assert encode(message) == h(wire)
    decoder = VSCardDecoder()
    decoder.receive_data(h(wire))
    assert decoder.next_message() == message
    assert decoder.next_message() is None and decoder.buffered == 0


def test_every_type_round_trips_fed_a_byte_at_a_time() -> None:
    messages: list[Message] = [
        Init(0, 2, (0, 7)),
        Error(0, 3),
        ReaderAdd(UNDEFINED_READER_ID, "Gemalto ÜSB"),
        ReaderRemove(0),
        ATR(0, h("3b80800101")),
        CardRemove(0),
        APDU(0, bytes(range(256)) * 16),
        Flush(0),
        FlushComplete(0),
    ]
    wire = b"".join(encode(m) for m in messages)
    decoder = VSCardDecoder()
    received = []
    for byte in wire:
        decoder.receive_data(bytes([byte]))
        while (message := decoder.next_message()) is not None:
            received.append(message)
    assert received == messages
    assert decoder.buffered == 0


def test_several_messages_in_one_chunk_and_a_partial_one() -> None:
    wire = encode(Error(0, 0)) + encode(APDU(0, h("9000"))) + encode(CardRemove(0))[:7]
    decoder = VSCardDecoder()
    decoder.receive_data(wire)
    assert decoder.next_message() == Error(0, 0)
    assert decoder.next_message() == APDU(0, h("9000"))
    assert decoder.next_message() is None
    decoder.receive_data(encode(CardRemove(0))[7:])
    assert decoder.next_message() == CardRemove(0)


def test_error_codes_are_big_endian() -> None:
    assert encode(Error(0, 1))[-4:] == h("00000001")


def test_apdu_repr_is_hex() -> None:
    assert "90 00" in repr(APDU(0, h("9000")))


# --- malformed input: each raises VSCardError (the front-end closes the connection) -------------
MALFORMED = {
    "wrong magic": "00000001 ffffffff 0000000c 56534345 00000002 00000000",
    "init too short": "00000001 ffffffff 00000008 56534344 00000002",
    "init not whole u32s": "00000001 ffffffff 0000000d 56534344 00000002 00000000 00",
    "unknown type 0": "00000000 00000000 00000000",
    "unknown type 10": "0000000a 00000000 00000000",
    "unknown type ffffffff": "ffffffff 00000000 00000000",
    "error of 2 bytes": "00000002 00000000 00000002 0000",
    "error of 8 bytes": "00000002 00000000 00000008 00000000 00000000",
    "card remove with payload": "00000006 00000000 00000001 00",
    "reader remove with payload": "00000004 00000000 00000002 0000",
    "flush with payload": "00000008 00000000 00000001 00",
    "reader name not utf-8": "00000003 ffffffff 00000002 c328",
}


@pytest.mark.parametrize("wire", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_messages_are_refused(wire: str) -> None:
    decoder = VSCardDecoder()
    decoder.receive_data(h(wire))
    with pytest.raises(VSCardError):
        decoder.next_message()


def test_oversize_length_is_refused_from_the_header_alone() -> None:
    decoder = VSCardDecoder()
    decoder.receive_data(h("00000007 00000000") + (MAX_PAYLOAD + 1).to_bytes(4, "big"))
    with pytest.raises(VSCardError, match="exceeds"):
        decoder.next_message()  # no payload byte has arrived: refused before buffering it


def test_largest_payload_is_accepted() -> None:
    message = APDU(0, bytes(MAX_PAYLOAD))
    decoder = VSCardDecoder()
    decoder.receive_data(encode(message))
    assert decoder.next_message() == message


def test_encoding_an_oversize_message_is_a_bug() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode(APDU(0, bytes(MAX_PAYLOAD + 1)))


def test_unknown_type_is_refused_before_its_payload_arrives() -> None:
    decoder = VSCardDecoder()
    decoder.receive_data(h("0000000b 00000000 00001000"))  # 4 KiB announced, none sent
    with pytest.raises(VSCardError, match="unknown message type 11"):
        decoder.next_message()
