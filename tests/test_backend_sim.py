"""The simulated backend behaves as pcsc-lite 1.9.9 does for an application.

Each expectation here was checked against the real pcscd with pyscard (tests/test_backend_pyscard.py
covers the same ground on the rig) or read from pcsc-lite's source. Blocking cases run the
blocked call in a thread and wait for it to be blocked inside the backend, never a fixed sleep;
only "still blocked" checks use a short bounded wait.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pcscbridge.host.backend import ReaderState
from pcscbridge.host.backends.sim import (
    CM_IOCTL_GET_FEATURE_REQUEST,
    SCARD_ATTR_ATR_STRING,
    SCARD_ATTR_DEVICE_FRIENDLY_NAME,
    TAG_IFD_ATR,
    SimulatedBackend,
    atr_protocols,
)
from pcscbridge.host.backends.simcard import APP_AID, DEFAULT_ATR, SimulatedCard
from pcscbridge.pcsc import (
    INFINITE,
    PNP_NOTIFICATION,
    Disposition,
    PCSCError,
    Protocol,
    ReaderStatus,
    ShareMode,
    State,
)
from pcscbridge.pcsc import ReturnCode as RC

R0 = "Sim Reader 00 00"
R1 = "Sim Reader 01 00"
SHARED, EXCLUSIVE, DIRECT = ShareMode.SHARED, ShareMode.EXCLUSIVE, ShareMode.DIRECT
LEAVE, RESET, UNPOWER = Disposition.LEAVE_CARD, Disposition.RESET_CARD, Disposition.UNPOWER_CARD
T0, T1, RAW, ANY = Protocol.T0, Protocol.T1, Protocol.RAW, Protocol.ANY
CARD_READY = ReaderStatus.SCARD_PRESENT | ReaderStatus.SCARD_POWERED | ReaderStatus.SCARD_NEGOTIABLE

SELECT_APP = bytes([0x00, 0xA4, 0x04, 0x0C, len(APP_AID)]) + APP_AID
SELECT_LABEL = bytes.fromhex("00A4000C022F10")
READ_BINARY = bytes.fromhex("00B0000000")
OK = b"\x90\x00"
NO_CURRENT_EF = b"\x69\x86"
STILL_BLOCKED = 0.15  # seconds a call must stay blocked to count as blocked


class Background:
    """A backend call in its own thread, like the agent's worker threads."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(function, args), daemon=True)
        self.thread.start()

    def _run(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._result = function(*args)
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def done(self, timeout: float = 0.0) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float = 5.0) -> Any:
        assert self._done.wait(timeout), "the call did not finish"
        self.thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def rv(self, timeout: float = 5.0) -> int:
        with pytest.raises(PCSCError) as info:
            self.result(timeout)
        return info.value.rv


def rv_of(function: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(PCSCError) as info:
        function(*args)
    return info.value.rv


@pytest.fixture
def backend() -> Iterator[SimulatedBackend]:
    sim = SimulatedBackend([R0, R1])
    sim.insert_card(R0, SimulatedCard(label="card zero"))
    threads_before = set(threading.enumerate())
    yield sim
    sim.close()  # ends every wait still running
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(5)
        assert not thread.is_alive(), "a backend call outlived close()"


@pytest.fixture
def ctx(backend: SimulatedBackend) -> int:
    return backend.establish_context()


def gsc(
    backend: SimulatedBackend, context: int, *states: ReaderState, timeout: int = 0
) -> list[ReaderState]:
    return backend.get_status_change(context, timeout, list(states))


def known(state: ReaderState) -> ReaderState:
    """The next round's input: what the last call reported, as pcsc-lite callers do."""
    # int(): ~ on an IntFlag member would also clear the event counter in the upper bits.
    return ReaderState(state.reader, state.event_state & ~int(State.CHANGED))


def two_sharers(backend: SimulatedBackend) -> tuple[int, int, int, int]:
    """Two contexts, each with a SHARED T=1 handle on R0: (context, handle, context, handle)."""
    c1, c2 = backend.establish_context(), backend.establish_context()
    first, _ = backend.connect(c1, R0, SHARED, T1)
    second, _ = backend.connect(c2, R0, SHARED, T1)
    return c1, first, c2, second


def label_selected(backend: SimulatedBackend, card: int) -> None:
    assert backend.transmit(card, T1, SELECT_LABEL) == OK


def card_was_reset(backend: SimulatedBackend, card: int) -> bool:
    """A reset card has no current EF: READ BINARY tells whether SELECT_LABEL survived."""
    return backend.transmit(card, T1, READ_BINARY) == NO_CURRENT_EF


# --- readers, contexts ----------------------------------------------------------------------
def test_list_readers_in_slot_order(backend: SimulatedBackend, ctx: int) -> None:
    assert backend.list_readers(ctx) == [R0, R1]
    backend.add_reader("Another 00 00")
    assert backend.list_readers(ctx) == [R0, R1, "Another 00 00"]


def test_no_readers_is_an_error_as_in_libpcsclite() -> None:
    sim = SimulatedBackend()
    context = sim.establish_context()
    assert rv_of(sim.list_readers, context) == RC.SCARD_E_NO_READERS_AVAILABLE
    sim.close()


def test_unknown_or_released_context(backend: SimulatedBackend, ctx: int) -> None:
    assert rv_of(backend.list_readers, 12345) == RC.SCARD_E_INVALID_HANDLE
    backend.release_context(ctx)
    assert rv_of(backend.list_readers, ctx) == RC.SCARD_E_INVALID_HANDLE
    assert rv_of(backend.release_context, ctx) == RC.SCARD_E_INVALID_HANDLE
    assert rv_of(backend.connect, ctx, R0, SHARED, T1) == RC.SCARD_E_INVALID_HANDLE


def test_demo_setup_has_two_readers_and_a_card_in_the_first() -> None:
    sim = SimulatedBackend.with_demo_readers()
    context = sim.establish_context()
    names = sim.list_readers(context)
    assert len(names) == 2
    states = gsc(sim, context, *(ReaderState(name) for name in names))
    assert states[0].event_state & State.PRESENT and states[0].atr
    assert states[1].event_state & State.EMPTY
    sim.close()


def test_reader_and_card_misuse_raises_value_error(backend: SimulatedBackend) -> None:
    with pytest.raises(ValueError):
        backend.insert_card(R0)  # already holds one
    with pytest.raises(ValueError):
        backend.insert_card("nope")
    with pytest.raises(ValueError):
        backend.add_reader(R1)
    assert backend.remove_card(R1) is None


# --- connect, protocols, transmit -------------------------------------------------------------
def test_connect_errors(backend: SimulatedBackend, ctx: int) -> None:
    assert rv_of(backend.connect, ctx, "nope", SHARED, T1) == RC.SCARD_E_UNKNOWN_READER
    assert rv_of(backend.connect, ctx, R1, SHARED, T1) == RC.SCARD_E_NO_SMARTCARD
    assert rv_of(backend.connect, ctx, R0, 7, T1) == RC.SCARD_E_INVALID_VALUE
    assert rv_of(backend.connect, ctx, R0, SHARED, 0) == RC.SCARD_E_PROTO_MISMATCH
    assert rv_of(backend.connect, ctx, R0, SHARED, T0) == RC.SCARD_E_PROTO_MISMATCH
    assert rv_of(backend.connect, ctx, "x" * 200, SHARED, T1) == RC.SCARD_E_INVALID_VALUE


def test_connect_transmit_disconnect(backend: SimulatedBackend, ctx: int) -> None:
    card, protocol = backend.connect(ctx, R0, SHARED, ANY)
    assert protocol == T1  # the test card offers T=1 only
    assert backend.transmit(card, T1, SELECT_APP) == OK
    assert backend.transmit(card, T1, bytes.fromhex("8010000003010203")) == b"\x01\x02\x03" + OK
    assert rv_of(backend.transmit, card, T0, SELECT_APP) == RC.SCARD_E_PROTO_MISMATCH
    assert backend.transmit(card, RAW, SELECT_APP) == OK  # pcscd does not check RAW
    backend.disconnect(card, LEAVE)
    assert rv_of(backend.transmit, card, T1, SELECT_APP) == RC.SCARD_E_INVALID_HANDLE
    assert rv_of(backend.disconnect, card, LEAVE) == RC.SCARD_E_INVALID_HANDLE


def test_first_connect_fixes_the_protocol(backend: SimulatedBackend, ctx: int) -> None:
    first, _ = backend.connect(ctx, R0, SHARED, T1)
    assert rv_of(backend.connect, ctx, R0, SHARED, T0) == RC.SCARD_E_PROTO_MISMATCH
    _, protocol = backend.connect(ctx, R0, SHARED, T0 | T1)
    assert protocol == T1
    # pcscd switches to RAW whenever RAW is among the preferred protocols.
    _, protocol = backend.connect(ctx, R0, SHARED, RAW | T1)
    assert protocol == RAW
    assert rv_of(backend.transmit, first, T1, SELECT_APP) == RC.SCARD_E_PROTO_MISMATCH


def test_direct_mode_needs_no_card(backend: SimulatedBackend, ctx: int) -> None:
    card, protocol = backend.connect(ctx, R1, DIRECT, 0)
    assert protocol == 0
    status = backend.status(card)
    assert status.state == ReaderStatus.SCARD_ABSENT and status.atr == b""
    assert rv_of(backend.transmit, card, T1, SELECT_APP) == RC.SCARD_E_NO_SMARTCARD
    assert rv_of(backend.transmit, card, RAW, SELECT_APP) == RC.SCARD_E_NOT_TRANSACTED
    assert backend.control(card, CM_IOCTL_GET_FEATURE_REQUEST, b"") == b""
    # Once a card is in and another handle negotiated, the DIRECT handle can talk T=1.
    backend.insert_card(R1)
    backend.connect(ctx, R1, SHARED, T1)
    assert backend.transmit(card, T1, SELECT_APP) == OK


def test_atr_protocols() -> None:
    assert atr_protocols(DEFAULT_ATR) == T1
    assert atr_protocols(bytes.fromhex("3B00")) == T0  # no TD1: T=0
    assert atr_protocols(bytes.fromhex("3B8080010101")) == T0 | T1


# --- status, attributes, control ------------------------------------------------------------
def test_status(backend: SimulatedBackend, ctx: int) -> None:
    card, _ = backend.connect(ctx, R0, SHARED, T1)
    status = backend.status(card)
    assert status.reader == R0
    assert status.state == (1 << 16) | CARD_READY  # one insertion so far
    assert status.protocol == T1
    assert status.atr == DEFAULT_ATR


def test_attributes_and_control(backend: SimulatedBackend, ctx: int) -> None:
    card, _ = backend.connect(ctx, R0, SHARED, T1)
    assert backend.get_attrib(card, SCARD_ATTR_ATR_STRING) == DEFAULT_ATR
    assert backend.get_attrib(card, TAG_IFD_ATR) == DEFAULT_ATR
    assert backend.get_attrib(card, SCARD_ATTR_DEVICE_FRIENDLY_NAME) == R0.encode() + b"\0"
    assert rv_of(backend.get_attrib, card, 0x00010100) == RC.SCARD_E_UNSUPPORTED_FEATURE
    assert rv_of(backend.set_attrib, card, 0x00010100, b"x") == RC.SCARD_E_UNSUPPORTED_FEATURE
    assert backend.control(card, CM_IOCTL_GET_FEATURE_REQUEST, b"") == b""
    assert rv_of(backend.control, card, 0x42000001, b"") == RC.SCARD_E_UNSUPPORTED_FEATURE


# --- sharing ----------------------------------------------------------------------------------
def test_exclusive_conflicts(backend: SimulatedBackend, ctx: int) -> None:
    shared, _ = backend.connect(ctx, R0, SHARED, T1)
    assert rv_of(backend.connect, ctx, R0, EXCLUSIVE, T1) == RC.SCARD_E_SHARING_VIOLATION
    backend.disconnect(shared, LEAVE)
    direct, _ = backend.connect(ctx, R0, DIRECT, 0)  # DIRECT counts as a sharer
    assert rv_of(backend.connect, ctx, R0, EXCLUSIVE, T1) == RC.SCARD_E_SHARING_VIOLATION
    backend.disconnect(direct, LEAVE)
    exclusive, _ = backend.connect(ctx, R0, EXCLUSIVE, T1)
    for mode in (SHARED, EXCLUSIVE, DIRECT):
        assert rv_of(backend.connect, ctx, R0, mode, T1) == RC.SCARD_E_SHARING_VIOLATION
    assert backend.transmit(exclusive, T1, SELECT_APP) == OK
    backend.disconnect(exclusive, LEAVE)
    backend.connect(ctx, R0, SHARED, T1)


def test_sharing_shows_in_reader_states(backend: SimulatedBackend, ctx: int) -> None:
    (free,) = gsc(backend, ctx, ReaderState(R0))
    assert not free.event_state & (State.INUSE | State.EXCLUSIVE)
    first, _ = backend.connect(ctx, R0, SHARED, T1)
    second, _ = backend.connect(ctx, R0, SHARED, T1)
    (shared,) = gsc(backend, ctx, ReaderState(R0))
    assert shared.event_state & State.INUSE and not shared.event_state & State.EXCLUSIVE
    backend.disconnect(first, LEAVE)
    backend.reconnect(second, EXCLUSIVE, T1, LEAVE)
    (exclusive,) = gsc(backend, ctx, ReaderState(R0))
    assert exclusive.event_state & State.EXCLUSIVE and not exclusive.event_state & State.INUSE


def test_reconnect_to_exclusive_waits_for_the_other_handles(backend: SimulatedBackend) -> None:
    _, mine, c2, other = two_sharers(backend)
    # libpcsclite retries SCardReconnect while pcscd answers SCARD_E_SHARING_VIOLATION.
    reconnect = Background(backend.reconnect, mine, EXCLUSIVE, T1, LEAVE)
    assert backend.wait_for_blocked_calls(1)
    assert not reconnect.done(STILL_BLOCKED)
    backend.disconnect(other, LEAVE)
    assert reconnect.result() == T1
    assert rv_of(backend.connect, c2, R0, SHARED, T1) == RC.SCARD_E_SHARING_VIOLATION


def test_reconnect_from_exclusive_to_shared_lets_others_in(backend: SimulatedBackend) -> None:
    c1, c2 = backend.establish_context(), backend.establish_context()
    card, _ = backend.connect(c1, R0, EXCLUSIVE, T1)
    assert backend.reconnect(card, SHARED, T1, LEAVE) == T1
    other, _ = backend.connect(c2, R0, SHARED, T1)
    assert backend.transmit(other, T1, SELECT_APP) == OK


# --- card events seen by handles -------------------------------------------------------------
def test_removed_card_until_reconnect(backend: SimulatedBackend, ctx: int) -> None:
    card, _ = backend.connect(ctx, R0, SHARED, T1)
    backend.begin_transaction(card)
    backend.remove_card(R0)
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (backend.transmit, (card, T1, SELECT_APP)),
        (backend.status, (card,)),
        (backend.begin_transaction, (card,)),
        (backend.end_transaction, (card, LEAVE)),
        (backend.get_attrib, (card, SCARD_ATTR_ATR_STRING)),
    ]
    for call, args in calls:
        assert rv_of(call, *args) == RC.SCARD_W_REMOVED_CARD, call.__name__
    assert rv_of(backend.reconnect, card, SHARED, T1, LEAVE) == RC.SCARD_E_NO_SMARTCARD
    # The removal ended the transaction: another context connects without waiting.
    other = backend.establish_context()
    assert rv_of(backend.connect, other, R0, SHARED, T1) == RC.SCARD_E_NO_SMARTCARD
    backend.insert_card(R0)
    assert rv_of(backend.transmit, card, T1, SELECT_APP) == RC.SCARD_W_REMOVED_CARD
    assert backend.reconnect(card, SHARED, T1, LEAVE) == T1
    assert backend.transmit(card, T1, SELECT_APP) == OK
    assert backend.status(card).state >> 16 == 3  # inserted, removed, inserted


def test_reset_by_another_handle(backend: SimulatedBackend, ctx: int) -> None:
    mine, _ = backend.connect(ctx, R0, SHARED, T1)
    other, _ = backend.connect(ctx, R0, SHARED, T1)
    label_selected(backend, mine)
    backend.disconnect(other, RESET)
    # pcscd keeps telling until the application acknowledges with SCardReconnect.
    assert rv_of(backend.transmit, mine, T1, READ_BINARY) == RC.SCARD_W_RESET_CARD
    assert rv_of(backend.status, mine) == RC.SCARD_W_RESET_CARD
    assert rv_of(backend.transmit, mine, T1, READ_BINARY) == RC.SCARD_W_RESET_CARD
    assert backend.reconnect(mine, SHARED, T1, LEAVE) == T1
    assert card_was_reset(backend, mine)


def test_leave_keeps_the_card_state(backend: SimulatedBackend, ctx: int) -> None:
    mine, _ = backend.connect(ctx, R0, SHARED, T1)
    other, _ = backend.connect(ctx, R0, SHARED, T1)
    label_selected(backend, mine)
    backend.disconnect(other, LEAVE)
    assert backend.transmit(mine, T1, READ_BINARY) == b"card zero" + OK


def test_reconnect_with_reset(backend: SimulatedBackend, ctx: int) -> None:
    mine, _ = backend.connect(ctx, R0, SHARED, T1)
    other, _ = backend.connect(ctx, R0, SHARED, T1)
    label_selected(backend, mine)
    assert backend.reconnect(mine, SHARED, T1, RESET) == T1
    assert card_was_reset(backend, mine)  # the caller's own event is acknowledged
    assert rv_of(backend.transmit, other, T1, SELECT_APP) == RC.SCARD_W_RESET_CARD
    assert rv_of(backend.reconnect, mine, SHARED, T1, Disposition.EJECT_CARD) == (
        RC.SCARD_E_INVALID_VALUE
    )


def test_end_transaction_with_reset_flags_every_handle(backend: SimulatedBackend, ctx: int) -> None:
    mine, _ = backend.connect(ctx, R0, SHARED, T1)
    backend.begin_transaction(mine)
    label_selected(backend, mine)
    backend.end_transaction(mine, RESET)
    # As pcscd 1.9.9 does: the handle that asked for the reset is told too.
    assert rv_of(backend.transmit, mine, T1, READ_BINARY) == RC.SCARD_W_RESET_CARD
    backend.reconnect(mine, SHARED, T1, LEAVE)
    assert card_was_reset(backend, mine)


def test_unpower_keeps_atr_and_next_connect_powers_up(backend: SimulatedBackend) -> None:
    c1, c2 = backend.establish_context(), backend.establish_context()
    card, _ = backend.connect(c1, R0, SHARED, T1)
    backend.disconnect(card, UNPOWER)
    (state,) = gsc(backend, c2, ReaderState(R0))
    assert state.event_state & State.PRESENT and state.atr == DEFAULT_ATR
    card, _ = backend.connect(c2, R0, SHARED, T1)
    assert backend.status(card).state & 0xFFFF == CARD_READY
    assert backend.card_in(R0) is not None and backend.card_in(R0).powered


# --- transactions -------------------------------------------------------------------------------
def test_transaction_blocks_other_handles(backend: SimulatedBackend) -> None:
    _, owner, _, other = two_sharers(backend)
    backend.begin_transaction(owner)
    backend.begin_transaction(owner)  # nested: a count, as in pcscd
    begin = Background(backend.begin_transaction, other)
    assert backend.wait_for_blocked_calls(1)
    # libpcsclite does not retry these: the violation reaches the application.
    assert rv_of(backend.control, other, CM_IOCTL_GET_FEATURE_REQUEST, b"") == (
        RC.SCARD_E_SHARING_VIOLATION
    )
    assert rv_of(backend.get_attrib, other, SCARD_ATTR_ATR_STRING) == RC.SCARD_E_SHARING_VIOLATION
    assert backend.transmit(owner, T1, SELECT_APP) == OK
    backend.end_transaction(owner, LEAVE)
    assert not begin.done(STILL_BLOCKED)  # one level still held
    backend.end_transaction(owner, LEAVE)
    begin.result()
    # Now the owner waits, in transmit and in status.
    transmit = Background(backend.transmit, owner, T1, SELECT_APP)
    status = Background(backend.status, owner)
    assert backend.wait_for_blocked_calls(2)
    backend.end_transaction(other, LEAVE)
    assert transmit.result() == OK
    assert status.result().reader == R0


def test_transaction_ends_when_its_owner_disconnects(backend: SimulatedBackend) -> None:
    _, owner, _, other = two_sharers(backend)
    backend.begin_transaction(owner)
    begin = Background(backend.begin_transaction, other)
    assert backend.wait_for_blocked_calls(1)
    backend.disconnect(owner, LEAVE)
    begin.result()


def test_blocked_begin_ends_when_its_handle_goes(backend: SimulatedBackend) -> None:
    c1, c2 = backend.establish_context(), backend.establish_context()
    owner, _ = backend.connect(c1, R0, SHARED, T1)
    waiting, _ = backend.connect(c2, R0, SHARED, T1)
    second, _ = backend.connect(c2, R0, SHARED, T1)
    backend.begin_transaction(owner)
    begin = Background(backend.begin_transaction, waiting)
    assert backend.wait_for_blocked_calls(1)
    # SCardCancel only ends SCardGetStatusChange, in pcsc-lite and here.
    backend.cancel(c2)
    assert not begin.done(STILL_BLOCKED)
    # Between retries the context is free: disconnecting from another thread ends the wait.
    backend.disconnect(waiting, LEAVE)
    assert begin.rv() == RC.SCARD_E_INVALID_HANDLE
    begin = Background(backend.begin_transaction, second)
    assert backend.wait_for_blocked_calls(1)
    backend.release_context(c2)
    assert begin.rv() == RC.SCARD_E_INVALID_HANDLE


def test_connect_waits_for_a_transaction_of_another_context(backend: SimulatedBackend) -> None:
    c1, c2 = backend.establish_context(), backend.establish_context()
    owner, _ = backend.connect(c1, R0, SHARED, T1)
    backend.begin_transaction(owner)
    connect = Background(backend.connect, c2, R0, SHARED, T1)
    assert backend.wait_for_blocked_calls(1)
    assert not connect.done(STILL_BLOCKED)
    backend.end_transaction(owner, LEAVE)
    card, protocol = connect.result()
    assert protocol == T1 and backend.transmit(card, T1, SELECT_APP) == OK


def test_connect_on_the_transaction_owners_context_fails_instead_of_hanging(
    backend: SimulatedBackend, ctx: int
) -> None:
    owner, _ = backend.connect(ctx, R0, SHARED, T1)
    other, _ = backend.connect(ctx, R0, SHARED, T1)
    backend.begin_transaction(owner)
    assert rv_of(backend.connect, ctx, R0, SHARED, T1) == RC.SCARD_F_INTERNAL_ERROR
    assert rv_of(backend.disconnect, other, RESET) == RC.SCARD_F_INTERNAL_ERROR


def test_disconnect_with_reset_waits_for_another_transaction(backend: SimulatedBackend) -> None:
    _, owner, _, other = two_sharers(backend)
    backend.begin_transaction(owner)
    label_selected(backend, owner)
    disconnect = Background(backend.disconnect, other, RESET)
    assert backend.wait_for_blocked_calls(1)
    assert backend.transmit(owner, T1, READ_BINARY) == b"card zero" + OK
    backend.end_transaction(owner, LEAVE)
    disconnect.result()
    assert rv_of(backend.transmit, owner, T1, READ_BINARY) == RC.SCARD_W_RESET_CARD


def test_end_transaction_errors(backend: SimulatedBackend, ctx: int) -> None:
    card, _ = backend.connect(ctx, R0, SHARED, T1)
    assert rv_of(backend.end_transaction, card, LEAVE) == RC.SCARD_E_NOT_TRANSACTED
    assert rv_of(backend.end_transaction, card, 9) == RC.SCARD_E_INVALID_VALUE
    exclusive_ctx = backend.establish_context()
    backend.disconnect(card, LEAVE)
    exclusive, _ = backend.connect(exclusive_ctx, R0, EXCLUSIVE, T1)
    # Exclusive mode holds the lock already: one begin, one end, then nothing to end.
    backend.begin_transaction(exclusive)
    backend.end_transaction(exclusive, LEAVE)
    assert rv_of(backend.end_transaction, exclusive, LEAVE) == RC.SCARD_E_NOT_TRANSACTED


# --- release_context, as pcscd cleans up a client -------------------------------------------------
def test_release_context_resets_the_card_of_a_held_transaction(backend: SimulatedBackend) -> None:
    dying, owner, _, watcher = two_sharers(backend)
    backend.begin_transaction(owner)
    label_selected(backend, owner)
    backend.release_context(dying)
    assert rv_of(backend.transmit, owner, T1, SELECT_APP) == RC.SCARD_E_INVALID_HANDLE
    assert rv_of(backend.transmit, watcher, T1, READ_BINARY) == RC.SCARD_W_RESET_CARD
    backend.reconnect(watcher, SHARED, T1, LEAVE)
    assert card_was_reset(backend, watcher)
    backend.begin_transaction(watcher)  # the lock is free again


def test_release_context_leaves_the_card_without_a_transaction(backend: SimulatedBackend) -> None:
    dying, staying = backend.establish_context(), backend.establish_context()
    backend.connect(dying, R0, SHARED, T1)
    backend.connect(dying, R1, DIRECT, 0)
    watcher, _ = backend.connect(staying, R0, SHARED, T1)
    label_selected(backend, watcher)
    backend.release_context(dying)
    assert backend.transmit(watcher, T1, READ_BINARY) == b"card zero" + OK
    (state,) = gsc(backend, staying, ReaderState(R1))
    assert not state.event_state & State.INUSE  # sharing count back to 0 on R1


# --- readers coming and going -------------------------------------------------------------------
def test_removed_reader(backend: SimulatedBackend, ctx: int) -> None:
    card, _ = backend.connect(ctx, R0, SHARED, T1)
    backend.remove_reader(R0)
    assert backend.list_readers(ctx) == [R1]
    assert rv_of(backend.transmit, card, T1, SELECT_APP) == RC.SCARD_E_INVALID_VALUE
    assert rv_of(backend.status, card) == RC.SCARD_E_READER_UNAVAILABLE
    assert rv_of(backend.connect, ctx, R0, SHARED, T1) == RC.SCARD_E_UNKNOWN_READER
    backend.disconnect(card, RESET)  # pcscd ignores the reader's removal here
    backend.add_reader(R0, SimulatedCard(label="again"))
    card, _ = backend.connect(ctx, R0, SHARED, T1)
    assert backend.status(card).state >> 16 == 0  # a new reader's counter starts at 0


# --- get_status_change ---------------------------------------------------------------------
def test_unaware_returns_at_once(backend: SimulatedBackend, ctx: int) -> None:
    full, empty = gsc(backend, ctx, ReaderState(R0), ReaderState(R1), timeout=INFINITE)
    assert full.event_state == (1 << 16) | State.CHANGED | State.PRESENT
    assert full.atr == DEFAULT_ATR
    assert empty.event_state == State.CHANGED | State.EMPTY
    assert empty.atr == b""


def test_no_change_times_out(backend: SimulatedBackend, ctx: int) -> None:
    states = [known(state) for state in gsc(backend, ctx, ReaderState(R0), ReaderState(R1))]
    assert rv_of(gsc, backend, ctx, *states) == RC.SCARD_E_TIMEOUT
    assert rv_of(backend.get_status_change, ctx, 30, states) == RC.SCARD_E_TIMEOUT


def test_state_mismatch_and_counter_mismatch_return_at_once(
    backend: SimulatedBackend, ctx: int
) -> None:
    (state,) = gsc(backend, ctx, ReaderState(R0, State.EMPTY))
    assert state.event_state & State.CHANGED and state.event_state & State.PRESENT
    (state,) = gsc(backend, ctx, ReaderState(R0, (5 << 16) | State.PRESENT))
    assert state.event_state == (1 << 16) | State.CHANGED | State.PRESENT


def test_wakes_on_insertion_and_removal(backend: SimulatedBackend, ctx: int) -> None:
    (empty,) = gsc(backend, ctx, ReaderState(R1))
    wait = Background(backend.get_status_change, ctx, INFINITE, [known(empty)])
    assert backend.wait_for_blocked_calls(1)
    backend.insert_card(R1)
    (inserted,) = wait.result()
    assert inserted.event_state == (1 << 16) | State.CHANGED | State.PRESENT
    assert inserted.atr == DEFAULT_ATR
    wait = Background(backend.get_status_change, ctx, 5000, [known(inserted)])
    assert backend.wait_for_blocked_calls(1)
    backend.remove_card(R1)
    (removed,) = wait.result()
    assert removed.event_state == (2 << 16) | State.CHANGED | State.EMPTY
    assert removed.atr == b""


def test_wakes_when_sharing_changes_what_the_caller_knows(backend: SimulatedBackend) -> None:
    watcher, user = backend.establish_context(), backend.establish_context()
    card, _ = backend.connect(user, R0, SHARED, T1)
    (in_use,) = gsc(backend, watcher, ReaderState(R0))
    assert in_use.event_state & State.INUSE
    wait = Background(backend.get_status_change, watcher, 5000, [known(in_use)])
    assert backend.wait_for_blocked_calls(1)
    backend.disconnect(card, LEAVE)
    (free,) = wait.result()
    assert free.event_state & State.CHANGED and not free.event_state & State.INUSE


def test_in_use_alone_is_no_change_as_in_libpcsclite(backend: SimulatedBackend) -> None:
    # libpcsclite flags CHANGED for INUSE only when the caller believed EXCLUSIVE: a reader
    # becoming used while the caller knew it free ends the wait only by timeout.
    watcher, user = backend.establish_context(), backend.establish_context()
    (free,) = gsc(backend, watcher, ReaderState(R0))
    wait = Background(backend.get_status_change, watcher, 200, [known(free)])
    assert backend.wait_for_blocked_calls(1)
    backend.connect(user, R0, SHARED, T1)
    assert wait.rv() == RC.SCARD_E_TIMEOUT


def test_unknown_reader(backend: SimulatedBackend, ctx: int) -> None:
    assert rv_of(gsc, backend, ctx, ReaderState("nope")) == RC.SCARD_E_UNKNOWN_READER
    ignored_unknown = ReaderState("nope", State.IGNORE)
    assert rv_of(gsc, backend, ctx, ReaderState(R0), ignored_unknown) == (RC.SCARD_E_UNKNOWN_READER)


def test_reader_removed_during_the_wait(backend: SimulatedBackend, ctx: int) -> None:
    (state,) = gsc(backend, ctx, ReaderState(R1))
    wait = Background(backend.get_status_change, ctx, 5000, [known(state)])
    assert backend.wait_for_blocked_calls(1)
    backend.remove_reader(R1)
    (gone,) = wait.result()
    assert gone.event_state == State.CHANGED | State.UNKNOWN | State.UNAVAILABLE


def test_pnp_notification(backend: SimulatedBackend, ctx: int) -> None:
    pnp = ReaderState(PNP_NOTIFICATION)
    # UNAWARE is no change for the PnP pseudo-reader (pcsc-lite); it reports the counter.
    assert rv_of(gsc, backend, ctx, pnp) == RC.SCARD_E_TIMEOUT
    wait = Background(backend.get_status_change, ctx, INFINITE, [pnp])
    assert backend.wait_for_blocked_calls(1)
    backend.add_reader("New Reader 00 00")
    (added,) = wait.result()
    assert added.event_state & State.CHANGED
    counter = added.event_state >> 16
    assert counter
    # With the counter passed back, nothing missed: no change now, a change after removal.
    assert rv_of(gsc, backend, ctx, known(added)) == RC.SCARD_E_TIMEOUT
    backend.remove_reader("New Reader 00 00")
    (removed,) = gsc(backend, ctx, known(added))
    assert removed.event_state & State.CHANGED and removed.event_state >> 16 == counter + 1


def test_pnp_name_is_case_insensitive(backend: SimulatedBackend, ctx: int) -> None:
    wait = Background(backend.get_status_change, ctx, 5000, [ReaderState(PNP_NOTIFICATION.upper())])
    assert backend.wait_for_blocked_calls(1)
    backend.remove_reader(R1)
    (state,) = wait.result()
    assert state.event_state & State.CHANGED


def test_cancel(backend: SimulatedBackend, ctx: int) -> None:
    backend.cancel(ctx)  # nothing to cancel: a no-op that is not remembered
    states = [known(state) for state in gsc(backend, ctx, ReaderState(R0))]
    wait = Background(backend.get_status_change, ctx, INFINITE, states)
    assert backend.wait_for_blocked_calls(1)
    assert not wait.done(STILL_BLOCKED)
    backend.cancel(ctx)
    assert wait.rv() == RC.SCARD_E_CANCELLED
    assert rv_of(backend.cancel, 424242) == RC.SCARD_E_INVALID_HANDLE


def test_close_ends_waits_and_later_calls(backend: SimulatedBackend, ctx: int) -> None:
    states = [known(state) for state in gsc(backend, ctx, ReaderState(R0))]
    wait = Background(backend.get_status_change, ctx, INFINITE, states)
    assert backend.wait_for_blocked_calls(1)
    backend.close()
    assert wait.rv() == RC.SCARD_F_COMM_ERROR
    assert rv_of(backend.establish_context) == RC.SCARD_E_NO_SERVICE


def test_ignore_and_argument_checks(backend: SimulatedBackend, ctx: int) -> None:
    ignored = ReaderState("whatever", State.IGNORE, event_state=0x1234)
    assert backend.get_status_change(ctx, INFINITE, [ignored]) == [ignored]
    assert backend.get_status_change(ctx, INFINITE, []) == []
    too_many = [ReaderState(R0)] * 17
    assert rv_of(backend.get_status_change, ctx, 0, too_many) == RC.SCARD_E_INVALID_PARAMETER


def test_a_wait_keeps_its_context_busy(backend: SimulatedBackend, ctx: int) -> None:
    # libpcsclite holds the context's mutex during SCardGetStatusChange: other calls on the
    # same context wait for it, calls on other contexts do not, SCardCancel always goes through.
    states = [known(state) for state in gsc(backend, ctx, ReaderState(R0))]
    wait = Background(backend.get_status_change, ctx, INFINITE, states)
    assert backend.wait_for_blocked_calls(1)
    queued = Background(backend.list_readers, ctx)
    other = backend.establish_context()
    assert backend.list_readers(other) == [R0, R1]
    assert not queued.done(STILL_BLOCKED)
    backend.cancel(ctx)
    assert wait.rv() == RC.SCARD_E_CANCELLED
    assert queued.result() == [R0, R1]


def test_slow_card_blocks_only_its_context(backend: SimulatedBackend) -> None:
    backend.insert_card(R1)
    c1, c2 = backend.establish_context(), backend.establish_context()
    slow_card, _ = backend.connect(c1, R0, SHARED, T1)
    fast_card, _ = backend.connect(c2, R1, SHARED, T1)
    slow = Background(backend.transmit, slow_card, T1, bytes.fromhex("801601F4"))  # 500 ms
    assert backend.wait_for_blocked_calls(1)
    assert backend.transmit(fast_card, T1, SELECT_APP) == OK
    assert not slow.done()
    assert slow.result() == OK
