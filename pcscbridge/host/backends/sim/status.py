"""SCardGetStatusChange as libpcsclite computes it from the readers-state table: pure functions.

libpcsclite compares each table entry with the caller's current_state (:func:`evaluate_reader`)
in a loop (:func:`evaluate`), and returns as soon as one entry differs; the waiting between two
passes lives in :mod:`.backend`.

Deviation from pcsc-lite 1.9.9 (deliberate): the PnP pseudo-reader reports pcsc-lite 2.x's
reader-events counter in the upper 16 bits and flags CHANGED when the caller's counter differs
(:func:`start_pnp`); 1.9.9 reports 0 and only notices a reader count change during the call.
A 2.x-style caller works with both.
"""

from __future__ import annotations

from collections.abc import Mapping

from ....pcsc import PNP_NOTIFICATION, ReaderStatus, State
from ....pcsc import ReturnCode as RC
from ...backend import ReaderState
from .daemon import SHARING_EXCLUSIVE, Reader, fail

# libpcsclite 1.9.9 refuses more reader states in one SCardGetStatusChange.
MAX_READER_STATES = 16

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


def is_pnp(reader: str) -> bool:
    return reader.casefold() == PNP_NOTIFICATION.casefold()


def answer_before_the_context(states: list[ReaderState]) -> list[ReaderState] | None:
    """What libpcsclite decides before it even looks at the context: too many entries fail,
    and when every entry is IGNOREd the call returns at once, with copies of them."""
    if len(states) > MAX_READER_STATES:
        raise fail(RC.SCARD_E_INVALID_PARAMETER, "too many reader states")
    if all(state.current_state & State.IGNORE for state in states):
        return [_copy_state(state) for state in states]
    return None


def _copy_state(state: ReaderState) -> ReaderState:
    return ReaderState(state.reader, state.current_state, state.event_state, state.atr)


def check_readers(states: list[ReaderState], readers: Mapping[str, Reader]) -> None:
    """Every entry names a reader or the PnP pseudo-reader; IGNOREd ones are checked too, as
    libpcsclite does."""
    for state in states:
        if state.reader not in readers and not is_pnp(state.reader):
            raise fail(RC.SCARD_E_UNKNOWN_READER, state.reader)


def start_pnp(results: list[ReaderState], reader_events: int) -> bool:
    """pcsc-lite 2.x: the PnP entry carries the reader-events counter in its upper word."""
    changed = False
    for state in results:
        if is_pnp(state.reader) and not state.current_state & State.IGNORE:
            previous = state.current_state >> 16
            state.event_state = reader_events << 16
            if previous and previous != reader_events:
                state.event_state |= _S_CHANGED
                changed = True
    return changed


def evaluate(
    results: list[ReaderState],
    readers: Mapping[str, Reader],
    reader_count: int,
    reader_events: int,
) -> tuple[int, bool]:
    """One pass of libpcsclite's loop over the reader states; returns the reader count
    seen and whether anything changed relative to the caller's current_state."""
    changed = False
    for state in results:
        if state.current_state & State.IGNORE:
            continue
        slot = readers.get(state.reader)
        if slot is not None:
            changed |= evaluate_reader(state, slot)
        elif is_pnp(state.reader):
            if len(readers) != reader_count:
                reader_count = len(readers)
                state.event_state = (
                    (state.event_state & 0xFFFF) | (reader_events << 16) | _S_CHANGED
                )
                changed = True
        else:  # the reader went away during the call
            state.event_state = _S_UNKNOWN | _S_UNAVAILABLE
            if not state.current_state & _S_UNKNOWN:
                state.event_state |= _S_CHANGED
                changed = True
    return reader_count, changed


def evaluate_reader(state: ReaderState, slot: Reader) -> bool:
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
    if slot.sharing == SHARING_EXCLUSIVE:
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
