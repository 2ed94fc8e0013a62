"""Keeps the host attached to a guest: dial, serve, and dial again with backoff when it ends."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..backoff import Backoff
from ..link.endpoint import LinkLimits
from .agent import HostAgent
from .service import Service

log = logging.getLogger("pcscbridge.host")


class LinkKeeper:
    """Dials the guest, serves the link, and dials again with backoff when it ends."""

    def __init__(
        self,
        open_link: Callable[[], Awaitable[trio.abc.Stream]],
        service: Service,
        *,
        guest: str,
        is_transient: Callable[[Exception], bool],
        link_limits: LinkLimits | None = None,
    ) -> None:
        self._open_link = open_link
        self._service = service
        self.guest = guest
        self._is_transient = is_transient
        self._link_limits = link_limits
        self._agent: HostAgent | None = None
        self._links = 0

    def statistics(self) -> dict[str, object]:
        agent = self._agent
        return {
            "guest": self.guest,
            "links_made": self._links,
            **(agent.statistics() if agent is not None else {"established": False}),
        }

    async def run(self) -> None:
        """Run until cancelled. Errors `is_transient` rejects are raised to the caller."""
        backoff = Backoff()
        while True:
            try:
                stream = await self._open_link()
            except Exception as exc:
                if not self._is_transient(exc):
                    raise
                delay = backoff.next()
                log.warning("cannot reach %s: %s; retrying in %.1f s", self.guest, exc, delay)
                await trio.sleep(delay)
                continue
            started = trio.current_time()
            self._links += 1
            self._agent = HostAgent(self._service, guest=self.guest, link_limits=self._link_limits)
            try:
                await self._agent.serve(stream)
            finally:
                self._agent = None
            backoff.lived(trio.current_time() - started)
            delay = backoff.next()
            log.warning("link to %s ended; reconnecting in %.1f s", self.guest, delay)
            await trio.sleep(delay)
