"""pcsc-lite protocol revisions 4.2 to 4.6 as sets of wire differences (spec §11).

The session logic asks a Dialect what to do instead of comparing version numbers, so a new
revision is one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pcsc import ReturnCode


@dataclass(frozen=True)
class Dialect:
    major: int
    minor: int
    # WAIT/STOP carry an 8-byte {timeout, rv} body (≤4.3); later revisions send none.
    wait_has_body: bool
    # WAIT registers and dumps the 16-entry array at once (4.4, 4.5).
    wait_returns_array: bool
    # STOP is answered only while registered (pcscd ≥1.8.19 behaviour, used for all).
    has_reader_events: bool  # CMD_GET_READER_EVENTS (0x15), 4.5+
    has_variable_array: bool  # CMD_GET_READERS_STATE_SIZE/_ARRAY (0x16/0x17), 4.6

    @property
    def version(self) -> tuple[int, int]:
        return (self.major, self.minor)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


DIALECTS: dict[tuple[int, int], Dialect] = {
    (4, 2): Dialect(4, 2, True, False, False, False),
    (4, 3): Dialect(4, 3, True, False, False, False),
    (4, 4): Dialect(4, 4, False, True, False, False),
    (4, 5): Dialect(4, 5, False, True, True, False),
    (4, 6): Dialect(4, 6, False, False, True, True),
}
NEWEST = DIALECTS[(4, 6)]
# A connection that never sent CMD_VERSION (SCardCancel's throw-away socket) is served as 4.4,
# with the ≤4.3 WAIT/STOP bodies also accepted (see ServerConnection).
DEFAULT = DIALECTS[(4, 4)]


def negotiate(major: int, minor: int) -> tuple[Dialect | None, tuple[int, int, int]]:
    """Choose the dialect for a client's CMD_VERSION; returns it and the reply (major, minor, rv).

    Known versions are echoed, so old clients (which ignore the numbers) and new ones (which
    gate features on them) are both satisfied. Anything else gets the newest version with
    SCARD_E_SERVICE_STOPPED, like pcscd 2.5; 2.4.1+ clients then retry on the same socket.
    """
    dialect = DIALECTS.get((major, minor))
    if dialect is None:
        return None, (NEWEST.major, NEWEST.minor, ReturnCode.SCARD_E_SERVICE_STOPPED)
    return dialect, (major, minor, ReturnCode.SCARD_S_SUCCESS)
