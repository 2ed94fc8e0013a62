"""The guest's copy of the host's readers-state table, and pcscd's event-signal rules.

Fed by the host's pushes; read locally by every client connection, so reader-state reads,
waits and cancels never cross the link.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Protocol

from ..pcsc import ReturnCode
from ..pcsclite.readers import LEGACY_TABLE_SLOTS, ReaderEntry

log = logging.getLogger("pcscbridge.guest.mirror")

READER_EVENTS_WRAP = 32767  # pcscd's reader-events counter runs 1..32767, never 0


class Waiter(Protocol):
    def signal(self, rv: int) -> None:
        """Deliver the 8-byte event signal {0, rv}; must not block."""


class ReaderMirror:
    def __init__(self, slots: int = LEGACY_TABLE_SLOTS) -> None:
        # Slot positions stay put while a reader exists, as pcscd's do; the table only grows.
        self._slots: list[ReaderEntry | None] = [None] * slots
        self._registered: dict[Waiter, None] = {}
        # Protocol a guest handle negotiated, per reader (pcscd shows it as cardProtocol; the
        # host's API does not report it). Kept while guest handles on the card remain.
        self._protocols: dict[str, tuple[int, int, int]] = {}  # name -> (counter, protocol, n)
        self.reader_events = 1

    # --- what clients read -------------------------------------------------------------
    @property
    def slots(self) -> list[ReaderEntry | None]:
        return [self._visible(entry) for entry in self._slots]

    def _visible(self, entry: ReaderEntry | None) -> ReaderEntry | None:
        if entry is None:
            return None
        held = self._protocols.get(entry.name)
        if held is not None and held[0] == entry.event_counter and entry.protocol == 0:
            return replace(entry, protocol=held[1])
        return entry

    def find(self, name: str) -> ReaderEntry | None:
        for entry in self._slots:
            if entry is not None and entry.name == name:
                return self._visible(entry)
        return None

    @property
    def reader_names(self) -> list[str]:
        return [entry.name for entry in self._slots if entry is not None]

    # --- event registration (spec §7.3) ------------------------------------------------
    def register(self, waiter: Waiter) -> None:
        self._registered[waiter] = None

    def unregister(self, waiter: Waiter) -> bool:
        """True when the waiter was still registered (no signal was sent to it)."""
        if waiter not in self._registered:
            return False
        del self._registered[waiter]
        return True

    def is_registered(self, waiter: Waiter) -> bool:
        return waiter in self._registered

    def cancel(self, waiter: Waiter) -> bool:
        if not self.unregister(waiter):
            return False
        waiter.signal(ReturnCode.SCARD_E_CANCELLED)
        return True

    def _signal_all(self) -> None:
        waiters, self._registered = list(self._registered), {}
        for waiter in waiters:
            waiter.signal(ReturnCode.SCARD_S_SUCCESS)

    # --- updates -------------------------------------------------------------------------
    def update(self, readers: Iterable[ReaderEntry]) -> None:
        """Replace the table with the host's view; signal waiters if anything visible changed."""
        incoming = {entry.name: entry for entry in readers}
        before = self.slots
        added = removed = 0
        for index, entry in enumerate(self._slots):
            if entry is None:
                continue
            if entry.name in incoming:
                self._slots[index] = incoming.pop(entry.name)
            else:
                self._slots[index] = None
                self._protocols.pop(entry.name, None)
                removed += 1
        for entry in incoming.values():
            self._place(entry)
            added += 1
        self._count_reader_events(added + removed)
        self._forget_stale_protocols()
        if self.slots != before:
            self._signal_all()

    def clear(self) -> None:
        """The host link is gone: every reader disappears, as if unplugged."""
        self.update(())

    def _place(self, entry: ReaderEntry) -> None:
        for index, slot in enumerate(self._slots):
            if slot is None:
                self._slots[index] = entry
                return
        self._slots.extend([entry, None])  # pcscd 2.5 grows its table two slots at a time

    def _count_reader_events(self, events: int) -> None:
        for _ in range(events):
            self.reader_events = self.reader_events % READER_EVENTS_WRAP + 1

    def _forget_stale_protocols(self) -> None:
        for name, (counter, _, _) in list(self._protocols.items()):
            entry = self.find(name)
            if entry is None or entry.event_counter != counter:
                del self._protocols[name]

    def handle_opened(self, reader: str, protocol: int) -> None:
        entry = self.find(reader)
        if entry is None:
            return
        before = self.slots
        _, _, count = self._protocols.get(reader, (0, 0, 0))
        self._protocols[reader] = (entry.event_counter, protocol, count + 1)
        if self.slots != before:
            self._signal_all()

    def handle_closed(self, reader: str) -> None:
        held = self._protocols.get(reader)
        if held is None:
            return
        if held[2] > 1:
            self._protocols[reader] = (held[0], held[1], held[2] - 1)
            return
        before = self.slots
        del self._protocols[reader]
        if self.slots != before:
            self._signal_all()
