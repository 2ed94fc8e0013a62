"""A guest server and a host agent in one process, joined by a socket pair.

The demo, the fast tests and the benchmarks use it; it is the same code the two commands run,
with the link carried by a local socket pair instead of SSH or TCP.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from ..guest.server import GuestServer
from ..host.agent import HostAgent
from ..host.backend import Backend
from ..host.policy import Policy
from ..transports.endpoints import unix_listener


@dataclass
class InProcessBridge:
    server: GuestServer
    socket_path: str
    nursery: trio.Nursery
    backend: Backend | None
    policy: Policy | None = None

    async def attach_host(self) -> trio.CancelScope:
        """Attach a host agent over a fresh socket pair; cancel the scope to cut the link."""
        assert self.backend is not None, "a host needs a backend"
        guest_sock, host_sock = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        scope = trio.CancelScope()
        agent = HostAgent(self.backend, self.policy, guest="in-process guest")

        async def run_agent() -> None:
            with scope:
                await agent.serve(trio.SocketStream(host_sock))

        self.nursery.start_soon(self.server.attach_host, trio.SocketStream(guest_sock))
        self.nursery.start_soon(run_agent)
        await self.server.readers_pushed.wait()
        return scope


@asynccontextmanager
async def inprocess_bridge(
    backend: Backend | None,
    socket_path: str,
    *,
    policy: Policy | None = None,
    attach: bool = True,
    handle_misuse_delay: float = 2.0,
) -> AsyncIterator[InProcessBridge]:
    server = GuestServer(handle_misuse_delay=handle_misuse_delay)
    listener = await unix_listener(socket_path, 0o666)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_clients, listener)
        bridge = InProcessBridge(server, socket_path, nursery, backend, policy)
        if attach:
            await bridge.attach_host()
        yield bridge
        nursery.cancel_scope.cancel()
