"""What every helper of the rig and the benchmark that runs something shares: a start/stop
pair behind the with-statement, and polling until something is ready."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Self


class Service:
    """Something that is started and stopped: ``with Thing(...) as thing`` starts it and
    always stops it.

    Subclasses implement start(), returning the started object, and stop(), which must be
    safe after a failed or partial start and when called twice.
    """

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    max_interval: float | None = None,
    ignore: tuple[type[BaseException], ...] = (Exception,),
    give_up: Callable[[], None] | None = None,
) -> float:
    """Poll ``condition()`` until it is true; TimeoutError naming ``what`` otherwise.

    Exceptions of the ``ignore`` types count as false (the last one is named in the timeout).
    ``give_up`` runs after every false round and may raise to end the wait early (a process
    that died). With ``max_interval`` the interval grows by half each round up to it. Returns
    the seconds it took.
    """
    start = time.monotonic()
    deadline = start + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except ignore as exc:
            last_error = exc
        if give_up is not None:
            give_up()
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)
        if max_interval is not None:
            interval = min(interval * 1.5, max_interval)
