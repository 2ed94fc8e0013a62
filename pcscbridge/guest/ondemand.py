"""The host link on demand (`--link exec:COMMAND`): the guest runs COMMAND when a pcsc-lite
client needs the host, and the command's stdin and stdout become the link.

COMMAND reaches the host and runs `pcscbridge host --link stdio` there: `qrexec-client-vm
sys-usb pcscbridge.Link` in a Qubes app qube, `ssh -T host pcscbridge host --link stdio`
elsewhere. When it runs:

- when a client connects and no host is attached; that client's first request waits (at most
  CLIENT_WAIT seconds, long enough to answer a qrexec `ask` dialog) until the host's readers
  have arrived or the command has ended, so the client sees the readers at once;
- again, with backoff (0.5 s doubling to 10 s), when a link that was up ends while clients are
  still connected (their contexts get the readers back, as after any lost link);
- not again by itself when the command ends before a host answered (refused by the policy,
  no such qube, no network): the next client to connect tries again, so a refusal is not
  asked again and again.

Nothing runs while no client has connected: a qube that never uses a card never asks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..backoff import Backoff
from ..transports.process import ProcessStream
from .hostlink import HostLink
from .mirror import ReaderMirror

log = logging.getLogger("pcscbridge.guest")

CLIENT_WAIT = 30.0
# A host's first push can be an empty table (sent before its first look at the readers); an
# empty table this long after the first push is the host's real answer: no readers.
EMPTY_TABLE_GRACE = 1.0


class LinkOnDemand:
    def __init__(
        self,
        host: HostLink,
        open_link: Callable[[], Awaitable[ProcessStream]],
        *,
        name: str,
        client_wait: float = CLIENT_WAIT,
    ) -> None:
        self.host = host
        self.open_link = open_link
        self.name = name
        self.client_wait = client_wait
        self.clients = 0  # client connections open now
        self._demand = trio.Event()  # a client needs the host
        self._settled = trio.Event()  # the current attempt has the readers, or it ended

    def listener(
        self, clients: trio.abc.Listener[trio.abc.Stream]
    ) -> trio.abc.Listener[trio.abc.Stream]:
        """The client listener, with every connection counted and its first request held
        until the host is there (see `needed`)."""
        return _DemandListener(clients, self)

    async def needed(self) -> None:
        """A client is about to be served: start the link if no host is attached, and wait
        (bounded) until the host's readers are there or the attempt ended."""
        if self.host.endpoint is not None and self.host.readers_pushed.is_set():
            return
        settled = self._settled
        self._demand.set()
        with trio.move_on_after(self.client_wait):
            await settled.wait()

    async def run(self) -> None:
        """Run the command whenever it is needed, until cancelled."""
        backoff = Backoff()
        while True:
            await self._demand.wait()
            settled = self._settled
            established, lived = await self._attempt(settled)
            settled.set()
            self._settled = trio.Event()
            if established and self.clients:
                backoff.lived(lived)
                delay = backoff.next()
                log.warning("%s: running it again in %.1f s", self.name, delay)
                await trio.sleep(delay)
                continue
            self._demand = trio.Event()
            if not established:
                log.warning("%s: no host link; the next client to connect tries again", self.name)

    async def _attempt(self, settled: trio.Event) -> tuple[bool, float]:
        """Run the command once and serve its link: (was the link up, for how long)."""
        log.info("a client needs the host: running %s", self.name)
        try:
            stream = await self.open_link()
        except OSError as exc:
            log.error("%s cannot be run: %s", self.name, exc.strerror or exc)
            return False, 0.0
        started = trio.current_time()
        established = False
        try:
            # The host speaks first (its hello). Until then the command may be waiting for a
            # person (a qrexec `ask` dialog): the guest's link starts only when the host is
            # there, so its hello timeout does not run out meanwhile.
            if await stream.wait_first_data():
                pushed = self.host.readers_pushed
                async with trio.open_nursery() as nursery:

                    async def settle_when_pushed() -> None:
                        nonlocal established
                        await pushed.wait()
                        established = True
                        with trio.move_on_after(EMPTY_TABLE_GRACE):
                            await _readers_shown(self.host.mirror)
                        settled.set()

                    nursery.start_soon(settle_when_pushed)
                    await self.host.attach(stream)
                    nursery.cancel_scope.cancel()
        finally:
            await stream.aclose()
        log.warning(
            "%s ended (exit status %s)%s",
            self.name,
            stream.returncode,
            "" if established else " before a host answered",
        )
        return established, trio.current_time() - started


async def _readers_shown(mirror: ReaderMirror) -> None:
    """Until the mirror shows at least one reader."""
    while not mirror.reader_names:
        changed = _Changed()
        mirror.register(changed)
        try:
            await changed.event.wait()
        finally:
            mirror.unregister(changed)


class _Changed:
    """A mirror waiter that only wakes a task (see mirror.Waiter)."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def signal(self, rv: int) -> None:
        self.event.set()


class _DemandListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, inner: trio.abc.Listener[trio.abc.Stream], demand: LinkOnDemand) -> None:
        self.inner = inner
        self.demand = demand

    async def accept(self) -> trio.abc.Stream:
        return _ClientStream(await self.inner.accept(), self.demand)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _ClientStream(trio.abc.Stream):
    """A client connection whose first request waits for the host (LinkOnDemand.needed)."""

    def __init__(self, inner: trio.abc.Stream, demand: LinkOnDemand) -> None:
        self.inner = inner
        self.demand = demand
        self._waited = False
        self._open = True
        demand.clients += 1

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._waited:
            self._waited = True
            await self.demand.needed()
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self.demand.clients -= 1
        await self.inner.aclose()
