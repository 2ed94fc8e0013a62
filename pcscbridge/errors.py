"""pcscbridge's own errors: one base, two kinds.

A *remote* error means the other side broke a rule: a local pcsc-lite client or a link peer
sent something malformed or not allowed. The connection it came on is closed with a log line;
nothing else is affected. A *local* error is this side's condition: a setting that cannot be
used, a peer that went away, a PC/SC call that failed. PC/SC return codes (PCSCError) are
local errors of their own class, since they travel as values.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error pcscbridge raises on purpose."""

    remote: bool = False


class PeerError(BridgeError):
    """The other side of a connection broke its protocol; close that connection."""

    remote = True


class SetupError(BridgeError):
    """Something the user asked for cannot be done; the message says what and how to fix it."""

    exit_code: int = 1


class ConnectionLost(BridgeError):
    """The peer went away while something waited for it."""


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first leaf exception of a (nested) exception group, for a log line."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
