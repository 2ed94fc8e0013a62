"""The simulated backend: the daemon's rules behind libpcsclite's blocking calls.

:class:`SimulatedBackend` runs :class:`~.daemon.Daemon` under one state lock and adds the
client library's part: one call at a time per context, the waits, SCardCancel, and the retry
loops on SCARD_E_SHARING_VIOLATION.

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
  * `no_blocking=True` is libpcsclite with PCSCLITE_NO_BLOCKING set (what the host agent
    uses): transmit, status and reconnect return SCARD_E_SHARING_VIOLATION at once instead of
    retrying; begin_transaction retries all the same, as in libpcsclite.

Deviation from pcsc-lite 1.9.9 (deliberate): close() ends waits with SCARD_F_COMM_ERROR and
later calls get SCARD_E_NO_SERVICE, as libpcsclite reports a daemon that went away.

Test controls (insert_card, remove_card, add_reader, remove_reader) may be called from any
thread, like a person at the machine; wait_for_blocked_calls lets a test act on a blocked call
without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from ....pcsc import INFINITE, MAX_BUFFER_SIZE_EXTENDED, PCSCError
from ....pcsc import ReturnCode as RC
from ...backend import CardStatus, ReaderState
from ..simcard import SimulatedCard, requested_delay
from . import status
from .daemon import MAX_READERNAME, Context, Daemon, Handle, fail

T = TypeVar("T")


@dataclass(eq=False)
class _ClientContext:
    """libpcsclite's side of one context: its mutex and the get_status_change in progress."""

    context: Context
    # libpcsclite's per-context mutex: one call at a time per context.
    call_lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: bool = False  # inside get_status_change: what SCardCancel can end
    cancelled: bool = False


class SimulatedBackend:
    """Backend over simulated readers and SimulatedCard cards; see the module docstring."""

    name = "sim"

    def __init__(self, readers: Iterable[str] = (), *, no_blocking: bool = False) -> None:
        self._retry_shared = not no_blocking  # libpcsclite's sharing_shall_block
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # every state change notifies it
        # Separate, so counting a blocked call does not wake the blocked calls themselves.
        self._blocked_changed = threading.Condition(self._lock)
        self._blocked = 0
        self._generation = 0  # bumped on every change a waiter may care about
        self._daemon = Daemon(on_change=self._changed)
        self._contexts: dict[int, _ClientContext] = {}  # by id; empty once all are released
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
        with self._cond:
            self._daemon.add_reader(name, card)

    def remove_reader(self, name: str) -> None:
        """Unplug a reader: its handles stay allocated but every call on them fails."""
        with self._cond:
            self._daemon.remove_reader(name)

    def insert_card(self, reader: str, card: SimulatedCard | None = None) -> SimulatedCard:
        """Insert a card (a fresh SimulatedCard labelled with the reader name by default)."""
        with self._cond:
            return self._daemon.insert_card(reader, card)

    def remove_card(self, reader: str) -> SimulatedCard | None:
        """Pull the card out; returns it (None if the reader was empty)."""
        with self._cond:
            return self._daemon.remove_card(reader)

    def card_in(self, reader: str) -> SimulatedCard | None:
        with self._cond:
            return self._daemon.reader(reader).card

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

    # --- contexts ---------------------------------------------------------------------------
    def establish_context(self) -> int:
        with self._cond:
            self._check_open()
            context = self._daemon.establish_context()
            self._contexts[context.id] = _ClientContext(context)
            return context.id

    def release_context(self, context: int) -> None:
        """As pcscd for a client that leaves (see Daemon.release_context)."""
        with self._context_call(context) as client:
            self._daemon.release_context(client.context)
            del self._contexts[client.context.id]

    def list_readers(self, context: int) -> list[str]:
        with self._context_call(context):
            return self._daemon.list_readers()

    def cancel(self, context: int) -> None:
        """Ends a get_status_change in progress on `context`; a no-op otherwise (as pcsc-lite)."""
        with self._cond:
            self._check_open()
            client = self._contexts[self._daemon.context(context).id]
            if client.waiting:
                client.cancelled = True
                self._cond.notify_all()

    def get_status_change(
        self, context: int, timeout_ms: int, states: list[ReaderState]
    ) -> list[ReaderState]:
        at_once = status.answer_before_the_context(states)
        if at_once is not None:
            return at_once
        with self._context_call(context) as client:
            daemon = self._daemon
            status.check_readers(states, daemon.readers)
            results = [ReaderState(state.reader, state.current_state) for state in states]
            changed = status.start_pnp(results, daemon.reader_events)
            reader_count = len(daemon.readers)
            deadline = _deadline(timeout_ms)
            client.waiting, client.cancelled = True, False
            try:
                while True:
                    reader_count, changed_now = status.evaluate(
                        results, daemon.readers, reader_count, daemon.reader_events
                    )
                    if changed or changed_now:
                        return results
                    self._wait_for_change(client, deadline)
            finally:
                client.waiting = client.cancelled = False

    # --- card handles -----------------------------------------------------------------------
    def connect(
        self, context: int, reader: str, share_mode: int, preferred_protocols: int
    ) -> tuple[int, int]:
        if len(reader.encode()) > MAX_READERNAME:  # libpcsclite's own check
            raise fail(RC.SCARD_E_INVALID_VALUE, "reader name too long")
        with self._context_call(context) as client:
            slot = self._daemon.connect_target(reader, share_mode, preferred_protocols)
            while self._daemon.connect_waits(slot, client.context):
                self._wait_in_daemon()
            handle = self._daemon.connect(client.context, slot, share_mode, preferred_protocols)
            return handle.id, slot.protocol

    def reconnect(
        self, card: int, share_mode: int, preferred_protocols: int, initialization: int
    ) -> int:
        def attempt(handle: Handle) -> int:
            return self._daemon.reconnect(handle, share_mode, preferred_protocols, initialization)

        return self._handle_call(card, attempt, retry_on_sharing_violation=self._retry_shared)

    def disconnect(self, card: int, disposition: int) -> None:
        def attempt(handle: Handle) -> None:
            while self._daemon.disconnect_waits(handle, disposition):
                self._wait_in_daemon()
            self._daemon.disconnect(handle, disposition)

        self._handle_call(card, attempt)

    def begin_transaction(self, card: int) -> None:
        self._handle_call(card, self._daemon.begin_transaction, retry_on_sharing_violation=True)

    def end_transaction(self, card: int, disposition: int) -> None:
        self._handle_call(card, lambda handle: self._daemon.end_transaction(handle, disposition))

    def status(self, card: int) -> CardStatus:
        return self._handle_call(
            card, self._daemon.status, retry_on_sharing_violation=self._retry_shared
        )

    def transmit(self, card: int, protocol: int, command: bytes) -> bytes:
        if len(command) > MAX_BUFFER_SIZE_EXTENDED:
            raise fail(RC.SCARD_E_INSUFFICIENT_BUFFER, "command too long")

        def attempt(handle: Handle) -> bytes:
            response = self._daemon.transmit(handle, protocol, command)
            deadline = time.monotonic() + requested_delay(command)
            # A slow card: its context stays busy, the other readers do not.
            while not self._closed and time.monotonic() < deadline:
                self._block(deadline - time.monotonic())
            return response

        return self._handle_call(card, attempt, retry_on_sharing_violation=self._retry_shared)

    def control(self, card: int, control_code: int, data: bytes) -> bytes:
        if len(data) > MAX_BUFFER_SIZE_EXTENDED:
            raise fail(RC.SCARD_E_INSUFFICIENT_BUFFER, "control data too long")
        return self._handle_call(card, lambda handle: self._daemon.control(handle, control_code))

    def get_attrib(self, card: int, attr_id: int) -> bytes:
        return self._handle_call(card, lambda handle: self._daemon.get_attrib(handle, attr_id))

    def set_attrib(self, card: int, attr_id: int, value: bytes) -> None:
        self._handle_call(card, lambda handle: self._daemon.set_attrib(handle, attr_id))

    def close(self) -> None:
        """The resource manager goes away: waits end, later calls fail with NO_SERVICE."""
        with self._cond:
            self._closed = True
            self._daemon.forget_clients()
            self._contexts.clear()
            self._changed()

    # --- call plumbing ----------------------------------------------------------------------
    @contextmanager
    def _context_call(self, context: int) -> Iterator[_ClientContext]:
        """One call on `context`: its call lock (libpcsclite's mutex), then the state lock."""
        with self._cond:
            self._check_open()
            client = self._contexts[self._daemon.context(context).id]
        with client.call_lock, self._cond:
            self._check_open()
            if self._contexts.get(context) is not client:  # released while we queued
                raise fail(RC.SCARD_E_INVALID_HANDLE, "context released")
            yield client

    def _handle_call(
        self,
        card: int,
        attempt: Callable[[Handle], T],
        *,
        retry_on_sharing_violation: bool = False,
    ) -> T:
        """Runs `attempt` as one daemon request on the handle's context. With the retry flag,
        a sharing violation is retried after the next change, as libpcsclite retries it, with
        the context free in between."""
        while True:
            with self._cond:
                self._check_open()
                handle = self._daemon.handle(card)
                client = self._contexts[handle.context.id]
            with client.call_lock, self._cond:
                self._check_open()
                if self._daemon.handles.get(card) is not handle:
                    raise fail(RC.SCARD_E_INVALID_HANDLE)
                try:
                    return attempt(handle)
                except PCSCError as exc:
                    if not (retry_on_sharing_violation and exc.rv == RC.SCARD_E_SHARING_VIOLATION):
                        raise
                generation = self._generation
            self._wait_past(generation)

    def _wait_for_change(self, client: _ClientContext, deadline: float | None) -> None:
        """Waits (state lock held) for the next change; raises on cancel, close or timeout."""
        generation = self._generation
        while generation == self._generation:
            if client.cancelled:
                raise fail(RC.SCARD_E_CANCELLED)
            if self._closed:
                raise fail(RC.SCARD_F_COMM_ERROR, "the simulated service closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise fail(RC.SCARD_E_TIMEOUT)
            self._block(remaining)
        if client.cancelled:
            raise fail(RC.SCARD_E_CANCELLED)

    def _wait_past(self, generation: int) -> None:
        with self._cond:
            while self._generation == generation and not self._closed:
                self._block()
            if self._closed:
                raise fail(RC.SCARD_F_COMM_ERROR, "the simulated service closed")

    def _wait_in_daemon(self) -> None:
        self._block()
        if self._closed:
            raise fail(RC.SCARD_F_COMM_ERROR, "the simulated service closed")

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
            raise fail(RC.SCARD_E_NO_SERVICE, "the simulated service is closed")


def _deadline(timeout_ms: int) -> float | None:
    if timeout_ms in (INFINITE, -1):
        return None
    return time.monotonic() + max(0, timeout_ms) / 1000.0
