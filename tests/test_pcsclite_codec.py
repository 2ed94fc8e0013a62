"""The sans-IO pcsc-lite codec, against the spec's bytes (captured from pcscd 1.9.9)."""

from __future__ import annotations

import pytest

from pcscbridge.pcsc import ReturnCode
from pcscbridge.pcsclite import dialect
from pcscbridge.pcsclite.messages import (
    AttribBody,
    Command,
    ConnectBody,
    Empty,
    TransmitBody,
    VersionBody,
    WaitBody,
    encode_reply,
    encode_request,
)
from pcscbridge.pcsclite.readers import ReaderEntry, decode_table, encode_table
from pcscbridge.pcsclite.server import ProtocolViolation, ServerConnection, reader_name

# From §10 of the spec: libpcsclite 1.9.9 talking to pcscd 1.9.9.
VERSION_44 = bytes.fromhex("0c000000 11000000 04000000 04000000 00000000")
ESTABLISH = bytes.fromhex("0c000000 01000000 02000000 00000000 00000000")
CONNECT = (
    bytes.fromhex("98000000 04000000 1c81151a")
    + b"Virtual PCD 00 00".ljust(128, b"\0")
    + bytes.fromhex("02000000 03000000 00000000 00000000 00000000")
)
CONNECT_REPLY = (
    bytes.fromhex("1c81151a")
    + b"Virtual PCD 00 00".ljust(128, b"\0")
    + bytes.fromhex("02000000 03000000 b142996e 02000000 00000000")
)
TRANSMIT = bytes.fromhex(
    "20000000 09000000 b142996e 02000000 10000000 0d000000 03000000 10000000 02010000 00000000"
    "00a40400 07a00000 00031010 00"
)
TRANSMIT_REPLY = bytes.fromhex(
    "b142996e 02000000 10000000 0d000000 01000000 10000000 02000000 00000000 6a82"
)
ENTRY_WITH_CARD = (
    b"Virtual PCD 00 00".ljust(128, b"\0")
    + bytes.fromhex("05000000 34000000 00000000")
    + bytes.fromhex("3b951381 018073ff 01000b").ljust(33, b"\0")
    + bytes(3)
    + bytes.fromhex("0b000000 00000000")
)


def requests_of(data: bytes, conn: ServerConnection | None = None, chunk: int = 0):
    conn = conn or ServerConnection()
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    out = []
    for piece in pieces:
        conn.receive_data(piece)
        while (request := conn.next_request()) is not None:
            out.append(request)
    return out


@pytest.mark.parametrize("chunk", [0, 1, 3, 7])
def test_a_real_session_parses_in_any_fragmentation(chunk: int) -> None:
    requests = requests_of(VERSION_44 + ESTABLISH + CONNECT + TRANSMIT, chunk=chunk)
    assert [r.command for r in requests] == [
        Command.CMD_VERSION,
        Command.SCARD_ESTABLISH_CONTEXT,
        Command.SCARD_CONNECT,
        Command.SCARD_TRANSMIT,
    ]
    assert requests[0].body == VersionBody(4, 4, 0)
    connect = requests[2].body
    assert isinstance(connect, ConnectBody)
    assert reader_name(connect) == "Virtual PCD 00 00"
    assert (connect.h_context, connect.share_mode, connect.preferred_protocols) == (
        0x1A15811C,
        2,
        3,
    )
    transmit = requests[3]
    assert transmit.body.send_length == 13 and transmit.body.recv_length == 258
    assert transmit.data == bytes.fromhex("00a4040007a000000003101000")


def test_replies_are_byte_exact() -> None:
    (_, _, connect, transmit) = requests_of(VERSION_44 + ESTABLISH + CONNECT + TRANSMIT)
    reply = encode_reply(connect.body._replace(h_card=0x6E9942B1, active_protocol=2, rv=0))
    assert reply == CONNECT_REPLY
    body = transmit.body
    reply = encode_reply(body._replace(recv_pci_protocol=1, recv_length=2, rv=0), b"\x6a\x82")
    assert reply == TRANSMIT_REPLY


def test_request_encoder_round_trips() -> None:
    body = TransmitBody(7, 2, 16, 3, 3, 16, 258, 0)
    [request] = requests_of(encode_request(Command.SCARD_TRANSMIT, body, b"\x00\x84\x00"))
    assert request.body == body and request.data == b"\x00\x84\x00"


def test_version_negotiation_echoes_known_and_refuses_others() -> None:
    conn = ServerConnection()
    assert conn.negotiate(VersionBody(4, 4, 0)) == VersionBody(4, 4, 0)
    assert conn.dialect is dialect.DIALECTS[(4, 4)]
    for major, minor in [(4, 7), (5, 0), (4, 1), (3, 0)]:
        fresh = ServerConnection()
        answer = fresh.negotiate(VersionBody(major, minor, 0))
        assert answer == VersionBody(4, 6, ReturnCode.SCARD_E_SERVICE_STOPPED)
        assert fresh.dialect is None
    # The connection stays usable: a retry with a served version succeeds.
    assert fresh.negotiate(VersionBody(4, 6, 0)).rv == 0


@pytest.mark.parametrize(
    "data, reason",
    [
        (bytes.fromhex("0d000000 01000000") + bytes(13), "size"),
        (bytes.fromhex("00000000 03000000"), "never served"),
        (bytes.fromhex("00000000 0c000000"), "never served"),
        (bytes.fromhex("00000000 00000000"), "unknown"),
        (bytes.fromhex("00000000 ff000000"), "unknown"),
        (bytes.fromhex("00000000 15000000"), "not part of protocol 4.4"),
        (bytes.fromhex("00000000 16000000"), "not part of protocol 4.4"),
        (
            encode_request(Command.SCARD_TRANSMIT, TransmitBody(1, 2, 16, 65549, 3, 16, 10, 0)),
            "send length",
        ),
        (
            encode_request(Command.SCARD_GET_ATTRIB, AttribBody(1, 2, b"", 265, 0)),
            "attribute length",
        ),
    ],
)
def test_input_pcscd_closes_on_is_a_violation(data: bytes, reason: str) -> None:
    conn = ServerConnection()
    conn.negotiate(VersionBody(4, 4, 0))
    with pytest.raises(ProtocolViolation, match=reason):
        requests_of(data, conn)


def test_wait_and_stop_bodies_follow_the_dialect() -> None:
    old = ServerConnection()
    old.negotiate(VersionBody(4, 3, 0))
    wait_43 = encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, WaitBody(5000, 0))
    [request] = requests_of(wait_43, old)
    assert request.body == WaitBody(5000, 0)
    with pytest.raises(ProtocolViolation):
        requests_of(bytes.fromhex("00000000 13000000"), old)

    new = ServerConnection()
    new.negotiate(VersionBody(4, 4, 0))
    [request] = requests_of(bytes.fromhex("00000000 13000000"), new)
    assert request.body == Empty()
    with pytest.raises(ProtocolViolation):
        requests_of(wait_43, new)


def test_newer_commands_in_their_dialects() -> None:
    v45 = ServerConnection()
    v45.negotiate(VersionBody(4, 5, 0))
    assert requests_of(bytes.fromhex("00000000 15000000"), v45)[0].command == (
        Command.CMD_GET_READER_EVENTS
    )
    v46 = ServerConnection()
    v46.negotiate(VersionBody(4, 6, 0))
    commands = [
        r.command for r in requests_of(bytes.fromhex("00000000 16000000 00000000 17000000"), v46)
    ]
    assert commands == [Command.CMD_GET_READERS_STATE_SIZE, Command.CMD_GET_READERS_STATE_ARRAY]


def test_cancel_connection_needs_no_version_exchange() -> None:
    [request] = requests_of(bytes.fromhex("08000000 0d000000 31cab045 00000000"))
    assert request.command == Command.SCARD_CANCEL and request.body.h_context == 0x45B0CA31


def test_old_42_clients_with_100_byte_names() -> None:
    conn = ServerConnection()
    conn.negotiate(VersionBody(4, 2, 0))
    body = ConnectBody(1, b"Reader".ljust(100, b"\0"), 2, 3, 0, 0, 0)
    [request] = requests_of(encode_request(Command.SCARD_CONNECT, body), conn)
    assert reader_name(request.body) == "Reader"
    assert conn.reader_name_size == 100
    assert len(encode_table([None], 16, conn.reader_name_size)) == 16 * 156


def test_readers_table_matches_pcscd() -> None:
    entry = ReaderEntry("Virtual PCD 00 00", 5, 0x34, 0, bytes.fromhex("3b95138101 8073ff01000b"))
    absent = ReaderEntry("Virtual PCD 00 01", 0, 0x02)
    table = encode_table([entry, absent], 16)
    assert len(table) == 2944
    assert table[:184] == ENTRY_WITH_CARD
    empty_slot = bytes(176) + bytes.fromhex("22000000 00000000")
    assert table[2 * 184 : 3 * 184] == empty_slot
    assert table[-184:] == empty_slot
    assert decode_table(table)[:3] == [entry, absent, None]
    # pcscd 2.5 fills the legacy array beyond its own slots with all-zero entries.
    assert encode_table([entry], 16, pad_zero=True)[184:] == bytes(15 * 184)
