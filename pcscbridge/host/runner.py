"""Keeps the host attached to a guest: dial, serve, and dial again with backoff when it ends."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..backoff import Backoff
from .agent import HostAgent
from .service import Service

log = logging.getLogger("pcscbridge.host")


async def keep_attached(
    open_link: Callable[[], Awaitable[trio.abc.Stream]],
    service: Service,
    *,
    guest: str,
    is_transient: Callable[[Exception], bool],
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
        await HostAgent(service, guest=guest).serve(stream)
        backoff.lived(trio.current_time() - started)
        delay = backoff.next()
        log.warning("link to %s ended; reconnecting in %.1f s", guest, delay)
        await trio.sleep(delay)
