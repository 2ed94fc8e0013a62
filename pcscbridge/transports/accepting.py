"""Accept connections for as long as the program runs, whatever accept() says.

Running out of file descriptors (EMFILE: a client that opens thousands of connections) or of
kernel memory must cost new connections a delay, never the server its life: the error is
logged once per episode and accepting goes on after a short backoff. Beyond `max_connections`
a new connection is closed at once, with a log line, as pcscd closes a client beyond its limit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

FIRST_BACKOFF = 0.01
MAX_BACKOFF = 1.0


@dataclass(frozen=True)
class AcceptorStatistics:
    active: int  # connections being served now
    accepted: int  # since start
    refused: int  # closed at once: over the limit
    accept_errors: int  # accept() failures (EMFILE, ...)


class Acceptor:
    def __init__(
        self,
        handler: Callable[[trio.abc.Stream], Awaitable[None]],
        *,
        what: str,
        log: logging.Logger,
        max_connections: int | None = None,
    ) -> None:
        self._handler = handler
        self._what = what
        self._log = log
        self.max_connections = max_connections
        self._active = self._accepted = self._refused = self._errors = 0

    def statistics(self) -> AcceptorStatistics:
        return AcceptorStatistics(self._active, self._accepted, self._refused, self._errors)

    async def serve(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        """Accept and serve until cancelled."""
        delay = FIRST_BACKOFF
        failing = refusing = False
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    self._errors += 1
                    if not failing:
                        self._log.warning(
                            "%s: cannot accept a connection (%s); retrying",
                            self._what,
                            exc.strerror or exc,
                        )
                        failing = True
                    await trio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
                    continue
                if failing:
                    self._log.info("%s: accepting connections again", self._what)
                failing, delay = False, FIRST_BACKOFF
                if self.max_connections is not None and self._active >= self.max_connections:
                    self._refused += 1
                    if not refusing:
                        self._log.warning(
                            "%s: %d connections already; closing new ones until one ends",
                            self._what,
                            self._active,
                        )
                        refusing = True
                    await trio.aclose_forcefully(stream)
                    continue
                refusing = False
                self._accepted += 1
                self._active += 1
                nursery.start_soon(self._serve_one, stream)

    async def _serve_one(self, stream: trio.abc.Stream) -> None:
        try:
            await self._handler(stream)
        finally:
            self._active -= 1
