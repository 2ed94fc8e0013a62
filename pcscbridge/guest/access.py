"""Which local clients may use the guest server: an optional allow-list of uids and gids,
checked against the kernel's credentials of each connection (SO_PEERCRED).

A refused client is treated as pcscd treats one that polkit refuses ("Rejected unauthorized
PC/SC client" in pcscd's log): its connection is closed without a byte read or written. pcscd
closes after asking polkit, by when the client has sent its first request, and libpcsclite then
reports SCARD_W_SECURITY_VIOLATION ("Access denied"); `refuse` likewise waits (briefly) for the
client's first bytes before closing, or the client would see SCARD_E_NO_SERVICE instead. The
socket's own mode and group (--socket-mode, --socket-group) decide who can connect at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..transports.peers import peer_credentials

log = logging.getLogger("pcscbridge.guest")

# Seconds a refused client has to send its first request; generous, so a slow client still
# sees "Access denied" rather than "Service not available" (the connection counts against
# --max-clients meanwhile).
REFUSAL_WAIT = 5.0


@dataclass(frozen=True)
class ClientGate:
    """Empty lists admit every client; else its uid, or its gid or one of its supplementary
    groups, must be listed."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def admits(self, stream: trio.abc.Stream, name: str) -> bool:
        if not self.uids and not self.gids:
            return True
        credentials = peer_credentials(stream)
        if credentials is not None and (
            credentials.uid in self.uids
            or not self.gids.isdisjoint({credentials.gid, *credentials.groups})
        ):
            return True
        log.warning(
            "rejected client %s (%s): not in --allow-uid/--allow-gid; closing the connection",
            name,
            credentials or "no credentials",
        )
        return False


async def refuse(stream: trio.abc.Stream) -> None:
    """Close a refused client's connection once it has sent something (or after
    REFUSAL_WAIT), never reading it."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        with trio.move_on_after(REFUSAL_WAIT):
            await trio.lowlevel.wait_readable(sock)
    await trio.aclose_forcefully(stream)
