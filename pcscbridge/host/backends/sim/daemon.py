"""pcscd 1.9.9's arbitration, as pure state transitions: no threads, no waiting.

What pcscd decides for each request (read from its source and checked against the real
daemon with pyscard): the readers-state table, the sharing count, the transaction lock
(hLockId and its count), the per-handle SCARD_W_RESET_CARD / SCARD_W_REMOVED_CARD events that
stay until SCardReconnect, and protocol negotiation (PHSetProtocol: T=1 when both sides allow
it). Where pcscd would wait (a connect, or a disconnect with a card action, while another handle
holds the transaction) the daemon says so (:meth:`Daemon.connect_waits`,
:meth:`Daemon.disconnect_waits`) and the caller waits; the blocking lives in :mod:`.backend`.

Every change a waiter may care about calls ``on_change``.

Deviations from pcscd 1.9.9 (all deliberate):
  * Where pcsc-lite would hang forever (connect, or disconnect with a card action, on the same
    context that holds the reader's transaction) this raises SCARD_F_INTERNAL_ERROR.
  * reconnect from EXCLUSIVE to SHARED/DIRECT releases the exclusive lock; pcscd 1.9.9 keeps
    it, so later connects block until the handle is disconnected.
  * reconnect with SCARD_LEAVE_CARD powers a card that an UNPOWER disposition switched off
    (pcscd leaves it unpowered and relies on the driver to cope).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from ....iso7816.atr import offered_protocols
from ....pcsc import Disposition, PCSCError, Protocol, ReaderStatus, ShareMode
from ....pcsc import ReturnCode as RC
from ...backend import CardStatus
from ..simcard import SimulatedCard

# szReader is 128 bytes with its NUL.
MAX_READERNAME = 128

SCARD_ATTR_ATR_STRING = 0x00090303
TAG_IFD_ATR = 0x0303  # the IFD handler's own tag for the same value (CCID and vpcd know it)
# pcscd answers these itself when the driver does not know them.
SCARD_ATTR_DEVICE_FRIENDLY_NAME = 0x7FFF0003
SCARD_ATTR_DEVICE_SYSTEM_NAME = 0x7FFF0004
CM_IOCTL_GET_FEATURE_REQUEST = 0x42000D48  # SCARD_CTL_CODE(3400)

# Plain ints in the table, so what leaves the backend packs as numbers, not enum members.
CARD_READY = int(
    ReaderStatus.SCARD_PRESENT | ReaderStatus.SCARD_POWERED | ReaderStatus.SCARD_NEGOTIABLE
)
CARD_UNPOWERED = int(ReaderStatus.SCARD_PRESENT)
NO_CARD = int(ReaderStatus.SCARD_ABSENT)
SHARING_EXCLUSIVE = -1
NO_EVENT = 0
_TRANSPORT_PROTOCOLS = Protocol.T0 | Protocol.T1 | Protocol.RAW | Protocol.ANY_OLD
_DISPOSITIONS = frozenset(int(d) for d in Disposition)
_SHARE_MODES = frozenset(int(m) for m in ShareMode)
_CARD_ACTIONS = (Disposition.RESET_CARD, Disposition.UNPOWER_CARD)


@dataclass(eq=False)
class Reader:
    """One slot of pcscd's readers-state table, plus the daemon's private reader context."""

    name: str
    card: SimulatedCard | None = None
    event_counter: int = 0
    status: int = NO_CARD  # pcscd's readerState bits
    atr: bytes = b""
    protocol: int = 0  # cardProtocol: set by the first negotiation
    sharing: int = 0  # -1 exclusive, else the number of handles
    lock_owner: Handle | None = None  # hLockId: transaction (or exclusive) owner
    lock_count: int = 0
    handles: list[Handle] = field(default_factory=list)
    removed: bool = False


@dataclass(eq=False)
class Handle:
    """A card handle (SCardConnect's hCard) on one reader, owned by one context."""

    id: int
    context: Context
    reader: Reader
    event: int = NO_EVENT  # pending SCARD_W_RESET_CARD / SCARD_W_REMOVED_CARD until reconnect


@dataclass(eq=False)
class Context:
    """A client context as pcscd knows it: its id and its card handles."""

    id: int
    handles: list[Handle] = field(default_factory=list)


def fail(rv: int, message: str = "") -> PCSCError:
    return PCSCError(rv, message)


def negotiate_protocol(atr: bytes, preferred: int) -> int:
    """pcscd's PHSetProtocol: T=1 when both sides allow it, else T=0."""
    if preferred & Protocol.ANY_OLD:
        preferred = Protocol.T0 | Protocol.T1
    usable = preferred & offered_protocols(atr)
    if usable & Protocol.T1:
        return Protocol.T1
    if usable & Protocol.T0:
        return Protocol.T0
    raise fail(RC.SCARD_E_PROTO_MISMATCH, "the card offers none of the preferred protocols")


def _nothing() -> None:
    pass


class Daemon:
    """The readers, contexts and card handles of one simulated pcscd, and its rules.

    Not thread-safe: the caller serialises every call (the backend holds its state lock).
    """

    def __init__(self, on_change: Callable[[], None] = _nothing) -> None:
        self.readers: dict[str, Reader] = {}  # insertion order = slot order
        self.contexts: dict[int, Context] = {}
        self.handles: dict[int, Handle] = {}
        self.reader_events = 1  # pcsc-lite 2.x: +1 per reader added/removed, never 0
        self._changed = on_change

    # --- the person at the machine ---------------------------------------------------------
    def add_reader(self, name: str, card: SimulatedCard | None = None) -> None:
        """Plug a reader in (with a card already in it, the counter stays 0 as in pcscd)."""
        if not name or len(name.encode()) >= MAX_READERNAME:
            raise ValueError(f"bad reader name {name!r}")
        if name in self.readers:
            raise ValueError(f"reader {name!r} exists")
        reader = Reader(name)
        if card is not None:
            _power_card_in(reader, card)
        self.readers[name] = reader
        self._count_reader_event()
        self._changed()

    def remove_reader(self, name: str) -> None:
        """Unplug a reader: its handles stay allocated but every call on them fails."""
        reader = self.reader(name)
        if reader.card is not None:
            reader.card.power_off()
        reader.removed = True
        reader.lock_owner, reader.lock_count = None, 0
        del self.readers[name]
        self._count_reader_event()
        self._changed()

    def insert_card(self, name: str, card: SimulatedCard | None = None) -> SimulatedCard:
        """Insert a card (a fresh SimulatedCard labelled with the reader name by default)."""
        slot = self.reader(name)
        if slot.card is not None:
            raise ValueError(f"reader {name!r} already holds a card")
        card = card or SimulatedCard(label=name)
        _power_card_in(slot, card)
        _count_card_event(slot)
        self._changed()
        return card

    def remove_card(self, name: str) -> SimulatedCard | None:
        """Pull the card out; returns it (None if the reader was empty)."""
        slot = self.reader(name)
        card = slot.card
        if card is None:
            return None
        card.power_off()
        slot.card, slot.atr, slot.protocol = None, b"", 0
        slot.status = NO_CARD
        for handle in slot.handles:
            handle.event = RC.SCARD_W_REMOVED_CARD
        slot.lock_owner, slot.lock_count = None, 0  # pcscd unlocks a removed card
        _count_card_event(slot)
        self._changed()
        return card

    def reader(self, name: str) -> Reader:
        """The reader called ``name``; ValueError (a test's mistake, not a PC/SC error) if none."""
        reader = self.readers.get(name)
        if reader is None:
            raise ValueError(f"no reader {name!r}")
        return reader

    def _count_reader_event(self) -> None:
        self.reader_events = self.reader_events % 32767 + 1  # pcsc-lite 2.x: 1..32767

    # --- lookups ----------------------------------------------------------------------------
    def context(self, context: int) -> Context:
        ctx = self.contexts.get(context) if isinstance(context, int) else None
        if ctx is None:
            raise fail(RC.SCARD_E_INVALID_HANDLE, "unknown context")
        return ctx

    def handle(self, card: int) -> Handle:
        handle = self.handles.get(card) if isinstance(card, int) else None
        if handle is None:
            raise fail(RC.SCARD_E_INVALID_HANDLE, "unknown card handle")
        return handle

    def _new_id(self) -> int:
        # pcscd hands out random non-negative 31-bit values.
        while True:
            value = secrets.randbits(31)
            if value and value not in self.contexts and value not in self.handles:
                return value

    # --- contexts ---------------------------------------------------------------------------
    def establish_context(self) -> Context:
        context = Context(self._new_id())
        self.contexts[context.id] = context
        return context

    def release_context(self, ctx: Context) -> None:
        """As pcscd for a client that leaves: handles are disconnected with LEAVE, except the
        transaction owner's, whose card is reset (unless it was already reset or removed)."""
        for handle in list(ctx.handles):
            reader = handle.reader
            disposition = Disposition.LEAVE_CARD
            if not reader.removed and reader.lock_owner is handle:
                reader.lock_owner = None
                if handle.event == NO_EVENT:
                    disposition = Disposition.RESET_CARD
            self._disconnect(handle, disposition)
        del self.contexts[ctx.id]
        self._changed()

    def forget_clients(self) -> None:
        """The daemon goes away: every context and handle is gone with it."""
        self.contexts.clear()
        self.handles.clear()

    def list_readers(self) -> list[str]:
        if not self.readers:
            raise fail(RC.SCARD_E_NO_READERS_AVAILABLE)
        return list(self.readers)

    # --- card handles -----------------------------------------------------------------------
    def connect_target(self, reader: str, share_mode: int, preferred_protocols: int) -> Reader:
        """SCardConnect's checks before pcscd may wait: arguments, the reader, exclusivity."""
        if share_mode != ShareMode.DIRECT and not preferred_protocols & _TRANSPORT_PROTOCOLS:
            raise fail(RC.SCARD_E_PROTO_MISMATCH)
        if share_mode not in _SHARE_MODES:
            raise fail(RC.SCARD_E_INVALID_VALUE, "share mode")
        slot = self.readers.get(reader)
        if slot is None:
            raise fail(RC.SCARD_E_UNKNOWN_READER, reader)
        if slot.sharing == SHARING_EXCLUSIVE:
            raise fail(RC.SCARD_E_SHARING_VIOLATION, "reader held exclusively")
        return slot

    @staticmethod
    def connect_waits(slot: Reader, ctx: Context) -> bool:
        """pcscd waits for a transaction of another handle to end before connecting."""
        if slot.removed:
            raise fail(RC.SCARD_E_READER_UNAVAILABLE, slot.name)
        if slot.lock_owner is None:
            return False
        _refuse_self_deadlock(slot, ctx, "connect")
        return True

    def connect(
        self, ctx: Context, slot: Reader, share_mode: int, preferred_protocols: int
    ) -> Handle:
        """SCardConnect once no transaction of another handle is in the way."""
        if share_mode != ShareMode.DIRECT:
            _require_card(slot)
        _set_protocol(slot, share_mode, preferred_protocols)
        if share_mode == ShareMode.EXCLUSIVE:
            if slot.sharing != 0:
                raise fail(RC.SCARD_E_SHARING_VIOLATION, "reader in use")
            slot.sharing = SHARING_EXCLUSIVE
        else:
            slot.sharing += 1
        handle = Handle(self._new_id(), ctx, slot)
        if share_mode == ShareMode.EXCLUSIVE:
            slot.lock_owner, slot.lock_count = handle, slot.lock_count + 1
        slot.handles.append(handle)
        ctx.handles.append(handle)
        self.handles[handle.id] = handle
        self._changed()
        return handle

    def reconnect(
        self, handle: Handle, share_mode: int, preferred_protocols: int, initialization: int
    ) -> int:
        if initialization not in (
            Disposition.LEAVE_CARD,
            Disposition.RESET_CARD,
            Disposition.UNPOWER_CARD,
        ):
            raise fail(RC.SCARD_E_INVALID_VALUE, "initialization")
        if share_mode not in _SHARE_MODES:
            raise fail(RC.SCARD_E_INVALID_VALUE, "share mode")
        if share_mode != ShareMode.DIRECT and not preferred_protocols & _TRANSPORT_PROTOCOLS:
            raise fail(RC.SCARD_E_PROTO_MISMATCH)
        slot = _daemon_reader(handle)
        _check_sharing(handle)
        if initialization == Disposition.LEAVE_CARD:
            if not slot.status & ReaderStatus.SCARD_PRESENT:
                raise fail(RC.SCARD_E_NO_SMARTCARD)
            _require_card(slot)
        else:
            self._card_action(slot, initialization)
            if slot.card is None:
                raise fail(RC.SCARD_E_NO_SMARTCARD)
        _set_protocol(slot, share_mode, preferred_protocols)
        if share_mode == ShareMode.EXCLUSIVE:
            if slot.sharing != SHARING_EXCLUSIVE:
                if slot.sharing != 1:
                    raise fail(RC.SCARD_E_SHARING_VIOLATION, "other handles on the reader")
                slot.sharing = SHARING_EXCLUSIVE
                slot.lock_owner, slot.lock_count = handle, slot.lock_count + 1
        elif slot.sharing == SHARING_EXCLUSIVE:
            slot.sharing = 1
            slot.lock_count -= 1  # the exclusive mode's share of the lock
            if slot.lock_count <= 0:
                slot.lock_owner, slot.lock_count = None, 0
        handle.event = NO_EVENT  # the application has now seen the reset/removal
        self._changed()
        return slot.protocol

    @staticmethod
    def disconnect_waits(handle: Handle, disposition: int) -> bool:
        """A card action waits for another handle's transaction to end."""
        if disposition not in _DISPOSITIONS:
            raise fail(RC.SCARD_E_INVALID_VALUE, "disposition")
        slot = handle.reader
        if disposition == Disposition.LEAVE_CARD or slot.removed:
            return False
        if slot.lock_owner in (None, handle):
            return False
        _refuse_self_deadlock(slot, handle.context, "disconnect")
        return True

    def disconnect(self, handle: Handle, disposition: int) -> None:
        self._disconnect(handle, disposition)

    def begin_transaction(self, handle: Handle) -> None:
        slot = _daemon_reader(handle)
        _check_event(handle)
        _check_sharing(handle)
        slot.lock_owner, slot.lock_count = handle, slot.lock_count + 1

    def end_transaction(self, handle: Handle, disposition: int) -> None:
        if disposition not in _DISPOSITIONS:
            raise fail(RC.SCARD_E_INVALID_VALUE, "disposition")
        slot = _daemon_reader(handle)
        _check_event(handle)
        if disposition != Disposition.LEAVE_CARD and slot.lock_owner not in (None, handle):
            raise fail(RC.SCARD_E_SHARING_VIOLATION, "no card action in another's transaction")
        if disposition in _CARD_ACTIONS:
            # pcscd power-cycles for both here, and flags every handle, this one included.
            self._card_action(slot, Disposition.RESET_CARD)
        _check_sharing(handle)
        if slot.sharing == SHARING_EXCLUSIVE:
            if slot.lock_count <= 1:  # the exclusive mode's own share stays
                raise fail(RC.SCARD_E_NOT_TRANSACTED)
            slot.lock_count -= 1
        else:
            if slot.lock_count <= 0:
                raise fail(RC.SCARD_E_NOT_TRANSACTED)
            slot.lock_count -= 1
            if slot.lock_count == 0:
                slot.lock_owner = None
                self._changed()

    @staticmethod
    def status(handle: Handle) -> CardStatus:
        slot = handle.reader
        if slot.removed:  # libpcsclite finds no table entry for the handle's reader
            raise fail(RC.SCARD_E_READER_UNAVAILABLE)
        _check_sharing(handle)
        _check_event(handle)
        return CardStatus(
            slot.name, (slot.event_counter << 16) | slot.status, slot.protocol, slot.atr
        )

    @staticmethod
    def transmit(handle: Handle, protocol: int, command: bytes) -> bytes:
        slot = _daemon_reader(handle)
        _check_sharing(handle)
        _check_event(handle)
        if protocol != Protocol.RAW:
            if not slot.status & ReaderStatus.SCARD_PRESENT:
                raise fail(RC.SCARD_E_NO_SMARTCARD)
            if protocol != Protocol.ANY_OLD and protocol != slot.protocol:
                raise fail(RC.SCARD_E_PROTO_MISMATCH, "send PCI protocol")
        if slot.card is None:
            raise fail(RC.SCARD_E_NOT_TRANSACTED, "no card")
        return slot.card.process_apdu(bytes(command))

    @staticmethod
    def control(handle: Handle, control_code: int) -> bytes:
        _daemon_reader(handle)
        _check_sharing(handle)  # no retry: libpcsclite returns the violation
        if control_code == CM_IOCTL_GET_FEATURE_REQUEST:
            return b""  # a reader without PIN pad or other features: empty TLV list
        raise fail(RC.SCARD_E_UNSUPPORTED_FEATURE, f"control code 0x{control_code:08X}")

    @staticmethod
    def get_attrib(handle: Handle, attr_id: int) -> bytes:
        slot = _daemon_reader(handle)
        _check_sharing(handle)
        _check_event(handle)
        if attr_id in (SCARD_ATTR_ATR_STRING, TAG_IFD_ATR):
            return slot.atr
        if attr_id in (SCARD_ATTR_DEVICE_FRIENDLY_NAME, SCARD_ATTR_DEVICE_SYSTEM_NAME):
            return slot.name.encode() + b"\0"
        raise fail(RC.SCARD_E_UNSUPPORTED_FEATURE, f"attribute 0x{attr_id:08X}")

    @staticmethod
    def set_attrib(handle: Handle, attr_id: int) -> None:
        _daemon_reader(handle)
        _check_sharing(handle)
        _check_event(handle)
        raise fail(RC.SCARD_E_UNSUPPORTED_FEATURE, f"attribute 0x{attr_id:08X}")

    # --- state changes ----------------------------------------------------------------------
    def _card_action(self, slot: Reader, action: int) -> None:
        """RESET or UNPOWER on behalf of one handle: every handle of the reader is told."""
        for handle in slot.handles:
            handle.event = RC.SCARD_W_RESET_CARD
        slot.protocol = 0
        if slot.card is None:
            slot.status = NO_CARD
        elif action == Disposition.UNPOWER_CARD:
            slot.card.power_off()
            slot.status = CARD_UNPOWERED  # the ATR stays in the table
        else:
            slot.atr = slot.card.reset()
            slot.status = CARD_READY
        self._changed()

    def _disconnect(self, handle: Handle, disposition: int) -> None:
        slot = handle.reader
        if not slot.removed:
            if slot.lock_owner in (None, handle):
                slot.lock_owner, slot.lock_count = None, 0
            if disposition in _CARD_ACTIONS:
                self._card_action(slot, disposition)
            # EJECT: the simulated reader has no motor; pcscd's eject request does nothing here.
            if slot.sharing == SHARING_EXCLUSIVE:
                slot.sharing = 0
            else:
                slot.sharing = max(0, slot.sharing - 1)
        slot.handles.remove(handle)
        handle.context.handles.remove(handle)
        del self.handles[handle.id]
        self._changed()


# --- the daemon's checks --------------------------------------------------------------------
def _daemon_reader(handle: Handle) -> Reader:
    if handle.reader.removed:  # pcscd finds no reader for the handle any more
        raise fail(RC.SCARD_E_INVALID_VALUE, "reader removed")
    return handle.reader


def _check_sharing(handle: Handle) -> None:
    owner = handle.reader.lock_owner
    if owner is not None and owner is not handle:
        raise fail(RC.SCARD_E_SHARING_VIOLATION, "another handle holds the transaction")


def _check_event(handle: Handle) -> None:
    if handle.event != NO_EVENT:
        raise fail(handle.event)


def _refuse_self_deadlock(slot: Reader, ctx: Context, what: str) -> None:
    owner = slot.lock_owner
    if owner is not None and owner.context is ctx:
        raise fail(
            RC.SCARD_F_INTERNAL_ERROR,
            f"{what} waits for a transaction held on its own context: pcsc-lite hangs here",
        )


def _require_card(slot: Reader) -> None:
    if slot.card is None:
        raise fail(RC.SCARD_E_NO_SMARTCARD)
    if not slot.status & ReaderStatus.SCARD_POWERED:
        slot.atr = slot.card.power_on()
        slot.status = CARD_READY


def _set_protocol(slot: Reader, share_mode: int, preferred: int) -> None:
    if preferred & Protocol.RAW:
        slot.protocol = int(Protocol.RAW)  # pcscd takes RAW without asking the card
    elif share_mode != ShareMode.DIRECT:
        if slot.protocol == Protocol.UNDEFINED:
            slot.protocol = int(negotiate_protocol(slot.atr, preferred))
        elif not preferred & slot.protocol:
            raise fail(RC.SCARD_E_PROTO_MISMATCH, "card already uses another protocol")


def _power_card_in(slot: Reader, card: SimulatedCard) -> None:
    slot.card = card
    slot.atr = card.power_on()  # pcscd powers a card up when it sees it
    slot.status = CARD_READY
    slot.protocol = 0


def _count_card_event(slot: Reader) -> None:
    slot.event_counter = (slot.event_counter + 1) & 0xFFFF
