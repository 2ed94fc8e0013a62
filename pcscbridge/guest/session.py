"""One pcsc-lite client connection to the guest server: pcscd's per-connection behaviour.

Reader-state reads, waits and cancels are answered from the mirror; calls that touch a card
go to the host over the link. Requests on one connection are served in order, as pcscd does;
a blocking call blocks only its own connection. What a session needs from the server it names
in the small protocols below.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..link.calls import (
    BeginTransaction,
    CardCall,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    GetAttrib,
    Reconnect,
    SetAttrib,
    Status,
    Transmit,
)
from ..pcsc import MAX_BUFFER_SIZE, Disposition, PCSCError, ReturnCode, Scope, rv_name
from ..pcsclite.messages import (
    CancelBody,
    Command,
    ConnectBody,
    EstablishBody,
    ReaderEventsBody,
    ReleaseBody,
    TransmitBody,
    WaitBody,
    encode_reply,
)
from ..pcsclite.readers import LEGACY_TABLE_SLOTS, ReaderEntry, encode_table, legacy_view
from ..pcsclite.server import ProtocolViolation, Request, ServerConnection, reader_name
from ..stats import CallStats
from ..transports.direct import DirectReader
from ..transports.ending import connection_ends_logged
from ..transports.outbox import Outbox
from .mirror import ReaderMirror, Waiter

log = logging.getLogger("pcscbridge.guest.session")

MAX_HANDLES_PER_CONNECTION = 200  # pcscd's --max-card-handle-per-thread default
HANDLE_MISUSE_DELAY = 2.0  # pcscd sleeps this long before closing on a foreign card handle
RECEIVE_SIZE = 65536 + 1024
# Replies and event signals a client has not read yet: beyond this, it does not read at all.
UNREAD_LIMIT = 256 * 1024
_SIZE = struct.Struct("=i")

# Commands whose first field is a card handle that must belong to this connection.
_CARD_COMMANDS = {
    Command.SCARD_RECONNECT,
    Command.SCARD_DISCONNECT,
    Command.SCARD_BEGIN_TRANSACTION,
    Command.SCARD_END_TRANSACTION,
    Command.SCARD_TRANSMIT,
    Command.SCARD_CONTROL,
    Command.SCARD_STATUS,
    Command.SCARD_GET_ATTRIB,
    Command.SCARD_SET_ATTRIB,
}


# Commands the guest answers from its mirror and its own state, never waiting for the host.
_ANSWERED_HERE = frozenset(
    {
        Command.CMD_VERSION,
        Command.CMD_GET_READERS_STATE,
        Command.CMD_WAIT_READER_STATE_CHANGE,
        Command.CMD_STOP_WAITING_READER_STATE_CHANGE,
        Command.CMD_GET_READER_EVENTS,
        Command.CMD_GET_READERS_STATE_SIZE,
        Command.CMD_GET_READERS_STATE_ARRAY,
        Command.SCARD_CANCEL,
    }
)

# Commands with a disposition, which pcscd checks before anything else.
_DISPOSING = {Command.SCARD_DISCONNECT, Command.SCARD_END_TRANSACTION}


class Host(Protocol):
    """The attached host, as a session sees it (guest/hostlink.py)."""

    @property
    def generation(self) -> int:
        """Changes whenever the link does; handles opened under another value are gone."""
        ...

    async def connect(self, call: Connect) -> int: ...
    async def card_call(self, call: CardCall) -> Any: ...
    async def release_context(self, h_context: int) -> None: ...


class Registry(Protocol):
    """Context and card-handle numbers shared by all connections (guest/registry.py)."""

    def add_context(self, owner: Waiter) -> int: ...
    def remove_context(self, h_context: int) -> None: ...
    def context_owner(self, h_context: int) -> Waiter | None: ...
    def add_card(self) -> int: ...
    def remove_card(self, h_card: int) -> None: ...


@dataclass(frozen=True)
class SessionOptions:
    """`reader_slots`: the table size of clients with a fixed-size table (protocols up to
    4.5, and 0x12 of 4.6): PCSCLITE_MAX_READERS_CONTEXTS of their libpcsclite build.
    `legacy_readers`: fnmatch patterns choosing which readers such clients see when the host
    has more than fit (see readers.legacy_view)."""

    reader_slots: int = LEGACY_TABLE_SLOTS
    legacy_readers: Sequence[str] = ()
    handle_misuse_delay: float = HANDLE_MISUSE_DELAY
    max_handles: int = MAX_HANDLES_PER_CONNECTION
    unread_limit: int = UNREAD_LIMIT

    def __post_init__(self) -> None:
        if self.reader_slots < 1:
            raise ValueError("reader_slots must be at least 1")


@dataclass
class CardHandle:
    h_card: int
    reader: str
    link_generation: int  # the link it was opened on; a new link means the handle is gone
    share_mode: int


class HandleMisuse(ProtocolViolation):
    """A card handle this connection does not own: pcscd waits 2 s and hangs up."""


class ClientSession:
    def __init__(
        self,
        stream: trio.abc.Stream,
        name: str,
        *,
        mirror: ReaderMirror,
        registry: Registry,
        host: Host,
        options: SessionOptions,
        stats: CallStats | None = None,
    ) -> None:
        self.stream = stream
        self.name = name
        self.mirror = mirror
        self.registry = registry
        self.host = host
        self.options = options
        self.stats = stats or CallStats()
        self.protocol = ServerConnection()
        self.h_context: int | None = None
        self.cards: dict[int, CardHandle] = {}
        self.outbox = Outbox(stream, options.unread_limit)
        self._serving = False  # a request is with the serving task (it may wait for the host)

    # --- I/O -------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            with connection_ends_logged(log, f"client {self.name}"):
                async with trio.open_nursery() as nursery:
                    requests_in, requests_out = trio.open_memory_channel[Request](0)
                    nursery.start_soon(self._serve, requests_out)
                    nursery.start_soon(self.outbox.run)
                    await self._receive(requests_in)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()
                await self.stream.aclose()

    async def _receive(self, requests: trio.MemorySendChannel[Request]) -> None:
        """Reads requests. Those answered here, from the mirror, are answered at once in this
        task when nothing is under way; the others go, in order, to the serving task, so this
        one goes on reading: a client that goes away is noticed during a long host call."""
        async with requests:
            reader = DirectReader(self.stream)
            while data := await reader.receive_some(RECEIVE_SIZE):
                self.protocol.receive_data(data)
                while (request := self.protocol.next_request()) is not None:
                    if not self._serving and self._answered_here(request):
                        await self._serve_one(request)
                        if self.protocol.pending:
                            # A client that sends without waiting for replies gets no more
                            # turns than one that waits: others run between its requests.
                            await trio.lowlevel.checkpoint()
                    else:
                        self._serving = True
                        await requests.send(request)

    async def _serve(self, requests: trio.MemoryReceiveChannel[Request]) -> None:
        async with requests:
            async for request in requests:
                await self._serve_one(request)
                self._serving = False

    async def _serve_one(self, request: Request) -> None:
        log.debug("client %s: %r", self.name, request)
        with self.stats.timing(request.command.name):
            await self._handle(request)

    def _answered_here(self, request: Request) -> bool:
        """Whether the guest answers `request` without the host (nothing to wait for)."""
        if request.command == Command.SCARD_ESTABLISH_CONTEXT:
            return self.h_context is None  # else the old context is released on the host
        return request.command in _ANSWERED_HERE

    async def send(self, data: bytes) -> None:
        await self.outbox.send(data)

    def signal(self, rv: int) -> None:
        """The 8-byte event signal, behind any reply being written; never waits, and is
        harmless on a connection that is closing."""
        data = self.protocol.signal(rv)
        if data is not None:
            self.outbox.put(data)

    # --- dispatch --------------------------------------------------------------------------
    async def _handle(self, request: Request) -> None:
        body = request.body
        if request.command in _CARD_COMMANDS:
            handle = self.cards.get(body.h_card)
            if handle is None or self.h_context is None:
                await trio.sleep(self.options.handle_misuse_delay)
                raise HandleMisuse(
                    f"{request.command.name} with card handle 0x{body.h_card & 0xFFFFFFFF:08X} "
                    "not owned by this connection"
                )
            reply = await self._card_command(request, handle)
        else:
            reply = await self._other_command(request)
        if reply is not None:
            await self.send(reply)
        held = self.protocol.reply_sent(request.command)
        if held is not None:
            await self.send(held)

    async def _other_command(self, request: Request) -> bytes | None:
        body: Any = request.body
        match request.command:
            case Command.CMD_VERSION:
                answer = self.protocol.negotiate(body)
                if answer.rv:
                    log.warning(
                        "client %s speaks pcsc-lite protocol %d.%d, which is not served; "
                        "answering %d.%d %s",
                        self.name,
                        body.major,
                        body.minor,
                        answer.major,
                        answer.minor,
                        rv_name(answer.rv),
                    )
                return encode_reply(answer)
            case Command.SCARD_ESTABLISH_CONTEXT:
                return encode_reply(await self._establish(body))
            case Command.SCARD_RELEASE_CONTEXT:
                return encode_reply(await self._release(body))
            case Command.SCARD_CONNECT:
                return encode_reply(await self._connect(body))
            case Command.SCARD_CANCEL:
                return encode_reply(self._cancel(body))
            case Command.CMD_GET_READERS_STATE:
                return self._legacy_table()
            case Command.CMD_WAIT_READER_STATE_CHANGE:
                # Registration and the table dump are one step: no await in between, so no
                # signal can slip ahead of the table (its write queues behind this reply).
                self.mirror.register(self)
                return self._legacy_table() if self.protocol.wait_reply(request) else None
            case Command.CMD_STOP_WAITING_READER_STATE_CHANGE:
                if self.mirror.unregister(self):
                    return encode_reply(WaitBody(0, ReturnCode.SCARD_S_SUCCESS))
                return None  # the signal already sent is the client's answer
            case Command.CMD_GET_READER_EVENTS:
                return encode_reply(ReaderEventsBody(self.mirror.reader_events, 0))
            case Command.CMD_GET_READERS_STATE_SIZE:
                return _SIZE.pack(self.protocol.table_size(len(self.mirror.slots)))
            case Command.CMD_GET_READERS_STATE_ARRAY:
                slots = self.mirror.slots
                count = self.protocol.table_count(len(slots))
                name_size = self.protocol.reader_name_size
                return self.mirror.derived(
                    ("array", count, name_size),
                    lambda: encode_table(slots[:count], count, name_size),
                )
        raise ProtocolViolation(f"{request.command.name} is not served")

    def _legacy_table(self) -> bytes:
        """The fixed-size table of 0x12 (and of WAIT up to 4.5): `reader_slots` entries.

        Beyond the mirror's own slots, 4.6 connections get all-zero entries as from pcscd 2.5;
        older ones get empty slots, as from the pcscd of their time (always 16 slots used)."""
        dialect = self.protocol.dialect
        pad_zero = dialect is not None and dialect.has_variable_array
        name_size = self.protocol.reader_name_size
        options = self.options
        return self.mirror.derived(
            ("fixed", options.reader_slots, tuple(options.legacy_readers), name_size, pad_zero),
            lambda: encode_table(
                self.legacy_slots(), options.reader_slots, name_size, pad_zero=pad_zero
            ),
        )

    def legacy_slots(self) -> list[ReaderEntry | None]:
        """What a client with a fixed-size table sees: `reader_slots` entries at most."""
        return legacy_view(
            self.mirror.slots, self.options.reader_slots, self.options.legacy_readers
        )

    # --- contexts --------------------------------------------------------------------------
    async def _establish(self, body: EstablishBody) -> EstablishBody:
        if body.scope not in tuple(Scope):
            return body._replace(h_context=0, rv=ReturnCode.SCARD_E_INVALID_VALUE)
        if self.h_context is not None:
            await self._release_context()
        self.h_context = self.registry.add_context(self)
        return body._replace(h_context=self.h_context, rv=ReturnCode.SCARD_S_SUCCESS)

    async def _release(self, body: ReleaseBody) -> ReleaseBody:
        if self.h_context is None:
            return body._replace(rv=ReturnCode.SCARD_E_INVALID_HANDLE)
        if body.h_context != self.h_context:
            return body._replace(rv=ReturnCode.SCARD_E_INVALID_VALUE)
        await self._release_context()
        return body._replace(rv=ReturnCode.SCARD_S_SUCCESS)

    async def _release_context(self) -> None:
        assert self.h_context is not None
        self.mirror.unregister(self)
        h_context, self.h_context = self.h_context, None
        self.registry.remove_context(h_context)
        for handle in self.cards.values():
            self.registry.remove_card(handle.h_card)
            self.mirror.handle_closed(handle.reader, handle.share_mode)
        self.cards.clear()
        # The host releases what this context held: handles left, transactions reset.
        await self.host.release_context(h_context)

    async def _cleanup(self) -> None:
        if self.h_context is not None:
            await self._release_context()
        self.mirror.unregister(self)

    def _cancel(self, body: CancelBody) -> CancelBody:
        # pcscd 1.9.9 answers success only when the context was waiting (and signals it); a
        # context that exists but does not wait gets INVALID_HANDLE like an unknown one, so the
        # answer tells nobody which context numbers exist.
        target = self.registry.context_owner(body.h_context)
        if target is None or not self.mirror.cancel(target):
            return body._replace(rv=ReturnCode.SCARD_E_INVALID_HANDLE)
        return body._replace(rv=ReturnCode.SCARD_S_SUCCESS)

    # --- cards -----------------------------------------------------------------------------
    async def _connect(self, body: ConnectBody) -> ConnectBody:
        # On failure pcscd answers card handle 0, and the active protocol only when the card's
        # protocol was settled before the failure (the host says so); else the client's value.
        failed = body._replace(h_card=0)
        if self.h_context is None:
            return failed._replace(rv=ReturnCode.SCARD_E_INVALID_HANDLE)
        if body.h_context != self.h_context:
            return failed._replace(rv=ReturnCode.SCARD_E_INVALID_VALUE)
        reader = reader_name(body)
        if self.mirror.find(reader) is None:
            return failed._replace(rv=ReturnCode.SCARD_E_UNKNOWN_READER)
        if len(self.cards) >= self.options.max_handles:
            return failed._replace(rv=ReturnCode.SCARD_E_NO_MEMORY)
        h_card = self.registry.add_card()
        generation = self.host.generation
        call = Connect(self.h_context, h_card, reader, body.share_mode, body.preferred_protocols)
        try:
            protocol = await self.host.connect(call)
        except PCSCError as exc:
            self.registry.remove_card(h_card)
            self.stats.error(exc.rv)
            if isinstance(exc.result, int):
                failed = failed._replace(active_protocol=exc.result)
            return failed._replace(rv=exc.rv)
        except BaseException:
            self.registry.remove_card(h_card)  # the client left while the host connected
            raise
        self.cards[h_card] = CardHandle(h_card, reader, generation, body.share_mode)
        self.mirror.handle_opened(reader, protocol, body.share_mode)
        return body._replace(h_card=h_card, active_protocol=protocol, rv=0)

    async def _card_command(self, request: Request, handle: CardHandle) -> bytes:
        body: Any = request.body
        if handle.link_generation != self.host.generation:
            # The link this handle lived on is gone, and the host released it.
            if request.command == Command.SCARD_DISCONNECT:
                self._forget(handle)
                return encode_reply(body._replace(rv=ReturnCode.SCARD_S_SUCCESS))
            return self._failed(request, ReturnCode.SCARD_E_READER_UNAVAILABLE)
        try:
            return await self._card_call(request, handle)
        except PCSCError as exc:
            return self._failed(request, exc.rv, exc.result)

    def _failed(self, request: Request, rv: int, result: Any = None) -> bytes:
        """A failed call's reply, with the out-fields pcscd sends when it fails (checked
        against pcscd 1.9.9 on the rig: tests/test_error_replies.py). `result` is what the
        host's call reported all the same (an active protocol), when it did."""
        self.stats.error(rv)
        body: Any = request.body
        match request.command:
            case Command.SCARD_TRANSMIT:
                return encode_reply(body._replace(recv_length=0, rv=rv))
            case Command.SCARD_CONTROL:
                return encode_reply(body._replace(bytes_returned=0, rv=rv))
            case Command.SCARD_GET_ATTRIB:
                return encode_reply(body._replace(attr_length=0, rv=rv))
            case Command.SCARD_RECONNECT:
                protocol = result if isinstance(result, int) else 0
                return encode_reply(body._replace(active_protocol=protocol, rv=rv))
        return encode_reply(body._replace(rv=rv))

    def _forget(self, handle: CardHandle) -> None:
        self.cards.pop(handle.h_card, None)
        self.registry.remove_card(handle.h_card)
        self.mirror.handle_closed(handle.reader, handle.share_mode)

    async def _card_call(self, request: Request, handle: CardHandle) -> bytes:
        body: Any = request.body
        call = self.host.card_call
        h_card = handle.h_card
        if request.command in _DISPOSING and body.disposition not in tuple(Disposition):
            # pcscd's first check: the handle and its transaction stay as they are.
            return self._failed(request, ReturnCode.SCARD_E_INVALID_VALUE)
        match request.command:
            case Command.SCARD_TRANSMIT:
                response = await call(Transmit(h_card, body.send_pci_protocol, request.data))
                return _transmit_reply(body, response)
            case Command.SCARD_CONTROL:
                response = await call(Control(h_card, body.control_code, request.data))
                if len(response) > body.recv_length:
                    return encode_reply(
                        body._replace(
                            bytes_returned=len(response), rv=ReturnCode.SCARD_E_INSUFFICIENT_BUFFER
                        )
                    )
                return encode_reply(body._replace(bytes_returned=len(response), rv=0), response)
            case Command.SCARD_STATUS:
                await call(Status(h_card))
                return encode_reply(body._replace(rv=0))
            case Command.SCARD_BEGIN_TRANSACTION:
                await call(BeginTransaction(h_card))
                return encode_reply(body._replace(rv=0))
            case Command.SCARD_END_TRANSACTION:
                await call(EndTransaction(h_card, body.disposition))
                return encode_reply(body._replace(rv=0))
            case Command.SCARD_RECONNECT:
                protocol = await call(
                    Reconnect(
                        h_card, body.share_mode, body.preferred_protocols, body.initialization
                    )
                )
                self.mirror.handle_closed(handle.reader, handle.share_mode)
                handle.share_mode = body.share_mode
                self.mirror.handle_opened(handle.reader, protocol, handle.share_mode)
                return encode_reply(body._replace(active_protocol=protocol, rv=0))
            case Command.SCARD_DISCONNECT:
                try:
                    await call(Disconnect(h_card, body.disposition))
                finally:
                    self._forget(handle)
                return encode_reply(body._replace(rv=0))
            case Command.SCARD_GET_ATTRIB:
                value = await call(GetAttrib(h_card, body.attr_id))
                if len(value) > min(body.attr_length, MAX_BUFFER_SIZE):
                    return encode_reply(
                        body._replace(
                            attr_length=len(value), rv=ReturnCode.SCARD_E_INSUFFICIENT_BUFFER
                        )
                    )
                return encode_reply(body._replace(attr=value, attr_length=len(value), rv=0))
            case Command.SCARD_SET_ATTRIB:
                await call(SetAttrib(h_card, body.attr_id, body.attr[: body.attr_length]))
                return encode_reply(body._replace(rv=0))
        raise ProtocolViolation(f"{request.command.name} is not served")


def _transmit_reply(body: TransmitBody, response: bytes) -> bytes:
    if len(response) > body.recv_length:
        # As pcscd: the real length, no data, so the client can retry with a bigger buffer.
        return encode_reply(
            body._replace(recv_length=len(response), rv=ReturnCode.SCARD_E_INSUFFICIENT_BUFFER)
        )
    return encode_reply(
        # ioRecvPciProtocol: pcscd returns what its reader driver leaves there; libccid leaves
        # the client's own value, which the host's API cannot tell us otherwise. Echo it.
        body._replace(recv_length=len(response), rv=0),
        response,
    )
