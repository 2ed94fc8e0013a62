"""One long-lived thread per host PC/SC context, running that context's blocking calls in order.

libpcsclite serialises the calls of one context anyway, so a thread per context loses nothing
and saves a thread hand-off and a limiter per call (trio.to_thread). A call that blocks (a
transaction held by another application) blocks only its own context's thread.

Cancellation: a trio task waiting for a call can always be cancelled at once. A call that has
not started yet is then skipped; one already running in the thread cannot be interrupted, so
its result is dropped when it comes. Whatever it left behind (a handle, a transaction) belongs
to the context, and the context's release, queued behind it on the same thread, ends it
(host/service.py; it also ends a BeginTransaction waiting for another application).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger("pcscbridge.host.worker")

T = TypeVar("T")


class _Job:
    __slots__ = ("abandoned", "args", "function", "task", "token")

    def __init__(
        self,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        task: trio.lowlevel.Task | None,
        token: trio.lowlevel.TrioToken | None,
    ) -> None:
        self.function = function
        self.args = args
        self.task = task  # None: nobody waits for the result
        self.token = token
        self.abandoned = False  # set in the trio thread, read in the worker

    def deliver(self, result: outcome.Outcome) -> None:
        """In the trio thread: wake the waiting task, unless it stopped waiting."""
        if not self.abandoned and self.task is not None:
            trio.lowlevel.reschedule(self.task, result)


class ContextWorker:
    """Runs blocking calls for one host context, in the order they were submitted."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function(*args)` in the thread after the calls queued before it."""
        job = _Job(function, args, trio.lowlevel.current_task(), self._token)
        self._jobs.put(job)

        def abort(_: Any) -> trio.lowlevel.Abort:
            job.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        # Unwrapped by trio: the call's value, or its exception raised here.
        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue a call nobody waits for (a release); failures are logged at debug level."""
        self._jobs.put(_Job(function, args, None, None))

    def close(self) -> None:
        """The thread ends after the calls already queued."""
        self._jobs.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Blocking: wait for the thread to end; False when it is still running."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.abandoned:
                continue  # cancelled before it started
            result = outcome.capture(job.function, *job.args)
            if job.token is not None:
                try:
                    job.token.run_sync_soon(job.deliver, result)
                except trio.RunFinishedError:
                    return  # the program is ending
            elif isinstance(result, outcome.Error):
                log.debug("%s: %s", getattr(job.function, "__name__", job.function), result.error)
