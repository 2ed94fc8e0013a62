"""The guest's copy of the host's readers-state table, and pcscd's event-signal rules.

Fed by the host's pushes; read locally by every client connection, so reader-state reads,
waits and cancels never cross the link.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from ..pcsc import ReturnCode, ShareMode
from ..pcsclite.readers import LEGACY_TABLE_SLOTS, ReaderEntry

log = logging.getLogger("pcscbridge.guest.mirror")

T = TypeVar("T")

READER_EVENTS_WRAP = 32767  # pcscd's reader-events counter runs 1..32767, never 0


class Waiter(Protocol):
    def signal(self, rv: int) -> None:
        """Deliver the 8-byte event signal {0, rv}; must not block."""


class ReaderMirror:
    def __init__(self, slots: int = LEGACY_TABLE_SLOTS) -> None:
        # Slot positions stay put while a reader exists, as pcscd's do; the table only grows.
        self._slots: list[ReaderEntry | None] = [None] * slots
        self._registered: dict[Waiter, None] = {}
        # What this guest's open handles do to a reader, shown at once (the host's push of the
        # same change comes a moment later) and beyond what the host's API reports: sharing,
        # and the negotiated protocol (pcscd's cardProtocol). pcscd keeps cardProtocol after
        # the last handle until it powers the idle card down; the host's API does not say
        # when, so it is shown while the guest holds the card.
        self._guest_use: dict[str, GuestUse] = {}
        self.reader_events = 1
        # What clients read is read far more often than it changes: the visible table, and
        # whatever is derived from it (encoded tables), are kept until the next change.
        self.version = 0  # grows with every visible change
        self._view: list[ReaderEntry | None] | None = None
        self._derived: dict[Hashable, Any] = {}

    # --- what clients read -------------------------------------------------------------
    @property
    def slots(self) -> list[ReaderEntry | None]:
        """The table as clients see it (do not modify the list)."""
        if self._view is None:
            self._view = [self._visible(entry) for entry in self._slots]
        return self._view

    def derived(self, key: Hashable, build: Callable[[], T]) -> T:
        """`build()`'s result for `key`, kept until the table changes (an encoded table)."""
        try:
            value: T = self._derived[key]
        except KeyError:
            value = self._derived[key] = build()
        return value

    def _changed(self, before: list[ReaderEntry | None]) -> None:
        """After a mutation: when the visible table differs, forget what was derived from it
        and signal the waiters."""
        self._view = None
        if self.slots != before:
            self.version += 1
            self._derived.clear()
            self._signal_all()

    def _visible(self, entry: ReaderEntry | None) -> ReaderEntry | None:
        if entry is None:
            return None
        use = self._guest_use.get(entry.name)
        if use is None or use.event_counter != entry.event_counter:
            return entry
        sharing = entry.sharing
        if use.exclusive:
            sharing = -1
        elif use.shared and sharing >= 0:
            sharing = max(sharing, use.shared)
        return replace(entry, protocol=entry.protocol or use.protocol, sharing=sharing)

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

    @property
    def waiter_count(self) -> int:
        """Connections registered for the next event signal."""
        return len(self._registered)

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
                self._guest_use.pop(entry.name, None)
                removed += 1
        for entry in incoming.values():
            self._place(entry)
            added += 1
        self._count_reader_events(added + removed)
        self._view = None
        self._forget_other_cards()
        self._changed(before)

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

    def _forget_other_cards(self) -> None:
        for name, use in list(self._guest_use.items()):
            entry = self.find(name)
            if entry is None or entry.event_counter != use.event_counter:
                del self._guest_use[name]

    def handle_opened(self, reader: str, protocol: int, share_mode: int) -> None:
        entry = next((e for e in self._slots if e is not None and e.name == reader), None)
        if entry is None:
            return
        before = self.slots
        use = self._guest_use.get(reader)
        if use is None or use.event_counter != entry.event_counter:
            use = self._guest_use[reader] = GuestUse(entry.event_counter)
        if protocol:
            use.protocol = protocol
        if share_mode == ShareMode.EXCLUSIVE:
            use.exclusive += 1
        else:
            use.shared += 1
        self._changed(before)

    def handle_closed(self, reader: str, share_mode: int) -> None:
        use = self._guest_use.get(reader)
        if use is None:
            return
        before = self.slots
        if share_mode == ShareMode.EXCLUSIVE:
            use.exclusive = max(use.exclusive - 1, 0)
        else:
            use.shared = max(use.shared - 1, 0)
        if not use.shared and not use.exclusive:
            del self._guest_use[reader]
        self._changed(before)


@dataclass
class GuestUse:
    """This guest's handles on one card (the card is told apart by the event counter)."""

    event_counter: int
    protocol: int = 0
    shared: int = 0  # SHARED and DIRECT handles, which pcscd counts alike
    exclusive: int = 0
