"""A raw pcsc-lite client over the socket, for tests: any dialect, any bytes, no libpcsclite.

It speaks exactly what it is told (including garbage), so tests can probe the guest server's
handling of old dialects and bad input the real client library never produces.
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

from ..pcsc import ReaderStatus
from ..pcsclite.messages import (
    LAYOUTS,
    CardBody,
    Command,
    ConnectBody,
    DispositionBody,
    Empty,
    EstablishBody,
    ReaderEventsBody,
    ReleaseBody,
    TransmitBody,
    VersionBody,
    WaitBody,
    encode_request,
    unpack_body,
)
from ..pcsclite.readers import ReaderEntry, decode_table, entry_size


class RawClient:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.h_context = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bytes -------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, size: int) -> bytes:
        data = recv_exactly(self.sock, size)
        if len(data) < size:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        return data

    def closed_by_peer(self) -> bool:
        """True when the server closed the connection (EOF or reset) within the timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def request(self, command: Command, body: NamedTuple, trailer: bytes = b"") -> NamedTuple:
        self.send(encode_request(command, body, trailer))
        return unpack_body(type(body), self.receive(LAYOUTS[type(body)].size))

    # --- calls -------------------------------------------------------------------------------
    def version(self, major: int = 4, minor: int = 4) -> VersionBody:
        return self.request(Command.CMD_VERSION, VersionBody(major, minor, 0))  # type: ignore[return-value]

    def establish(self, scope: int = 2) -> EstablishBody:
        reply: EstablishBody = self.request(  # type: ignore[assignment]
            Command.SCARD_ESTABLISH_CONTEXT, EstablishBody(scope, 0, 0)
        )
        self.h_context = reply.h_context
        return reply

    def release(self) -> ReleaseBody:
        return self.request(Command.SCARD_RELEASE_CONTEXT, ReleaseBody(self.h_context, 0))  # type: ignore[return-value]

    def connect(self, reader: str, share_mode: int = 2, protocols: int = 3) -> ConnectBody:
        body = ConnectBody(
            self.h_context, reader.encode().ljust(128, b"\0"), share_mode, protocols, 0, 0, 0
        )
        return self.request(Command.SCARD_CONNECT, body)  # type: ignore[return-value]

    def disconnect(self, h_card: int, disposition: int = 0) -> DispositionBody:
        return self.request(Command.SCARD_DISCONNECT, DispositionBody(h_card, disposition, 0))  # type: ignore[return-value]

    def begin_transaction(self, h_card: int) -> CardBody:
        return self.request(Command.SCARD_BEGIN_TRANSACTION, CardBody(h_card, 0))  # type: ignore[return-value]

    def transmit(
        self, h_card: int, apdu: bytes, protocol: int = 2, recv_length: int = 65548
    ) -> tuple[TransmitBody, bytes]:
        body = TransmitBody(h_card, protocol, 16, len(apdu), 3, 16, recv_length, 0)
        self.send(encode_request(Command.SCARD_TRANSMIT, body, apdu))
        reply: TransmitBody = unpack_body(TransmitBody, self.receive(32))  # type: ignore[assignment]
        data = self.receive(reply.recv_length) if reply.rv == 0 else b""
        return reply, data

    def readers_state(self, slots: int = 16) -> list[ReaderEntry | None]:
        self.send(encode_request(Command.CMD_GET_READERS_STATE, Empty()))
        return decode_table(self.receive(slots * entry_size()))

    def wait(
        self, with_array: bool = True, body: WaitBody | None = None
    ) -> list[ReaderEntry | None]:
        """Register for events (CMD_WAIT_READER_STATE_CHANGE); 4.4/4.5 get the table back."""
        self.send(encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, body or Empty()))
        return decode_table(self.receive(16 * entry_size())) if with_array else []

    def wait_signal(self, timeout: float) -> bool:
        """True when the event signal came (the registration is used up), False on timeout."""
        readable, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not readable:
            return False
        self.read_signal()
        return True

    def unregister(self) -> None:
        """STOP, then the one 8-byte message owed: its reply, or the signal that raced it."""
        self.stop_waiting()
        self.read_signal()

    def read_signal(self) -> WaitBody:
        return unpack_body(WaitBody, self.receive(8))  # type: ignore[return-value]

    def stop_waiting(self, body: WaitBody | None = None) -> None:
        self.send(encode_request(Command.CMD_STOP_WAITING_READER_STATE_CHANGE, body or Empty()))

    def reader_events(self) -> ReaderEventsBody:
        self.send(encode_request(Command.CMD_GET_READER_EVENTS, Empty()))
        return unpack_body(ReaderEventsBody, self.receive(8))  # type: ignore[return-value]

    def readers_state_size(self) -> int:
        self.send(encode_request(Command.CMD_GET_READERS_STATE_SIZE, Empty()))
        return struct.unpack("=i", self.receive(4))[0]

    def readers_state_array(self, count: int) -> list[ReaderEntry | None]:
        self.send(encode_request(Command.CMD_GET_READERS_STATE_ARRAY, Empty()))
        return decode_table(self.receive(count * entry_size()))


def recv_exactly(
    sock: socket.socket, size: int, after_recv: Callable[[], None] | None = None
) -> bytes:
    """Read ``size`` bytes from ``sock``, fewer only when the peer closes first.

    ``after_recv`` runs after every recv (the vpcd card re-arms TCP_QUICKACK there).
    """
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if after_recv is not None:
            after_recv()
        if not chunk:
            break
        data += chunk
    return bytes(data)


def card_present(entry: ReaderEntry) -> bool:
    return bool(entry.state & ReaderStatus.SCARD_PRESENT)
