"""Watches the host's readers through the backend and reports the readers-state table.

The host API reports SCARD_STATE_* bits; the guest's mirror needs pcscd's table entries, so
the conversion lives here, next to the only code that reads the host's reader states.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..pcsc import PNP_NOTIFICATION, PCSCError, ReaderStatus, ReturnCode, State
from .backend import Backend, ReaderState

log = logging.getLogger("pcscbridge.host.watcher")

ReaderRow = list[Any]  # [name, event_counter, state, sharing, atr, protocol], as on the link
RETRY_DELAY = 1.0
# Waits end by themselves this often: a cancel that reaches pcsc-lite before its wait began is
# dropped, and a wait that never ends would hold the context (and our shutdown) forever.
WAIT_SLICE_MS = 2000


def reader_row(state: ReaderState) -> ReaderRow:
    """pcscd's table entry for one reader, from what SCardGetStatusChange reports."""
    event = state.event_state
    counter = (event >> 16) & 0xFFFF
    if event & (State.UNKNOWN | State.UNAVAILABLE):
        status = ReaderStatus.SCARD_UNKNOWN
    elif event & State.PRESENT:
        if event & State.MUTE:
            status = ReaderStatus.SCARD_PRESENT | ReaderStatus.SCARD_SWALLOWED
        else:
            # pcscd publishes PRESENT|POWERED|NEGOTIABLE for a card with an ATR, and keeps it
            # when it powers an idle card down.
            status = (
                ReaderStatus.SCARD_PRESENT
                | ReaderStatus.SCARD_POWERED
                | ReaderStatus.SCARD_NEGOTIABLE
            )
    else:
        status = ReaderStatus.SCARD_ABSENT
    if event & State.EXCLUSIVE:
        sharing = -1
    elif event & State.INUSE:
        sharing = 1  # the API tells "in use", not how many handles
    else:
        sharing = 0
    atr = state.atr if event & State.PRESENT else b""
    return [state.reader, counter, int(status), sharing, bytes(atr), 0]


async def watch_readers(
    backend: Backend,
    publish: Callable[[list[ReaderRow]], Awaitable[None]],
    limiter: trio.CapacityLimiter | None = None,
) -> None:
    """Publish the table now and after every change, until cancelled."""
    while True:
        try:
            await _watch_with_context(backend, publish, limiter)
        except PCSCError as exc:
            # The host's PC/SC service went away or failed: show no readers, try again.
            log.warning("watching the host's readers failed: %s; retrying", exc)
            await publish([])
            await trio.sleep(RETRY_DELAY)


async def _watch_with_context(
    backend: Backend,
    publish: Callable[[list[ReaderRow]], Awaitable[None]],
    limiter: trio.CapacityLimiter | None,
) -> None:
    context = await trio.to_thread.run_sync(backend.establish_context, limiter=limiter)
    try:
        known: dict[str, ReaderState] = {}
        pnp = ReaderState(PNP_NOTIFICATION)
        while True:
            names = await trio.to_thread.run_sync(_list_readers, backend, context, limiter=limiter)
            # A reader not seen yet is asked with UNAWARE, so the wait returns at once with it.
            states = [known.get(name) or ReaderState(name) for name in names]
            await publish([reader_row(known[name]) for name in names if name in known])
            try:
                result = await trio.to_thread.run_sync(
                    backend.get_status_change,
                    context,
                    WAIT_SLICE_MS,
                    _next_round([*states, pnp]),
                    abandon_on_cancel=True,
                    limiter=limiter,
                )
            except PCSCError as exc:
                if exc.rv in (ReturnCode.SCARD_E_TIMEOUT, ReturnCode.SCARD_E_UNKNOWN_READER):
                    continue
                raise
            for state in result:
                if state.reader == PNP_NOTIFICATION:
                    pnp = state
                else:
                    known[state.reader] = state
            for name in set(known) - set(names):
                del known[name]
    finally:
        with trio.CancelScope(shield=True):
            # Unblocks a wait still running in its worker thread, then frees the context.
            await trio.to_thread.run_sync(_cancel_and_release, backend, context)


def _next_round(states: list[ReaderState]) -> list[ReaderState]:
    return [
        # int(): ~ on an IntFlag keeps only named bits and would drop the event counter.
        ReaderState(s.reader, current_state=s.event_state & ~int(State.CHANGED), atr=s.atr)
        for s in states
    ]


def _list_readers(backend: Backend, context: Any) -> list[str]:
    try:
        return backend.list_readers(context)
    except PCSCError as exc:
        if exc.rv == ReturnCode.SCARD_E_NO_READERS_AVAILABLE:
            return []
        raise


def _cancel_and_release(backend: Backend, context: Any) -> None:
    for step in (backend.cancel, backend.release_context):
        try:
            step(context)
        except PCSCError as exc:
            log.debug("%s: %s", step.__name__, exc)
