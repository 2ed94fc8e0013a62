"""Watches the host's readers through the backend and publishes them as plain reader states.

One watcher serves every front-end (host/readers.py's board). Changes are found with
SCardGetStatusChange on the PnP pseudo-reader and on every reader at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from ..errors import first_leaf
from ..pcsc import PNP_NOTIFICATION, PCSCError, ReturnCode, State
from .backend import Backend, ReaderState
from .readers import HostReader

log = logging.getLogger("pcscbridge.host.watcher")

Publish = Callable[[tuple[HostReader, ...]], None]
RETRY_DELAY = 1.0
# Waits end by themselves this often, so a wait whose cancel got lost cannot hold its context
# for long, and the host applications' use of a card (which wakes no wait) shows this soon.
WAIT_SLICE_MS = 1000
# libpcsclite 1.9.9 refuses more reader states in one SCardGetStatusChange (2.5 does not).
MAX_STATES_PER_CALL = 16
CANCEL_RETRY = 0.02  # seconds between cancels of a wait that has not ended yet


async def watch_readers(
    backend: Backend, publish: Publish, limiter: trio.CapacityLimiter | None = None
) -> None:
    """Publish the table now and after every change, until cancelled."""
    while True:
        try:
            await _watch_with_context(backend, publish, limiter)
        except PCSCError as exc:
            # The host's PC/SC service went away or failed: show no readers, try again.
            log.warning("watching the host's readers failed: %s; retrying", exc)
            publish(())
            await trio.sleep(RETRY_DELAY)


async def _watch_with_context(
    backend: Backend, publish: Publish, limiter: trio.CapacityLimiter | None
) -> None:
    # One context per group of reader states: libpcsclite 1.9.9 refuses more than 16 states in
    # one SCardGetStatusChange, and one context runs one call at a time. The first context
    # also lists the readers and watches the PnP pseudo-reader.
    contexts = [await trio.to_thread.run_sync(backend.establish_context, limiter=limiter)]
    try:
        known: dict[str, ReaderState] = {}
        pnp = ReaderState(PNP_NOTIFICATION)
        refresh = False
        while True:
            names = await trio.to_thread.run_sync(
                _list_readers, backend, contexts[0], limiter=limiter
            )
            # A reader not seen yet is asked with UNAWARE, so the wait returns at once with it;
            # after a quiet slice every reader is: libpcsclite does not count another
            # application's connect as a change (free -> INUSE or EXCLUSIVE), so that is how
            # the guest comes to see the host's own use of a card.
            states = [
                ReaderState(name) if refresh else known.get(name) or ReaderState(name)
                for name in names
            ]
            if all(name in known for name in names):
                # Only whole tables: a reader listed but not looked at yet is not "no reader".
                publish(tuple(_host_reader(known[name]) for name in names))
            groups = _groups(_next_round([pnp, *states]))
            while len(contexts) < len(groups):
                contexts.append(
                    await trio.to_thread.run_sync(backend.establish_context, limiter=limiter)
                )
            reported = await _wait_for_a_change(backend, contexts, groups, limiter)
            refresh = not reported
            readers_changed = False
            for state in reported:
                if state.reader == PNP_NOTIFICATION:
                    pnp = state
                    readers_changed = bool(state.event_state & State.CHANGED)
                else:
                    known[state.reader] = state
            for name in set(known) - set(names):
                del known[name]
            if not readers_changed and all(name in known for name in names):
                # A card came or went: show it now, not after listing the readers again.
                publish(tuple(_host_reader(known[name]) for name in names))
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_release, backend, contexts)


def _groups(states: list[ReaderState]) -> list[list[ReaderState]]:
    return [
        states[start : start + MAX_STATES_PER_CALL]
        for start in range(0, len(states), MAX_STATES_PER_CALL)
    ]


async def _wait_for_a_change(
    backend: Backend,
    contexts: list[Any],
    groups: list[list[ReaderState]],
    limiter: trio.CapacityLimiter | None,
) -> list[ReaderState]:
    """Wait on every group at once, each on its own context, until one of them returns (a
    change, or the end of its slice); then end the others. Returns every state reported.

    Waits are ended with SCardCancel, never abandoned, also when the watcher is cancelled:
    a context is free again as soon as this returns, and shutdown does not wait for a slice.
    """
    reported: list[ReaderState] = []
    running = set(range(len(groups)))
    one_returned = trio.Event()
    all_returned = trio.Event()

    async def wait(index: int) -> None:
        try:
            reported.extend(await _wait_on(backend, contexts[index], groups[index], limiter))
        finally:
            running.discard(index)
            one_returned.set()
            if not running:
                all_returned.set()

    try:
        async with trio.open_nursery() as nursery:
            for index in range(len(groups)):
                nursery.start_soon(wait, index)
            try:
                await one_returned.wait()
            finally:
                with trio.CancelScope(shield=True):
                    # pcsc-lite drops a cancel that arrives before its wait has begun, so
                    # repeat it until every wait has ended (a cancel after the end is a no-op).
                    while running:
                        for index in list(running):
                            await trio.to_thread.run_sync(
                                _cancel_quietly, backend, contexts[index], limiter=limiter
                            )
                        with trio.move_on_after(CANCEL_RETRY):
                            await all_returned.wait()
    except* PCSCError as failed:
        raise first_leaf(failed) from None  # the service failed: watch_readers starts over
    return reported


async def _wait_on(
    backend: Backend, context: Any, states: list[ReaderState], limiter: trio.CapacityLimiter | None
) -> list[ReaderState]:
    try:
        return await trio.to_thread.run_sync(
            backend.get_status_change, context, WAIT_SLICE_MS, states, limiter=limiter
        )
    except PCSCError as exc:
        # The slice ended, this wait was ended by another group's change (or by shutdown), or
        # a reader went away before the call (the next round lists the readers again).
        if exc.rv in (
            ReturnCode.SCARD_E_TIMEOUT,
            ReturnCode.SCARD_E_CANCELLED,
            ReturnCode.SCARD_E_UNKNOWN_READER,
        ):
            return []
        raise


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


def _cancel_quietly(backend: Backend, context: Any) -> None:
    try:
        backend.cancel(context)
    except PCSCError as exc:
        log.debug("cancel: %s", exc)


def _release(backend: Backend, contexts: list[Any]) -> None:
    for context in contexts:
        try:
            backend.release_context(context)
        except PCSCError as exc:
            log.debug("release_context: %s", exc)


def _host_reader(state: ReaderState) -> HostReader:
    return HostReader(state.reader, state.event_state, bytes(state.atr))
