"""One fuzzing client connection to the guest socket: structured pcsc-lite requests of every
command and dialect with checked answers, then a hostile ending (a mutated, truncated or
garbage message, another connection's handle, a flood never read, an abrupt close).

A connection draws everything from its own random.Random, so its requests are replayable
from (seed, batch, connection); what it is answered decides between equally likely paths.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

from pcscbridge.pcsc import MAX_BUFFER_SIZE, ReturnCode
from pcscbridge.pcsclite import dialect as dialects
from pcscbridge.pcsclite.messages import (
    BODY_OF_COMMAND,
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
    ReaderEventsBody,
    ReconnectBody,
    ReleaseBody,
    TransmitBody,
    VersionBody,
    WaitBody,
    encode_request,
    pack_body,
    unpack_body,
)
from pcscbridge.pcsclite.readers import LEGACY_TABLE_SLOTS, entry_size
from pcscbridge.pcsclite.server import ProtocolViolation, ServerConnection

from .mutate import fragments, mutate
from .watch import KNOWN_RV, echo_apdu, random_apdu

REPLY_TIMEOUT = 20.0
BLOCKING_TIMEOUT = 120.0  # a BEGIN waits for another connection's transaction to end
ATTRIBUTES = (0x00090303, 0x00010100, 0x00010102, 0x00010103, 0x0007A007, 0x7FFF0003, 0x00000000)
CONTROL_CODES = (0x42000D48, 0x42000C00, 0x42000001, 0, 0xFFFFFFFF)
SHORT_CONNECT = struct.Struct("=I100sIIiII")


class Closed(Exception):
    """The guest closed the connection."""


class Hang(Exception):
    """No answer within the time allowed."""


class WrongAnswer(Exception):
    """An answer that is neither right nor a PC/SC error code."""


@dataclass
class Shared:
    """What the connections of a run know of each other: handles to misuse."""

    readers_with_card: list[str]
    empty_readers: list[str]
    active: dict[str, FuzzConnection] = field(default_factory=dict)  # for diagnostics
    contexts: set[int] = field(default_factory=set)
    cards: set[int] = field(default_factory=set)
    gone_cards: list[int] = field(default_factory=list)


class Wire:
    """A client socket with exact reads under a deadline."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Closed(f"send failed: {exc}") from None

    async def read(self, size: int, timeout: float = REPLY_TIMEOUT) -> bytes:
        with trio.move_on_after(timeout):
            while len(self._buffer) < size:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise Closed(f"receive failed: {exc}") from None
                if not data:
                    raise Closed(f"closed after {len(self._buffer)} of {size} bytes")
                self._buffer += data
            out = bytes(self._buffer[:size])
            del self._buffer[:size]
            return out
        raise Hang(f"{len(self._buffer)} of {size} bytes after {timeout:.0f} s")

    async def drain(self, timeout: float) -> tuple[int, bool]:
        """Read until the guest closes or `timeout`: (bytes read, closed)."""
        total = len(self._buffer)
        self._buffer.clear()
        with trio.move_on_after(timeout):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return total, True
                if not data:
                    return total, True
                total += len(data)
        return total, False

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


Check = Callable[[Wire], Awaitable[None]]


@dataclass
class Op:
    """One request: its bytes, and how its answer is read and checked."""

    kind: str
    data: bytes
    check: Check


@dataclass
class Handle:
    h_card: int
    reader: str
    in_transaction: bool = False


class FuzzConnection:
    """One client connection's life: structured requests, then an ending."""

    def __init__(self, rng: random.Random, shared: Shared, wire: Wire, label: str) -> None:
        self.rng = rng
        self.shared = shared
        self.wire = wire
        self.label = label
        self.version: tuple[int, int] | None = None
        self.h_context: int | None = None
        self.handles: dict[int, Handle] = {}
        self.name_size = 128
        self.kinds: Counter[str] = Counter()  # cases tried, by kind
        self.last: str = "nothing yet"

    # --- bookkeeping ----------------------------------------------------------------------
    @property
    def cases(self) -> int:
        return self.kinds.total()

    def forget_all(self) -> None:
        if self.h_context is not None:
            self.shared.contexts.discard(self.h_context)
        for h_card in self.handles:
            self.shared.cards.discard(h_card)
            self.shared.gone_cards.append(h_card)
        del self.shared.gone_cards[:-500]
        self.handles.clear()
        self.h_context = None

    def rv_known(self, rv: int, what: str) -> None:
        if rv not in KNOWN_RV:
            raise WrongAnswer(f"{what}: unknown return code 0x{rv:08X}")

    def echoed(self, what: str, sent: Any, got: Any) -> None:
        if sent != got:
            raise WrongAnswer(f"{what}: answer for {got!r}, asked about {sent!r}")

    async def reply(self, body_type: type, timeout: float = REPLY_TIMEOUT) -> Any:
        return unpack_body(body_type, await self.wire.read(LAYOUTS[body_type].size, timeout))

    # --- the whole connection ---------------------------------------------------------------
    async def run(self, steps: int) -> tuple[str, Callable[[], Awaitable[None]] | None]:
        """Structured requests, then an ending (see `ending`)."""
        try:
            await self.start()
            for _ in range(steps):
                await self.step()
        except BaseException:
            self.forget_all()
            raise
        return await self.ending()

    def holders(self) -> str:
        """The connections holding a transaction now, and what each is doing (for a hang)."""
        lines = []
        for label, other in self.shared.active.items():
            for handle in other.holding:
                lines.append(f"  {label} holds {handle.reader!r}; doing {other.last}")
        return "\n".join(lines) or "  no connection holds a transaction"

    async def send_ops(self, ops: list[Op]) -> None:
        data = b"".join(op.data for op in ops)
        self.kinds["structured"] += len(ops)
        self.last = "+".join(op.kind for op in ops)
        for piece in fragments(self.rng, data):
            await self.wire.send(piece)
        for op in ops:
            await op.check(self.wire)

    async def start(self) -> None:
        rng = self.rng
        choice = rng.random()
        if choice < 0.08:
            return  # no CMD_VERSION at all: served as 4.4 (SCardCancel's throw-away socket)
        if choice < 0.12:
            wanted = (rng.choice((3, 4, 5, 4, 4)), rng.randint(0, 9))
        else:
            wanted = rng.choice(list(dialects.DIALECTS))
        await self.send_ops([self.version_op(wanted)])
        if self.version is None and rng.random() < 0.8:
            await self.send_ops([self.version_op(rng.choice(list(dialects.DIALECTS)))])
        if rng.random() < 0.9:
            await self.send_ops([self.establish_op()])

    # --- requests ---------------------------------------------------------------------------
    def version_op(self, wanted: tuple[int, int]) -> Op:
        async def check(wire: Wire) -> None:
            body = await self.reply(VersionBody)
            if wanted in dialects.DIALECTS:
                if body != VersionBody(*wanted, 0):
                    raise WrongAnswer(f"version {wanted}: {body}")
                self.version = wanted
            elif body != VersionBody(4, 6, ReturnCode.SCARD_E_SERVICE_STOPPED):
                raise WrongAnswer(f"unserved version {wanted}: {body}")

        return Op("version", encode_request(Command.CMD_VERSION, VersionBody(*wanted, 0)), check)

    def establish_op(self) -> Op:
        scope = 2 if self.rng.random() < 0.9 else self.rng.choice((0, 1, 3, 7, 0xFFFFFFFF))

        async def check(wire: Wire) -> None:
            body = await self.reply(EstablishBody)
            self.rv_known(body.rv, "establish")
            if body.rv == 0:
                if not body.h_context or body.h_context in self.shared.contexts:
                    raise WrongAnswer(f"establish gave context {body.h_context:#x} (in use)")
                self.forget_all()  # a second establish releases the first context
                self.h_context = body.h_context
                self.shared.contexts.add(body.h_context)
            elif scope in (0, 1, 2):
                raise WrongAnswer(f"establish with scope {scope} failed: 0x{body.rv:08X}")

        return Op(
            "establish",
            encode_request(Command.SCARD_ESTABLISH_CONTEXT, EstablishBody(scope, 0, 0)),
            check,
        )

    def release_op(self) -> Op:
        h_context = self.h_context or self.rng.randrange(1 << 31)

        async def check(wire: Wire) -> None:
            body = await self.reply(ReleaseBody)
            self.rv_known(body.rv, "release")
            self.echoed("release", h_context, body.h_context)
            if body.rv == 0:
                self.forget_all()

        return Op(
            "release",
            encode_request(Command.SCARD_RELEASE_CONTEXT, ReleaseBody(h_context, 0)),
            check,
        )

    def connect_op(self) -> Op:
        rng = self.rng
        pick = rng.random()
        if pick < 0.75:
            reader = rng.choice(self.shared.readers_with_card)
        elif pick < 0.85:
            reader = rng.choice(self.shared.empty_readers)
        elif pick < 0.93:
            reader = "Virtual PCD 0" + rng.choice(("", "0 0", "0 00 00 x", "\u00e9"))
        else:
            reader = rng.choice(self.shared.readers_with_card) + "\0" + rng.randbytes(3).hex()
        h_context = self.h_context or 0
        if rng.random() < 0.05:
            h_context = rng.choice([*self.shared.contexts, rng.randrange(1 << 31)])
        share = rng.choice((2, 2, 2, 2, 1, 3, rng.randrange(8)))
        protocols = random_protocols(rng)
        short = self.version == (4, 2) and rng.random() < 0.5
        size = 100 if short else 128
        name = reader.encode()[: size - 1].ljust(size, b"\0")
        body = ConnectBody(h_context, name, share, protocols, 0, 0, 0)
        if short:
            packed = SHORT_CONNECT.pack(*body)
            data = struct.pack("=II", len(packed), Command.SCARD_CONNECT) + packed
        else:
            data = encode_request(Command.SCARD_CONNECT, body)

        async def check(wire: Wire) -> None:
            if short:
                reply = ConnectBody(*SHORT_CONNECT.unpack(await wire.read(SHORT_CONNECT.size)))
                self.name_size = 100
            else:
                reply = await self.reply(ConnectBody)
            self.rv_known(reply.rv, "connect")
            self.echoed("connect", h_context, reply.h_context)
            if reply.rv == 0:
                if not reply.h_card or reply.h_card in self.shared.cards:
                    raise WrongAnswer(f"connect gave card handle {reply.h_card:#x} (in use)")
                self.handles[reply.h_card] = Handle(reply.h_card, reader.split("\0")[0])
                self.shared.cards.add(reply.h_card)

        return Op("connect", data, check)

    def card_op(self, handle: Handle, pipelined: bool = False) -> Op:
        """A call on one of this connection's handles. Pipelined calls leave the handle as it
        is. pcscd holds a CONNECT, a BEGIN, a DISCONNECT with a card reset, ... behind another
        context's transaction on the reader, so a connection that holds a transaction only
        makes calls on that handle, which pcscd never holds (as applications must: two that
        each hold a transaction and wait for the other's deadlock, on pcscd as on the bridge);
        waiting connections therefore never wait for each other in a cycle."""
        builders: list[Callable[[Handle], Op]] = [
            self.transmit_op,
            self.transmit_op,
            self.transmit_op,
            self.status_op,
            self.control_op,
            self.attrib_op,
        ]
        if not pipelined:
            builders += [self.disposition_op, self.reconnect_op]
            if not self.holding:
                builders.append(self.begin_op)
        return self.rng.choice(builders)(handle)

    @property
    def holding(self) -> list[Handle]:
        """This connection's handles that may hold a transaction."""
        return [handle for handle in self.handles.values() if handle.in_transaction]

    def transmit_op(self, handle: Handle) -> Op:
        rng = self.rng
        pick = rng.random()
        if pick < 0.6:
            payload = f"{self.label}:{self.cases}".encode() + rng.randbytes(rng.randint(0, 60))
            apdu = echo_apdu(payload)
            expected: bytes | None = payload + b"\x90\x00"
        else:
            apdu = random_apdu(rng)
            expected = None
        protocol = rng.choice((2, 2, 2, 1, 3, 0, rng.randrange(1 << 32)))
        recv_length = rng.choice((65548, 65548, 258, 2, 0))
        body = TransmitBody(handle.h_card, protocol, 16, len(apdu), 3, 16, recv_length, 0)

        async def check(wire: Wire) -> None:
            reply = await self.reply(TransmitBody)
            self.rv_known(reply.rv, "transmit")
            self.echoed("transmit", handle.h_card, reply.h_card)
            if reply.rv:
                return
            if reply.recv_length > recv_length:
                raise WrongAnswer(f"transmit: {reply.recv_length} bytes > buffer {recv_length}")
            answer = await wire.read(reply.recv_length)
            if expected is not None and answer != expected:
                raise WrongAnswer(f"echo of {expected.hex()} answered {answer.hex()}")

        return Op("transmit", encode_request(Command.SCARD_TRANSMIT, body, apdu), check)

    def status_op(self, handle: Handle) -> Op:
        async def check(wire: Wire) -> None:
            reply = await self.reply(CardBody)
            self.rv_known(reply.rv, "status")
            self.echoed("status", handle.h_card, reply.h_card)

        return Op("status", encode_request(Command.SCARD_STATUS, CardBody(handle.h_card, 0)), check)

    def control_op(self, handle: Handle) -> Op:
        rng = self.rng
        code = rng.choice((*CONTROL_CODES, rng.randrange(1 << 32)))
        data = rng.randbytes(rng.choice((0, 0, 4, rng.randint(0, 64))))
        recv_length = rng.choice((0, 16, 264, 65548))
        body = ControlBody(handle.h_card, code, len(data), recv_length, 0, 0)

        async def check(wire: Wire) -> None:
            reply = await self.reply(ControlBody)
            self.rv_known(reply.rv, "control")
            self.echoed("control", handle.h_card, reply.h_card)
            if reply.rv == 0:
                if reply.bytes_returned > recv_length:
                    raise WrongAnswer(f"control: {reply.bytes_returned} > {recv_length}")
                await wire.read(reply.bytes_returned)

        return Op("control", encode_request(Command.SCARD_CONTROL, body, data), check)

    def attrib_op(self, handle: Handle) -> Op:
        rng = self.rng
        command = rng.choice(
            (Command.SCARD_GET_ATTRIB, Command.SCARD_GET_ATTRIB, Command.SCARD_SET_ATTRIB)
        )
        attr_id = rng.choice((*ATTRIBUTES, rng.randrange(1 << 32)))
        length = rng.choice((MAX_BUFFER_SIZE, 33, 0, rng.randint(0, MAX_BUFFER_SIZE)))
        value = rng.randbytes(length) if command == Command.SCARD_SET_ATTRIB else b""
        body = AttribBody(handle.h_card, attr_id, value, length, 0)

        async def check(wire: Wire) -> None:
            reply = await self.reply(AttribBody)
            self.rv_known(reply.rv, command.name)
            self.echoed(command.name, (handle.h_card, attr_id), (reply.h_card, reply.attr_id))
            if command == Command.SCARD_GET_ATTRIB and reply.rv == 0 and reply.attr_length > length:
                raise WrongAnswer(f"get_attrib: {reply.attr_length} bytes > buffer {length}")

        return Op(command.name.lower(), encode_request(command, body), check)

    def begin_op(self, handle: Handle) -> Op:
        async def check(wire: Wire) -> None:
            reply = await self.reply(CardBody, BLOCKING_TIMEOUT)
            self.rv_known(reply.rv, "begin")
            self.echoed("begin", handle.h_card, reply.h_card)
            if reply.rv == 0:
                handle.in_transaction = True

        return Op(
            "begin",
            encode_request(Command.SCARD_BEGIN_TRANSACTION, CardBody(handle.h_card, 0)),
            check,
        )

    def disposition_op(self, handle: Handle) -> Op:
        rng = self.rng
        command = rng.choice((Command.SCARD_END_TRANSACTION, Command.SCARD_DISCONNECT))
        disposition = rng.choice((0, 0, 0, 1, 2, 3, rng.randrange(1 << 32)))

        async def check(wire: Wire) -> None:
            reply = await self.reply(DispositionBody)
            self.rv_known(reply.rv, command.name)
            self.echoed(command.name, handle.h_card, reply.h_card)
            if command == Command.SCARD_END_TRANSACTION:
                if reply.rv == 0:
                    handle.in_transaction = False
            else:
                # The handle is gone once the guest answered (the host's disconnect may fail).
                self.handles.pop(handle.h_card, None)
                self.shared.cards.discard(handle.h_card)
                self.shared.gone_cards.append(handle.h_card)

        body = DispositionBody(handle.h_card, disposition, 0)
        return Op(command.name.lower(), encode_request(command, body), check)

    def reconnect_op(self, handle: Handle) -> Op:
        rng = self.rng
        body = ReconnectBody(
            handle.h_card,
            rng.choice((2, 2, 1, 3, rng.randrange(8))),
            random_protocols(rng),
            rng.choice((0, 1, 2, 3, rng.randrange(1 << 32))),
            0,
            0,
        )

        async def check(wire: Wire) -> None:
            reply = await self.reply(ReconnectBody)
            self.rv_known(reply.rv, "reconnect")
            self.echoed("reconnect", handle.h_card, reply.h_card)

        return Op("reconnect", encode_request(Command.SCARD_RECONNECT, body), check)

    def table_op(self) -> Op:
        size = LEGACY_TABLE_SLOTS * entry_size(self.name_size)

        async def check(wire: Wire) -> None:
            await wire.read(size)

        return Op("readers_state", encode_request(Command.CMD_GET_READERS_STATE, Empty()), check)

    def events_op(self) -> Op:
        async def check(wire: Wire) -> None:
            reply = await self.reply(ReaderEventsBody)
            if reply.rv != 0 or not 1 <= reply.reader_events <= 32767:
                raise WrongAnswer(f"reader events: {reply}")

        return Op("reader_events", encode_request(Command.CMD_GET_READER_EVENTS, Empty()), check)

    def cancel_op(self, h_context: int) -> Op:
        async def check(wire: Wire) -> None:
            reply = await self.reply(CancelBody)
            self.echoed("cancel", h_context, reply.h_context)
            if reply.rv not in (0, ReturnCode.SCARD_E_INVALID_HANDLE):
                raise WrongAnswer(f"cancel: 0x{reply.rv:08X}")

        return Op("cancel", encode_request(Command.SCARD_CANCEL, CancelBody(h_context, 0)), check)

    def own_cancel_op(self, h_context: int) -> Op:
        """SCardCancel of this connection's own wait: its answer and the event signal (the
        cancel's, or one that came first), in either order (a 4.6 signal held during the table
        read is written after the answer)."""

        async def check(wire: Wire) -> None:
            first, second = (unpack_body(CancelBody, part) for part in _halves(await wire.read(16)))
            answer, signal = (first, second) if first.h_context == h_context else (second, first)
            self.echoed("cancel", h_context, answer.h_context)
            if signal.h_context != 0 or answer.rv not in (0, ReturnCode.SCARD_E_INVALID_HANDLE):
                raise WrongAnswer(f"cancel of own wait: {first}, {second}")
            self.rv_known(signal.rv, "wait")

        return Op("cancel", encode_request(Command.SCARD_CANCEL, CancelBody(h_context, 0)), check)

    async def wait_block(self) -> None:
        """Register for events, maybe read the 4.6 table or cancel, then STOP: exactly one 8-byte
        message is owed after the WAIT (the signal, or the STOP's answer), read at the end."""
        dialect = dialects.DIALECTS.get(self.version) if self.version else None
        with_body = dialect.wait_has_body if dialect else self.rng.random() < 0.5
        wait_body: NamedTuple = WaitBody(self.rng.randrange(1 << 32), 0) if with_body else Empty()
        table_reply = not with_body and (dialect is None or dialect.wait_returns_array)
        size = LEGACY_TABLE_SLOTS * entry_size(self.name_size)

        async def read_table(wire: Wire) -> None:
            if table_reply:
                await wire.read(size)

        await self.send_ops(
            [
                Op(
                    "wait",
                    encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, wait_body),
                    read_table,
                )
            ]
        )
        owed = 8
        if dialect is not None and dialect.has_variable_array and self.rng.random() < 0.8:
            count = [0]

            async def read_size(wire: Wire) -> None:
                (count[0],) = struct.unpack("=i", await wire.read(4))
                if not 0 <= count[0] <= 1024:
                    raise WrongAnswer(f"table size {count[0]}")

            async def read_array(wire: Wire) -> None:
                await wire.read(count[0] * entry_size())

            await self.send_ops(
                [
                    Op(
                        "table_size",
                        encode_request(Command.CMD_GET_READERS_STATE_SIZE, Empty()),
                        read_size,
                    )
                ]
            )
            await self.send_ops(
                [
                    Op(
                        "table_array",
                        encode_request(Command.CMD_GET_READERS_STATE_ARRAY, Empty()),
                        read_array,
                    )
                ]
            )
        if self.h_context is not None and self.rng.random() < 0.2:
            await self.send_ops([self.own_cancel_op(self.h_context)])
            owed = 0  # the cancel's answer and the signal came together
        elif self.rng.random() < 0.3:
            await trio.sleep(self.rng.random() * 0.05)
        stop = encode_request(Command.CMD_STOP_WAITING_READER_STATE_CHANGE, wait_body)

        async def read_owed(wire: Wire) -> None:
            if owed:
                self.rv_known(WaitBody(*struct.unpack("=II", await wire.read(owed))).rv, "wait")

        await self.send_ops([Op("stop", stop, read_owed)])

    # --- one step -----------------------------------------------------------------------------
    async def step(self) -> None:
        rng = self.rng
        handles = self.holding or list(self.handles.values())
        roll = rng.random()
        if self.holding and 0.55 <= roll < 0.75:
            roll = 0.75 + rng.random() * 0.25  # no CONNECT while holding a transaction
        if self.h_context is None:
            ops = [self.establish_op() if roll < 0.7 else self.table_op()]
        elif handles and roll < 0.55:
            if rng.random() < 0.15:  # pipelined: several requests in one write
                count = rng.randint(2, 4)
                ops = [self.card_op(rng.choice(handles), pipelined=True) for _ in range(count)]
            else:
                ops = [self.card_op(rng.choice(handles))]
        elif roll < 0.75:
            ops = [self.connect_op()]
        elif roll < 0.82:
            await self.wait_block()
            return
        elif roll < 0.87:
            ops = [self.table_op()]
        elif roll < 0.9 and self.version in ((4, 5), (4, 6)):
            ops = [self.events_op()]
        elif roll < 0.94:
            targets = [*self.shared.contexts, rng.randrange(1 << 31)]
            ops = [self.cancel_op(rng.choice(targets))]
        elif roll < 0.97:
            ops = [self.release_op()]
        else:
            ops = [self.establish_op()]
        await self.send_ops(ops)

    # --- endings ------------------------------------------------------------------------------
    def any_request(self) -> bytes:
        """A request of any command with random fields: the raw material of mutations."""
        rng = self.rng
        command = rng.choice(list(Command))
        # WAIT and STOP in their 8-byte form: the other one is empty.
        layout_type = WaitBody if command in _WAITS else BODY_OF_COMMAND.get(command, Empty)
        handles = [*self.handles, *list(self.shared.cards)[:50], rng.randrange(1 << 31)]
        fields: list[Any] = []
        for value in _zero_fields(layout_type):
            if isinstance(value, bytes):
                fields.append(rng.randbytes(len(value)) if rng.random() < 0.3 else value)
            else:
                fields.append(rng.choice((0, 1, 2, 3, rng.choice(handles), rng.randrange(1 << 31))))
        body = layout_type(*fields)
        if layout_type in (TransmitBody, ControlBody):
            # An APDU of 00s; never 1 byte (see random_apdu).
            body = body._replace(send_length=rng.choice((0, 5, 13, 300)))
        if layout_type is AttribBody:
            body = body._replace(attr_length=rng.randint(0, MAX_BUFFER_SIZE))
        trailer = bytes(getattr(body, "send_length", 0))
        return struct.pack("=II", len(pack_body(body)), command) + pack_body(body) + trailer

    async def ending(self) -> tuple[str, Callable[[], Awaitable[None]] | None]:
        """How the connection ends: its kind (counted as one case) and, for a misused handle,
        the wait for the guest to hang up (2 s), for the caller to run on its own."""
        rng = self.rng
        roll = rng.random()
        follow_up = None
        if roll >= 0.38:
            await self.end_transactions()
        if roll < 0.24:
            kind = "close"
        elif roll < 0.38:
            kind = "release"
            if self.h_context is not None:
                await self.send_ops([self.release_op()])
        elif roll < 0.66:
            kind = "mutated"
            await self.hostile(self.mutated())
        elif roll < 0.72:
            kind = "truncated"
            data = self.any_request()
            await self.hostile(data[: rng.randrange(len(data))])
        elif roll < 0.76:
            kind = "garbage"
            await self.hostile(rng.randbytes(rng.randint(1, 2000)))
        elif roll < 0.9:
            kind = "wrong_handle"
            follow_up = await self.misuse()
        else:
            kind = "flood"
            await self.flood()
        self.forget_all()
        if kind not in ("release", "flood"):
            self.kinds[kind] += 1
        return kind, follow_up

    async def end_transactions(self) -> None:
        """Before a hostile ending: a bad message may still be a call pcscd holds behind
        another transaction, and a connection holding one must never wait (see card_op)."""
        for handle in self.holding:
            body = DispositionBody(handle.h_card, 0, 0)
            data = encode_request(Command.SCARD_END_TRANSACTION, body)

            async def check(wire: Wire, handle: Handle = handle) -> None:
                reply = await self.reply(DispositionBody)
                self.rv_known(reply.rv, "end")
                handle.in_transaction = False  # whatever the answer: no longer ours to wait on

            await self.send_ops([Op("end_transaction", data, check)])

    def mutated(self) -> bytes:
        """A mutated request, never one whose APDU is 1 byte long (see random_apdu)."""
        for _ in range(10):
            data = mutate(self.rng, self.any_request())
            if not _has_one_byte_apdu(data, self.version):
                return data
        return self.any_request()

    async def hostile(self, data: bytes) -> None:
        """Send bad bytes; read whatever comes for a moment, or go at once."""
        try:
            for piece in fragments(self.rng, data):
                await self.wire.send(piece)
            if self.rng.random() < 0.3:
                await self.wire.drain(self.rng.random() * 0.05)
        except Closed:
            pass

    async def misuse(self) -> Callable[[], Awaitable[None]] | None:
        """A card command naming a handle this connection does not own: pcscd (and the guest)
        waits 2 s and hangs up, without an answer. Returns that wait."""
        rng = self.rng
        candidates = [h for h in self.shared.cards if h not in self.handles]
        pick = rng.random()
        if candidates and pick < 0.5:
            h_card = rng.choice(candidates)
        elif self.shared.gone_cards and pick < 0.75:
            h_card = rng.choice(self.shared.gone_cards)
        else:
            h_card = rng.randrange(1, 1 << 31)
        if h_card in self.handles:
            return None
        command = rng.choice(
            (
                Command.SCARD_TRANSMIT,
                Command.SCARD_STATUS,
                Command.SCARD_BEGIN_TRANSACTION,
                Command.SCARD_DISCONNECT,
            )
        )
        if command == Command.SCARD_TRANSMIT:
            apdu = echo_apdu(b"misuse")
            body: NamedTuple = TransmitBody(h_card, 2, 16, len(apdu), 3, 16, 65548, 0)
            data = encode_request(command, body, apdu)
        elif command == Command.SCARD_DISCONNECT:
            data = encode_request(command, DispositionBody(h_card, 0, 0))
        else:
            data = encode_request(command, CardBody(h_card, 0))
        try:
            await self.wire.send(data)
        except Closed:
            return None

        async def hung_up() -> None:
            received, closed = await self.wire.drain(15)
            if received:
                raise WrongAnswer(f"{received} bytes answered a foreign card handle {h_card:#x}")
            if not closed:
                raise Hang(f"a foreign card handle {h_card:#x}: not closed within 15 s")

        return hung_up

    async def flood(self) -> None:
        """Requests in one burst, never read; then go, or read a little and go."""
        rng = self.rng
        one = rng.choice(
            [self.table_op().data, encode_request(Command.CMD_VERSION, VersionBody(4, 4, 0))]
        )
        count = rng.choice((10, 50, 200))
        self.kinds["flood"] += count
        try:
            await self.wire.send(one * count)
            if rng.random() < 0.5:
                await self.wire.drain(rng.random() * 0.2)
        except Closed:
            pass


_WAITS = (Command.CMD_WAIT_READER_STATE_CHANGE, Command.CMD_STOP_WAITING_READER_STATE_CHANGE)


def random_protocols(rng: random.Random) -> int:
    """Preferred protocols, T=1 or T=0 mostly, odd bits sometimes; never RAW alone: a card left
    in RAW by one client refuses T=0/T=1 to the next until it is powered down."""
    return rng.choice((3, 3, 2, 1, 0, 0x10003, (rng.randrange(1 << 32) | 2) & ~4))


def _has_one_byte_apdu(data: bytes, version: tuple[int, int] | None) -> bool:
    conn = ServerConnection()
    if version is not None:
        conn.negotiate(VersionBody(*version, 0))
    conn.receive_data(data)
    try:
        while (request := conn.next_request()) is not None:
            if request.command == Command.SCARD_TRANSMIT and len(request.data) == 1:
                return True
    except ProtocolViolation:
        pass
    return False


def _halves(data: bytes) -> tuple[bytes, bytes]:
    middle = len(data) // 2
    return data[:middle], data[middle:]


def _zero_fields(body_type: type) -> list[Any]:
    """A body's fields as zeroes (bytes fields as zero bytes of their size)."""
    layout = LAYOUTS[body_type]
    return list(unpack_body(body_type, bytes(layout.size)))
