"""The host agent: executes one guest's PC/SC calls with the host's own PC/SC stack.

Every backend call runs in a worker thread. Calls of one guest context are serialised, as a
pcsc-lite client serialises them; different contexts run concurrently, so a call that blocks
(BeginTransaction behind another application, a slow Transmit) blocks only its own context.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..link.endpoint import LinkEndpoint
from ..link.protocol import Push, Request, Response
from ..pcsc import PCSCError, ReturnCode, rv_name
from .backend import Backend, Card, Context
from .policy import AllowAll, Call, Policy
from .watcher import ReaderRow, watch_readers

log = logging.getLogger("pcscbridge.host")

THREADS = 256  # one per concurrently blocked guest call; trio's default of 40 is too few


@dataclass
class GuestContext:
    context: Context | None = None  # established on first use
    lock: trio.Lock = field(default_factory=trio.Lock)
    cards: set[int] = field(default_factory=set)


@dataclass
class GuestCard:
    card: Card
    h_context: int
    reader: str
    in_transaction: bool = False


class BadArguments(Exception):
    pass


class HostAgent:
    """Serves one link. Create one per link; the backend is shared."""

    def __init__(
        self,
        backend: Backend,
        policy: Policy | None = None,
        *,
        guest: str = "guest",
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.backend = backend
        self.policy = policy or AllowAll()
        self.guest = guest
        self.limiter = limiter or trio.CapacityLimiter(THREADS)
        self.contexts: dict[int, GuestContext] = {}
        self.cards: dict[int, GuestCard] = {}
        self._endpoint: LinkEndpoint | None = None
        self._last_readers: list[ReaderRow] | None = None
        self._methods: dict[str, Callable[..., Awaitable[list[Any]]]] = {
            "connect": self._connect,
            "reconnect": self._reconnect,
            "disconnect": self._disconnect,
            "begin_transaction": self._begin_transaction,
            "end_transaction": self._end_transaction,
            "status": self._status,
            "transmit": self._transmit,
            "control": self._control,
            "get_attrib": self._get_attrib,
            "set_attrib": self._set_attrib,
            "release_context": self._release_context,
            "ping": self._ping,
        }

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve the link until it ends, then release everything the guest held."""
        endpoint = LinkEndpoint(
            stream,
            "host",
            on_request=self._on_request,
            peer_name=self.guest,
            capabilities=("readers",),
        )
        self._endpoint = endpoint
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_when_established, endpoint)
                await endpoint.run()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._release_everything()

    async def _watch_when_established(self, endpoint: LinkEndpoint) -> None:
        if await endpoint.wait_established():
            await watch_readers(self.backend, self._publish, self.limiter)

    async def _publish(self, rows: list[ReaderRow]) -> None:
        rows = [row for row in rows if self.policy.reader_visible(self.guest, row[0])]
        if rows == self._last_readers or self._endpoint is None:
            return
        self._last_readers = rows
        log.debug("readers now: %s", [(row[0], hex(row[2])) for row in rows])
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._endpoint.send(Push("readers", rows))

    # --- request dispatch ------------------------------------------------------------------
    async def _on_request(self, request: Request) -> Response:
        method = self._methods.get(request.method)
        if method is None:
            log.warning("%s asked for unknown method %r", self.guest, request.method)
            return Response(request.id, ReturnCode.SCARD_E_UNSUPPORTED_FEATURE)
        try:
            result = await method(*request.args)
        except PCSCError as exc:
            log.debug("%s %s: %s", self.guest, request.method, rv_name(exc.rv))
            return Response(request.id, exc.rv)
        except (BadArguments, TypeError) as exc:
            log.warning("%s sent a malformed %s: %s", self.guest, request.method, exc)
            return Response(request.id, ReturnCode.SCARD_E_INVALID_PARAMETER)
        return Response(request.id, ReturnCode.SCARD_S_SUCCESS, result)

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args, limiter=self.limiter)

    def _check(self, method: str, reader: str | None, *args: Any) -> None:
        self.policy.check(Call(self.guest, method, reader, args))

    def _card(self, h_card: Any) -> GuestCard:
        card = self.cards.get(_int(h_card))
        if card is None:
            raise PCSCError(ReturnCode.SCARD_E_INVALID_HANDLE)
        return card

    # --- methods ---------------------------------------------------------------------------
    async def _connect(
        self, h_context: Any, h_card: Any, reader: Any, share_mode: Any, protocols: Any
    ) -> list[Any]:
        h_context, h_card = _int(h_context), _int(h_card)
        reader, share_mode, protocols = _str(reader), _int(share_mode), _int(protocols)
        if h_card in self.cards:
            raise BadArguments(f"card handle {h_card} already in use")
        self._check("connect", reader, share_mode, protocols)
        guest_context = self.contexts.setdefault(h_context, GuestContext())
        if any(
            self.cards[c].reader == reader and self.cards[c].in_transaction
            for c in guest_context.cards
        ):
            # pcscd would hold this connect behind the context's own transaction forever, and
            # keep the reader stuck even after the client is gone. Refuse instead.
            raise PCSCError(ReturnCode.SCARD_E_SHARING_VIOLATION, "own transaction is active")
        async with guest_context.lock:
            if guest_context.context is None:
                guest_context.context = await self._run(self.backend.establish_context)
            card, protocol = await self._run(
                self.backend.connect, guest_context.context, reader, share_mode, protocols
            )
            self.cards[h_card] = GuestCard(card, h_context, reader)
            guest_context.cards.add(h_card)
        return [protocol]

    async def _card_call(self, method: str, h_card: Any, *args: Any) -> tuple[GuestCard, Any]:
        card = self._card(h_card)
        self._check(method, card.reader, *args)
        async with self.contexts[card.h_context].lock:
            return card, await self._run(getattr(self.backend, method), card.card, *args)

    async def _reconnect(
        self, h_card: Any, share_mode: Any, protocols: Any, initialization: Any
    ) -> list[Any]:
        _, protocol = await self._card_call(
            "reconnect", h_card, _int(share_mode), _int(protocols), _int(initialization)
        )
        return [protocol]

    async def _disconnect(self, h_card: Any, disposition: Any) -> list[Any]:
        card = self._card(h_card)
        try:
            await self._card_call("disconnect", h_card, _int(disposition))
        finally:
            self._forget(_int(h_card), card)
        return []

    async def _begin_transaction(self, h_card: Any) -> list[Any]:
        card, _ = await self._card_call("begin_transaction", h_card)
        card.in_transaction = True
        return []

    async def _end_transaction(self, h_card: Any, disposition: Any) -> list[Any]:
        card = self._card(h_card)
        try:
            await self._card_call("end_transaction", h_card, _int(disposition))
        finally:
            card.in_transaction = False  # also when it failed: removed card, reset, ...
        return []

    async def _status(self, h_card: Any) -> list[Any]:
        await self._card_call("status", h_card)
        return []

    async def _transmit(self, h_card: Any, protocol: Any, command: Any) -> list[Any]:
        _, response = await self._card_call("transmit", h_card, _int(protocol), _bytes(command))
        return [bytes(response)]

    async def _control(self, h_card: Any, control_code: Any, data: Any) -> list[Any]:
        _, response = await self._card_call("control", h_card, _int(control_code), _bytes(data))
        return [bytes(response)]

    async def _get_attrib(self, h_card: Any, attr_id: Any) -> list[Any]:
        _, value = await self._card_call("get_attrib", h_card, _int(attr_id))
        return [bytes(value)]

    async def _set_attrib(self, h_card: Any, attr_id: Any, value: Any) -> list[Any]:
        await self._card_call("set_attrib", h_card, _int(attr_id), _bytes(value))
        return []

    async def _ping(self) -> list[Any]:
        return []

    async def _release_context(self, h_context: Any) -> list[Any]:
        guest_context = self.contexts.pop(_int(h_context), None)
        if guest_context is not None:
            async with guest_context.lock:
                await self._release(guest_context)
        return []

    # --- cleanup ---------------------------------------------------------------------------
    def _forget(self, h_card: int, card: GuestCard) -> None:
        self.cards.pop(h_card, None)
        guest_context = self.contexts.get(card.h_context)
        if guest_context is not None:
            guest_context.cards.discard(h_card)

    async def _release(self, guest_context: GuestContext) -> None:
        """Releasing the PC/SC context makes the host's stack do what pcscd does for a client
        that goes away: handles are left as they are, but a transaction still held ends with a
        card reset."""
        for h_card in guest_context.cards:
            self.cards.pop(h_card, None)
        guest_context.cards.clear()
        if guest_context.context is not None:
            try:
                await self._run(self.backend.release_context, guest_context.context)
            except PCSCError as exc:
                log.debug("release_context: %s", exc)
            guest_context.context = None

    async def _release_everything(self) -> None:
        contexts, self.contexts = self.contexts, {}
        for guest_context in contexts.values():
            await self._release(guest_context)
        if contexts:
            log.info("%s: released %d contexts", self.guest, len(contexts))


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadArguments(f"expected an integer, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise BadArguments(f"expected a string, got {type(value).__name__}")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise BadArguments(f"expected bytes, got {type(value).__name__}")
    return value
