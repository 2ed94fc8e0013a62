"""The guest server: pcscd's socket for local clients, and the link the host attaches to."""

from __future__ import annotations

import itertools
import logging

import trio

from ..link.endpoint import LinkLimits
from ..stats import CallStats
from ..transports.accepting import Acceptor
from .access import ClientGate, refuse
from .hostlink import LINK_KEEPALIVE, HostLink
from .mirror import ReaderMirror
from .registry import HandleRegistry
from .session import ClientSession, Host, SessionOptions

log = logging.getLogger("pcscbridge.guest")

MAX_CLIENTS = 200  # pcscd's default --max-thread: connections it serves at once


class GuestServer:
    def __init__(
        self,
        options: SessionOptions | None = None,
        *,
        keepalive: float | None = LINK_KEEPALIVE,
        max_clients: int = MAX_CLIENTS,
        link_limits: LinkLimits | None = None,
        mirror: ReaderMirror | None = None,
        card_host: Host | None = None,
        gate: ClientGate | None = None,
    ) -> None:
        self.options = options or SessionOptions()
        self.gate = gate or ClientGate()
        self.mirror = mirror or ReaderMirror()
        self.registry: HandleRegistry[ClientSession] = HandleRegistry()
        self.host = HostLink(self.mirror, keepalive=keepalive, limits=link_limits)
        # Where the sessions' card calls go: the attached link's host, or a host in this
        # process (`pcscbridge serve`, which feeds `mirror` itself).
        self.card_host: Host = card_host or self.host
        self.clients = Acceptor(
            self._serve_client, what="pcsc-lite clients", log=log, max_connections=max_clients
        )
        self.links = Acceptor(self.host.attach, what="host links", log=log)
        self.calls = CallStats()
        self._client_numbers = itertools.count(1)

    def statistics(self) -> dict[str, object]:
        """A snapshot of what the server holds and has done (for `pcscbridge status`)."""
        return {
            "clients": vars(self.clients.statistics()),
            "contexts": self.registry.context_count,
            "card_handles": self.registry.card_count,
            "waiting_for_events": self.mirror.waiter_count,
            "readers": len(self.mirror.reader_names),
            "host_link": {**self.host.statistics(), "accepted": vars(self.links.statistics())},
            "calls": self.calls.snapshot(),
        }

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
                nursery.start_soon(self.host.attach, link_stream)

    async def serve_clients(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        await self.clients.serve(listener)

    async def serve_links(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        await self.links.serve(listener)

    async def _serve_client(self, stream: trio.abc.Stream) -> None:
        name = f"#{next(self._client_numbers)}"
        if not self.gate.admits(stream, name):
            await refuse(stream)  # as pcscd when polkit refuses
            return
        session = ClientSession(
            stream,
            name,
            mirror=self.mirror,
            registry=self.registry,
            host=self.card_host,
            options=self.options,
            stats=self.calls,
        )
        await session.run()
