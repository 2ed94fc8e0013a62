"""One pcsc-lite client connection to the guest server: pcscd's per-connection behaviour.

Reader-state reads, waits and cancels are answered from the mirror; calls that touch a card
go to the host over the link. Requests on one connection are served in order, as pcscd does;
a blocking call blocks only its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..exceptions import first_leaf
from ..pcsc import (
    MAX_BUFFER_SIZE,
    PCSCError,
    ReturnCode,
    Scope,
    rv_name,
)
from ..pcsclite.messages import (
    AttribBody,
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
from ..pcsclite.readers import encode_table
from ..pcsclite.server import ProtocolViolation, Request, ServerConnection, reader_name

if TYPE_CHECKING:
    from .server import GuestServer

log = logging.getLogger("pcscbridge.guest.session")

MAX_HANDLES_PER_CONNECTION = 200  # pcscd's --max-card-handle-per-thread default
RECEIVE_SIZE = 65536 + 1024
_SIZE = struct.Struct("=i")

# What a 4.6 client sends between WAIT and the end of its table read (0x17 ends it).
_TABLE_READ = {Command.CMD_WAIT_READER_STATE_CHANGE, Command.CMD_GET_READERS_STATE_SIZE}

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


@dataclass
class CardHandle:
    h_card: int
    reader: str
    link_generation: int  # the link it was opened on; a new link means the handle is gone
    share_mode: int


class HandleMisuse(Exception):
    """A card handle this connection does not own: pcscd waits 2 s and hangs up."""


class ClientSession:
    def __init__(self, server: GuestServer, stream: trio.abc.Stream, name: str) -> None:
        self.server = server
        self.stream = stream
        self.name = name
        self.protocol = ServerConnection()
        self.h_context: int | None = None
        self.cards: dict[int, CardHandle] = {}
        self._write_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        # 4.6: a registration's table is read with 0x16 and 0x17 after WAIT. A signal due
        # meanwhile is held back until that read is done (pcscd 2.5 may write it in between,
        # where the client takes it for the size: spec §11.2 observation (a)).
        self._reading_table = False
        self._held_signal: int | None = None
        self._reported_size: int | None = None  # the last 0x16 answer: 0x17 sends as many

    # --- I/O -------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                requests_in, requests_out = trio.open_memory_channel[Request](0)
                nursery.start_soon(self._serve, requests_out)
                await self._receive(requests_in)
                nursery.cancel_scope.cancel()
        except* (ProtocolViolation, HandleMisuse) as group:
            log.warning("client %s: %s; closing the connection", self.name, first_leaf(group))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.debug("client %s: connection lost: %s", self.name, first_leaf(group))
        except* Exception as group:
            # A bug must cost one connection, never the server.
            log.error(
                "client %s: internal error; closing the connection",
                self.name,
                exc_info=first_leaf(group),
            )
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()
                await self.stream.aclose()

    async def _receive(self, requests: trio.MemorySendChannel[Request]) -> None:
        async with requests:
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                self.protocol.receive_data(data)
                while (request := self.protocol.next_request()) is not None:
                    await requests.send(request)

    async def _serve(self, requests: trio.MemoryReceiveChannel[Request]) -> None:
        async with requests:
            async for request in requests:
                log.debug("client %s: %r", self.name, request)
                await self._handle(request)

    async def send(self, data: bytes) -> None:
        async with self._write_lock:
            await self.stream.send_all(data)

    def signal(self, rv: int) -> None:
        """The 8-byte event signal; queued behind any reply being written (FIFO lock)."""
        if self._reading_table:
            self._held_signal = rv  # at most one: signalling unregisters
            return
        if self._nursery is not None:
            self._nursery.start_soon(self._send_quietly, encode_reply(WaitBody(0, rv)))

    async def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(data)

    # --- dispatch --------------------------------------------------------------------------
    async def _handle(self, request: Request) -> None:
        body = request.body
        if request.command in _CARD_COMMANDS:
            handle = self.cards.get(body.h_card)
            if handle is None or self.h_context is None:
                await trio.sleep(self.server.handle_misuse_delay)
                raise HandleMisuse(
                    f"{request.command.name} with card handle 0x{body.h_card & 0xFFFFFFFF:08X} "
                    "not owned by this connection"
                )
            reply = await self._card_command(request, handle)
        else:
            reply = await self._other_command(request)
        if reply is not None:
            await self.send(reply)
        if self._reading_table and request.command not in _TABLE_READ:
            # The table read after a 4.6 WAIT is over (0x17, or anything else the client
            # sent instead): a signal held meanwhile follows the reply.
            self._reading_table = False
            held, self._held_signal = self._held_signal, None
            if held is not None:
                await self.send(encode_reply(WaitBody(0, held)))

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
                return self._wait(request)
            case Command.CMD_STOP_WAITING_READER_STATE_CHANGE:
                if self.server.mirror.unregister(self):
                    return encode_reply(WaitBody(0, ReturnCode.SCARD_S_SUCCESS))
                return None  # the signal already sent is the client's answer
            case Command.CMD_GET_READER_EVENTS:
                return encode_reply(ReaderEventsBody(self.server.mirror.reader_events, 0))
            case Command.CMD_GET_READERS_STATE_SIZE:
                self._reported_size = len(self.server.mirror.slots)
                return _SIZE.pack(self._reported_size)
            case Command.CMD_GET_READERS_STATE_ARRAY:
                # As many entries as the client was told by its 0x16: it reads exactly that
                # many. Should the table have grown in between, the signal that follows makes
                # it read again.
                slots = self.server.mirror.slots
                count = self._reported_size or len(slots)
                return encode_table(slots[:count], count, self.protocol.reader_name_size)
        raise ProtocolViolation(f"{request.command.name} is not served")

    def _legacy_table(self) -> bytes:
        """The fixed-size table of 0x12 (and of WAIT up to 4.5): `reader_slots` entries.

        Beyond the mirror's own slots, 4.6 connections get all-zero entries as from pcscd 2.5;
        older ones get empty slots, as from the pcscd of their time (always 16 slots used)."""
        dialect = self.protocol.dialect
        return encode_table(
            self.server.legacy_slots(),
            self.server.reader_slots,
            self.protocol.reader_name_size,
            pad_zero=dialect is not None and dialect.has_variable_array,
        )

    def _wait(self, request: Request) -> bytes | None:
        # Registration and the table dump are one step: no await in between, so no signal can
        # slip ahead of the table (the signal's write queues behind this reply).
        self.server.mirror.register(self)
        dialect = self.protocol.effective_dialect
        if isinstance(request.body, WaitBody):
            return None  # ≤4.3: the client read the table before, with 0x12
        if dialect.has_variable_array:
            self._reading_table = True  # 4.6: 0x16 and 0x17 follow
            return None
        return self._legacy_table()

    # --- contexts --------------------------------------------------------------------------
    async def _establish(self, body: EstablishBody) -> EstablishBody:
        if body.scope not in tuple(Scope):
            return body._replace(h_context=0, rv=ReturnCode.SCARD_E_INVALID_VALUE)
        if self.h_context is not None:
            await self._release_context()
        self.h_context = self.server.register_context(self)
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
        self.server.mirror.unregister(self)
        h_context, self.h_context = self.h_context, None
        self.server.unregister_context(h_context)
        for handle in self.cards.values():
            self.server.release_card_id(handle.h_card)
            self.server.mirror.handle_closed(handle.reader, handle.share_mode)
        had_cards = bool(self.cards)
        self.cards.clear()
        if had_cards or self.server.context_used_on_link(h_context):
            # The host releases what this context held: handles left, transactions reset.
            await self.server.call_quietly("release_context", [h_context])

    async def _cleanup(self) -> None:
        if self.h_context is not None:
            await self._release_context()
        self.server.mirror.unregister(self)

    def _cancel(self, body: CancelBody) -> CancelBody:
        target = self.server.contexts.get(body.h_context)
        if target is None:
            return body._replace(rv=ReturnCode.SCARD_E_INVALID_HANDLE)
        self.server.mirror.cancel(target)
        return body._replace(rv=ReturnCode.SCARD_S_SUCCESS)

    # --- cards -----------------------------------------------------------------------------
    async def _connect(self, body: ConnectBody) -> ConnectBody:
        if self.h_context is None:
            return body._replace(rv=ReturnCode.SCARD_E_INVALID_HANDLE)
        if body.h_context != self.h_context:
            return body._replace(rv=ReturnCode.SCARD_E_INVALID_VALUE)
        reader = reader_name(body)
        if self.server.mirror.find(reader) is None:
            return body._replace(rv=ReturnCode.SCARD_E_UNKNOWN_READER)
        if len(self.cards) >= MAX_HANDLES_PER_CONNECTION:
            return body._replace(rv=ReturnCode.SCARD_E_NO_MEMORY)
        h_card = self.server.allocate_card_id()
        generation = self.server.link_generation
        try:
            (protocol,) = await self.server.call(
                "connect",
                [self.h_context, h_card, reader, body.share_mode, body.preferred_protocols],
            )
        except PCSCError as exc:
            self.server.release_card_id(h_card)
            return body._replace(rv=exc.rv)
        self.cards[h_card] = CardHandle(h_card, reader, generation, body.share_mode)
        self.server.mirror.handle_opened(reader, protocol, body.share_mode)
        return body._replace(h_card=h_card, active_protocol=protocol, rv=0)

    async def _card_command(self, request: Request, handle: CardHandle) -> bytes:
        body: Any = request.body
        if handle.link_generation != self.server.link_generation:
            # The link this handle lived on is gone, and the host released it.
            if request.command == Command.SCARD_DISCONNECT:
                self._forget(handle)
                return encode_reply(body._replace(rv=ReturnCode.SCARD_S_SUCCESS))
            return self._failed(request, ReturnCode.SCARD_E_READER_UNAVAILABLE)
        try:
            return await self._card_call(request, handle)
        except PCSCError as exc:
            return self._failed(request, exc.rv)

    def _failed(self, request: Request, rv: int) -> bytes:
        body: Any = request.body
        if isinstance(body, AttribBody) and request.command == Command.SCARD_GET_ATTRIB:
            return encode_reply(body._replace(attr_length=0, rv=rv))
        return encode_reply(body._replace(rv=rv))

    def _forget(self, handle: CardHandle) -> None:
        self.cards.pop(handle.h_card, None)
        self.server.release_card_id(handle.h_card)
        self.server.mirror.handle_closed(handle.reader, handle.share_mode)

    async def _card_call(self, request: Request, handle: CardHandle) -> bytes:
        body: Any = request.body
        call = self.server.call
        h_card = handle.h_card
        match request.command:
            case Command.SCARD_TRANSMIT:
                (response,) = await call("transmit", [h_card, body.send_pci_protocol, request.data])
                return _transmit_reply(body, response)
            case Command.SCARD_CONTROL:
                (response,) = await call("control", [h_card, body.control_code, request.data])
                if len(response) > body.recv_length:
                    return encode_reply(
                        body._replace(
                            bytes_returned=len(response), rv=ReturnCode.SCARD_E_INSUFFICIENT_BUFFER
                        )
                    )
                return encode_reply(body._replace(bytes_returned=len(response), rv=0), response)
            case Command.SCARD_STATUS:
                await call("status", [h_card])
                return encode_reply(body._replace(rv=0))
            case Command.SCARD_BEGIN_TRANSACTION:
                await call("begin_transaction", [h_card])
                return encode_reply(body._replace(rv=0))
            case Command.SCARD_END_TRANSACTION:
                await call("end_transaction", [h_card, body.disposition])
                return encode_reply(body._replace(rv=0))
            case Command.SCARD_RECONNECT:
                (protocol,) = await call(
                    "reconnect",
                    [h_card, body.share_mode, body.preferred_protocols, body.initialization],
                )
                mirror = self.server.mirror
                mirror.handle_closed(handle.reader, handle.share_mode)
                handle.share_mode = body.share_mode
                mirror.handle_opened(handle.reader, protocol, handle.share_mode)
                return encode_reply(body._replace(active_protocol=protocol, rv=0))
            case Command.SCARD_DISCONNECT:
                try:
                    await call("disconnect", [h_card, body.disposition])
                finally:
                    self._forget(handle)
                return encode_reply(body._replace(rv=0))
            case Command.SCARD_GET_ATTRIB:
                (value,) = await call("get_attrib", [h_card, body.attr_id])
                if len(value) > min(body.attr_length, MAX_BUFFER_SIZE):
                    return encode_reply(
                        body._replace(
                            attr_length=len(value), rv=ReturnCode.SCARD_E_INSUFFICIENT_BUFFER
                        )
                    )
                return encode_reply(body._replace(attr=value, attr_length=len(value), rv=0))
            case Command.SCARD_SET_ATTRIB:
                await call("set_attrib", [h_card, body.attr_id, body.attr[: body.attr_length]])
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
