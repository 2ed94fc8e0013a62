"""A link endpoint on a trio Stream: hello, concurrent requests, responses, pushes."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .. import __version__
from ..exceptions import first_leaf
from ..pcsc import PCSCError, ReturnCode
from .protocol import (
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
RequestHandler = Callable[[Request], Awaitable[Response]]
PushHandler = Callable[[Push], Awaitable[None]]  # must not block: it runs in the receive loop


class LinkClosed(Exception):
    """The link went away while a call was waiting for its response."""


class LinkEndpoint:
    """One side of a link. `run()` owns the receive loop and the tasks serving requests."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: str,
        *,
        on_request: RequestHandler | None = None,
        on_push: PushHandler | None = None,
        capabilities: tuple[str, ...] = (),
        peer_name: str = "peer",
        keepalive: float | None = None,
    ) -> None:
        self.stream = stream
        self.role = role
        self.peer_name = peer_name
        self.peer_hello: Hello | None = None
        self._on_request = on_request
        self._on_push = on_push
        self._capabilities = capabilities
        self._connection = LinkConnection()
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[Response]] = {}
        self._closed = False
        self._settled = trio.Event()  # hello exchanged, or the link ended before that
        # Seconds between pings; a peer that does not answer within twice that is gone. A
        # transport can stay open long after the peer went silent (an SSH session whose client
        # vanished), and only a question asked over the link itself tells.
        self._keepalive = keepalive

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_established(self) -> bool:
        """Wait until the hellos are exchanged (True) or the link ended before that (False)."""
        await self._settled.wait()
        return self.peer_hello is not None and not self._closed

    async def run(self) -> None:
        """Exchange hellos, then serve until the stream ends. Raises nothing for a lost link."""
        try:
            async with trio.open_nursery() as nursery:
                await self.send(
                    Hello(
                        self.role,
                        software=f"pcscbridge {__version__}",
                        capabilities=self._capabilities,
                    )
                )
                with trio.fail_after(HELLO_TIMEOUT):
                    hello = await self._receive_message()
                if not isinstance(hello, Hello) or hello.protocol != LINK_PROTOCOL:
                    raise LinkProtocolError(
                        f"expected a link protocol {LINK_PROTOCOL} hello, got {hello!r}"
                    )
                if hello.role == self.role:
                    raise LinkProtocolError(f"peer has the same role {hello.role!r}")
                self.peer_hello = hello
                log.info("link up with %s (%s)", self.peer_name, hello.software or hello.role)
                self._settled.set()
                if self._keepalive:
                    nursery.start_soon(self._ping_forever, self._keepalive)
                while True:
                    message = await self._receive_message()
                    if message is None:
                        break
                    if isinstance(message, Push) and self._on_push is not None:
                        # In the receive loop, not a task of its own: pushes are state, and a
                        # later one must never be applied before an earlier one.
                        await self._on_push(message)
                    else:
                        self._dispatch(message, nursery)
                nursery.cancel_scope.cancel()
        except* LinkProtocolError as group:
            log.warning("link with %s: %s; closing it", self.peer_name, first_leaf(group))
        except* trio.TooSlowError:
            log.warning(
                "link with %s: no hello within %.0f s; closing it", self.peer_name, HELLO_TIMEOUT
            )
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.info("link with %s lost: %s", self.peer_name, first_leaf(group))
        except* Exception as group:
            log.error(
                "link with %s: internal error; closing it",
                self.peer_name,
                exc_info=first_leaf(group),
            )
        finally:
            self._closed = True
            self._settled.set()
            for channel in self._waiting.values():
                channel.close()
            self._waiting.clear()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            log.info("link with %s closed", self.peer_name)

    async def _ping_forever(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(2 * interval) as waited:
                try:
                    await self.call("ping", [])
                except PCSCError:
                    pass  # any answer is a sign of life, even from a host without "ping"
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
            data = await self.stream.receive_some()
            if not data:
                return None
            self._connection.receive_data(data)
        return message

    def _dispatch(self, message: Message, nursery: trio.Nursery) -> None:
        match message:
            case Response():
                channel = self._waiting.pop(message.id, None)
                if channel is None:
                    log.debug("response to an abandoned request %d", message.id)
                    return
                channel.send_nowait(message)
                channel.close()
            case Request() if self._on_request is not None:
                nursery.start_soon(self._serve_request, message)
            case _:
                kind = type(message).__name__
                raise LinkProtocolError(f"unexpected {kind} from {self.peer_name}")

    async def _serve_request(self, request: Request) -> None:
        assert self._on_request is not None
        try:
            response = await self._on_request(request)
        except Exception:
            log.exception("serving %s from %s failed", request.method, self.peer_name)
            response = Response(request.id, ReturnCode.SCARD_F_INTERNAL_ERROR)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(response)

    async def send(self, message: Message) -> None:
        frame = encode(message)  # the whole message leaves in one send
        async with self._send_lock:
            await self.stream.send_all(frame)

    async def call(self, method: str, args: list[Any]) -> list[Any] | None:
        """Send a request and wait for its response; PCSCError for a non-zero rv."""
        if self._closed:
            raise LinkClosed("link is closed")
        request_id = next(self._ids)
        send_channel, receive_channel = trio.open_memory_channel[Response](1)
        self._waiting[request_id] = send_channel
        try:
            try:
                await self.send(Request(request_id, method, args))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LinkClosed(str(exc)) from None
            try:
                response = await receive_channel.receive()
            except trio.EndOfChannel:
                raise LinkClosed("link closed before the response came") from None
        finally:
            self._waiting.pop(request_id, None)
        if response.rv != ReturnCode.SCARD_S_SUCCESS:
            raise PCSCError(response.rv)
        return response.result

    async def aclose(self) -> None:
        self._closed = True
        await self.stream.aclose()
