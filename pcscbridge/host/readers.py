"""The host's readers as the host's PC/SC API reports them, and the board every front-end reads.

One watcher (host/watcher.py) publishes; each guest session waits for the next version. What a
guest may see of it (which readers, under which names) is decided by its checkpoint, and how it
is shown (pcscd table rows for a link guest, a CCID card for QEMU) by its front-end.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..pcsc import State


@dataclass(frozen=True, slots=True)
class HostReader:
    """One reader: SCardGetStatusChange's dwEventState (SCARD_STATE_* bits, card event counter
    in the upper 16 bits) and ATR."""

    name: str
    event_state: int
    atr: bytes = b""

    @property
    def event_counter(self) -> int:
        return (self.event_state >> 16) & 0xFFFF

    @property
    def card_present(self) -> bool:
        return bool(self.event_state & State.PRESENT) and not self.event_state & (
            State.UNKNOWN | State.UNAVAILABLE
        )


@dataclass(frozen=True, slots=True)
class ReaderSnapshot:
    """The readers at one moment; `version` grows with every change (0: nothing known yet)."""

    version: int
    readers: tuple[HostReader, ...]


class ReaderBoard:
    """The latest snapshot, and a way to wait for the next one."""

    def __init__(self) -> None:
        self._snapshot = ReaderSnapshot(0, ())
        self._changed = trio.Event()

    @property
    def snapshot(self) -> ReaderSnapshot:
        return self._snapshot

    def publish(self, readers: tuple[HostReader, ...]) -> None:
        if self._snapshot.version and readers == self._snapshot.readers:
            return
        self._snapshot = ReaderSnapshot(self._snapshot.version + 1, readers)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, after: int) -> ReaderSnapshot:
        """The first snapshot newer than version `after`."""
        while self._snapshot.version <= after:
            await self._changed.wait()
        return self._snapshot
