"""A link endpoint on a trio Stream: hello, concurrent requests, responses, pushes.

Generic: it matches responses to requests and serves requests with a handler, but gives no
meaning to return codes; the guest's host link and the host agent do.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .. import __version__
from ..errors import BridgeError, ConnectionLost
from ..pcsc import ReturnCode
from ..transports.direct import DirectReader
from ..transports.ending import connection_ends_logged
from ..transports.outbox import Outbox
from .calls import Call, Ping
from .protocol import (
    DEFAULT_MAX_MESSAGE,
    LINK_PROTOCOL,
    Hello,
    LinkConnection,
    LinkProtocolError,
    Message,
    Push,
    Request,
    Response,
    encode,
)

log = logging.getLogger("pcscbridge.link")

HELLO_TIMEOUT = 10.0
RECEIVE_SIZE = 65536
MAX_IN_FLIGHT = 256  # requests served at once; beyond, the peer's next ones wait unread
UNREAD_LIMIT = 4 << 20  # bytes the peer may leave unread before the link is closed
WRITE_TIMEOUT = 30.0  # seconds one write may wait for the peer to read
RequestHandler = Callable[[Request], Awaitable[Response]]
PushHandler = Callable[[Push], Awaitable[None]]  # must not block: it runs in the receive loop
HelloHandler = Callable[[Hello], None]  # runs before any later message is looked at


class LinkClosed(ConnectionLost):
    """The link went away while a call was waiting for its response."""


class MessageTooLarge(BridgeError):
    """A request larger than the peer accepts (its hello's max_message_size); never sent."""


@dataclass(frozen=True)
class LinkLimits:
    in_flight: int = MAX_IN_FLIGHT
    unread: int = UNREAD_LIMIT
    write_timeout: float = WRITE_TIMEOUT


class _Pending:
    """One request waiting for its response."""

    __slots__ = ("done", "response")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: Response | None = None


class LinkEndpoint:
    """One side of a link. `run()` owns the receive loop and the tasks serving requests."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: str,
        *,
        on_request: RequestHandler | None = None,
        on_push: PushHandler | None = None,
        on_hello: HelloHandler | None = None,
        peer_name: str = "peer",
        keepalive: float | None = None,
        ping_any_peer: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
        limits: LinkLimits | None = None,
    ) -> None:
        self.stream = stream
        self.role = role
        self.peer_name = peer_name
        self.peer_hello: Hello | None = None
        self._on_request = on_request
        self._on_push = on_push
        self._on_hello = on_hello
        self._max_message_size = max_message_size
        self._connection = LinkConnection(max_message_size)
        self.limits = limits or LinkLimits()
        self._outbox = Outbox(stream, self.limits.unread, self.limits.write_timeout)
        self._reader = DirectReader(stream)
        self._in_flight = trio.Semaphore(self.limits.in_flight)
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Pending] = {}
        self._closed = False
        self._settled = trio.Event()  # hello exchanged, or the link ended before that
        # Seconds between pings; a peer that does not answer within twice that is gone. A
        # transport can stay open long after the peer went silent (an SSH session whose client
        # vanished), and only a question asked over the link itself tells.
        self._keepalive = keepalive
        # Ping a peer whose hello does not say it answers pings (hosts always did).
        self._ping_any_peer = ping_any_peer

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> dict[str, object]:
        return {
            "peer": self.peer_name,
            "established": self.peer_hello is not None and not self._closed,
            "awaiting_responses": len(self._waiting),
            "serving_requests": self.limits.in_flight - self._in_flight.value,
            "unread_bytes": self._outbox.queued_size,
            "sent_bytes": self._outbox.sent_bytes,
        }

    async def wait_established(self) -> bool:
        """Wait until the hellos are exchanged (True) or the link ended before that (False)."""
        await self._settled.wait()
        return self.peer_hello is not None and not self._closed

    async def run(self) -> None:
        """Exchange hellos, then serve until the stream ends. Raises nothing for a lost link."""
        what = f"link with {self.peer_name}"
        try:
            with connection_ends_logged(log, what, lost_level=logging.INFO, closing="closing it"):
                await self._run()
        finally:
            self._closed = True
            self._settled.set()
            for pending in self._waiting.values():
                pending.done.set()  # no response: the caller raises LinkClosed
            self._waiting.clear()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            log.info("link with %s closed", self.peer_name)

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._outbox.run)
            await self.send(
                Hello(
                    self.role,
                    software=f"pcscbridge {__version__}",
                    max_message_size=self._max_message_size,
                    answers_pings=self._on_request is not None,
                )
            )
            with trio.move_on_after(HELLO_TIMEOUT) as waited:
                message = await self._receive_message()
            if waited.cancelled_caught:
                raise LinkProtocolError(f"no hello within {HELLO_TIMEOUT:.0f} s")
            hello = self._accept_hello(message)
            if self._keepalive and (self._ping_any_peer or hello.answers_pings):
                nursery.start_soon(self._ping_forever, self._keepalive)
            while (message := await self._receive_message()) is not None:
                if isinstance(message, Push) and self._on_push is not None:
                    # In the receive loop, not a task of its own: pushes are state, and a
                    # later one must never be applied before an earlier one.
                    await self._on_push(message)
                else:
                    await self._dispatch(message, nursery)
            nursery.cancel_scope.cancel()

    def _accept_hello(self, hello: Message | None) -> Hello:
        if hello is None:
            raise LinkProtocolError("the peer closed the link before its hello (a tls: peer?)")
        if not isinstance(hello, Hello) or hello.protocol != LINK_PROTOCOL:
            raise LinkProtocolError(
                f"expected a link protocol {LINK_PROTOCOL} hello, got {hello!r}"
            )
        if hello.role == self.role:
            raise LinkProtocolError(f"peer has the same role {hello.role!r}")
        if hello.max_message_size < 1024:
            raise LinkProtocolError(f"peer accepts messages of {hello.max_message_size} bytes")
        self.peer_hello = hello
        log.info("link up with %s (%s)", self.peer_name, hello.software or hello.role)
        if self._on_hello is not None:
            self._on_hello(hello)
        self._settled.set()
        return hello

    async def _ping_forever(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(2 * interval) as waited:
                try:
                    await self.call(Ping())  # any answer is a sign of life, even an error
                except LinkClosed:
                    return
            if waited.cancelled_caught:
                log.warning(
                    "link with %s: no answer to a ping within %.1f s; closing it",
                    self.peer_name,
                    2 * interval,
                )
                await self.stream.aclose()
                return

    async def _receive_message(self) -> Message | None:
        while (message := self._connection.next_message()) is None:
            data = await self._reader.receive_some(RECEIVE_SIZE)
            if not data:
                return None
            self._connection.receive_data(data)
        return message

    async def _dispatch(self, message: Message, nursery: trio.Nursery) -> None:
        match message:
            case Response():
                pending = self._waiting.pop(message.id, None)
                if pending is None:
                    log.debug("response to an abandoned request %d", message.id)
                    return
                pending.response = message
                pending.done.set()
            case Request() if self._on_request is not None:
                try:
                    self._in_flight.acquire_nowait()
                except trio.WouldBlock:
                    await self._in_flight.acquire()  # a flooding peer waits, unread
                nursery.start_soon(self._serve_request, message)
            case _:
                kind = type(message).__name__
                raise LinkProtocolError(f"unexpected {kind} from {self.peer_name}")

    async def _serve_request(self, request: Request) -> None:
        assert self._on_request is not None
        try:
            try:
                response = await self._on_request(request)
            except Exception:
                log.exception("serving %r from %s failed", request.call, self.peer_name)
                response = Response(request.id, ReturnCode.SCARD_F_INTERNAL_ERROR)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.send(response)
        finally:
            self._in_flight.release()

    async def send(self, message: Message) -> None:
        frame = encode(message)  # the whole message leaves in one send
        limit = self.peer_hello.max_message_size if self.peer_hello else DEFAULT_MAX_MESSAGE
        if len(frame) - 4 > limit:
            if isinstance(message, Response):
                log.warning("a response of %d bytes exceeds %s's limit", len(frame), self.peer_name)
                frame = encode(Response(message.id, ReturnCode.SCARD_E_INSUFFICIENT_BUFFER))
            else:
                raise MessageTooLarge(f"a message of {len(frame)} bytes exceeds the peer's {limit}")
        await self._outbox.send(frame)

    async def post(self, call: Call) -> None:
        """Send a request and do not wait for its response (it is dropped when it comes):
        for a call whose outcome changes nothing for the caller (a context's release)."""
        if self._closed:
            raise LinkClosed("link is closed")
        try:
            await self.send(Request(next(self._ids), call))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise LinkClosed(str(exc)) from None

    async def call(self, call: Call) -> Response:
        """Send a request and wait for its response (any return code); LinkClosed when the
        link ends first, MessageTooLarge when the peer would refuse it."""
        if self._closed:
            raise LinkClosed("link is closed")
        request_id = next(self._ids)
        pending = self._waiting[request_id] = _Pending()
        try:
            try:
                await self.send(Request(request_id, call))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LinkClosed(str(exc)) from None
            await pending.done.wait()
        finally:
            self._waiting.pop(request_id, None)
        if pending.response is None:
            raise LinkClosed("link closed before the response came")
        return pending.response

    async def aclose(self) -> None:
        self._closed = True
        await self.stream.aclose()
