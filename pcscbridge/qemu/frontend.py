"""The QEMU front-end of the host service: a host reader's card in a VM's emulated CCID reader.

One VirtualReader per `--chardev`/`--reader` pair: it connects to the VM's ccid-card-passthru
chardev (QEMU is the server), retries until QEMU is there and reconnects when QEMU restarts.
On each connection it speaks VSCard as the card's side: Init, ReaderAdd, then the ATR of the
host card that the reader pattern picks (rewritten to offer T=0: iso7816.atr.offer_t0) and
CardRemove when it goes; each guest command becomes calls on the host service (qemu/card.py).
A clean stop sends CardRemove and ReaderRemove. Input that is not VSCard, or an APDU before any
ATR, closes the connection with a log line; the front-end then connects again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass

import trio

from ..errors import PeerError, first_leaf
from ..host.readers import HostReader
from ..host.runner import Backoff
from ..host.service import Service, Session
from ..iso7816.atr import ATRError, offer_t0
from ..link.calls import ReleaseContext
from ..pcsc import PCSCError, State, rv_name
from ..transports.endpoints import Endpoint, connect
from ..vscard import codec as vsc
from . import DEFAULT_IDLE_RELEASE
from .card import SharedCard

log = logging.getLogger("pcscbridge.qemu")

HANDSHAKE_TIMEOUT = 10.0
STOP_TIMEOUT = 2.0  # seconds a clean stop spends telling QEMU the card and reader are gone
FIRST_RETRY, MAX_RETRY = 0.25, 2.0  # seconds between connection attempts (doubling)
STABLE_AFTER = 10.0  # a connection that lived this long resets the delay
MAX_UNACKNOWLEDGED = 16  # messages QEMU has not answered yet; it answers each at once


@dataclass(frozen=True)
class VirtualReaderConfig:
    chardev: Endpoint
    reader_pattern: str  # fnmatch, case-sensitive, on the names the guest may see
    guest: str  # the VM's name for the host service: policy and audit
    idle_release: float = DEFAULT_IDLE_RELEASE


class VirtualReader:
    """One emulated reader of one VM, fed with one host reader's card."""

    def __init__(self, service: Service, config: VirtualReaderConfig) -> None:
        self.service = service
        self.config = config
        self._context_ids = itertools.count(1)
        self._card_ids = itertools.count(1)

    async def run(self) -> None:
        """Until cancelled: connect, serve, and connect again when the connection ends."""
        session = self.service.open_session(self.config.guest)
        backoff = Backoff(FIRST_RETRY, MAX_RETRY)
        waiting_logged = False
        try:
            while True:
                try:
                    stream = await connect(self.config.chardev)
                except OSError as exc:
                    if not waiting_logged:
                        log.info("waiting for QEMU at %s (%s)", self.config.chardev, exc)
                        waiting_logged = True
                    await trio.sleep(backoff.next())
                    continue
                waiting_logged = False
                log.info("connected to QEMU at %s", self.config.chardev)
                started = trio.current_time()
                connection = ChardevConnection(self, session, stream, next(self._context_ids))
                await connection.serve()
                if trio.current_time() - started > STABLE_AFTER:
                    backoff.reset()  # else a QEMU that keeps dropping us is not hammered
                await trio.sleep(backoff.next())
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()

    def new_card(self, session: Session, reader: str, h_context: int) -> SharedCard:
        return SharedCard(
            session,
            reader,
            h_context=h_context,
            h_card=next(self._card_ids),
            idle_release=self.config.idle_release,
        )


@dataclass(frozen=True)
class InsertedCard:
    """What the guest's reader holds: which host card, and the ATR QEMU was given."""

    reader: str
    event_counter: int
    host_atr: bytes


class ChardevConnection:
    """One connection to QEMU's chardev, from the handshake to its end."""

    def __init__(
        self, owner: VirtualReader, session: Session, stream: trio.abc.Stream, h_context: int
    ) -> None:
        self.owner = owner
        self.session = session
        self.stream = stream
        self.h_context = h_context
        self.where = str(owner.config.chardev)
        self._decoder = vsc.VSCardDecoder()
        self._send_lock = trio.Lock()
        self._reader_id = vsc.MINIMAL_READER_ID
        self._awaiting_ack: deque[str] = deque()  # what each Error from QEMU answers, in order
        self._slot_cleared = False  # QEMU acknowledged the opening CardRemove
        self._atr_sent = False  # an ATR went to QEMU on this connection
        self._inserted: InsertedCard | None = None
        self._card: SharedCard | None = None
        self._generation = 0  # grows with every card change; stale answers are dropped
        self._host_reader: str | None = None  # the host reader the pattern picked
        self._no_match_logged = False

    async def serve(self) -> None:
        """Until QEMU closes, the input breaks the protocol, or the caller is cancelled (a clean
        stop: QEMU is told the card and the reader are gone)."""
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await self._handshake()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_host_reader, nursery)
                await self._serve_messages()
                nursery.cancel_scope.cancel()
        except* trio.TooSlowError:
            log.warning("%s: QEMU did not answer the handshake; closing", self.where)
        except* PeerError as group:
            log.warning("%s: %s; closing the connection", self.where, first_leaf(group))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.info("%s: connection ended (%s)", self.where, first_leaf(group))
        finally:
            # Cancelled from outside (the program stops) rather than ended by QEMU or an error.
            stopping = trio.current_effective_deadline() == -math.inf
            with trio.CancelScope(shield=True):
                await self._end(stopping)

    # --- handshake ------------------------------------------------------------------------------
    async def _handshake(self) -> None:
        await self._send(vsc.Init(self._reader_id))
        init = await self._next_message()
        if not isinstance(init, vsc.Init):
            raise PeerError(f"QEMU answered Init with {type(init).__name__}")
        if init.version != vsc.VERSION:
            log.info("%s: QEMU speaks VSCard version %#x", self.where, init.version)
        await self._send(vsc.ReaderAdd(vsc.UNDEFINED_READER_ID))
        added = await self._next_message()
        if not isinstance(added, vsc.Error):
            raise PeerError(f"QEMU answered ReaderAdd with {type(added).__name__}")
        if added.code != vsc.SUCCESS:
            raise PeerError(f"QEMU refused the reader (error {added.code})")
        self._reader_id = added.reader_id
        # QEMU keeps a card announced by a connection that died (it does not take a closed
        # chardev for a removal): clear it, so the guest sees this connection's card anew.
        await self._send(vsc.CardRemove(self._reader_id), ack="CardRemove")

    # --- messages from QEMU ---------------------------------------------------------------------
    async def _serve_messages(self) -> None:
        while (message := await self._receive()) is not None:
            match message:
                case vsc.APDU(data=command):
                    await self._answer(command)
                case vsc.Error(code=code):
                    self._acknowledged(code)
                case vsc.Init():
                    log.debug("%s: QEMU sent Init again", self.where)
                case vsc.Flush():
                    await self._send(vsc.FlushComplete(self._reader_id))
                case _:
                    raise PeerError(f"QEMU sent {type(message).__name__}, a card's message")

    async def _answer(self, command: bytes) -> None:
        if not self._atr_sent and self._slot_cleared:
            raise PeerError("QEMU sent an APDU before any ATR")
        generation, card = self._generation, self._card
        if card is None:
            # In flight while the card went, or for a card an earlier connection announced.
            await self._send(vsc.Error(self._reader_id, vsc.GENERAL_ERROR))
            return
        reply: vsc.Message
        try:
            reply = vsc.APDU(self._reader_id, await card.transmit(command))
        except PCSCError as exc:
            log.info("%s: command failed on the host: %s", card.reader, rv_name(exc.rv))
            reply = vsc.Error(self._reader_id, vsc.GENERAL_ERROR)
            # A card that is gone: the reader watcher sees it shortly and tells QEMU.
        if generation == self._generation:  # else QEMU dropped the command with the old card
            await self._send(reply)

    def _acknowledged(self, code: int) -> None:
        what = self._awaiting_ack.popleft() if self._awaiting_ack else "nothing"
        if what == "CardRemove" and not self._slot_cleared:
            self._slot_cleared = True
        if code != vsc.SUCCESS:
            log.warning("%s: QEMU answered %s with error %d", self.where, what, code)

    # --- the host reader ------------------------------------------------------------------------
    async def _follow_host_reader(self, nursery: trio.Nursery) -> None:
        version = 0
        while True:
            snapshot = await self.session.wait_readers(version)
            version = snapshot.version
            await self._show(self._pick(snapshot.readers), nursery)

    def _pick(self, readers: tuple[HostReader, ...]) -> HostReader | None:
        """The host reader the pattern picks: the one picked before while it exists, else the
        first whose name matches."""
        by_name = {reader.name: reader for reader in readers}
        if self._host_reader in by_name:
            return by_name[self._host_reader]
        pattern = self.owner.config.reader_pattern
        picked = next((r for r in readers if fnmatch.fnmatchcase(r.name, pattern)), None)
        if picked is not None:
            log.info("%s: serving host reader %r", self.where, picked.name)
        elif self._host_reader is not None:
            log.info("%s: host reader %r is gone", self.where, self._host_reader)
        elif not self._no_match_logged:
            log.info("%s: no host reader matches %r (yet)", self.where, pattern)
            self._no_match_logged = True
        self._host_reader = picked.name if picked is not None else None
        return picked

    async def _show(self, reader: HostReader | None, nursery: trio.Nursery) -> None:
        wanted = None
        mute = reader is not None and reader.event_state & State.MUTE
        if reader is not None and reader.card_present and reader.atr and not mute:
            wanted = InsertedCard(reader.name, reader.event_counter, reader.atr)
        if wanted == self._inserted:
            return
        if self._inserted is not None:
            await self._remove_card()
        if wanted is not None:
            await self._insert_card(wanted, nursery)

    async def _insert_card(self, inserted: InsertedCard, nursery: trio.Nursery) -> None:
        try:
            atr = offer_t0(inserted.host_atr)
        except ATRError as exc:
            log.warning(
                "%s: ATR %s: %s; sent as it is", inserted.reader, inserted.host_atr.hex(), exc
            )
            atr = inserted.host_atr
        if atr != inserted.host_atr:
            log.info(
                "%s: ATR %s shown as %s (T=0)", inserted.reader, inserted.host_atr.hex(), atr.hex()
            )
        self._generation += 1
        self._inserted = inserted
        self._card = self.owner.new_card(self.session, inserted.reader, self.h_context)
        nursery.start_soon(self._card.release_when_idle)
        self._atr_sent = True  # before the send: QEMU may answer it before this task resumes
        await self._send(vsc.ATR(self._reader_id, atr), ack="ATR")

    async def _remove_card(self) -> None:
        self._generation += 1
        card, self._card, self._inserted = self._card, None, None
        await self._send(vsc.CardRemove(self._reader_id), ack="CardRemove")
        if card is not None:
            await card.close()

    # --- the end --------------------------------------------------------------------------------
    async def _end(self, stopping: bool) -> None:
        with trio.move_on_after(STOP_TIMEOUT):
            if stopping:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    if self._inserted is not None:
                        await self._send(vsc.CardRemove(self._reader_id))
                    await self._send(vsc.ReaderRemove(self._reader_id))
                log.info("%s: told QEMU the card and the reader are gone", self.where)
            card, self._card = self._card, None
            if card is not None:
                await card.close()
        await self.stream.aclose()
        with contextlib.suppress(PCSCError):
            await self.session.call(ReleaseContext(self.h_context))

    # --- I/O ------------------------------------------------------------------------------------
    async def _send(self, message: vsc.Message, ack: str | None = None) -> None:
        async with self._send_lock:
            if ack is not None:
                if len(self._awaiting_ack) >= MAX_UNACKNOWLEDGED:
                    raise PeerError(f"QEMU left {len(self._awaiting_ack)} messages unanswered")
                self._awaiting_ack.append(ack)
            await self.stream.send_all(vsc.encode(message))

    async def _next_message(self) -> vsc.Message:
        message = await self._receive()
        if message is None:
            raise trio.BrokenResourceError("QEMU closed the chardev")
        return message

    async def _receive(self) -> vsc.Message | None:
        """The next message from QEMU; None when it closed the connection."""
        while (message := self._decoder.next_message()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._decoder.receive_data(data)
        return message
