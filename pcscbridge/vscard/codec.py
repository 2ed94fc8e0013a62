"""VSCard messages (QEMU's ccid-card-passthru protocol) and their bytes.

Every message is a 12-byte header, three big-endian u32 (type, reader id, payload length),
then the payload. Init's payload is the magic ``VSCD`` (raw bytes), the version (u32) and one
or more capabilities (u32 each); Error's is one u32 code; ReaderAdd's an optional UTF-8 name;
ATR's and APDU's their bytes; the others have none.

    decoder = VSCardDecoder()
    decoder.receive_data(chunk)
    while (message := decoder.next_message()) is not None: ...   # VSCardError: close
    stream.send_all(encode(ATR(MINIMAL_READER_ID, atr_bytes)))
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from ..errors import PeerError

MAGIC = b"VSCD"
VERSION = 2  # major 0, middle 0, minor 2, packed as 11/11/10 bits
UNDEFINED_READER_ID = 0xFFFFFFFF
MINIMAL_READER_ID = 0
# QEMU never sends more than its 64 KiB bulk-out buffer holds (one guest XfrBlock), and keeps
# at most 64 KiB of our input unprocessed: nothing legitimate is larger in either direction.
MAX_PAYLOAD = 64 * 1024

SUCCESS, GENERAL_ERROR, CANNOT_ADD_MORE_READERS, CARD_ALREADY_INSERTED = 0, 1, 2, 3

_HEADER = struct.Struct(">III")
HEADER_SIZE = _HEADER.size


class VSCardError(PeerError):
    """The bytes are not the VSCard protocol; the chardev connection must be closed."""


@dataclass(frozen=True, slots=True)
class Message:
    type_code: ClassVar[int]
    reader_id: int

    def payload(self) -> bytes:
        return b""

    @classmethod
    def from_payload(cls, reader_id: int, payload: bytes) -> Message:
        if payload:
            raise VSCardError(f"{cls.__name__} carries no payload, got {len(payload)} bytes")
        return cls(reader_id)


@dataclass(frozen=True, slots=True)
class Init(Message):
    type_code = 1
    version: int = VERSION
    capabilities: tuple[int, ...] = (0,)

    def payload(self) -> bytes:
        return MAGIC + struct.pack(f">I{len(self.capabilities)}I", self.version, *self.capabilities)

    @classmethod
    def from_payload(cls, reader_id: int, payload: bytes) -> Message:
        if len(payload) < 12 or len(payload) % 4:
            raise VSCardError(f"Init of {len(payload)} bytes: magic, version and capabilities")
        if payload[:4] != MAGIC:
            raise VSCardError(f"Init with wrong magic {payload[:4].hex()} (not 'VSCD')")
        version, *capabilities = struct.unpack(f">{len(payload) // 4 - 1}I", payload[4:])
        return cls(reader_id, version, tuple(capabilities))


@dataclass(frozen=True, slots=True)
class Error(Message):
    """The answer to ReaderAdd/ReaderRemove/ATR/CardRemove (code 0 = success), or, from the
    card's side, the answer to an APDU that could not reach the card."""

    type_code = 2
    code: int = SUCCESS

    def payload(self) -> bytes:
        return struct.pack(">I", self.code)

    @classmethod
    def from_payload(cls, reader_id: int, payload: bytes) -> Message:
        if len(payload) != 4:
            raise VSCardError(f"Error of {len(payload)} bytes, not 4")
        return cls(reader_id, struct.unpack(">I", payload)[0])


@dataclass(frozen=True, slots=True)
class ReaderAdd(Message):
    type_code = 3
    name: str = ""

    def payload(self) -> bytes:
        return self.name.encode()

    @classmethod
    def from_payload(cls, reader_id: int, payload: bytes) -> Message:
        try:
            return cls(reader_id, payload.decode())
        except UnicodeDecodeError:
            raise VSCardError("ReaderAdd with a name that is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class ReaderRemove(Message):
    type_code = 4


@dataclass(frozen=True, slots=True)
class _Bytes(Message):
    """A message whose payload is its bytes as they are."""

    data: bytes = b""

    def payload(self) -> bytes:
        return self.data

    @classmethod
    def from_payload(cls, reader_id: int, payload: bytes) -> Message:
        return cls(reader_id, payload)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reader_id={self.reader_id}, data={self.data.hex(' ')})"


@dataclass(frozen=True, slots=True, repr=False)  # _Bytes' repr: the bytes in hex
class ATR(_Bytes):
    """The card was inserted or reset; this is its ATR."""

    type_code = 5


@dataclass(frozen=True, slots=True)
class CardRemove(Message):
    type_code = 6


@dataclass(frozen=True, slots=True, repr=False)
class APDU(_Bytes):
    """From QEMU: one command from the guest; from the card's side: the whole response."""

    type_code = 7


@dataclass(frozen=True, slots=True)
class Flush(Message):
    type_code = 8


@dataclass(frozen=True, slots=True)
class FlushComplete(Message):
    type_code = 9


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.type_code: cls
    for cls in (Init, Error, ReaderAdd, ReaderRemove, ATR, CardRemove, APDU, Flush, FlushComplete)
}


def encode(message: Message) -> bytes:
    payload = message.payload()
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"{type(message).__name__} of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(message.type_code, message.reader_id, len(payload)) + payload


class VSCardDecoder:
    """Messages out of a byte stream. Checks the header before waiting for the payload, so an
    oversize length is refused at once, not after buffering it."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_message(self) -> Message | None:
        """The next complete message, None when more bytes are needed; VSCardError when the
        bytes are not the protocol (the decoder is then unusable: close the connection)."""
        if len(self._buffer) < HEADER_SIZE:
            return None
        type_code, reader_id, length = _HEADER.unpack_from(self._buffer)
        cls = MESSAGE_TYPES.get(type_code)
        if cls is None:
            raise VSCardError(f"unknown message type {type_code}")
        if length > MAX_PAYLOAD:
            raise VSCardError(f"{cls.__name__} of {length} bytes exceeds {MAX_PAYLOAD}")
        end = HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        return cls.from_payload(reader_id, payload)
