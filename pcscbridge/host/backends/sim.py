"""A PC/SC stack in software: readers, cards and pcscd's arbitration, for demos and fast tests.

What a caller sees is what a pcsc-lite 1.9.9 application sees through libpcsclite and pcscd
(read from their source and checked against the real daemon with pyscard): the daemon's
arbitration (sharing count, transaction lock, per-handle reset/removed events, protocol
negotiation) and the client library's part (SCardGetStatusChange computed from the
readers-state table, retry loops on SCARD_E_SHARING_VIOLATION, one call at a time per context).

Blocking follows the real stack, with one Condition instead of pcsc-lite's polling:
  * get_status_change waits for a change of the readers-state table; cancel() ends it.
  * begin_transaction, transmit, status and reconnect wait while another handle holds the
    reader's transaction (libpcsclite retries them every 100 ms); the context is free for
    other calls meanwhile, so disconnect/release_context from another thread ends the wait
    with SCARD_E_INVALID_HANDLE. SCardCancel does not end these waits, in pcsc-lite nor here.
  * connect, and disconnect with a card action, wait inside "the daemon" while another
    handle holds the transaction, keeping their context busy (as libpcsclite does).
  * Calls on one context are serialised, as libpcsclite's per-context mutex does: a
    get_status_change in progress delays every other call on its context but cancel().

Deviations from pcsc-lite 1.9.9 (all deliberate):
  * The PnP pseudo-reader reports pcsc-lite 2.x's reader-events counter in the upper 16 bits
    and flags CHANGED when the caller's counter differs; 1.9.9 reports 0 and only notices a
    reader count change during the call. A 2.x-style caller works with both.
  * Where pcsc-lite would hang forever (connect, or disconnect with a card action, on the same
    context that holds the reader's transaction) this raises SCARD_F_INTERNAL_ERROR.
  * reconnect from EXCLUSIVE to SHARED/DIRECT releases the exclusive lock; pcscd 1.9.9 keeps
    it, so later connects block until the handle is disconnected.
  * reconnect with SCARD_LEAVE_CARD powers a card that an UNPOWER disposition switched off
    (pcscd leaves it unpowered and relies on the driver to cope).
  * close() ends waits with SCARD_F_COMM_ERROR and later calls get SCARD_E_NO_SERVICE, as
    libpcsclite reports a daemon that went away.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from ...iso7816.atr import offered_protocols
from ...pcsc import (
    INFINITE,
    MAX_BUFFER_SIZE_EXTENDED,
    PNP_NOTIFICATION,
    Disposition,
    PCSCError,
    Protocol,
    ReaderStatus,
    ShareMode,
    State,
)
from ...pcsc import ReturnCode as RC
from ..backend import CardStatus, ReaderState
from .simcard import SimulatedCard, requested_delay

T = TypeVar("T")

# libpcsclite 1.9.9 refuses more reader states in one SCardGetStatusChange.
MAX_READER_STATES = 16
# szReader is 128 bytes with its NUL.
MAX_READERNAME = 128

SCARD_ATTR_ATR_STRING = 0x00090303
TAG_IFD_ATR = 0x0303  # the IFD handler's own tag for the same value (CCID and vpcd know it)
# pcscd answers these itself when the driver does not know them.
SCARD_ATTR_DEVICE_FRIENDLY_NAME = 0x7FFF0003
SCARD_ATTR_DEVICE_SYSTEM_NAME = 0x7FFF0004
CM_IOCTL_GET_FEATURE_REQUEST = 0x42000D48  # SCARD_CTL_CODE(3400)

# Plain ints in the table, so what leaves the backend packs as numbers, not enum members.
_CARD_READY = int(
    ReaderStatus.SCARD_PRESENT | ReaderStatus.SCARD_POWERED | ReaderStatus.SCARD_NEGOTIABLE
)
_CARD_UNPOWERED = int(ReaderStatus.SCARD_PRESENT)
_NO_CARD = int(ReaderStatus.SCARD_ABSENT)
_SHARING_EXCLUSIVE = -1
_NO_EVENT = 0
_TRANSPORT_PROTOCOLS = Protocol.T0 | Protocol.T1 | Protocol.RAW | Protocol.ANY_OLD
_DISPOSITIONS = frozenset(int(d) for d in Disposition)
_SHARE_MODES = frozenset(int(m) for m in ShareMode)


@dataclass(eq=False)
class _Reader:
    """One slot of pcscd's readers-state table, plus the daemon's private reader context."""

    name: str
    card: SimulatedCard | None = None
    event_counter: int = 0
    status: int = _NO_CARD  # pcscd's readerState bits
    atr: bytes = b""
    protocol: int = 0  # cardProtocol: set by the first negotiation
    sharing: int = 0  # -1 exclusive, else the number of handles
    lock_owner: _Handle | None = None  # hLockId: transaction (or exclusive) owner
    lock_count: int = 0
    handles: list[_Handle] = field(default_factory=list)
    removed: bool = False


@dataclass(eq=False)
class _Context:
    id: int
    # libpcsclite's per-context mutex: one call at a time per context.
    call_lock: threading.Lock = field(default_factory=threading.Lock)
    handles: list[_Handle] = field(default_factory=list)
    waiting: bool = False  # inside get_status_change: what SCardCancel can end
    cancelled: bool = False


@dataclass(eq=False)
class _Handle:
    id: int
    context: _Context
    reader: _Reader
    event: int = _NO_EVENT  # pending SCARD_W_RESET_CARD / SCARD_W_REMOVED_CARD until reconnect


def _fail(rv: int, message: str = "") -> PCSCError:
    return PCSCError(rv, message)


atr_protocols = offered_protocols  # the name the tests know


def negotiate_protocol(atr: bytes, preferred: int) -> int:
    """pcscd's PHSetProtocol: T=1 when both sides allow it, else T=0."""
    if preferred & Protocol.ANY_OLD:
        preferred = Protocol.T0 | Protocol.T1
    usable = preferred & offered_protocols(atr)
    if usable & Protocol.T1:
        return Protocol.T1
    if usable & Protocol.T0:
        return Protocol.T0
    raise _fail(RC.SCARD_E_PROTO_MISMATCH, "the card offers none of the preferred protocols")


class SimulatedBackend:
    """Backend over simulated readers and SimulatedCard cards; see the module docstring.

    The test-facing methods (insert_card, remove_card, add_reader, remove_reader) may be
    called from any thread, like a person at the machine.
    """

    name = "sim"

    def __init__(self, readers: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # every state change notifies it
        # Separate, so counting a blocked call does not wake the blocked calls themselves.
        self._blocked_changed = threading.Condition(self._lock)
        self._blocked = 0
        self._generation = 0  # bumped on every change a waiter may care about
        self._readers: dict[str, _Reader] = {}  # insertion order = slot order
        self._contexts: dict[int, _Context] = {}
        self._handles: dict[int, _Handle] = {}
        self._reader_events = 1  # pcsc-lite 2.x: +1 per reader added/removed, never 0
        self._closed = False
        for name in readers:
            self.add_reader(name)

    @classmethod
    def with_demo_readers(cls) -> SimulatedBackend:
        """Two readers, a card in the first: what `pcscbridge host --backend sim` shows."""
        backend = cls(["Sim Reader 00 00", "Sim Reader 01 00"])
        backend.insert_card("Sim Reader 00 00", SimulatedCard(label="demo card"))
        return backend

    # --- the person at the machine ---------------------------------------------------------
    def add_reader(self, name: str, card: SimulatedCard | None = None) -> None:
        """Plug a reader in (with a card already in it, the counter stays 0 as in pcscd)."""
        if not name or len(name.encode()) >= MAX_READERNAME:
            raise ValueError(f"bad reader name {name!r}")
        with self._cond:
            if name in self._readers:
                raise ValueError(f"reader {name!r} exists")
            reader = _Reader(name)
            if card is not None:
                self._power_card_in(reader, card)
            self._readers[name] = reader
            self._count_reader_event()
            self._changed()

    def remove_reader(self, name: str) -> None:
        """Unplug a reader: its handles stay allocated but every call on them fails."""
        with self._cond:
            reader = self._reader_or_value_error(name)
            if reader.card is not None:
                reader.card.power_off()
            reader.removed = True
            reader.lock_owner, reader.lock_count = None, 0
            del self._readers[name]
            self._count_reader_event()
            self._changed()

    def insert_card(self, reader: str, card: SimulatedCard | None = None) -> SimulatedCard:
        """Insert a card (a fresh SimulatedCard labelled with the reader name by default)."""
        with self._cond:
            slot = self._reader_or_value_error(reader)
            if slot.card is not None:
                raise ValueError(f"reader {reader!r} already holds a card")
            card = card or SimulatedCard(label=reader)
            self._power_card_in(slot, card)
            self._count_card_event(slot)
            self._changed()
            return card

    def remove_card(self, reader: str) -> SimulatedCard | None:
        """Pull the card out; returns it (None if the reader was empty)."""
        with self._cond:
            slot = self._reader_or_value_error(reader)
            card = slot.card
            if card is None:
                return None
            card.power_off()
            slot.card, slot.atr, slot.protocol = None, b"", 0
            slot.status = _NO_CARD
            for handle in slot.handles:
                handle.event = RC.SCARD_W_REMOVED_CARD
            slot.lock_owner, slot.lock_count = None, 0  # pcscd unlocks a removed card
            self._count_card_event(slot)
            self._changed()
            return card

    @property
    def blocked_calls(self) -> int:
        """How many calls are waiting inside the backend right now (test aid)."""
        with self._lock:
            return self._blocked

    def wait_for_blocked_calls(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Test aid: waits until at least `count` calls wait inside the backend (a status
        change wait, a transaction wait, a slow card...), so a test can act on a blocked call
        without sleeping. Calls queued behind a busy context do not count."""
        with self._lock:
            return self._blocked_changed.wait_for(lambda: self._blocked >= count, timeout)

    def card_in(self, reader: str) -> SimulatedCard | None:
        with self._cond:
            return self._reader_or_value_error(reader).card

    # --- contexts ---------------------------------------------------------------------------
    def establish_context(self) -> int:
        with self._cond:
            self._check_open()
            context = _Context(self._new_id())
            self._contexts[context.id] = context
            return context.id

    def release_context(self, context: int) -> None:
        """As pcscd for a client that leaves: handles are disconnected with LEAVE, except the
        transaction owner's, whose card is reset (unless it was already reset or removed)."""
        with self._context_call(context) as ctx:
            for handle in list(ctx.handles):
                reader = handle.reader
                disposition = Disposition.LEAVE_CARD
                if not reader.removed and reader.lock_owner is handle:
                    reader.lock_owner = None
                    if handle.event == _NO_EVENT:
                        disposition = Disposition.RESET_CARD
                self._disconnect(handle, disposition)
            del self._contexts[ctx.id]
            self._changed()

    def list_readers(self, context: int) -> list[str]:
        with self._context_call(context):
            if not self._readers:
                raise _fail(RC.SCARD_E_NO_READERS_AVAILABLE)
            return list(self._readers)

    def cancel(self, context: int) -> None:
        """Ends a get_status_change in progress on `context`; a no-op otherwise (as pcsc-lite)."""
        with self._cond:
            self._check_open()
            ctx = self._live_context(context)
            if ctx.waiting:
                ctx.cancelled = True
                self._cond.notify_all()

    def get_status_change(
        self, context: int, timeout_ms: int, states: list[ReaderState]
    ) -> list[ReaderState]:
        if len(states) > MAX_READER_STATES:
            raise _fail(RC.SCARD_E_INVALID_PARAMETER, "too many reader states")
        if all(state.current_state & State.IGNORE for state in states):
            # libpcsclite returns at once, before even looking at the context.
            return [_copy_state(state) for state in states]
        with self._context_call(context) as ctx:
            for state in states:  # IGNOREd entries are checked too, as libpcsclite does
                if state.reader not in self._readers and not _is_pnp(state.reader):
                    raise _fail(RC.SCARD_E_UNKNOWN_READER, state.reader)
            results = [ReaderState(state.reader, state.current_state) for state in states]
            changed = self._start_pnp(results)
            reader_count = len(self._readers)
            deadline = _deadline(timeout_ms)
            ctx.waiting, ctx.cancelled = True, False
            try:
                while True:
                    reader_count, changed_now = self._evaluate(results, reader_count)
                    if changed or changed_now:
                        return results
                    self._wait_for_change(ctx, deadline)
            finally:
                ctx.waiting = ctx.cancelled = False

    # --- card handles -----------------------------------------------------------------------
    def connect(
        self, context: int, reader: str, share_mode: int, preferred_protocols: int
    ) -> tuple[int, int]:
        if len(reader.encode()) > MAX_READERNAME:  # libpcsclite's own check
            raise _fail(RC.SCARD_E_INVALID_VALUE, "reader name too long")
        with self._context_call(context) as ctx:
            if share_mode != ShareMode.DIRECT and not preferred_protocols & _TRANSPORT_PROTOCOLS:
                raise _fail(RC.SCARD_E_PROTO_MISMATCH)
            if share_mode not in _SHARE_MODES:
                raise _fail(RC.SCARD_E_INVALID_VALUE, "share mode")
            slot = self._readers.get(reader)
            if slot is None:
                raise _fail(RC.SCARD_E_UNKNOWN_READER, reader)
            if slot.sharing == _SHARING_EXCLUSIVE:
                raise _fail(RC.SCARD_E_SHARING_VIOLATION, "reader held exclusively")
            # pcscd waits for a transaction of another handle to end before connecting.
            while slot.lock_owner is not None:
                self._refuse_self_deadlock(slot, ctx, "connect")
                self._wait_in_daemon()
                if slot.removed:
                    raise _fail(RC.SCARD_E_READER_UNAVAILABLE, reader)
            if share_mode != ShareMode.DIRECT:
                self._require_card(slot)
            self._set_protocol(slot, share_mode, preferred_protocols)
            if share_mode == ShareMode.EXCLUSIVE:
                if slot.sharing != 0:
                    raise _fail(RC.SCARD_E_SHARING_VIOLATION, "reader in use")
                slot.sharing = _SHARING_EXCLUSIVE
            else:
                slot.sharing += 1
            handle = _Handle(self._new_id(), ctx, slot)
            if share_mode == ShareMode.EXCLUSIVE:
                slot.lock_owner, slot.lock_count = handle, slot.lock_count + 1
            slot.handles.append(handle)
            ctx.handles.append(handle)
            self._handles[handle.id] = handle
            self._changed()
            return handle.id, slot.protocol

    def reconnect(
        self, card: int, share_mode: int, preferred_protocols: int, initialization: int
    ) -> int:
        def attempt(handle: _Handle) -> int:
            if initialization not in (
                Disposition.LEAVE_CARD,
                Disposition.RESET_CARD,
                Disposition.UNPOWER_CARD,
            ):
                raise _fail(RC.SCARD_E_INVALID_VALUE, "initialization")
            if share_mode not in _SHARE_MODES:
                raise _fail(RC.SCARD_E_INVALID_VALUE, "share mode")
            if share_mode != ShareMode.DIRECT and not preferred_protocols & _TRANSPORT_PROTOCOLS:
                raise _fail(RC.SCARD_E_PROTO_MISMATCH)
            slot = self._daemon_reader(handle)
            self._check_sharing(handle)
            if initialization == Disposition.LEAVE_CARD:
                if not slot.status & ReaderStatus.SCARD_PRESENT:
                    raise _fail(RC.SCARD_E_NO_SMARTCARD)
                self._require_card(slot)
            else:
                self._card_action(slot, initialization)
                if slot.card is None:
                    raise _fail(RC.SCARD_E_NO_SMARTCARD)
            self._set_protocol(slot, share_mode, preferred_protocols)
            if share_mode == ShareMode.EXCLUSIVE:
                if slot.sharing != _SHARING_EXCLUSIVE:
                    if slot.sharing != 1:
                        raise _fail(RC.SCARD_E_SHARING_VIOLATION, "other handles on the reader")
                    slot.sharing = _SHARING_EXCLUSIVE
                    slot.lock_owner, slot.lock_count = handle, slot.lock_count + 1
            elif slot.sharing == _SHARING_EXCLUSIVE:
                slot.sharing = 1
                slot.lock_count -= 1  # the exclusive mode's share of the lock
                if slot.lock_count <= 0:
                    slot.lock_owner, slot.lock_count = None, 0
            handle.event = _NO_EVENT  # the application has now seen the reset/removal
            self._changed()
            return slot.protocol

        return self._handle_call(card, attempt, retry_on_sharing_violation=True)

    def disconnect(self, card: int, disposition: int) -> None:
        def attempt(handle: _Handle) -> None:
            if disposition not in _DISPOSITIONS:
                raise _fail(RC.SCARD_E_INVALID_VALUE, "disposition")
            slot = handle.reader
            if disposition != Disposition.LEAVE_CARD:
                # A card action waits for another handle's transaction to end.
                while slot.lock_owner not in (None, handle) and not slot.removed:
                    self._refuse_self_deadlock(slot, handle.context, "disconnect")
                    self._wait_in_daemon()
            self._disconnect(handle, disposition)

        self._handle_call(card, attempt)

    def begin_transaction(self, card: int) -> None:
        def attempt(handle: _Handle) -> None:
            slot = self._daemon_reader(handle)
            self._check_event(handle)
            self._check_sharing(handle)
            slot.lock_owner, slot.lock_count = handle, slot.lock_count + 1

        self._handle_call(card, attempt, retry_on_sharing_violation=True)

    def end_transaction(self, card: int, disposition: int) -> None:
        def attempt(handle: _Handle) -> None:
            if disposition not in _DISPOSITIONS:
                raise _fail(RC.SCARD_E_INVALID_VALUE, "disposition")
            slot = self._daemon_reader(handle)
            self._check_event(handle)
            if disposition != Disposition.LEAVE_CARD and slot.lock_owner not in (None, handle):
                raise _fail(RC.SCARD_E_SHARING_VIOLATION, "no card action in another's transaction")
            if disposition in (Disposition.RESET_CARD, Disposition.UNPOWER_CARD):
                # pcscd power-cycles for both here, and flags every handle, this one included.
                self._card_action(slot, Disposition.RESET_CARD)
            self._check_sharing(handle)
            if slot.sharing == _SHARING_EXCLUSIVE:
                if slot.lock_count <= 1:  # the exclusive mode's own share stays
                    raise _fail(RC.SCARD_E_NOT_TRANSACTED)
                slot.lock_count -= 1
            else:
                if slot.lock_count <= 0:
                    raise _fail(RC.SCARD_E_NOT_TRANSACTED)
                slot.lock_count -= 1
                if slot.lock_count == 0:
                    slot.lock_owner = None
                    self._changed()

        self._handle_call(card, attempt)

    def status(self, card: int) -> CardStatus:
        def attempt(handle: _Handle) -> CardStatus:
            slot = handle.reader
            if slot.removed:  # libpcsclite finds no table entry for the handle's reader
                raise _fail(RC.SCARD_E_READER_UNAVAILABLE)
            self._check_sharing(handle)
            self._check_event(handle)
            return CardStatus(
                slot.name, (slot.event_counter << 16) | slot.status, slot.protocol, slot.atr
            )

        return self._handle_call(card, attempt, retry_on_sharing_violation=True)

    def transmit(self, card: int, protocol: int, command: bytes) -> bytes:
        if len(command) > MAX_BUFFER_SIZE_EXTENDED:
            raise _fail(RC.SCARD_E_INSUFFICIENT_BUFFER, "command too long")

        def attempt(handle: _Handle) -> bytes:
            slot = self._daemon_reader(handle)
            self._check_sharing(handle)
            self._check_event(handle)
            if protocol != Protocol.RAW:
                if not slot.status & ReaderStatus.SCARD_PRESENT:
                    raise _fail(RC.SCARD_E_NO_SMARTCARD)
                if protocol != Protocol.ANY_OLD and protocol != slot.protocol:
                    raise _fail(RC.SCARD_E_PROTO_MISMATCH, "send PCI protocol")
            if slot.card is None:
                raise _fail(RC.SCARD_E_NOT_TRANSACTED, "no card")
            response = slot.card.process_apdu(bytes(command))
            deadline = time.monotonic() + requested_delay(command)
            # A slow card: its context stays busy, the other readers do not.
            while not self._closed and time.monotonic() < deadline:
                self._block(deadline - time.monotonic())
            return response

        return self._handle_call(card, attempt, retry_on_sharing_violation=True)

    def control(self, card: int, control_code: int, data: bytes) -> bytes:
        if len(data) > MAX_BUFFER_SIZE_EXTENDED:
            raise _fail(RC.SCARD_E_INSUFFICIENT_BUFFER, "control data too long")

        def attempt(handle: _Handle) -> bytes:
            self._daemon_reader(handle)
            self._check_sharing(handle)  # no retry: libpcsclite returns the violation
            if control_code == CM_IOCTL_GET_FEATURE_REQUEST:
                return b""  # a reader without PIN pad or other features: empty TLV list
            raise _fail(RC.SCARD_E_UNSUPPORTED_FEATURE, f"control code 0x{control_code:08X}")

        return self._handle_call(card, attempt)

    def get_attrib(self, card: int, attr_id: int) -> bytes:
        def attempt(handle: _Handle) -> bytes:
            slot = self._daemon_reader(handle)
            self._check_sharing(handle)
            self._check_event(handle)
            if attr_id in (SCARD_ATTR_ATR_STRING, TAG_IFD_ATR):
                return slot.atr
            if attr_id in (SCARD_ATTR_DEVICE_FRIENDLY_NAME, SCARD_ATTR_DEVICE_SYSTEM_NAME):
                return slot.name.encode() + b"\0"
            raise _fail(RC.SCARD_E_UNSUPPORTED_FEATURE, f"attribute 0x{attr_id:08X}")

        return self._handle_call(card, attempt)

    def set_attrib(self, card: int, attr_id: int, value: bytes) -> None:
        def attempt(handle: _Handle) -> None:
            self._daemon_reader(handle)
            self._check_sharing(handle)
            self._check_event(handle)
            raise _fail(RC.SCARD_E_UNSUPPORTED_FEATURE, f"attribute 0x{attr_id:08X}")

        self._handle_call(card, attempt)

    def close(self) -> None:
        """The resource manager goes away: waits end, later calls fail with NO_SERVICE."""
        with self._cond:
            self._closed = True
            self._contexts.clear()
            self._handles.clear()
            self._changed()

    # --- call plumbing ----------------------------------------------------------------------
    @contextmanager
    def _context_call(self, context: int) -> Iterator[_Context]:
        """One call on `context`: its call lock (libpcsclite's mutex), then the state lock."""
        with self._cond:
            self._check_open()
            ctx = self._live_context(context)
        with ctx.call_lock, self._cond:
            self._check_open()
            if self._contexts.get(context) is not ctx:  # released while we queued
                raise _fail(RC.SCARD_E_INVALID_HANDLE, "context released")
            yield ctx

    def _handle_call(
        self,
        card: int,
        attempt: Callable[[_Handle], T],
        *,
        retry_on_sharing_violation: bool = False,
    ) -> T:
        """Runs `attempt` as one daemon request on the handle's context. With the retry flag,
        a sharing violation is retried after the next change, as libpcsclite retries it, with
        the context free in between."""
        while True:
            with self._cond:
                self._check_open()
                handle = self._live_handle(card)
            with handle.context.call_lock, self._cond:
                self._check_open()
                if self._handles.get(card) is not handle:
                    raise _fail(RC.SCARD_E_INVALID_HANDLE)
                try:
                    return attempt(handle)
                except PCSCError as exc:
                    if not (retry_on_sharing_violation and exc.rv == RC.SCARD_E_SHARING_VIOLATION):
                        raise
                generation = self._generation
            self._wait_past(generation)

    def _wait_for_change(self, ctx: _Context, deadline: float | None) -> None:
        """Waits (state lock held) for the next change; raises on cancel, close or timeout."""
        generation = self._generation
        while generation == self._generation:
            if ctx.cancelled:
                raise _fail(RC.SCARD_E_CANCELLED)
            if self._closed:
                raise _fail(RC.SCARD_F_COMM_ERROR, "the simulated service closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _fail(RC.SCARD_E_TIMEOUT)
            self._block(remaining)
        if ctx.cancelled:
            raise _fail(RC.SCARD_E_CANCELLED)

    def _wait_past(self, generation: int) -> None:
        with self._cond:
            while self._generation == generation and not self._closed:
                self._block()
            if self._closed:
                raise _fail(RC.SCARD_F_COMM_ERROR, "the simulated service closed")

    def _wait_in_daemon(self) -> None:
        self._block()
        if self._closed:
            raise _fail(RC.SCARD_F_COMM_ERROR, "the simulated service closed")

    def _block(self, timeout: float | None = None) -> None:
        """Waits for a notification (state lock held), counted for wait_for_blocked_calls."""
        self._blocked += 1
        self._blocked_changed.notify_all()
        try:
            self._cond.wait(timeout)
        finally:
            self._blocked -= 1

    def _changed(self) -> None:
        self._generation += 1
        self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise _fail(RC.SCARD_E_NO_SERVICE, "the simulated service is closed")

    def _live_context(self, context: int) -> _Context:
        ctx = self._contexts.get(context) if isinstance(context, int) else None
        if ctx is None:
            raise _fail(RC.SCARD_E_INVALID_HANDLE, "unknown context")
        return ctx

    def _live_handle(self, card: int) -> _Handle:
        handle = self._handles.get(card) if isinstance(card, int) else None
        if handle is None:
            raise _fail(RC.SCARD_E_INVALID_HANDLE, "unknown card handle")
        return handle

    def _new_id(self) -> int:
        # pcscd hands out random non-negative 31-bit values.
        while True:
            value = secrets.randbits(31)
            if value and value not in self._contexts and value not in self._handles:
                return value

    def _reader_or_value_error(self, name: str) -> _Reader:
        reader = self._readers.get(name)
        if reader is None:
            raise ValueError(f"no reader {name!r}")
        return reader

    # --- the daemon's checks ----------------------------------------------------------------
    @staticmethod
    def _daemon_reader(handle: _Handle) -> _Reader:
        if handle.reader.removed:  # pcscd finds no reader for the handle any more
            raise _fail(RC.SCARD_E_INVALID_VALUE, "reader removed")
        return handle.reader

    @staticmethod
    def _check_sharing(handle: _Handle) -> None:
        owner = handle.reader.lock_owner
        if owner is not None and owner is not handle:
            raise _fail(RC.SCARD_E_SHARING_VIOLATION, "another handle holds the transaction")

    @staticmethod
    def _check_event(handle: _Handle) -> None:
        if handle.event != _NO_EVENT:
            raise _fail(handle.event)

    @staticmethod
    def _refuse_self_deadlock(slot: _Reader, ctx: _Context, what: str) -> None:
        owner = slot.lock_owner
        if owner is not None and owner.context is ctx:
            raise _fail(
                RC.SCARD_F_INTERNAL_ERROR,
                f"{what} waits for a transaction held on its own context: pcsc-lite hangs here",
            )

    @staticmethod
    def _require_card(slot: _Reader) -> None:
        if slot.card is None:
            raise _fail(RC.SCARD_E_NO_SMARTCARD)
        if not slot.status & ReaderStatus.SCARD_POWERED:
            slot.atr = slot.card.power_on()
            slot.status = _CARD_READY

    @staticmethod
    def _set_protocol(slot: _Reader, share_mode: int, preferred: int) -> None:
        if preferred & Protocol.RAW:
            slot.protocol = int(Protocol.RAW)  # pcscd takes RAW without asking the card
        elif share_mode != ShareMode.DIRECT:
            if slot.protocol == Protocol.UNDEFINED:
                slot.protocol = int(negotiate_protocol(slot.atr, preferred))
            elif not preferred & slot.protocol:
                raise _fail(RC.SCARD_E_PROTO_MISMATCH, "card already uses another protocol")

    def _card_action(self, slot: _Reader, action: int) -> None:
        """RESET or UNPOWER on behalf of one handle: every handle of the reader is told."""
        for handle in slot.handles:
            handle.event = RC.SCARD_W_RESET_CARD
        slot.protocol = 0
        if slot.card is None:
            slot.status = _NO_CARD
        elif action == Disposition.UNPOWER_CARD:
            slot.card.power_off()
            slot.status = _CARD_UNPOWERED  # the ATR stays in the table
        else:
            slot.atr = slot.card.reset()
            slot.status = _CARD_READY
        self._changed()

    def _disconnect(self, handle: _Handle, disposition: int) -> None:
        slot = handle.reader
        if not slot.removed:
            if slot.lock_owner in (None, handle):
                slot.lock_owner, slot.lock_count = None, 0
            if disposition in (Disposition.RESET_CARD, Disposition.UNPOWER_CARD):
                self._card_action(slot, disposition)
            # EJECT: the simulated reader has no motor; pcscd's eject request does nothing here.
            if slot.sharing == _SHARING_EXCLUSIVE:
                slot.sharing = 0
            else:
                slot.sharing = max(0, slot.sharing - 1)
        slot.handles.remove(handle)
        handle.context.handles.remove(handle)
        del self._handles[handle.id]
        self._changed()

    def _power_card_in(self, slot: _Reader, card: SimulatedCard) -> None:
        slot.card = card
        slot.atr = card.power_on()  # pcscd powers a card up when it sees it
        slot.status = _CARD_READY
        slot.protocol = 0

    @staticmethod
    def _count_card_event(slot: _Reader) -> None:
        slot.event_counter = (slot.event_counter + 1) & 0xFFFF

    def _count_reader_event(self) -> None:
        self._reader_events = self._reader_events % 32767 + 1  # pcsc-lite 2.x: 1..32767

    # --- SCardGetStatusChange, as libpcsclite computes it ------------------------------------
    def _start_pnp(self, results: list[ReaderState]) -> bool:
        """pcsc-lite 2.x: the PnP entry carries the reader-events counter in its upper word."""
        changed = False
        for state in results:
            if _is_pnp(state.reader) and not state.current_state & State.IGNORE:
                previous = state.current_state >> 16
                state.event_state = self._reader_events << 16
                if previous and previous != self._reader_events:
                    state.event_state |= _S_CHANGED
                    changed = True
        return changed

    def _evaluate(self, results: list[ReaderState], reader_count: int) -> tuple[int, bool]:
        """One pass of libpcsclite's loop over the reader states; returns the reader count
        seen and whether anything changed relative to the caller's current_state."""
        changed = False
        for state in results:
            if state.current_state & State.IGNORE:
                continue
            slot = self._readers.get(state.reader)
            if slot is not None:
                changed |= _evaluate_reader(state, slot)
            elif _is_pnp(state.reader):
                if len(self._readers) != reader_count:
                    reader_count = len(self._readers)
                    state.event_state = (
                        (state.event_state & 0xFFFF) | (self._reader_events << 16) | _S_CHANGED
                    )
                    changed = True
            else:  # the reader went away during the call
                state.event_state = _S_UNKNOWN | _S_UNAVAILABLE
                if not state.current_state & _S_UNKNOWN:
                    state.event_state |= _S_CHANGED
                    changed = True
        return reader_count, changed


# Plain ints: ~ on an IntFlag member complements only the defined bits, which would drop
# the event counter kept in the upper 16 bits.
_S_CHANGED = int(State.CHANGED)
_S_UNKNOWN = int(State.UNKNOWN)
_S_UNAVAILABLE = int(State.UNAVAILABLE)
_S_EMPTY = int(State.EMPTY)
_S_PRESENT = int(State.PRESENT)
_S_EXCLUSIVE = int(State.EXCLUSIVE)
_S_INUSE = int(State.INUSE)
_S_MUTE = int(State.MUTE)
_CLEARED_WHEN_EMPTY = int(
    State.PRESENT
    | State.IGNORE
    | State.UNKNOWN
    | State.UNAVAILABLE
    | State.ATRMATCH
    | State.MUTE
    | State.INUSE
)
_CLEARED_WHEN_PRESENT = int(
    State.EMPTY | State.IGNORE | State.UNKNOWN | State.UNAVAILABLE | State.MUTE
)


def _evaluate_reader(state: ReaderState, slot: _Reader) -> bool:
    """libpcsclite's comparison of one table entry with the caller's current_state."""
    current = int(state.current_state)
    event = int(state.event_state)
    changed = False
    if current & _S_UNKNOWN:  # the reader came back
        event = (event | _S_CHANGED) & ~_S_UNKNOWN
        changed = True
    if current & 0xFFFF0000 and (current >> 16) & 0xFFFF != slot.event_counter:
        event |= _S_CHANGED
        changed = True
    event = (event & 0xFFFF) | (slot.event_counter << 16)
    if current & _S_UNAVAILABLE:  # no simulated reader ever fails
        event = (event & ~_S_UNAVAILABLE) | _S_CHANGED
        changed = True
    present = bool(slot.status & ReaderStatus.SCARD_PRESENT)
    state.atr = slot.atr if present else b""
    if slot.status & ReaderStatus.SCARD_ABSENT:
        event = (event | _S_EMPTY) & ~_CLEARED_WHEN_EMPTY
        if current & _S_PRESENT:
            event |= _S_CHANGED
            changed = True
    elif present:
        event = (event | _S_PRESENT) & ~_CLEARED_WHEN_PRESENT
        if current & (_S_EMPTY | _S_MUTE):
            event |= _S_CHANGED
            changed = True
    if slot.sharing == _SHARING_EXCLUSIVE:
        event = (event | _S_EXCLUSIVE) & ~_S_INUSE
        if current & _S_INUSE:
            event |= _S_CHANGED
            changed = True
    elif slot.sharing > 0:
        if present:  # a card must be there for the reader to be "in use"
            event = (event | _S_INUSE) & ~_S_EXCLUSIVE
            if current & _S_EXCLUSIVE:
                event |= _S_CHANGED
                changed = True
    else:
        event &= ~(_S_INUSE | _S_EXCLUSIVE)
        if current & (_S_INUSE | _S_EXCLUSIVE):
            event |= _S_CHANGED
            changed = True
    if current == State.UNAWARE:
        event |= _S_CHANGED
        changed = True
    state.event_state = event
    return changed


def _is_pnp(reader: str) -> bool:
    return reader.casefold() == PNP_NOTIFICATION.casefold()


def _copy_state(state: ReaderState) -> ReaderState:
    return ReaderState(state.reader, state.current_state, state.event_state, state.atr)


def _deadline(timeout_ms: int) -> float | None:
    if timeout_ms in (INFINITE, -1):
        return None
    return time.monotonic() + max(0, timeout_ms) / 1000.0
