"""How a connection ends, in one log line: bad input from the peer, a lost stream, or a bug.

Whatever it is costs that connection only: the block that serves a connection runs inside
`connection_ends_logged` and the process goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from ..errors import PeerError, first_leaf

LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@contextmanager
def connection_ends_logged(
    log: logging.Logger,
    what: str,
    *,
    lost_level: int = logging.DEBUG,
    closing: str = "closing the connection",
) -> Iterator[None]:
    """Log and swallow the errors that end a connection (`what` names it in the line)."""
    try:
        yield
    except* PeerError as group:
        log.warning("%s: %s; %s", what, first_leaf(group), closing)
    except* LOST as group:
        log.log(lost_level, "%s lost: %s", what, first_leaf(group))
    except* Exception as group:
        # A bug must cost one connection, never the process.
        log.error("%s: internal error; %s", what, closing, exc_info=first_leaf(group))
