"""pcsc-lite message bodies: command codes and fixed layouts (protocol/pcsc-lite.md §4, §5).

A request body and its reply share one layout; the daemon fills the out-fields. Integers travel
in the host's native byte order, which is what '=' gives struct, with standard sizes.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple


class Command(IntEnum):
    SCARD_ESTABLISH_CONTEXT = 0x01
    SCARD_RELEASE_CONTEXT = 0x02
    SCARD_LIST_READERS = 0x03  # defined, never served
    SCARD_CONNECT = 0x04
    SCARD_RECONNECT = 0x05
    SCARD_DISCONNECT = 0x06
    SCARD_BEGIN_TRANSACTION = 0x07
    SCARD_END_TRANSACTION = 0x08
    SCARD_TRANSMIT = 0x09
    SCARD_CONTROL = 0x0A
    SCARD_STATUS = 0x0B
    SCARD_GET_STATUS_CHANGE = 0x0C  # defined, never served
    SCARD_CANCEL = 0x0D
    SCARD_CANCEL_TRANSACTION = 0x0E  # defined, never served
    SCARD_GET_ATTRIB = 0x0F
    SCARD_SET_ATTRIB = 0x10
    CMD_VERSION = 0x11
    CMD_GET_READERS_STATE = 0x12
    CMD_WAIT_READER_STATE_CHANGE = 0x13
    CMD_STOP_WAITING_READER_STATE_CHANGE = 0x14
    CMD_GET_READER_EVENTS = 0x15  # 4.5+
    CMD_GET_READERS_STATE_SIZE = 0x16  # 4.6
    CMD_GET_READERS_STATE_ARRAY = 0x17  # 4.6


HEADER = struct.Struct("=II")  # size of the fixed body, command


class VersionBody(NamedTuple):
    major: int
    minor: int
    rv: int


class EstablishBody(NamedTuple):
    scope: int
    h_context: int
    rv: int


class ReleaseBody(NamedTuple):
    h_context: int
    rv: int


class CancelBody(NamedTuple):
    h_context: int
    rv: int


class ConnectBody(NamedTuple):
    h_context: int
    reader_name: bytes
    share_mode: int
    preferred_protocols: int
    h_card: int
    active_protocol: int
    rv: int


class ReconnectBody(NamedTuple):
    h_card: int
    share_mode: int
    preferred_protocols: int
    initialization: int
    active_protocol: int
    rv: int


class DispositionBody(NamedTuple):
    """SCARD_DISCONNECT and SCARD_END_TRANSACTION."""

    h_card: int
    disposition: int
    rv: int


class CardBody(NamedTuple):
    """SCARD_BEGIN_TRANSACTION and SCARD_STATUS."""

    h_card: int
    rv: int


class TransmitBody(NamedTuple):
    h_card: int
    send_pci_protocol: int
    send_pci_length: int
    send_length: int
    recv_pci_protocol: int
    recv_pci_length: int
    recv_length: int
    rv: int


class ControlBody(NamedTuple):
    h_card: int
    control_code: int
    send_length: int
    recv_length: int
    bytes_returned: int
    rv: int


class AttribBody(NamedTuple):
    h_card: int
    attr_id: int
    attr: bytes
    attr_length: int
    rv: int


class WaitBody(NamedTuple):
    """Event signal, STOP reply, and the ≤4.3 WAIT/STOP request body."""

    timeout: int
    rv: int


class ReaderEventsBody(NamedTuple):
    reader_events: int
    rv: int


class Empty(NamedTuple):
    """Body-less requests."""


Body = NamedTuple

LAYOUTS: dict[type, struct.Struct] = {
    VersionBody: struct.Struct("=iiI"),
    EstablishBody: struct.Struct("=III"),
    ReleaseBody: struct.Struct("=II"),
    CancelBody: struct.Struct("=iI"),
    ConnectBody: struct.Struct("=I128sIIiII"),
    ReconnectBody: struct.Struct("=iIIIII"),
    DispositionBody: struct.Struct("=iII"),
    CardBody: struct.Struct("=iI"),
    TransmitBody: struct.Struct("=iIIIIIII"),
    ControlBody: struct.Struct("=iIIIII"),
    AttribBody: struct.Struct("=iI264sII"),
    WaitBody: struct.Struct("=II"),
    ReaderEventsBody: struct.Struct("=II"),
    Empty: struct.Struct("="),
}
# pcsc-lite before 1.8.4 (protocol 4.2) had 100-byte reader names.
CONNECT_SHORT_NAME = struct.Struct("=I100sIIiII")

BODY_OF_COMMAND: dict[Command, type] = {
    Command.CMD_VERSION: VersionBody,
    Command.SCARD_ESTABLISH_CONTEXT: EstablishBody,
    Command.SCARD_RELEASE_CONTEXT: ReleaseBody,
    Command.SCARD_CONNECT: ConnectBody,
    Command.SCARD_RECONNECT: ReconnectBody,
    Command.SCARD_DISCONNECT: DispositionBody,
    Command.SCARD_BEGIN_TRANSACTION: CardBody,
    Command.SCARD_END_TRANSACTION: DispositionBody,
    Command.SCARD_TRANSMIT: TransmitBody,
    Command.SCARD_CONTROL: ControlBody,
    Command.SCARD_STATUS: CardBody,
    Command.SCARD_CANCEL: CancelBody,
    Command.SCARD_GET_ATTRIB: AttribBody,
    Command.SCARD_SET_ATTRIB: AttribBody,
    Command.CMD_GET_READERS_STATE: Empty,
    Command.CMD_WAIT_READER_STATE_CHANGE: Empty,
    Command.CMD_STOP_WAITING_READER_STATE_CHANGE: Empty,
    Command.CMD_GET_READER_EVENTS: Empty,
    Command.CMD_GET_READERS_STATE_SIZE: Empty,
    Command.CMD_GET_READERS_STATE_ARRAY: Empty,
}


def pack_body(body: NamedTuple) -> bytes:
    if isinstance(body, ConnectBody) and len(body.reader_name) == 100:
        return CONNECT_SHORT_NAME.pack(*body)
    return LAYOUTS[type(body)].pack(*body)


def unpack_body(body_type: type, data: bytes, layout: struct.Struct | None = None) -> NamedTuple:
    return body_type(*(layout or LAYOUTS[body_type]).unpack(data))


def encode_request(command: Command, body: NamedTuple, trailer: bytes = b"") -> bytes:
    """A client's request: header, fixed body, trailer (for tests and client-side tools)."""
    packed = pack_body(body)
    return HEADER.pack(len(packed), command) + packed + trailer


def encode_reply(body: NamedTuple, trailer: bytes = b"") -> bytes:
    """Replies carry no header: the body, then the trailer (TRANSMIT/CONTROL on success)."""
    return pack_body(body) + trailer
