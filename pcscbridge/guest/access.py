"""Which local clients may use the guest server: an optional allow-list of uids and gids,
checked against the kernel's credentials of each connection (SO_PEERCRED).

A refused client is treated as pcscd treats one that polkit refuses: the connection is closed
before anything is read ("Rejected unauthorized PC/SC client" in pcscd's log), so libpcsclite
reports the daemon as unreachable (SCARD_E_NO_SERVICE). The socket's own mode and group
(--socket-mode, --socket-group) decide who can connect at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..transports.peers import peer_credentials

log = logging.getLogger("pcscbridge.guest")


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
