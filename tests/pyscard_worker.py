"""PyscardBackend in a child process, driven over stdin/stdout: pyscard against any pcscd.

libpcsclite reads PCSCLITE_CSOCK_NAME once per process, and each test gets a pcscd of its own,
so the test process cannot use pyscard itself. `PyscardWorker(env)` starts this file as a
child with that environment; `worker.call("connect", ...)` runs the backend method there and
returns its result (or raises PCSCError with the same rv); `worker.submit(...)` returns at
once with a Pending, so a test can block one call (a status change wait, a transaction) and
act while it waits. Every request runs in a thread of its own in the child, as the host agent
runs backend calls in worker threads.

Wire format, one JSON object per line: request {"id", "method", "args"}; reply {"id", "ok"}
or {"id", "rv", "message"} or {"id", "error"}. Bytes, ReaderState and CardStatus are tagged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pcscbridge.host.backend import CardStatus, ReaderState
from pcscbridge.pcsc import PCSCError


def encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, ReaderState):
        return {"$state": [value.reader, value.current_state, value.event_state, value.atr.hex()]}
    if isinstance(value, CardStatus):
        return {"$status": [value.reader, value.state, value.protocol, value.atr.hex()]}
    if isinstance(value, list | tuple):
        return [encode(item) for item in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "$bytes" in value:
            return bytes.fromhex(value["$bytes"])
        if "$state" in value:
            reader, current, event, atr = value["$state"]
            return ReaderState(reader, current, event, bytes.fromhex(atr))
        if "$status" in value:
            reader, state, protocol, atr = value["$status"]
            return CardStatus(reader, state, protocol, bytes.fromhex(atr))
    if isinstance(value, list):
        return [decode(item) for item in value]
    return value


# --- the parent's side ---------------------------------------------------------------------
class Pending:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._reply: dict[str, Any] = {}

    def _resolve(self, reply: dict[str, Any]) -> None:
        self._reply = reply
        self._done.set()

    def done(self, timeout: float = 0.0) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float = 10.0) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError("the pyscard worker did not answer")
        if "rv" in self._reply:
            raise PCSCError(self._reply["rv"], self._reply.get("message", ""))
        if "error" in self._reply:
            raise RuntimeError(f"pyscard worker: {self._reply['error']}")
        return decode(self._reply["ok"])


class PyscardWorker:
    """A child process serving PyscardBackend calls; use as a context manager."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__],
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self._next_id = 0
        self._reader = threading.Thread(target=self._read_replies, daemon=True)
        self._reader.start()

    def _read_replies(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            reply = json.loads(line)
            with self._lock:
                pending = self._pending.pop(reply["id"])
            pending._resolve(reply)
        with self._lock:  # the child is gone: nothing more will come
            for pending in self._pending.values():
                pending._resolve({"error": "the worker exited"})
            self._pending.clear()

    def submit(self, method: str, *args: Any) -> Pending:
        pending = Pending()
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            self._pending[request_id] = pending
            assert self._proc.stdin is not None
            message = {"id": request_id, "method": method, "args": encode(list(args))}
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        return pending

    def call(self, method: str, *args: Any, timeout: float = 10.0) -> Any:
        return self.submit(method, *args).result(timeout)

    def close(self) -> None:
        """Ends the child; calls still blocked there are abandoned (pcscd cleans up)."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(5)

    def __enter__(self) -> PyscardWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the child's side ----------------------------------------------------------------------
def spin_during(function: Callable[[], object]) -> float:
    """Python loop iterations per second in this thread while `function` runs in another:
    about 0 if `function` holds the GIL. The clock starts before the other thread does, so
    a call that grabs the GIL at once cannot hide the time it held it."""
    busy = threading.Thread(target=function)
    iterations, started = 0, time.perf_counter()
    busy.start()
    while busy.is_alive():
        iterations += 1
    return iterations / max(time.perf_counter() - started, 1e-9)


def probe_gil(backend: Any, context: int, timeout_ms: int, states: list[ReaderState]) -> dict:
    """Python progress next to a thread sleeping (the GIL released: the reference) and next
    to one waiting in get_status_change (which should time out)."""
    reference = spin_during(lambda: time.sleep(timeout_ms / 1000))
    outcome: dict[str, Any] = {}

    def wait() -> None:
        started = time.perf_counter()
        try:
            backend.get_status_change(context, timeout_ms, states)
        except PCSCError as exc:
            outcome["rv"] = exc.rv
        outcome["seconds"] = time.perf_counter() - started

    during_wait = spin_during(wait)
    return {"reference_rate": reference, "rate_during_wait": during_wait, **outcome}


def serve() -> None:
    # Imported here so the parent never loads libpcsclite through this module.
    from pcscbridge.host.backends.pyscard import PyscardBackend

    backend = PyscardBackend()
    write_lock = threading.Lock()
    extras = {"probe_gil": lambda *args: probe_gil(backend, *args)}

    def handle(request: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": request["id"]}
        try:
            function = extras.get(request["method"]) or getattr(backend, request["method"])
            reply["ok"] = encode(function(*decode(request["args"])))
        except PCSCError as exc:
            reply.update(rv=exc.rv, message=str(exc))
        except Exception as exc:
            reply["error"] = f"{type(exc).__name__}: {exc}"
        with write_lock:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()

    for line in sys.stdin:
        threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()
    # stdin closed: leave at once, even with calls still blocked in libpcsclite.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    serve()
