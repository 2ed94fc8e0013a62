"""A guest's end of a link, driven by a test: send any call, read the host's reader pushes.

    async with open_link_peer(stream) as peer:   # stream: connected to a host agent
        response = await peer.call(Connect(1, 2, "Reader", ShareMode.SHARED, Protocol.T1))

It speaks only the link protocol, so a test can act as a careless or hostile guest: calls the
guest server never makes, handles of its own choosing, names with bytes after a NUL.
`attached_to_host` runs the host side in the same process: a host agent over a backend,
through a checkpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from ..host.agent import HostAgent
from ..host.backend import Backend
from ..host.checkpoint import CheckedService, Checkpoint
from ..host.service import Service, open_host_service
from ..link.calls import Call
from ..link.endpoint import LinkEndpoint
from ..link.protocol import Push, Response, decode_readers


class LinkPeer:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.endpoint = LinkEndpoint(stream, "guest", on_push=self._on_push, peer_name="host")
        self.tables: list[list[str]] = []  # the reader names of every readers push, in order

    async def _on_push(self, push: Push) -> None:
        self.tables.append([entry.name for entry in decode_readers(push)])

    async def call(self, call: Call) -> Response:
        """The host's response, whatever its return code."""
        return await self.endpoint.call(call)

    async def ok(self, call: Call) -> Any:
        """The call's typed result; AssertionError when the host refused it."""
        response = await self.call(call)
        assert response.rv == 0, f"{call!r} failed with 0x{response.rv:08X}"
        return call.decode_result(response.result)

    async def table(
        self, condition: Callable[[list[str]], bool] | None = None, timeout: float = 10
    ) -> list[str]:
        """The newest reader table (after the first push, or the first one meeting
        `condition`)."""
        with trio.fail_after(timeout):
            while not self.tables or (condition is not None and not condition(self.tables[-1])):
                await trio.sleep(0.005)
        return self.tables[-1]


@asynccontextmanager
async def open_link_peer(stream: trio.abc.Stream) -> AsyncIterator[LinkPeer]:
    """A link peer on `stream`, hellos exchanged; the link is closed when the block ends."""
    peer = LinkPeer(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.endpoint.run)
        if not await peer.endpoint.wait_established():
            raise ConnectionError("the host did not complete the link's hello")
        yield peer
        await peer.endpoint.aclose()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def attached_to_host(
    backend: Backend, *checkpoints: Checkpoint, guest: str = "guest"
) -> AsyncIterator[LinkPeer]:
    """A link peer attached to a host agent serving `backend` to a guest named `guest`, through
    `checkpoints` (the first innermost). When the block ends, the link closes and the service
    stops (its queued releases done)."""
    guest_side, host_side = trio.testing.memory_stream_pair()
    async with open_host_service(backend) as core, trio.open_nursery() as nursery:
        service: Service = core
        for checkpoint in checkpoints:
            service = CheckedService(service, checkpoint)
        nursery.start_soon(HostAgent(service, guest=guest).serve, host_side)
        async with open_link_peer(guest_side) as peer:
            yield peer
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
