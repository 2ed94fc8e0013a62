"""A userspace TCP delay proxy: one-way link delay on loopback, where netem is missing.

Every chunk read from one leg is written to the other leg DELAY ms after it was read, in
order; each direction is delayed separately, so a request/response pair costs 2 x DELAY on
top of the path's own time. TCP_NODELAY is set on both legs, so the proxy never holds a chunk
back to coalesce it with the next one, and a reader thread keeps reading while earlier chunks
wait: bandwidth is not limited, only latency is added (like `tc qdisc ... netem delay`).

It runs as its own process, so its threads never compete for a GIL with anything measured:

    python -m bench.delay --target 127.0.0.1:PORT --delay 5

prints ``LISTENING <port>`` once it accepts on 127.0.0.1 and serves until SIGTERM/SIGINT or
until its stdin closes (so it dies with the benchmark that started it).
:class:`DelayProxyProcess` starts and stops it from the benchmark.

Accuracy: the proxy sets its timer slack to 1 ns (prctl), so a 1 ms sleep overshoots by
tens of microseconds, not the default 50 us slack plus scheduling noise; each hop through the
proxy also costs a thread wake-up (~20-60 us on this kind of machine).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

from rig.service import Service

from .procs import LineReader, die_with_parent, stop_process

CHUNK = 1 << 16
_PR_SET_TIMERSLACK = 29


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Direction:
    """One direction of one connection: a reader thread stamps chunks, a writer sends them."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, delay: float, on_done: threading.Event
    ) -> None:
        self.src, self.dst, self.delay, self.done = src, dst, delay, on_done
        self.queue: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()

    def start(self, name: str) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._read, name=f"{name}-read", daemon=True),
            threading.Thread(target=self._write, name=f"{name}-write", daemon=True),
        ]
        for thread in threads:
            thread.start()
        return threads

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                if not data:
                    break
                self.queue.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        self.queue.put(None)

    def _write(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)  # pass the half-close on, delayed too
        except OSError:
            # The far side is gone: stop reading this direction's source as well.
            with contextlib.suppress(OSError):
                self.src.shutdown(socket.SHUT_RDWR)
        finally:
            self.done.set()


class DelayProxy:
    """Accepts on 127.0.0.1:``listen_port`` (0 = any) and relays to ``target`` with a delay."""

    def __init__(self, target: tuple[str, int], delay_ms: float, listen_port: int = 0) -> None:
        self.target = target
        self.delay = delay_ms / 1000.0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", listen_port))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def serve_forever(self) -> None:
        count = 0
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                _nodelay(sock)
            with self._lock:
                self._sockets += [client, upstream]
            count += 1
            done = threading.Event()
            _Direction(client, upstream, self.delay, done).start(f"c{count}-up")
            _Direction(upstream, client, self.delay, done).start(f"c{count}-down")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _fine_timer_slack() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Userspace TCP delay proxy (loopback only).")
    parser.add_argument("--target", required=True, metavar="HOST:PORT")
    parser.add_argument("--delay", type=float, required=True, metavar="MS", help="one-way delay")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: any free)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the delay proxy only relays to loopback")
    _fine_timer_slack()
    proxy = DelayProxy((host, int(port)), args.delay, args.port)
    signal.signal(signal.SIGTERM, lambda *_: proxy.close())
    signal.signal(signal.SIGINT, lambda *_: proxy.close())

    def close_on_stdin_eof() -> None:
        # The raw fd, not sys.stdin: a daemon thread must not hold the buffered reader's lock
        # at interpreter shutdown.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        proxy.close()

    threading.Thread(target=close_on_stdin_eof, daemon=True).start()
    print(f"LISTENING {proxy.port}", flush=True)
    proxy.serve_forever()
    return 0


class DelayProxyProcess(Service):
    """The proxy as a child process of the benchmark (see the module docstring)."""

    def __init__(self, target_port: int, delay_ms: float) -> None:
        self.target_port = target_port
        self.delay_ms = delay_ms
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> DelayProxyProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.delay",
                "--target",
                f"127.0.0.1:{self.target_port}",
                "--delay",
                str(self.delay_ms),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        line = LineReader(self.proc).read_line(timeout)
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"delay proxy did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
