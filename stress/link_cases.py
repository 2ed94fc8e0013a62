"""A hostile guest on the host agent's link: valid calls with right, wrong and stolen handles and
checked answers, calls of the wrong shape, floods, and link-ending frames (malformed msgpack,
messages a guest never sends, oversize or truncated frames)."""

from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from pcscbridge.link.calls import (
    CATALOGUE,
    BadResult,
    Call,
    Connect,
    Control,
    Disconnect,
    GetAttrib,
    Ping,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Status,
    Transmit,
)
from pcscbridge.link.protocol import (
    REQUEST,
    Hello,
    LinkConnection,
    LinkProtocolError,
    Push,
    Request,
    Response,
    decode_readers,
    encode,
)

from .mutate import mutate
from .watch import KNOWN_RV, echo_apdu, random_apdu

REPLY_TIMEOUT = 20.0
BLOCKING_TIMEOUT = 120.0
INVALID_RV = {0x80100004, 0x8010001F}  # INVALID_PARAMETER, UNSUPPORTED_FEATURE
_LENGTH = struct.Struct(">I")


class LinkClosedByHost(Exception):
    pass


class Hang(Exception):
    pass


class WrongAnswer(Exception):
    pass


@dataclass
class LinkDriver:
    """The guest's end of one link: requests with ids, responses matched by a reader task."""

    stream: trio.SocketStream
    kinds: Counter[str] = field(default_factory=Counter)
    closed: trio.Event = field(default_factory=trio.Event)
    reading: trio.Event = field(default_factory=trio.Event)  # set: stop reading (a deaf peer)
    sending: trio.Lock = field(default_factory=trio.Lock)  # whole frames, one writer at a time
    _ids: int = 0
    _waiting: dict[int, tuple[trio.Event, list[Response]]] = field(default_factory=dict)

    async def send(self, data: bytes) -> None:
        try:
            async with self.sending:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise LinkClosedByHost(str(exc)) from None

    async def read_loop(self) -> None:
        """Responses to their callers; the host's pushes checked, its pings answered; anything
        else is wrong."""
        connection = LinkConnection()
        try:
            while not self.reading.is_set() and (data := await self.stream.receive_some(65536)):
                connection.receive_data(data)
                while (message := connection.next_message()) is not None:
                    if isinstance(message, Response):
                        waiter = self._waiting.pop(message.id, None)
                        if waiter is not None:
                            waiter[1].append(message)
                            waiter[0].set()
                    elif isinstance(message, Push):
                        decode_readers(message)
                    elif isinstance(message, Request) and isinstance(message.call, Ping):
                        # The host's keepalive (every 5 s): answered as a guest does.
                        await self.send(encode(Response(message.id, 0)))
                    elif not isinstance(message, Hello):
                        raise WrongAnswer(f"the host sent {message!r}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except LinkProtocolError as exc:
            raise WrongAnswer(f"the host sent a bad frame: {exc}") from None
        finally:
            if self.reading.is_set():
                await trio.sleep_forever()  # deaf: the host's hang-up shows as a failed send
            self.closed.set()
            for event, _ in self._waiting.values():
                event.set()

    def new_id(self) -> int:
        self._ids += 1
        return self._ids

    async def request(self, method: str, args: Any, timeout: float = REPLY_TIMEOUT) -> Response:
        """Send any request (well-formed or not at the call level); its response."""
        request_id = self.new_id()
        event, box = self._waiting[request_id] = (trio.Event(), [])
        await self.send(frame([REQUEST, request_id, method, args]))
        with trio.move_on_after(timeout):
            await event.wait()
        if not box:
            self._waiting.pop(request_id, None)
            if self.closed.is_set():
                raise LinkClosedByHost(f"closed before the answer to {method}")
            raise Hang(f"no answer to {method} {_short(args)} within {timeout:.0f} s")
        return box[0]

    async def call(self, call: Call, timeout: float = REPLY_TIMEOUT) -> tuple[int, Any]:
        """A well-formed call: (rv, typed result); WrongAnswer for an unknown rv or a result
        of the wrong shape."""
        self.kinds["structured"] += 1
        response = await self.request(call.method, call.to_args(), timeout)
        if response.rv not in KNOWN_RV:
            raise WrongAnswer(f"{call.method}: unknown return code 0x{response.rv:08X}")
        if response.rv:
            return response.rv, None
        try:
            return 0, call.decode_result(response.result)
        except BadResult as exc:
            raise WrongAnswer(str(exc)) from None


def frame(body: Any) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


@dataclass
class Handles:
    """What the virtual contexts of one link hold (the host maps them per link)."""

    contexts: set[int] = field(default_factory=set)
    cards: dict[int, tuple[int, str]] = field(default_factory=dict)  # h_card: context, reader
    gone: list[int] = field(default_factory=list)


class VirtualContext:
    """One guest context on the link: connects, checked ECHOs, card calls on its own, other
    contexts' and stale handles, calls of the wrong shape. No transactions while the contexts
    run at once: pcscd keeps a reader locked when a transaction's end fails, which calls on
    another context's handles provoke at will, and a connect then waits for ever (see
    tests/test_fuzz_findings.py); transactions are begun alone, at a link's start and end."""

    def __init__(
        self, rng: random.Random, driver: LinkDriver, handles: Handles, readers: list[str]
    ) -> None:
        self.rng = rng
        self.driver = driver
        self.handles = handles
        self.readers = readers
        self.h_context = rng.randrange(1, 1 << 31)
        self.mine: dict[int, str] = {}

    def new_card_number(self) -> int:
        while True:
            h_card = self.rng.randrange(1, 1 << 31)
            if h_card not in self.handles.cards:
                return h_card

    async def connect(self, reader: str) -> int | None:
        rng = self.rng
        h_card = self.new_card_number()
        share = rng.choice((2, 2, 2, 3, rng.randrange(8) | 2))
        protocols = rng.choice((3, 3, 2, 0, 0x10003))
        self.handles.contexts.add(self.h_context)
        rv, _ = await self.driver.call(Connect(self.h_context, h_card, reader, share, protocols))
        if rv == 0:
            self.mine[h_card] = reader
            self.handles.cards[h_card] = (self.h_context, reader)
            return h_card
        return None

    def forget(self, h_card: int) -> None:
        self.mine.pop(h_card, None)
        self.handles.cards.pop(h_card, None)
        self.handles.gone.append(h_card)
        del self.handles.gone[:-200]

    async def echo(self, h_card: int) -> None:
        data = self.rng.randbytes(self.rng.randint(1, 200))
        rv, answer = await self.driver.call(Transmit(h_card, 2, echo_apdu(data)))
        if rv == 0 and answer != data + b"\x90\x00":
            raise WrongAnswer(f"echo of {data.hex()} answered {answer.hex()}")

    def any_card(self) -> int:
        """Mostly its own handles; else another context's, a stale or a random one."""
        rng = self.rng
        pick = rng.random()
        if self.mine and pick < 0.7:
            return rng.choice(list(self.mine))
        if self.handles.cards and pick < 0.85:
            return rng.choice(list(self.handles.cards))
        if self.handles.gone and pick < 0.93:
            return rng.choice(self.handles.gone)
        return rng.randrange(1 << 32)

    def harmless_card_call(self, h_card: int) -> Call:
        """A call pcscd never holds behind another transaction."""
        rng = self.rng
        return rng.choice(
            [
                # Neither RAW (4) nor T=0 (1): a random APDU sent so left the rig's vpcd reader
                # waiting for ever (a malformed T=0 case 3 APDU of 7 bytes, once the card had
                # been negotiated to T=0); other protocol numbers are refused at once.
                lambda: Transmit(h_card, rng.choice((2, 2, 2, 0, 3)), random_apdu(rng)),
                lambda: Status(h_card),
                lambda: Control(h_card, rng.choice((0x42000D48, rng.randrange(1 << 32))), b""),
                lambda: GetAttrib(h_card, rng.choice((0x90303, 0x10100, rng.randrange(1 << 32)))),
                lambda: SetAttrib(h_card, rng.randrange(1 << 32), rng.randbytes(rng.randint(0, 8))),
                # LEAVE or not an initialization: resets of the rig's vpcd reader failed under
                # concurrent calls ("Error resetting card") and left a transmit waiting for ever.
                lambda: Reconnect(h_card, 2, 3, rng.choice((0, 7))),
                lambda: Disconnect(h_card, 0),
            ]
        )()

    async def run(self, steps: int) -> None:
        rng = self.rng
        for _ in range(steps):
            roll = rng.random()
            if roll < 0.2 or not self.mine:
                reader = rng.choice(
                    [*self.readers, *self.readers, "No Such Reader", self.readers[0] + "\0x"]
                )
                await self.connect(reader)
            elif roll < 0.45:
                await self.echo(rng.choice(list(self.mine)))
            elif roll < 0.8:
                h_card = self.any_card()
                call = self.harmless_card_call(h_card)
                await self.driver.call(call)
                if isinstance(call, Disconnect) and h_card in self.handles.cards:
                    owner = self.handles.cards[h_card][0]
                    if owner == self.h_context:
                        self.forget(h_card)
            elif roll < 0.9:
                await self.bad_shape()
            elif roll < 0.95:
                await self.driver.call(Ping())
            else:
                target = rng.choice(
                    [self.h_context, *self.handles.contexts, rng.randrange(1 << 32)]
                )
                await self.driver.call(ReleaseContext(target))
                if target == self.h_context:
                    for h_card in list(self.mine):
                        self.forget(h_card)

    async def bad_shape(self) -> None:
        """A request the host must refuse with a return code, the link staying up."""
        rng = self.rng
        method = rng.choice([*CATALOGUE, "no_such_method", "", "connect\0", "ping "])
        cls = CATALOGUE.get(method)
        count = len(cls._field_types) if cls else rng.randint(0, 4)
        count = count if rng.random() < 0.7 else rng.randint(0, 6)
        weird: list[Any] = [
            -1,
            1 << 32,
            1 << 63,
            True,
            None,
            1.5,
            "x",
            b"\x00",
            [1],
            {"a": 1},
            msgpack.ExtType(5, b"x"),
        ]
        args = [rng.choice(weird) for _ in range(count)]
        self.driver.kinds["bad_shape"] += 1
        response = await self.driver.request(method, args)
        if response.rv == 0 and cls is not None:
            # Only what decodes as a valid call may succeed (e.g. a ping with no args).
            valid = all(
                type(value) is kind and (kind is not int or 0 <= value < 1 << 32)
                for (_, kind), value in zip(cls._field_types, args, strict=False)
            ) and len(args) == len(cls._field_types)
            if not valid:
                raise WrongAnswer(f"{method} {_short(args)} succeeded")
        elif response.rv not in KNOWN_RV:
            raise WrongAnswer(f"bad {method}: unknown return code 0x{response.rv:08X}")


# --- link-ending frames ---------------------------------------------------------------------


def fatal_frame(rng: random.Random) -> tuple[str, bytes]:
    """A frame after which the host must close the link (and release all it holds)."""
    pick = rng.randrange(8)
    if pick == 0:
        return "fatal_msgpack", frame_raw(
            rng.choice((b"\xc1", b"\x92\x01", b"\xdd\xff\xff\xff\xff"))
        )
    if pick == 1:
        return "fatal_shape", frame(
            rng.choice(({"a": 1}, [], [9, 1, 2], "x", 5, [1, "id", "ping", []]))
        )
    if pick == 2:
        return "fatal_push", frame([3, "readers", []])
    if pick == 3:
        return "fatal_hello", encode(Hello("guest"))
    if pick == 4:
        return "fatal_oversize", _LENGTH.pack(rng.choice((1 << 21, 0xFFFFFFFF))) + b"\x00" * 64
    if pick == 5:
        return "fatal_args", frame([REQUEST, 1, "ping", "not a list"])
    if pick == 6:
        good = encode(Request(1, Ping()))
        return "fatal_mutated", _LENGTH.pack(len(good) - 4) + mutate(rng, good[4:])
    return "fatal_garbage", rng.randbytes(rng.randint(8, 300))


def frame_raw(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload
