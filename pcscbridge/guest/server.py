"""The guest server: pcscd's socket for local clients, and the link the host attaches to."""

from __future__ import annotations

import itertools
import logging

import trio

from .hostlink import LINK_KEEPALIVE, HostLink
from .mirror import ReaderMirror
from .registry import HandleRegistry
from .session import ClientSession, Host, SessionOptions

log = logging.getLogger("pcscbridge.guest")


class GuestServer:
    def __init__(
        self,
        options: SessionOptions | None = None,
        *,
        keepalive: float | None = LINK_KEEPALIVE,
        mirror: ReaderMirror | None = None,
        card_host: Host | None = None,
    ) -> None:
        self.options = options or SessionOptions()
        self.mirror = mirror or ReaderMirror()
        self.registry: HandleRegistry[ClientSession] = HandleRegistry()
        self.host = HostLink(self.mirror, keepalive=keepalive)
        # Where the sessions' card calls go: the attached link's host, or a host in this
        # process (`pcscbridge serve`, which feeds `mirror` itself).
        self.card_host: Host = card_host or self.host
        self._client_numbers = itertools.count(1)

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
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                session = ClientSession(
                    stream,
                    f"#{next(self._client_numbers)}",
                    mirror=self.mirror,
                    registry=self.registry,
                    host=self.card_host,
                    options=self.options,
                )
                nursery.start_soon(session.run)

    async def serve_links(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self.host.attach, stream)
