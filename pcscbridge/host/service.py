"""The host service: the one place on the host where every card operation of every guest runs.

Front-ends (the link agent for `pcscbridge guest` servers, the QEMU CCID front-end) open a
session per guest and make typed calls (link/calls.py) on it; none of them calls the backend.
The service owns the backend, the guests' handle tables, the worker thread of each host
context, and the one readers watcher. Policy and audit wrap it (host/checkpoint.py), so what
they see is what runs.

Names: a guest chooses its own context and card-handle numbers (the ones its own clients hold)
and the service maps them to the host's PC/SC context and card handles, per session.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from ..link.calls import (
    BeginTransaction,
    Call,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    GetAttrib,
    Ping,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Status,
    Transmit,
)
from ..pcsc import Disposition, PCSCError, ReturnCode
from ..stats import CallStats
from .backend import Backend, Card, Context
from .readers import ReaderBoard, ReaderSnapshot
from .watcher import watch_readers
from .worker import ContextWorker

log = logging.getLogger("pcscbridge.host")

# What a host context answers once the host's PC/SC service it was established with is gone.
SERVICE_GONE = frozenset(
    {
        ReturnCode.SCARD_E_NO_SERVICE,
        ReturnCode.SCARD_E_SERVICE_STOPPED,
        ReturnCode.SCARD_F_COMM_ERROR,
    }
)
WATCHER_THREADS = 64  # the watcher's waits: one per group of 16 readers, plus cancels
RELEASE_GRACE = 2.0  # seconds a stopping service waits for queued releases

# An SCardEndTransaction failing so leaves no transaction behind: the handle died with it.
TRANSACTION_GONE = SERVICE_GONE | {
    ReturnCode.SCARD_E_INVALID_HANDLE,
    ReturnCode.SCARD_E_READER_UNAVAILABLE,
}


class Session(Protocol):
    """One guest's use of the host's PC/SC: what front-ends call and checkpoints wrap."""

    guest: str

    async def call(self, call: Call) -> Any:
        """Execute one call; its typed result (None, an int, bytes); PCSCError on failure."""
        ...

    async def wait_readers(self, after: int) -> ReaderSnapshot:
        """The readers this guest sees, once they differ from version `after`."""
        ...

    def context_ids(self) -> list[int]:
        """The guest's contexts that hold host resources."""
        ...

    async def aclose(self) -> None:
        """Release everything the guest holds (as pcscd does for a client that dies)."""
        ...


class Service(Protocol):
    def open_session(self, guest: str) -> Session: ...


@dataclass(eq=False)
class HostContext:
    """The host PC/SC context behind one guest context, and the thread that runs its calls.

    Every call on the context, its release included, runs on that one thread: libpcsclite's
    SCardReleaseContext frees the context after unlocking it, so a call another thread had
    started on it meanwhile goes on with freed memory (the host hung in SCardTransmit, or died
    of SIGSEGV). The one call made from another thread is `end_wait`, and only while the
    context's thread is between SCardBeginTransaction's retries, where it holds nothing.
    """

    worker: ContextWorker
    context: Context | None = None  # established by the first call that needs it
    cards: set[int] = field(default_factory=set)
    released: bool = False  # set by the service when the guest lets the context go
    # The card whose SCardBeginTransaction runs on the context's thread now; the lock keeps
    # that thread from moving on while `end_wait` disconnects it.
    waiting_card: Card | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def establish(self, backend: Backend) -> Context:
        """On the context's thread: the host context, established on first use."""
        if self.released:
            raise PCSCError(ReturnCode.SCARD_E_INVALID_HANDLE, "context released")
        if self.context is None:
            self.context = backend.establish_context()
        return self.context

    def renew(self, backend: Backend, dead: Context) -> Context:
        """On the context's thread: replace a host context the host's PC/SC service forgot (it
        restarted) with a fresh one; the guest's context lives on."""
        if self.released:
            raise PCSCError(ReturnCode.SCARD_E_INVALID_HANDLE, "context released")
        if self.context is dead:
            self.context = backend.establish_context()
        with contextlib.suppress(PCSCError):
            backend.release_context(dead)
        return self.context

    def begin_transaction(self, backend: Backend, card: Card) -> None:
        """On the context's thread: SCardBeginTransaction, which libpcsclite retries every
        100 ms for as long as another application holds the reader's transaction."""
        with self.lock:
            if self.released:
                raise PCSCError(ReturnCode.SCARD_E_INVALID_HANDLE, "context released")
            self.waiting_card = card
        try:
            backend.begin_transaction(card)
        finally:
            with self.lock:
                self.waiting_card = None

    def end_wait(self, backend: Backend) -> None:
        """From a thread of its own, once released: end a BeginTransaction still waiting for
        another application by disconnecting its card (LEAVE_CARD: pcscd does not wait for the
        other transaction then). libpcsclite's next retry finds no handle and gives up; the
        context's thread then goes on to the release."""
        with self.lock:
            if self.waiting_card is None:
                return
            try:
                backend.disconnect(self.waiting_card, Disposition.LEAVE_CARD)
            except PCSCError as exc:
                log.debug("disconnect to end a wait: %s", exc)

    def release(self, backend: Backend) -> None:
        """On the context's thread, after the calls queued before it."""
        context, self.context = self.context, None
        if context is not None:
            try:
                backend.release_context(context)
            except PCSCError as exc:
                log.debug("release_context: %s", exc)


@dataclass(frozen=True)
class HostLimits:
    """What guests may hold on the host, so that host applications always find room in the
    host's PC/SC service (pcscd serves 200 clients; every host context is one)."""

    contexts_per_guest: int = 64
    contexts: int = 128  # all guests together
    handles_per_context: int = 200  # pcscd's --max-card-handle-per-thread


@dataclass(eq=False)
class HostCard:
    card: Card | None  # None while the connect is in progress
    h_context: int
    reader: str
    in_transaction: bool = False


class HostService:
    """The core service; run `run()` in a nursery for the life of the program (the watcher)."""

    def __init__(self, backend: Backend, limits: HostLimits | None = None) -> None:
        self.backend = backend
        self.limits = limits or HostLimits()
        self.readers = ReaderBoard()
        self.host_contexts = 0  # open now, all sessions together
        self.sessions: set[HostSession] = set()
        self.calls = CallStats()
        self._workers: set[ContextWorker] = set()
        self._wait_enders: set[threading.Thread] = set()
        self._worker_names = itertools.count(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the host's readers until cancelled."""
        task_status.started()
        await watch_readers(
            self.backend, self.readers.publish, trio.CapacityLimiter(WATCHER_THREADS)
        )

    def open_session(self, guest: str) -> HostSession:
        session = HostSession(self, guest)
        self.sessions.add(session)
        return session

    def statistics(self) -> dict[str, object]:
        """A snapshot of what guests hold on the host (for `pcscbridge status`)."""
        return {
            "sessions": sorted(session.guest for session in self.sessions),
            "host_contexts": self.host_contexts,
            "card_handles": sum(session.card_count for session in self.sessions),
            "transactions_held": sum(session.transactions for session in self.sessions),
            "context_threads": self.context_threads(),
            "wait_enders": sum(thread.is_alive() for thread in self._wait_enders),
            "readers": len(self.readers.snapshot.readers),
            "limits": vars(self.limits),
            "calls": self.calls.snapshot(),
        }

    def context_threads(self) -> int:
        """Host contexts alive: the open ones, and released ones whose thread still waits for
        pcscd to return a call (a connect pcscd holds behind another application's transaction
        cannot be ended early); each keeps a connection to pcscd, so each counts."""
        return sum(worker.alive for worker in self._workers)

    def new_worker(self) -> ContextWorker:
        self._workers = {worker for worker in self._workers if worker.alive}
        worker = ContextWorker(f"pcsc-context-{next(self._worker_names)}")
        self._workers.add(worker)
        return worker

    def release(self, context: HostContext) -> None:
        """Release a host context the guest let go: on its own thread, after the calls queued
        there; a BeginTransaction waiting there for another application is ended first."""
        context.released = True  # before reading waiting_card: see HostContext.begin_transaction
        if context.waiting_card is not None:
            self._wait_enders = {thread for thread in self._wait_enders if thread.is_alive()}
            thread = threading.Thread(
                target=context.end_wait, args=(self.backend,), name="pcsc-end-wait", daemon=True
            )
            self._wait_enders.add(thread)
            thread.start()
        context.worker.submit(context.release, self.backend)
        context.worker.close()  # the thread ends after the release

    async def aclose(self) -> None:
        """Every worker ends after its queued calls (releases, mostly); wait a little for them.
        Call it after the front-ends have closed their sessions."""
        workers = [worker for worker in self._workers if worker.alive]
        for worker in workers:
            worker.close()
        threads = [worker.join for worker in workers]
        threads += [thread.join for thread in self._wait_enders if thread.is_alive()]
        if threads:
            await trio.to_thread.run_sync(_join_all, threads, RELEASE_GRACE)


def _join_all(joins: list[Callable[[float], object]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for join in joins:
        join(max(deadline - time.monotonic(), 0))


@asynccontextmanager
async def open_host_service(
    backend: Backend, limits: HostLimits | None = None
) -> AsyncIterator[HostService]:
    """A running HostService (its watcher in a nursery of its own) for the `async with` body;
    run the front-ends inside the body, so their sessions end before the service does."""
    service = HostService(backend, limits)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            yield service
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await service.aclose()


class HostSession:
    """One guest's contexts and card handles on the host. Calls of one guest context run in
    order on its worker thread; calls of different contexts run concurrently."""

    def __init__(self, service: HostService, guest: str) -> None:
        self.guest = guest
        self._service = service
        self._backend = service.backend
        self._contexts: dict[int, HostContext] = {}
        self._cards: dict[int, HostCard] = {}
        self._closed = False

    @property
    def card_count(self) -> int:
        return sum(card.card is not None for card in self._cards.values())

    @property
    def transactions(self) -> int:
        return sum(card.in_transaction for card in self._cards.values())

    # --- Session ----------------------------------------------------------------------------
    async def call(self, call: Call) -> Any:
        if self._closed:
            raise PCSCError(ReturnCode.SCARD_E_NO_SERVICE, "the session is closed")
        with self._service.calls.timing(call.method):
            return await self._dispatch(call)

    async def _dispatch(self, call: Call) -> Any:
        match call:
            case Connect():
                return await self._connect(call)
            case Transmit(h_card, protocol, command):
                return await self._on_card(h_card, self._backend.transmit, protocol, command)
            case BeginTransaction(h_card):
                card = self._card(h_card)
                begin = partial(self._contexts[card.h_context].begin_transaction, self._backend)
                await self._on_card(h_card, begin)
                card.in_transaction = True
                return None
            case EndTransaction(h_card, disposition):
                card = self._card(h_card)
                try:
                    await self._on_card(h_card, self._backend.end_transaction, disposition)
                except PCSCError as exc:
                    # pcscd keeps the transaction when the end fails (a bad disposition, a
                    # reset or removed card: it is ended by a later end or the disconnect),
                    # unless the handle itself is gone with its reader or the service.
                    if exc.rv in TRANSACTION_GONE:
                        card.in_transaction = False
                    raise
                card.in_transaction = False
                return None
            case Status(h_card):
                await self._on_card(h_card, self._backend.status)
                return None
            case Reconnect(h_card, share_mode, protocols, initialization):
                return await self._on_card(
                    h_card, self._backend.reconnect, share_mode, protocols, initialization
                )
            case Disconnect(h_card, disposition):
                card = self._card(h_card)
                try:
                    await self._on_card(h_card, self._backend.disconnect, disposition)
                finally:
                    self._forget_card(h_card, card)
                return None
            case Control(h_card, control_code, data):
                return await self._on_card(h_card, self._backend.control, control_code, data)
            case GetAttrib(h_card, attr_id):
                return await self._on_card(h_card, self._backend.get_attrib, attr_id)
            case SetAttrib(h_card, attr_id, value):
                await self._on_card(h_card, self._backend.set_attrib, attr_id, value)
                return None
            case ReleaseContext(h_context):
                self._release(h_context)
                return None
            case Ping():
                return None
        raise PCSCError(ReturnCode.SCARD_E_UNSUPPORTED_FEATURE, f"{call.method} is not served")

    async def wait_readers(self, after: int) -> ReaderSnapshot:
        return await self._service.readers.wait(after)

    def context_ids(self) -> list[int]:
        return list(self._contexts)

    async def aclose(self) -> None:
        self._closed = True
        self._service.sessions.discard(self)
        released = len(self._contexts)
        for h_context in list(self._contexts):
            self._release(h_context)
        if released:
            log.info("%s: released %d contexts", self.guest, released)

    # --- calls ------------------------------------------------------------------------------
    async def _connect(self, call: Connect) -> int:
        if call.h_card in self._cards:
            raise PCSCError(ReturnCode.SCARD_E_INVALID_PARAMETER, "card handle already in use")
        if "\0" in call.reader:
            # PC/SC names end at the first NUL: "name\0junk" is not "name".
            raise PCSCError(ReturnCode.SCARD_E_UNKNOWN_READER, "NUL in the reader name")
        context = self._contexts.get(call.h_context) or self._new_context(call.h_context)
        if len(context.cards) >= self._service.limits.handles_per_context:
            raise PCSCError(ReturnCode.SCARD_E_NO_MEMORY, "too many card handles on a context")
        if self._transaction_holder(context, call.reader) is not None:
            # pcscd would hold this connect behind the context's own transaction forever, and
            # keep the reader stuck even after the client is gone. Refuse instead.
            raise PCSCError(ReturnCode.SCARD_E_SHARING_VIOLATION, "own transaction is active")
        card = self._cards[call.h_card] = HostCard(None, call.h_context, call.reader)
        context.cards.add(call.h_card)
        try:
            card.card, protocol = await context.worker.run(
                self._connect_blocking,
                context,
                call.reader,
                call.share_mode,
                call.preferred_protocols,
            )
        except BaseException:
            self._forget_card(call.h_card, card)
            raise
        return protocol

    def _new_context(self, h_context: int) -> HostContext:
        limits = self._service.limits
        if len(self._contexts) >= limits.contexts_per_guest:
            log.warning(
                "%s holds %d host contexts already; refusing more", self.guest, len(self._contexts)
            )
            raise PCSCError(ReturnCode.SCARD_E_NO_MEMORY, "too many host contexts for this guest")
        if self._service.context_threads() >= limits.contexts:
            log.warning(
                "guests hold %d host contexts already (%d of them released, waiting for pcscd "
                "to return a call); refusing more",
                limits.contexts,
                self._service.context_threads() - self._service.host_contexts,
            )
            raise PCSCError(ReturnCode.SCARD_E_NO_MEMORY, "too many host contexts")
        self._service.host_contexts += 1
        context = self._contexts[h_context] = HostContext(self._service.new_worker())
        return context

    def _connect_blocking(
        self, context: HostContext, reader: str, share_mode: int, protocols: int
    ) -> tuple[Card, int]:
        host_context = context.establish(self._backend)
        try:
            return self._backend.connect(host_context, reader, share_mode, protocols)
        except PCSCError as exc:
            if exc.rv not in SERVICE_GONE:
                raise
        # The host's PC/SC service restarted since this context was established: the guest's
        # context is still good, so it gets a new host context, as a client would re-establish.
        host_context = context.renew(self._backend, host_context)
        return self._backend.connect(host_context, reader, share_mode, protocols)

    def _transaction_holder(self, context: HostContext, reader: str) -> int | None:
        """A card handle of this context holding a transaction on `reader`, if one does."""
        for h_card in context.cards:
            card = self._cards[h_card]
            if card.reader == reader and card.in_transaction:
                return h_card
        return None

    async def _on_card(self, h_card: int, method: Any, *args: Any) -> Any:
        card = self._card(h_card)
        context = self._contexts[card.h_context]
        holder = self._transaction_holder(context, card.reader)
        if holder is not None and holder != h_card:
            # Another handle of this very context holds the reader's transaction. pcscd answers
            # a sharing violation at once and the guest's libpcsclite retries with its context
            # free, so the holder can end it; a host call waiting here would keep the guest's
            # context locked forever.
            raise PCSCError(ReturnCode.SCARD_E_SHARING_VIOLATION, "own context's transaction")
        return await context.worker.run(method, card.card, *args)

    def _card(self, h_card: int) -> HostCard:
        card = self._cards.get(h_card)
        if card is None or card.card is None:
            raise PCSCError(ReturnCode.SCARD_E_INVALID_HANDLE)
        return card

    def _forget_card(self, h_card: int, card: HostCard) -> None:
        if self._cards.get(h_card) is card:
            del self._cards[h_card]
        context = self._contexts.get(card.h_context)
        if context is not None:
            context.cards.discard(h_card)

    def _release(self, h_context: int) -> None:
        """Releasing the PC/SC context makes the host's stack do what pcscd does for a client
        that goes away: handles are left as they are, but a transaction still held ends with a
        card reset. Nobody waits for it."""
        context = self._contexts.pop(h_context, None)
        if context is None:
            return
        self._service.host_contexts -= 1
        for h_card in context.cards:
            self._cards.pop(h_card, None)
        context.cards.clear()
        self._service.release(context)
