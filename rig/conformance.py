"""What a pcscd may send a libpcsclite client (protocol 4.4, pcsc-lite 1.9.9), checked on a
recorded connection: every byte the server sent must be the reply to the request before it, in
order, echoing that request's own fields; an event signal only while the client waits; nothing
after the client released its context, nothing unasked.

libpcsclite trusts the stream: it reads a reply of the size it expects and takes the fields it
sent back as given. A reply to another request, a second reply, or a stray signal is read as
part of the next reply and corrupts the client's memory (a crash seen once under concurrency).
This checker is how a test proves the bridge never sends one (tests/test_conformance.py).
"""

from __future__ import annotations

from typing import NamedTuple

from pcscbridge.pcsclite.messages import (
    LAYOUTS,
    AttribBody,
    CancelBody,
    CardBody,
    Command,
    ConnectBody,
    ControlBody,
    DispositionBody,
    Empty,
    EstablishBody,
    ReconnectBody,
    ReleaseBody,
    TransmitBody,
    WaitBody,
    unpack_body,
)
from pcscbridge.pcsclite.readers import entry_size
from pcscbridge.pcsclite.server import ProtocolViolation, Request, ServerConnection

# The fields a reply must echo from its request (the others are the server's out-fields).
ECHOED: dict[type, tuple[str, ...]] = {
    EstablishBody: ("scope",),
    ReleaseBody: ("h_context",),
    CancelBody: ("h_context",),
    ConnectBody: ("h_context", "reader_name", "share_mode", "preferred_protocols"),
    ReconnectBody: ("h_card", "share_mode", "preferred_protocols", "initialization"),
    DispositionBody: ("h_card", "disposition"),
    CardBody: ("h_card",),
    TransmitBody: ("h_card", "send_pci_protocol", "send_pci_length", "send_length"),
    ControlBody: ("h_card", "control_code", "send_length", "recv_length"),
    AttribBody: ("h_card", "attr_id"),
}
TABLE_SIZE = 16 * entry_size()
SIGNAL_SIZE = LAYOUTS[WaitBody].size


class Violation(Exception):
    pass


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def take(self, size: int, what: str) -> bytes:
        if self.position + size > len(self.data):
            raise Violation(f"{what}: {size} bytes expected, {self.remaining} left")
        chunk = self.data[self.position : self.position + size]
        self.position += size
        return chunk

    @property
    def remaining(self) -> int:
        return len(self.data) - self.position


def check_connection(c2s: bytes, s2c: bytes, *, closed_early: bool = False) -> list[str]:
    """Problems in one connection's transcript (empty when it conforms). `closed_early`: the
    client may have gone before reading every reply (a killed client): a missing tail is fine."""
    requests: list[Request] = []
    connection = ServerConnection()
    connection.receive_data(c2s)
    try:
        while (request := connection.next_request()) is not None:
            requests.append(request)
            if request.command == Command.CMD_VERSION:
                connection.negotiate(request.body)  # type: ignore[arg-type]
    except ProtocolViolation as exc:
        return [f"the client sent something unparsable: {exc}"]
    replies = _Stream(s2c)
    try:
        _check(requests, replies)
    except Violation as exc:
        if closed_early and "expected" in str(exc):
            return []
        return [str(exc)]
    if replies.remaining:
        return [f"{replies.remaining} bytes sent after the last reply: {s2c[-16:].hex()}"]
    return []


def _check(requests: list[Request], replies: _Stream) -> None:
    registered = False
    released = False
    for index, request in enumerate(requests):
        what = f"request {index} {request.command.name}"
        if released:
            raise Violation(f"{what}: the client sent it after releasing its context")
        body = request.body
        if registered and request.command != Command.CMD_STOP_WAITING_READER_STATE_CHANGE:
            # The client asks anything but STOP only after an event signal ended its wait (a
            # change, or SCardCancel), a new WAIT included: that signal comes first, once.
            _take_signal(replies, f"{what} (the signal that ended the wait)")
            registered = False
        if request.command == Command.CMD_WAIT_READER_STATE_CHANGE:
            replies.take(TABLE_SIZE, what)
            registered = True
            continue
        if request.command == Command.CMD_STOP_WAITING_READER_STATE_CHANGE:
            if not registered:
                raise Violation(f"{what}: STOP without a WAIT before it")
            # Exactly one 8-byte message is owed: the reply, or the signal that came first.
            _take_signal(replies, what)
            registered = False
            continue
        if request.command == Command.CMD_GET_READERS_STATE:
            replies.take(TABLE_SIZE, what)
            continue
        if isinstance(body, Empty):
            raise Violation(f"{what}: not a 4.4 request this checker knows")
        reply = unpack_body(type(body), replies.take(LAYOUTS[type(body)].size, what))
        for name in ECHOED.get(type(body), ()):
            if getattr(reply, name) != getattr(body, name):
                raise Violation(
                    f"{what}: reply's {name} {getattr(reply, name)!r} is not the request's "
                    f"{getattr(body, name)!r}: a reply to another request"
                )
        _take_trailer(reply, replies, what)
        if request.command == Command.SCARD_RELEASE_CONTEXT and reply.rv == 0:  # type: ignore[attr-defined]
            released = True


def _take_signal(replies: _Stream, what: str) -> None:
    signal = unpack_body(WaitBody, replies.take(SIGNAL_SIZE, what))
    if signal.timeout != 0:
        raise Violation(f"{what}: not an event signal: {signal}")


def _take_trailer(reply: NamedTuple, replies: _Stream, what: str) -> None:
    if getattr(reply, "rv", 1) != 0:
        return
    if isinstance(reply, TransmitBody):
        replies.take(reply.recv_length, f"{what} data")
    elif isinstance(reply, ControlBody):
        replies.take(reply.bytes_returned, f"{what} data")
