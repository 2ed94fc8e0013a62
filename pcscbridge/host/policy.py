"""The one checkpoint every guest call passes on the host (filled in by the policy issue)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Call:
    guest: str  # which link asks
    method: str  # backend method name: connect, transmit, control, ...
    reader: str | None  # the reader concerned, when known
    args: tuple[Any, ...]


class Policy(Protocol):
    def check(self, call: Call) -> None:
        """Return to allow; raise PCSCError (e.g. SCARD_W_SECURITY_VIOLATION) to refuse."""

    def reader_visible(self, guest: str, reader: str) -> bool:
        """Whether the guest may see a reader at all."""


class AllowAll:
    def check(self, call: Call) -> None:
        return None

    def reader_visible(self, guest: str, reader: str) -> bool:
        return True
