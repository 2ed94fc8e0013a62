"""The guest server: pcscd's socket for local clients, and the link the host attaches to."""

from __future__ import annotations

import itertools
import logging

import trio

from .access import ClientGate, refuse
from .hostlink import LINK_KEEPALIVE, HostLink
from .mirror import ReaderMirror
from .registry import HandleRegistry
from .session import ClientSession, SessionOptions

log = logging.getLogger("pcscbridge.guest")


class GuestServer:
    def __init__(
        self,
        options: SessionOptions | None = None,
        *,
        keepalive: float | None = LINK_KEEPALIVE,
        gate: ClientGate | None = None,
    ) -> None:
        self.options = options or SessionOptions()
        self.gate = gate or ClientGate()
        self.mirror = ReaderMirror()
        self.registry: HandleRegistry[ClientSession] = HandleRegistry()
        self.host = HostLink(self.mirror, keepalive=keepalive)
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
                name = f"#{next(self._client_numbers)}"
                if not self.gate.admits(stream, name):
                    nursery.start_soon(refuse, stream)  # as pcscd when polkit refuses
                    continue
                session = ClientSession(
                    stream,
                    name,
                    mirror=self.mirror,
                    registry=self.registry,
                    host=self.host,
                    options=self.options,
                )
                nursery.start_soon(session.run)

    async def serve_links(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self.host.attach, stream)
