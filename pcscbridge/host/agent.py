"""The link front-end of the host service: serves one `pcscbridge guest` server over a link.

Requests become typed calls on a host service session (policy and audit included); the readers
the session shows become the pcscd table rows the guest's mirror keeps.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from ..link.calls import InvalidCall
from ..link.endpoint import LinkEndpoint, LinkLimits
from ..link.protocol import Request, Response, readers_push
from ..pcsc import PCSCError, ReaderStatus, ReturnCode, State, rv_name
from ..pcsclite.readers import ReaderEntry
from .readers import HostReader
from .service import Service, Session

log = logging.getLogger("pcscbridge.host")

# Seconds between the host's pings; a guest silent for twice that is gone, and everything it
# held (transactions included) is released. The guest pings too: each side notices a link
# that went silent behind an open transport (a TCP path that dropped, a frozen VM).
LINK_KEEPALIVE = 5.0


class HostAgent:
    """Serves one link for one guest. Create one per link; the service is shared."""

    def __init__(
        self, service: Service, *, guest: str = "guest", link_limits: LinkLimits | None = None
    ) -> None:
        self.service = service
        self.guest = guest
        self.link_limits = link_limits
        self._endpoint: LinkEndpoint | None = None

    def statistics(self) -> dict[str, object]:
        endpoint = self._endpoint
        return endpoint.statistics() if endpoint is not None else {"established": False}

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve the link until it ends, then release everything the guest held."""
        session = self.service.open_session(self.guest)
        endpoint = LinkEndpoint(
            stream,
            "host",
            on_request=lambda request: self._serve(session, request),
            peer_name=self.guest,
            limits=self.link_limits,
            keepalive=LINK_KEEPALIVE,  # pings only a guest whose hello says it answers
        )
        self._endpoint = endpoint
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._push_readers, session, endpoint)
                await endpoint.run()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()

    async def _serve(self, session: Session, request: Request) -> Response:
        call = request.call
        if isinstance(call, InvalidCall):
            log.warning("%s sent a bad %r request: %s", self.guest, call.method, call.reason)
            return Response(request.id, call.rv)
        try:
            result = await session.call(call)
        except PCSCError as exc:
            log.debug("%s %s: %s", self.guest, call.method, rv_name(exc.rv))
            # An out-value the failed call still reported travels with its code.
            result = None if exc.result is None else call.encode_result(exc.result)
            return Response(request.id, exc.rv, result)
        return Response(request.id, ReturnCode.SCARD_S_SUCCESS, call.encode_result(result))

    async def _push_readers(self, session: Session, endpoint: LinkEndpoint) -> None:
        if not await endpoint.wait_established():
            return
        version, last = 0, None
        while True:
            snapshot = await session.wait_readers(version)
            version = snapshot.version
            rows = [table_entry(reader) for reader in snapshot.readers]
            if rows == last:
                continue
            last = rows
            log.debug("readers now: %s", [(row.name, hex(row.state)) for row in rows])
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await endpoint.send(readers_push(rows))


def table_entry(reader: HostReader) -> ReaderEntry:
    """pcscd's table entry for one reader, from what SCardGetStatusChange reports."""
    event = reader.event_state
    if event & (State.UNKNOWN | State.UNAVAILABLE):
        status = ReaderStatus.SCARD_UNKNOWN
    elif event & State.PRESENT:
        if event & State.MUTE:
            status = ReaderStatus.SCARD_PRESENT | ReaderStatus.SCARD_SWALLOWED
        else:
            # pcscd publishes PRESENT|POWERED|NEGOTIABLE for a card with an ATR, and keeps it
            # when it powers an idle card down.
            status = (
                ReaderStatus.SCARD_PRESENT
                | ReaderStatus.SCARD_POWERED
                | ReaderStatus.SCARD_NEGOTIABLE
            )
    else:
        status = ReaderStatus.SCARD_ABSENT
    if event & State.EXCLUSIVE:
        sharing = -1
    elif event & State.INUSE:
        sharing = 1  # the API tells "in use", not how many handles
    else:
        sharing = 0
    atr = reader.atr if event & State.PRESENT else b""
    return ReaderEntry(reader.name, reader.event_counter, int(status), sharing, bytes(atr), 0)
