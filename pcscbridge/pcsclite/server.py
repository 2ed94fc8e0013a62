"""pcscd's side of one client connection, without I/O: bytes in, requests out (h11 style).

    conn = ServerConnection()
    conn.receive_data(chunk)
    while (request := conn.next_request()) is not None:
        ...  # answer with encode_reply(...)

Input that pcscd would refuse by closing the connection raises ProtocolViolation; the caller
logs it and closes. Replies are built with messages.encode_reply.

The connection also keeps the rules of the event signal (the 8-byte {0, rv} a registered
client gets when a reader changes) that depend on what the client is doing: see wait_reply,
signal and reply_sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import PeerError
from ..pcsc import MAX_BUFFER_SIZE, MAX_BUFFER_SIZE_EXTENDED
from . import dialect as dialects
from .dialect import Dialect
from .messages import (
    BODY_OF_COMMAND,
    CONNECT_SHORT_NAME,
    HEADER,
    LAYOUTS,
    AttribBody,
    Command,
    ConnectBody,
    ControlBody,
    Empty,
    TransmitBody,
    VersionBody,
    WaitBody,
    encode_reply,
    unpack_body,
)


class ProtocolViolation(PeerError):
    """The client sent something pcscd would close the connection for."""


@dataclass(frozen=True)
class Request:
    command: Command
    body: NamedTuple
    data: bytes = b""  # the APDU / control trailer of TRANSMIT and CONTROL

    def __repr__(self) -> str:
        extra = f", {len(self.data)} data bytes" if self.data else ""
        return f"<{self.command.name} {self.body}{extra}>"


_WAIT_COMMANDS = (
    Command.CMD_WAIT_READER_STATE_CHANGE,
    Command.CMD_STOP_WAITING_READER_STATE_CHANGE,
)


# What a 4.6 client sends between WAIT and the end of its table read (0x17 ends it).
_TABLE_READ = frozenset({Command.CMD_WAIT_READER_STATE_CHANGE, Command.CMD_GET_READERS_STATE_SIZE})


class ServerConnection:
    def __init__(self) -> None:
        self.dialect: Dialect | None = None  # None until CMD_VERSION succeeds
        self.reader_name_size = 128
        self._buffer = bytearray()
        self._pending: tuple[Command, type, int, int] | None = None  # parsed header + sizes
        # 4.6: a registration's table is read with 0x16 and 0x17 after WAIT. A signal due
        # meanwhile is held back until that read is done (pcscd 2.5 may write it in between,
        # where the client takes it for the size: spec §11.2 observation (a)).
        self._reading_table = False
        self._held_signal: int | None = None
        self._reported_size: int | None = None  # the last 0x16 answer: 0x17 sends as many

    @property
    def effective_dialect(self) -> Dialect:
        return self.dialect or dialects.DEFAULT

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> bool:
        """Bytes of a next request are already here (the client sends without waiting)."""
        return bool(self._buffer)

    def negotiate(self, body: VersionBody) -> VersionBody:
        """Answer CMD_VERSION; the connection keeps the dialect when it is one we speak."""
        dialect, (major, minor, rv) = dialects.negotiate(body.major, body.minor)
        if dialect is not None:
            self.dialect = dialect
        return VersionBody(major, minor, rv)

    # --- event signals and table reads --------------------------------------------------------
    def wait_reply(self, request: Request) -> bool:
        """The client registered for events (WAIT): True when the reply is the fixed-size
        table (4.4, 4.5), False when WAIT gets no reply (≤4.3 read the table before with 0x12;
        4.6 reads it next with 0x16 and 0x17)."""
        if isinstance(request.body, WaitBody):
            return False
        if self.effective_dialect.has_variable_array:
            self._reading_table = True
            return False
        return True

    def signal(self, rv: int) -> bytes | None:
        """The event signal to write now, or None when it must wait for the end of a table
        read (reply_sent then returns it). At most one is due: signalling unregisters."""
        if self._reading_table:
            self._held_signal = rv
            return None
        return encode_reply(WaitBody(0, rv))

    def reply_sent(self, command: Command) -> bytes | None:
        """Call after replying to `command`: a signal held during a table read that just
        ended (0x17, or anything else the client sent instead), to write next."""
        if not self._reading_table or command in _TABLE_READ:
            return None
        self._reading_table = False
        held, self._held_signal = self._held_signal, None
        return None if held is None else encode_reply(WaitBody(0, held))

    def table_size(self, size: int) -> int:
        """Answer 0x16 with the table's current size; the 0x17 that follows sends as many."""
        self._reported_size = size
        return size

    def table_count(self, size: int) -> int:
        """How many entries 0x17 sends: what the client was told by its 0x16 (it reads exactly
        that many; should the table have grown, the signal that follows makes it read again)."""
        return self._reported_size or size

    # --- requests -------------------------------------------------------------------------------
    def next_request(self) -> Request | None:
        if self._pending is None:
            if len(self._buffer) < HEADER.size:
                return None
            size, code = HEADER.unpack_from(self._buffer)
            command, body_type = self._check_header(size, code)
            del self._buffer[: HEADER.size]
            self._pending = (command, body_type, size, -1)
        command, body_type, size, trailer = self._pending
        if len(self._buffer) < size:
            return None
        if trailer < 0:
            body = self._parse_body(command, body_type, size)
            trailer = self._trailer_length(body)
            self._pending = (command, body_type, size, trailer)
        if len(self._buffer) < size + trailer:
            return None
        body = self._parse_body(command, body_type, size)
        data = bytes(self._buffer[size : size + trailer])
        del self._buffer[: size + trailer]
        self._pending = None
        return Request(command, body, data)

    def _check_header(self, size: int, code: int) -> tuple[Command, type]:
        try:
            command = Command(code)
        except ValueError:
            raise ProtocolViolation(f"unknown command 0x{code:02X}") from None
        body_type = BODY_OF_COMMAND.get(command)
        if body_type is None:
            raise ProtocolViolation(f"{command.name} is never served by pcscd")
        dialect = self.effective_dialect
        if command == Command.CMD_GET_READER_EVENTS and not dialect.has_reader_events:
            raise ProtocolViolation(f"{command.name} is not part of protocol {dialect}")
        if (
            command in (Command.CMD_GET_READERS_STATE_SIZE, Command.CMD_GET_READERS_STATE_ARRAY)
            and not dialect.has_variable_array
        ):
            raise ProtocolViolation(f"{command.name} is not part of protocol {dialect}")
        if command in _WAIT_COMMANDS:
            allowed = self._wait_sizes()
            if size not in allowed:
                raise ProtocolViolation(f"{command.name} with body size {size}")
            return command, WaitBody if size else Empty
        expected = {LAYOUTS[body_type].size}
        if command == Command.SCARD_CONNECT and self._may_use_short_names():
            expected.add(CONNECT_SHORT_NAME.size)
        if size not in expected:
            raise ProtocolViolation(
                f"{command.name} with body size {size}, expected {sorted(expected)}"
            )
        return command, body_type

    def _wait_sizes(self) -> set[int]:
        if self.dialect is None:
            return {0, LAYOUTS[WaitBody].size}
        return {LAYOUTS[WaitBody].size} if self.dialect.wait_has_body else {0}

    def _may_use_short_names(self) -> bool:
        return self.dialect is not None and self.dialect.version == (4, 2)

    def _parse_body(self, command: Command, body_type: type, size: int) -> NamedTuple:
        raw = bytes(self._buffer[:size])
        if body_type is ConnectBody and size == CONNECT_SHORT_NAME.size:
            # An old 4.2 client with 100-byte names: its later tables must use them too.
            self.reader_name_size = 100
            return unpack_body(ConnectBody, raw, CONNECT_SHORT_NAME)
        return unpack_body(body_type, raw)

    @staticmethod
    def _trailer_length(body: NamedTuple) -> int:
        if isinstance(body, TransmitBody | ControlBody):
            if body.send_length > MAX_BUFFER_SIZE_EXTENDED:
                raise ProtocolViolation(
                    f"send length {body.send_length} > {MAX_BUFFER_SIZE_EXTENDED}"
                )
            return body.send_length
        if isinstance(body, AttribBody) and body.attr_length > MAX_BUFFER_SIZE:
            raise ProtocolViolation(f"attribute length {body.attr_length} > {MAX_BUFFER_SIZE}")
        return 0


def reader_name(body: ConnectBody) -> str:
    """The NUL-terminated name of a CONNECT body (pcscd forces the last byte to NUL)."""
    return body.reader_name[:-1].split(b"\0", 1)[0].decode("utf-8", "replace")
