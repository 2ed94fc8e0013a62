"""Keeps the host attached to a guest: dial, serve, and dial again with backoff when it ends."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..link.endpoint import LinkLimits
from .agent import HostAgent
from .service import Service

log = logging.getLogger("pcscbridge.host")

FIRST_DELAY = 0.5
MAX_DELAY = 10.0
STABLE_AFTER = 10.0  # a link that lived this long resets the backoff


class Backoff:
    def __init__(self, first: float = FIRST_DELAY, maximum: float = MAX_DELAY) -> None:
        self.first, self.maximum, self.delay = first, maximum, first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.delay = self.first


async def keep_attached(
    open_link: Callable[[], Awaitable[trio.abc.Stream]],
    service: Service,
    *,
    guest: str,
    is_transient: Callable[[Exception], bool],
    link_limits: LinkLimits | None = None,
) -> None:
    """Run until cancelled. Errors `is_transient` rejects are raised to the caller."""
    backoff = Backoff()
    while True:
        try:
            stream = await open_link()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = backoff.next()
            log.warning("cannot reach %s: %s; retrying in %.1f s", guest, exc, delay)
            await trio.sleep(delay)
            continue
        started = trio.current_time()
        await HostAgent(service, guest=guest, link_limits=link_limits).serve(stream)
        if trio.current_time() - started > STABLE_AFTER:
            backoff.reset()
        delay = backoff.next()
        log.warning("link to %s ended; reconnecting in %.1f s", guest, delay)
        await trio.sleep(delay)
