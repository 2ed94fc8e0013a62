"""Which local clients may use the guest server: an optional allow-list of uids and gids,
checked against the kernel's credentials of each connection (SO_PEERCRED).

A refused client is treated as pcscd treats one that polkit refuses ("Rejected unauthorized
PC/SC client" in pcscd's log): its connection is closed without a byte read or written. pcscd
closes after asking polkit, by when the client has sent its first request, and libpcsclite then
reports SCARD_W_SECURITY_VIOLATION ("Access denied"); `refuse` likewise waits (briefly) for the
client's whole first request before closing. libpcsclite writes a request's header and body
separately: closed in between, its second write fails and it says SCARD_E_NO_SERVICE. The
socket's own mode and group (--socket-mode, --socket-group) decide who can connect at all.
"""

from __future__ import annotations

import logging
import select
import socket
from dataclasses import dataclass

import trio

from ..pcsclite.messages import HEADER
from ..transports.peers import peer_credentials

log = logging.getLogger("pcscbridge.guest")

# Seconds a refused client has to send its first request; generous, so a slow client still
# sees "Access denied" rather than "Service not available" (the connection counts against
# --max-clients meanwhile).
REFUSAL_WAIT = 5.0
_LARGEST_FIRST_REQUEST = 4096  # a first request is CMD_VERSION (12 bytes) or a short one


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
    """Close a refused client's connection once its first request is all there (or after
    REFUSAL_WAIT), never reading it: only peeking at how much has arrived."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        with trio.move_on_after(REFUSAL_WAIT):
            try:
                while not _whole_request(
                    await sock.recv(_LARGEST_FIRST_REQUEST, socket.MSG_PEEK)
                ) and not _hung_up(sock.fileno()):
                    await trio.sleep(0.005)  # the body follows the header in a second write
            except OSError:
                pass  # it hung up already
    await trio.aclose_forcefully(stream)


def _hung_up(fd: int) -> bool:
    """Whether the client shut its end (what is left unread then never completes)."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return bool(poller.poll(0))


def _whole_request(pending: bytes) -> bool:
    """Whether these first bytes hold a whole request (or none: the client hung up)."""
    if not pending:
        return True
    if len(pending) < HEADER.size:
        return False
    body_size, _command = HEADER.unpack_from(pending)
    return len(pending) >= min(HEADER.size + body_size, _LARGEST_FIRST_REQUEST)
