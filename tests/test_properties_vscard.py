"""Properties of the VSCard codec (pcscbridge/vscard/codec.py), with hypothesis: what QEMU's
ccid-card-passthru chardev (or a hostile process on its socket) can send us."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pcscbridge.testing.streams import pieces
from pcscbridge.vscard.codec import (
    APDU,
    ATR,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    MESSAGE_TYPES,
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

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U32 = st.integers(0, 0xFFFFFFFF)
READER_IDS = st.one_of(st.sampled_from((0, 0xFFFFFFFF)), U32)


def messages() -> st.SearchStrategy[Message]:
    """Every message type with any valid content."""
    return st.one_of(
        st.builds(Init, READER_IDS, U32, st.lists(U32, min_size=1, max_size=6).map(tuple)),
        st.builds(Error, READER_IDS, U32),
        st.builds(ReaderAdd, READER_IDS, st.text(max_size=60)),
        st.builds(ATR, READER_IDS, st.binary(max_size=33)),
        st.builds(APDU, READER_IDS, st.binary(max_size=600)),
        *(st.builds(cls, READER_IDS) for cls in (ReaderRemove, CardRemove, Flush, FlushComplete)),
    )


def decode_all(chunks: list[bytes]) -> tuple[list[Message], VSCardDecoder]:
    decoder = VSCardDecoder()
    out: list[Message] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (message := decoder.next_message()) is not None:
            out.append(message)
    return out, decoder


@FAST
@given(st.lists(messages(), max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_message_sequence_survives_any_chunking(sent: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode(message) for message in sent)
    received, decoder = decode_all(pieces(stream, cuts))
    assert received == sent
    assert decoder.buffered == 0


@FAST
@given(messages())
def test_the_encoding_is_canonical(message: Message) -> None:
    """Decoding then encoding gives the same bytes: one encoding per message."""
    data = encode(message)
    (again,), _ = decode_all([data])
    assert encode(again) == data
    type_code, _, length = struct.unpack(">III", data[:HEADER_SIZE])
    assert type_code == message.type_code and length == len(data) - HEADER_SIZE


@FAST
@given(st.binary(max_size=400), st.lists(st.integers(0, 500), max_size=8))
@example(struct.pack(">III", 1, 0, 8) + MAGIC + b"\0\0\0\2", [])  # Init without capabilities
@example(struct.pack(">III", 2, 0, 3) + b"\0\0\0", [])  # Error of 3 bytes
@example(struct.pack(">III", 3, 0, 2) + b"\xff\xfe", [])  # ReaderAdd name not UTF-8
@example(struct.pack(">III", 6, 0, 1) + b"x", [])  # CardRemove with a payload
@example(struct.pack(">III", 10, 0, 0), [])  # unknown type
@example(struct.pack(">III", 7, 0, MAX_PAYLOAD + 1), [])  # oversize, refused from the header
def test_any_bytes_give_messages_or_a_protocol_error_and_nothing_else(
    data: bytes, cuts: list[int]
) -> None:
    """Whatever a peer sends: messages, a wait for more, or VSCardError (close). No other
    exception; what was accepted is exactly what was sent (it encodes back to the bytes read);
    never more buffered than one largest message."""
    decoder = VSCardDecoder()
    accepted: list[Message] = []
    try:
        for chunk in pieces(data, cuts):
            decoder.receive_data(chunk)
            while (message := decoder.next_message()) is not None:
                assert type(message) in MESSAGE_TYPES.values()
                accepted.append(message)
    except VSCardError:
        pass
    else:
        assert decoder.buffered <= HEADER_SIZE + MAX_PAYLOAD
    assert data.startswith(b"".join(encode(message) for message in accepted))


@FAST
@given(st.sampled_from(sorted(MESSAGE_TYPES)), U32, st.integers(MAX_PAYLOAD + 1, 0xFFFFFFFF))
def test_an_oversize_length_is_refused_before_its_payload_arrives(
    type_code: int, reader_id: int, length: int
) -> None:
    decoder = VSCardDecoder()
    decoder.receive_data(struct.pack(">III", type_code, reader_id, length))
    try:
        decoder.next_message()
    except VSCardError as exc:
        assert str(length) in str(exc)
    else:
        raise AssertionError(f"a {length}-byte payload was awaited")


@FAST
@given(st.integers(0, 0xFFFFFFFF).filter(lambda code: code not in MESSAGE_TYPES), U32)
def test_an_unknown_type_is_refused_at_once(type_code: int, length: int) -> None:
    decoder = VSCardDecoder()
    decoder.receive_data(struct.pack(">III", type_code, 0, length))
    try:
        decoder.next_message()
    except VSCardError as exc:
        assert f"unknown message type {type_code}" in str(exc)
    else:
        raise AssertionError("an unknown type was accepted")


@FAST
@given(messages().filter(lambda m: len(m.payload()) > 0), st.data())
def test_a_truncated_message_waits_and_a_wrong_length_is_not_taken_as_another_message(
    message: Message, data: st.DataObject
) -> None:
    """Short of its payload, a message is not decoded; lying about the payload length in a
    fixed-size message is a protocol error, never a silently different message."""
    encoded = encode(message)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    decoder = VSCardDecoder()
    decoder.receive_data(encoded[:cut])
    assert decoder.next_message() is None
    if isinstance(message, Error):
        shorter = struct.pack(">III", Error.type_code, message.reader_id, 2) + encoded[-4:-2]
        decoder = VSCardDecoder()
        decoder.receive_data(shorter)
        try:
            decoder.next_message()
        except VSCardError:
            pass
        else:
            raise AssertionError("an Error of 2 bytes was accepted")
