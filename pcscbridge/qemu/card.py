"""The host's card behind one virtual reader, as the guest uses it.

Every call goes through the host service session (policy and audit included). The card is
connected shared on the guest's first command; each burst of guest commands runs inside a host
transaction, so a host application cannot slip a command between a guest's SELECT and its READ,
and the transaction ends after an idle gap so host applications get the card between bursts.
The guest's T=0 TPDUs are translated for the card by iso7816.t0.
"""

from __future__ import annotations

import logging

import trio

from ..host.service import Session
from ..iso7816.t0 import T0Translator, ToCard
from ..link.calls import BeginTransaction, Connect, Disconnect, EndTransaction, Reconnect, Transmit
from ..pcsc import Disposition, PCSCError, Protocol, ReturnCode, ShareMode, rv_name

log = logging.getLogger("pcscbridge.qemu")

RELEASE_TIMEOUT = 2.0  # seconds to end a transaction and disconnect, when the card goes


class SharedCard:
    """One card in one host reader, for the life of its insertion in the guest's reader."""

    def __init__(
        self, session: Session, reader: str, *, h_context: int, h_card: int, idle_release: float
    ) -> None:
        self.session = session
        self.reader = reader
        self.h_context = h_context
        self.h_card = h_card
        self.idle_release = idle_release
        self._protocol: int | None = None  # the active protocol once connected
        self._translator = T0Translator(card_speaks_t1=True)
        self._in_transaction = False
        self._last_use = 0.0
        self._transaction_begun = trio.Event()
        self._lock = trio.Lock()  # one exchange at a time; the idle release waits for it
        self._closed = False

    async def transmit(self, tpdu: bytes) -> bytes:
        """The guest's command TPDU in, the answer it gets out. PCSCError when the card cannot
        be reached (the guest then gets a failed exchange, never a made-up answer)."""
        async with self._lock:
            if self._closed:
                raise PCSCError(ReturnCode.SCARD_W_REMOVED_CARD, "the card is gone")
            try:
                return await self._exchange(tpdu)
            except PCSCError as exc:
                if exc.rv != ReturnCode.SCARD_W_RESET_CARD:
                    raise
                # Another host application reset the card; no command ran. Reconnect and go
                # again: what the guest had set up on the card (a selected application, a
                # verified PIN) is gone, and the card itself will say so.
                log.warning("%s: the card was reset by another application", self.reader)
                await self._reconnect()
                return await self._exchange(tpdu)
            finally:
                self._last_use = trio.current_time()

    async def _exchange(self, tpdu: bytes) -> bytes:
        protocol = await self._begin()
        step = self._translator.command(tpdu)
        while isinstance(step, ToCard):
            response = await self.session.call(Transmit(self.h_card, protocol, step.apdu))
            step = self._translator.card_answered(response)
        return step.response

    async def _begin(self) -> int:
        """Connect if not yet, and hold a transaction (waits while a host application holds
        one: the guest's command waits, it does not interleave)."""
        if self._protocol is None:
            call = Connect(self.h_context, self.h_card, self.reader, ShareMode.SHARED, Protocol.ANY)
            self._protocol = await self.session.call(call)
            self._translator = T0Translator(card_speaks_t1=self._protocol == Protocol.T1)
            log.info("%s: connected (T=%d)", self.reader, 1 if self._protocol == Protocol.T1 else 0)
        if not self._in_transaction:
            await self.session.call(BeginTransaction(self.h_card))
            self._in_transaction = True
            self._transaction_begun.set()
        return self._protocol

    async def _reconnect(self) -> None:
        self._in_transaction = False
        self._translator.reset()
        call = Reconnect(self.h_card, ShareMode.SHARED, Protocol.ANY, Disposition.LEAVE_CARD)
        self._protocol = await self.session.call(call)
        self._translator = T0Translator(card_speaks_t1=self._protocol == Protocol.T1)

    async def release_when_idle(self) -> None:
        """Run for the card's life: end the transaction once the guest has been quiet for the
        idle gap, so host applications get the card between the guest's bursts."""
        while not self._closed:
            if not self._in_transaction:
                await self._transaction_begun.wait()
                self._transaction_begun = trio.Event()
                continue
            await trio.sleep_until(self._last_use + self.idle_release)
            async with self._lock:
                idle = trio.current_time() >= self._last_use + self.idle_release
                if self._in_transaction and idle and not self._closed:
                    await self._end_transaction()

    async def _end_transaction(self) -> None:
        self._in_transaction = False
        try:
            await self.session.call(EndTransaction(self.h_card, Disposition.LEAVE_CARD))
        except PCSCError as exc:
            log.debug("%s: end of transaction: %s", self.reader, rv_name(exc.rv))

    async def close(self) -> None:
        """The card left the guest's reader: end the transaction and disconnect (bounded: a
        call blocked in the host's PC/SC is left to the context's release)."""
        self._closed = True
        self._transaction_begun.set()  # wakes release_when_idle to end
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
            async with self._lock:
                if self._protocol is None:
                    return
                if self._in_transaction:
                    await self._end_transaction()
                try:
                    await self.session.call(Disconnect(self.h_card, Disposition.LEAVE_CARD))
                except PCSCError as exc:
                    log.debug("%s: disconnect: %s", self.reader, rv_name(exc.rv))
                self._protocol = None
