"""The guest server: pcscd's socket for local clients, and the link the host attaches to."""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Sequence
from typing import Any

import trio

from ..link.endpoint import LinkClosed, LinkEndpoint
from ..link.protocol import Push
from ..pcsc import PCSCError, ReturnCode
from ..pcsclite.readers import LEGACY_TABLE_SLOTS, ReaderEntry, legacy_view
from .mirror import ReaderMirror
from .session import ClientSession

log = logging.getLogger("pcscbridge.guest")

HANDLE_MISUSE_DELAY = 2.0  # pcscd sleeps this long before closing on a foreign card handle
LINK_KEEPALIVE = 5.0  # seconds between pings to the host; silent for twice that: link dropped


class GuestServer:
    def __init__(
        self,
        *,
        handle_misuse_delay: float = HANDLE_MISUSE_DELAY,
        reader_slots: int = LEGACY_TABLE_SLOTS,
        legacy_readers: Sequence[str] = (),
    ) -> None:
        """`reader_slots`: the table size of clients with a fixed-size table (protocols up to
        4.5, and 0x12 of 4.6): PCSCLITE_MAX_READERS_CONTEXTS of their libpcsclite build.
        `legacy_readers`: fnmatch patterns choosing which readers such clients see when the
        host has more than fit (see readers.legacy_view)."""
        if reader_slots < 1:
            raise ValueError("reader_slots must be at least 1")
        self.mirror = ReaderMirror()
        self.reader_slots = reader_slots
        self.legacy_readers = tuple(legacy_readers)
        self.handle_misuse_delay = handle_misuse_delay
        self.contexts: dict[int, ClientSession] = {}
        self._card_ids: set[int] = set()
        self._contexts_on_link: set[int] = set()
        self.link: LinkEndpoint | None = None
        self.link_generation = 0
        self._client_numbers = itertools.count(1)
        self._link_numbers = itertools.count(1)
        self.readers_pushed = trio.Event()  # the attached host has sent its readers

    def legacy_slots(self) -> list[ReaderEntry | None]:
        """What a client with a fixed-size table sees: `reader_slots` entries at most."""
        return legacy_view(self.mirror.slots, self.reader_slots, self.legacy_readers)

    # --- ids -------------------------------------------------------------------------------
    def register_context(self, session: ClientSession) -> int:
        # Random positive 31-bit ids like pcscd's, unique across all connections so that
        # SCardCancel, which names a context from another socket, finds the right one.
        while True:
            h_context = secrets.randbits(31)
            if h_context and h_context not in self.contexts:
                self.contexts[h_context] = session
                return h_context

    def unregister_context(self, h_context: int) -> None:
        self.contexts.pop(h_context, None)

    def context_used_on_link(self, h_context: int) -> bool:
        return h_context in self._contexts_on_link

    def allocate_card_id(self) -> int:
        while True:
            h_card = secrets.randbits(31)
            if h_card and h_card not in self._card_ids:
                self._card_ids.add(h_card)
                return h_card

    def release_card_id(self, h_card: int) -> None:
        self._card_ids.discard(h_card)

    # --- calls to the host -----------------------------------------------------------------
    async def call(self, method: str, args: list[Any]) -> list[Any]:
        """A PC/SC call executed by the host. No host, or a lost one: the reader is gone."""
        link = self.link
        if link is None:
            raise PCSCError(ReturnCode.SCARD_E_READER_UNAVAILABLE, "no host attached")
        if method == "connect":
            self._contexts_on_link.add(args[0])
        try:
            result = await link.call(method, args)
        except LinkClosed:
            raise PCSCError(ReturnCode.SCARD_E_READER_UNAVAILABLE, "host link lost") from None
        return result or []

    async def call_quietly(self, method: str, args: list[Any]) -> None:
        if method == "release_context":
            self._contexts_on_link.discard(args[0])
        try:
            await self.call(method, args)
        except PCSCError as exc:
            log.debug("%s%r on the host: %s", method, args, exc)

    async def serve(
        self,
        client_listener: trio.abc.Listener[trio.abc.Stream],
        link_listener: trio.abc.Listener[trio.abc.Stream] | None = None,
        link_stream: trio.abc.Stream | None = None,
    ) -> None:
        """Serve local clients, and hosts on a link listener or on one given stream."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.serve_clients, client_listener)
            if link_listener is not None:
                nursery.start_soon(self.serve_links, link_listener)
            if link_stream is not None:
                nursery.start_soon(self.attach_host, link_stream)

    # --- local clients -----------------------------------------------------------------------
    async def serve_clients(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                session = ClientSession(self, stream, f"#{next(self._client_numbers)}")
                nursery.start_soon(session.run)

    # --- host links ------------------------------------------------------------------------
    async def serve_links(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self.attach_host, stream)

    async def attach_host(self, stream: trio.abc.Stream) -> None:
        """Serve one host link until it ends. A newer link replaces an older one."""
        name = f"host link #{next(self._link_numbers)}"
        endpoint = LinkEndpoint(
            stream,
            "guest",
            on_push=self._on_push,
            peer_name=name,
            capabilities=("readers",),
            keepalive=LINK_KEEPALIVE,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint.run)
            if not await endpoint.wait_established():
                return
            previous = self.link
            if previous is not None:
                log.warning("a new host attached (%s); dropping the previous link", name)
                self._link_lost(previous)
                await previous.aclose()
            self.link = endpoint
            self.link_generation += 1
        if self.link is endpoint:
            self._link_lost(endpoint)

    def _link_lost(self, endpoint: LinkEndpoint) -> None:
        if self.link is not endpoint:
            return
        self.link = None
        self.link_generation += 1  # every handle opened on the old link is now stale
        self._contexts_on_link.clear()
        self.readers_pushed = trio.Event()
        self.mirror.clear()
        log.warning("host link lost: readers removed until a host attaches again")

    async def _on_push(self, push: Push) -> None:
        if push.topic != "readers":
            log.debug("ignoring push %r", push.topic)
            return
        try:
            readers = [_reader_entry(item) for item in push.data]
        except (TypeError, ValueError) as exc:
            log.warning("malformed readers push from the host: %s", exc)
            return
        self.mirror.update(readers)
        self.readers_pushed.set()


def _reader_entry(item: Any) -> ReaderEntry:
    name, event_counter, state, sharing, atr, protocol = item
    if not isinstance(name, str) or not isinstance(atr, bytes):
        raise TypeError("reader name must be str and ATR bytes")
    for value in (event_counter, state, sharing, protocol):
        if not isinstance(value, int):
            raise TypeError("reader fields must be integers")
    return ReaderEntry(name, event_counter, state, sharing, atr, protocol)
