"""The measuring client: a pyscard child process per path, driven over stdin/stdout.

libpcsclite reads PCSCLITE_CSOCK_NAME once per process, so every path gets clients of its own,
started with that variable pointing at the path's socket. The child reads one JSON command per
line and answers with JSON lines:

``latency``      N calls of each kind (see :data:`KINDS`), each timed alone with
                 ``perf_counter_ns`` around the pyscard call; stops a kind early when its time
                 budget is spent (but not before ``min_calls``). Every answer is checked.
``session``      the typical application session of :mod:`rig.pcsc_programs`
                 (establish, list, connect, select, 20 READ BINARY, disconnect, release), run in
                 this process; it times itself.
``watch``        ``SCardGetStatusChange`` on one reader until it shows the wanted states one
                 after the other; writes ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for
                 every process of the machine) when each state is seen.
``tp_prepare``   start T threads, each with its own context and card handle (a separate
                 connection, i.e. a separate client for pcscd or the guest server);
``tp_go``        at ``start_at`` they all transmit ECHO with data unique to (client, call) until
                 ``start_at + duration`` and check every response; then disconnect and release.

:class:`MeasureClient` is the benchmark's side of one such child.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .procs import LineReader, die_with_parent, stop_process

APP_AID = bytes.fromhex("F0") + b"pcscbridge"
SELECT_APP = bytes([0x00, 0xA4, 0x04, 0x0C, len(APP_AID)]) + APP_AID
SELECT_EF_0101 = bytes.fromhex("00A4020C020101")
READ_32 = bytes.fromhex("00B0000020")  # EF 0101 holds 32 bytes
RESPOND_4096 = bytes.fromhex("80121000")  # 80 12 P1P2: respond with P1P2 bytes

# What each latency kind does; the labels are the report's.
KINDS: dict[str, str] = {
    "transmit_short": "SCardTransmit, READ BINARY 32 B",
    "transmit_4k": "SCardTransmit, 4 KiB response",
    "get_status_change_0": "SCardGetStatusChange(timeout 0)",
    "list_readers": "SCardListReaders",
    "connect_disconnect": "SCardConnect + SCardDisconnect",
    "begin_end_transaction": "SCardBeginTransaction + EndTransaction",
}

Emit = Callable[[dict[str, Any]], None]


# ------------------------------------------------------------------------------ child side


def _pattern(length: int, seed: int) -> bytes:
    from pcscbridge.host.backends.simcard import pattern

    return pattern(length, seed)


class _Scard:
    """The pyscard calls the child makes, with results checked."""

    def __init__(self) -> None:
        from smartcard import scard

        self.s: Any = scard

    def check(self, what: str, hresult: int) -> None:
        if hresult != 0:
            raise RuntimeError(f"{what} failed: 0x{hresult & 0xFFFFFFFF:08X}")

    def establish(self, retries: list[int] | None = None) -> Any:
        """SCardEstablishContext; with ``retries``, up to 10 attempts, counted in retries[0].

        A burst of clients through an ssh -R forward can fail here: pcscd listens with a
        backlog of 1, ssh connects without blocking, and a refused forward reaches the client
        as a reset connection (SCARD_W_SECURITY_VIOLATION).
        """
        for attempt in range(10 if retries is not None else 1):
            hresult, context = self.s.SCardEstablishContext(self.s.SCARD_SCOPE_USER)
            if hresult == 0:
                return context
            if retries is not None:
                retries[0] += 1
                time.sleep(0.02 * (attempt + 1))
        self.check("SCardEstablishContext", hresult)
        return context

    def connect(self, context: Any, reader: str) -> Any:
        s = self.s
        hresult, card, _ = s.SCardConnect(
            context, reader, s.SCARD_SHARE_SHARED, s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1
        )
        self.check(f"SCardConnect({reader})", hresult)
        return card

    def transmit(self, card: Any, apdu: bytes) -> bytes:
        hresult, response = self.s.SCardTransmit(card, self.s.SCARD_PCI_T1, list(apdu))
        self.check("SCardTransmit", hresult)
        return bytes(response)


def _latency(
    sc: _Scard,
    reader: str,
    readers: int,
    max_calls: int,
    min_calls: int,
    budget_s: float,
    warmup: int,
) -> dict[str, Any]:
    s = sc.s
    context = sc.establish()
    card = sc.connect(context, reader)
    pci = s.SCARD_PCI_T1
    if sc.transmit(card, SELECT_APP) != b"\x90\x00":
        raise RuntimeError("SELECT of the test application failed")
    if sc.transmit(card, SELECT_EF_0101) != b"\x90\x00":
        raise RuntimeError("SELECT EF 0101 failed")
    read_32, respond_4k = list(READ_32), list(RESPOND_4096)
    expect_32 = list(_pattern(32, 0x01) + b"\x90\x00")
    expect_4k = list(_pattern(4096, 0x12) + b"\x90\x00")
    unaware = [(reader, s.SCARD_STATE_UNAWARE)]
    present = s.SCARD_STATE_PRESENT
    shared, protocols = s.SCARD_SHARE_SHARED, s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1
    leave = s.SCARD_LEAVE_CARD

    # Each returns (call succeeded, answer right).
    def transmit_short() -> tuple[bool, bool]:
        hresult, response = s.SCardTransmit(card, pci, read_32)
        return hresult == 0, response == expect_32

    def transmit_4k() -> tuple[bool, bool]:
        hresult, response = s.SCardTransmit(card, pci, respond_4k)
        return hresult == 0, response == expect_4k

    def get_status_change_0() -> tuple[bool, bool]:
        hresult, states = s.SCardGetStatusChange(context, 0, unaware)
        return hresult == 0, bool(states) and bool(states[0][1] & present)

    def list_readers() -> tuple[bool, bool]:
        hresult, names = s.SCardListReaders(context, [])
        return hresult == 0, len(names) == readers and reader in names

    def connect_disconnect() -> tuple[bool, bool]:
        hresult, other, _ = s.SCardConnect(context, reader, shared, protocols)
        if hresult != 0:
            return False, False
        return s.SCardDisconnect(other, leave) == 0, True

    def begin_end_transaction() -> tuple[bool, bool]:
        if s.SCardBeginTransaction(card) != 0:
            return False, False
        return s.SCardEndTransaction(card, leave) == 0, True

    calls = {
        "transmit_short": transmit_short,
        "transmit_4k": transmit_4k,
        "get_status_change_0": get_status_change_0,
        "list_readers": list_readers,
        "connect_disconnect": connect_disconnect,
        "begin_end_transaction": begin_end_transaction,
    }
    results: dict[str, Any] = {}
    clock = time.perf_counter_ns
    for kind, call in calls.items():
        for _ in range(warmup):
            call()
        samples: list[float] = []
        errors = wrong = 0
        gc.collect()
        gc.disable()
        try:
            stop_at = clock() + int(budget_s * 1e9)
            for index in range(max_calls):
                started = clock()
                ok, right = call()
                ended = clock()
                samples.append(round((ended - started) / 1000, 1))
                if not ok:
                    errors += 1
                elif not right:
                    wrong += 1
                if ended > stop_at and index + 1 >= min_calls:
                    break
        finally:
            gc.enable()
        results[kind] = {"samples_us": samples, "errors": errors, "wrong": wrong}
    s.SCardDisconnect(card, leave)
    s.SCardReleaseContext(context)
    return {"kinds": results}


def _session(reader: str, reads: int) -> dict[str, Any]:
    from rig import pcsc_programs

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            status = pcsc_programs.session(reader, str(reads))
    except SystemExit as exc:  # the program's own error exit (a PC/SC call failed)
        return {"ok": False, "error": str(exc)}
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    return {"ok": bool(result.get("ok")) and status == 0, "seconds": result["seconds"]}


def _watch(sc: _Scard, reader: str, states: list[bool], timeout_s: float, emit: Emit) -> None:
    s = sc.s
    context = sc.establish()
    try:
        hresult, result = s.SCardGetStatusChange(context, 0, [(reader, s.SCARD_STATE_UNAWARE)])
        sc.check("SCardGetStatusChange", hresult)
        current = result[0][1] & ~s.SCARD_STATE_CHANGED
        emit({"ready": True, "present": bool(current & s.SCARD_STATE_PRESENT)})
        for want in states:
            deadline = time.monotonic() + timeout_s
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    emit({"timeout": True, "present": want})
                    break
                hresult, result = s.SCardGetStatusChange(context, remaining_ms, [(reader, current)])
                seen = time.monotonic()
                if hresult == s.SCARD_E_TIMEOUT:
                    continue
                sc.check("SCardGetStatusChange", hresult)
                _, event, atr = result[0]
                current = event & ~s.SCARD_STATE_CHANGED
                present = bool(event & s.SCARD_STATE_PRESENT)
                if present == want and (atr or not present):
                    emit({"t": seen, "present": want})
                    break
    finally:
        s.SCardReleaseContext(context)


class _Throughput:
    """T clients (threads), each with its own context and handle, transmitting ECHO."""

    def __init__(self, sc: _Scard, reader: str, threads: int, tag: str) -> None:
        self.sc, self.reader, self.tag = sc, reader, tag
        self.go = threading.Event()
        self.start_at = self.end_at = 0.0
        self.results: list[dict[str, Any]] = [{} for _ in range(threads)]
        self.ready = threading.Barrier(threads + 1, timeout=120)
        self.threads = [
            threading.Thread(target=self._client, args=(index,), daemon=True)
            for index in range(threads)
        ]
        for thread in self.threads:
            thread.start()
        self.ready.wait()  # every client connected (or failed to)

    def _client(self, index: int) -> None:
        s = self.sc.s
        name = f"{self.tag}.{index}"
        result: dict[str, Any] = {"client": name, "calls": 0, "wrong": 0, "errors": 0}
        self.results[index] = result
        context = card = None
        retries = [0]
        try:
            try:
                context = self.sc.establish(retries)
                result["establish_retries"] = retries[0]
                card = self.sc.connect(context, self.reader)
            finally:
                self.ready.wait()
            self.go.wait(300)
            pci = s.SCARD_PCI_T1
            samples: list[int] = []
            clock = time.monotonic
            while clock() < self.start_at:
                time.sleep(max(0.0, min(self.start_at - clock(), 0.05)))
            calls = wrong = errors = 0
            while clock() < self.end_at:
                data = f"{name}:{calls}".encode()
                apdu = [0x80, 0x10, 0x00, 0x00, len(data), *data]
                expected = [*data, 0x90, 0x00]
                started = time.perf_counter_ns()
                hresult, response = s.SCardTransmit(card, pci, apdu)
                samples.append((time.perf_counter_ns() - started) // 1000)
                calls += 1
                if hresult != 0:
                    errors += 1
                elif response != expected:
                    wrong += 1
            result.update(calls=calls, wrong=wrong, errors=errors, samples_us=samples)
            result["finished"] = clock()
        except Exception as exc:
            result["failure"] = repr(exc)
        finally:
            if card is not None:
                s.SCardDisconnect(card, s.SCARD_LEAVE_CARD)
            if context is not None:
                s.SCardReleaseContext(context)

    def run(self, start_at: float, duration: float) -> dict[str, Any]:
        self.start_at, self.end_at = start_at, start_at + duration
        self.go.set()
        for thread in self.threads:
            thread.join(duration + max(0.0, start_at - time.monotonic()) + 60)
        stuck = sum(thread.is_alive() for thread in self.threads)
        return {"clients": self.results, "stuck": stuck}


def child_main() -> int:
    """The child program: JSON commands on stdin, JSON lines on stdout."""
    sc = _Scard()  # loads libpcsclite now: PCSCLITE_CSOCK_NAME is already set
    out = sys.stdout

    def emit(value: dict[str, Any]) -> None:
        out.write(json.dumps(value, separators=(",", ":")) + "\n")
        out.flush()

    throughput: _Throughput | None = None
    emit({"hello": os.getpid()})
    for line in sys.stdin:
        request = json.loads(line)
        command = request.pop("cmd")
        try:
            if command == "latency":
                emit(_latency(sc, **request))
            elif command == "session":
                emit(_session(**request))
            elif command == "watch":
                _watch(sc, emit=emit, **request)
                emit({"done": True})
            elif command == "tp_prepare":
                throughput = _Throughput(sc, **request)
                failures = [r.get("failure") for r in throughput.results if r.get("failure")]
                emit({"ready": True, "failures": failures})
            elif command == "tp_go":
                if throughput is None:
                    raise RuntimeError("tp_go without tp_prepare")
                emit(throughput.run(**request))
                throughput = None
            elif command == "quit":
                break
            else:
                emit({"error": f"unknown command {command!r}"})
        except Exception as exc:
            emit({"error": repr(exc)})
    return 0


# ------------------------------------------------------------------------------ bench side


class MeasureClient:
    """One measuring child against ``socket_path``; its stderr goes to ``log_path``."""

    def __init__(self, socket_path: str, log_path: Path, name: str = "client") -> None:
        self.name = name
        self.socket_path = socket_path
        env = {**os.environ, "PCSCLITE_CSOCK_NAME": socket_path}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.measure"],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.reader = LineReader(self.proc)
        self._hello = False

    def wait_hello(self, timeout: float = 30.0) -> None:
        if not self._hello:
            answer = self.reader.read_json(timeout)
            if "hello" not in answer:
                raise RuntimeError(f"{self.name}: unexpected first line {answer}")
            self._hello = True

    def send(self, command: str, **args: Any) -> None:
        self.wait_hello()
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": command, **args}) + "\n").encode())
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        answer = self.reader.read_json(timeout)
        if "error" in answer:
            raise RuntimeError(f"{self.name} ({self.socket_path}): {answer['error']}")
        return answer

    def request(self, command: str, timeout: float, **args: Any) -> dict[str, Any]:
        self.send(command, **args)
        return self.read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
        stop_process(self.proc)


if __name__ == "__main__":
    raise SystemExit(child_main())
