"""The cap on how long a guest may hold a transaction or an EXCLUSIVE card handle.

What the host can see: PC/SC shows no application waiting. pcscd keeps a host application's
SCardConnect or SCardBeginTransaction polling inside the daemon while a guest holds the
card's lock; a host application refused by an EXCLUSIVE handle gets SCARD_E_SHARING_VIOLATION
at once and leaves no trace; SCardGetStatusChange reports the reader INUSE or EXCLUSIVE, which
the guest's own handle already explains. A waiter is invisible, so the rule assumes one may
be there: a hold lasts at most `hold_limit` seconds in one go. Then the guest's handle is
reset, as if the card had been: its host handle is disconnected with SCARD_RESET_CARD (which
ends a transaction and an EXCLUSIVE hold alike; reconnecting SHARED would not do: pcscd 1.9.9
keeps its lock on the reader after an EXCLUSIVE handle reconnects SHARED), and every later call
on the guest's handle answers SCARD_W_RESET_CARD, as pcscd answers a handle whose card another
application reset, until the guest calls SCardReconnect, which opens a new host handle (or
SCardDisconnect). For COOLDOWN seconds after a cut the guest's next hold on that reader waits,
so that a waiting host application gets the card first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..link.calls import Disconnect
from ..pcsc import Disposition, PCSCError
from .service import Session

log = logging.getLogger("pcscbridge.policy")

COOLDOWN = 1.0  # seconds; pcscd's waiters poll the lock every 0.1 s


@dataclass(eq=False)
class GuestCard:
    """What the policy knows of one of the guest's card handles."""

    h_context: int
    reader: str  # the host's name
    share_mode: int
    protocols: int  # preferred, as the guest asked
    active_protocol: int = 0
    transaction_since: float | None = None
    exclusive_since: float | None = None
    cut: bool = False  # closed on the host at the hold limit, until the guest reconnects

    def hold_deadline(self, limit: float) -> float | None:
        starts = [t for t in (self.transaction_since, self.exclusive_since) if t is not None]
        return min(starts) + limit if starts else None


class HoldGuard:
    """Watches one session's holds; cuts each at `limit` seconds (0: never)."""

    def __init__(self, guest: str, limit: float, cards: dict[int, GuestCard]) -> None:
        self.guest = guest
        self.limit = limit
        self.cards = cards
        self._cut_at: dict[str, float] = {}  # host reader -> when a hold on it was last cut
        self._changed = trio.Event()
        self._running = False

    def changed(self, session: Session) -> None:
        """A hold started or ended. The watch runs as a system task (a checkpoint owns no
        nursery; its sessions belong to the front-ends) while the session has holds."""
        if not self.limit:
            return
        self._changed.set()
        if not self._running and self._next_deadline() is not None:
            self._running = True
            trio.lowlevel.spawn_system_task(self._watch, session, name=f"holds of {self.guest}")

    async def cooldown(self, reader: str) -> None:
        """Wait out the cooldown after a cut on `reader`, if one is running."""
        cut = self._cut_at.get(reader)
        if cut is not None:
            await trio.sleep_until(cut + COOLDOWN)

    def _next_deadline(self) -> float | None:
        due = [c.hold_deadline(self.limit) for c in self.cards.values()]
        deadlines = [d for d in due if d is not None]
        return min(deadlines) if deadlines else None

    async def _watch(self, session: Session) -> None:
        try:
            while (deadline := self._next_deadline()) is not None:
                self._changed = trio.Event()
                with trio.move_on_at(deadline):
                    await self._changed.wait()
                    continue
                now = trio.current_time()
                for h_card, card in list(self.cards.items()):
                    due = card.hold_deadline(self.limit)
                    if due is not None and due <= now:
                        await self._cut(session, h_card, card)
        except Exception:
            log.exception("%s: watching holds failed", self.guest)
        finally:
            self._running = False

    async def _cut(self, session: Session, h_card: int, card: GuestCard) -> None:
        held = "a transaction" if card.transaction_since is not None else "EXCLUSIVE"
        log.warning(
            "%s held %s on %s for %g s (hold_limit): resetting its card handle",
            self.guest,
            held,
            card.reader,
            self.limit,
        )
        card.cut = True
        card.transaction_since = card.exclusive_since = None
        self._cut_at[card.reader] = trio.current_time()
        try:
            await session.call(Disconnect(h_card, Disposition.RESET_CARD))
        except PCSCError as exc:
            log.warning("%s: cutting the hold on %s: %s", self.guest, card.reader, exc)
