"""A guest server and a host agent in one process, joined by a socket pair.

The demo, the fast tests and the benchmarks use it; it is the same code the two commands run,
with the link carried by a local socket pair instead of SSH or TCP.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio

from ..guest.server import GuestServer
from ..guest.session import SessionOptions
from ..host.agent import HostAgent
from ..host.backend import Backend
from ..host.checkpoint import CheckedService, Checkpoint
from ..host.service import Service, open_host_service
from ..transports.endpoints import unix_listener


@dataclass
class InProcessBridge:
    server: GuestServer
    socket_path: str
    nursery: trio.Nursery
    service: Service | None

    async def attach_host(self, guest: str = "in-process guest") -> trio.CancelScope:
        """Attach a host agent over a fresh socket pair; cancel the scope to cut the link."""
        assert self.service is not None, "a host needs a backend"
        guest_sock, host_sock = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        scope = trio.CancelScope()
        agent = HostAgent(self.service, guest=guest)

        async def run_agent() -> None:
            with scope:
                await agent.serve(trio.SocketStream(host_sock))

        self.nursery.start_soon(self.server.host.attach, trio.SocketStream(guest_sock))
        self.nursery.start_soon(run_agent)
        await self.server.host.readers_pushed.wait()
        return scope


@asynccontextmanager
async def inprocess_bridge(
    backend: Backend | None,
    socket_path: str,
    *,
    checkpoint: Checkpoint | None = None,
    attach: bool = True,
    options: SessionOptions | None = None,
    handle_misuse_delay: float = 2.0,
) -> AsyncIterator[InProcessBridge]:
    """The bridge on `socket_path`, with a host over `backend` attached (unless `attach` is
    False, or there is no backend); every call passes `checkpoint` when one is given."""
    options = replace(options or SessionOptions(), handle_misuse_delay=handle_misuse_delay)
    server = GuestServer(options)
    listener = await unix_listener(socket_path, 0o666)
    async with contextlib.AsyncExitStack() as stack:
        service: Service | None = None
        if backend is not None:
            core = await stack.enter_async_context(open_host_service(backend))
            service = core if checkpoint is None else CheckedService(core, checkpoint)
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(server.serve_clients, listener)
        bridge = InProcessBridge(server, socket_path, nursery, service)
        if attach and backend is not None:
            await bridge.attach_host()
        yield bridge
        nursery.cancel_scope.cancel()
