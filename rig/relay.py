"""A logging UNIX-socket relay: sits between PC/SC clients and a pcscd, records every chunk.

Clients connect to ``listen_path`` (point their ``PCSCLITE_CSOCK_NAME`` at it); each accepted
connection gets its own upstream connection to ``upstream_path``. Every ``recv`` is recorded
(connection id, direction, bytes) *before* it is forwarded, so the global order of the records
respects causality: a reply is never recorded ahead of the request that caused it. Half-closes
are passed on (EOF from one side -> ``shutdown(SHUT_WR)`` towards the other), so a daemon that
closes a connection on bad input looks the same to the client as without the relay.

Threads, not trio: the relay must also run next to blocking pyscard calls and plain scripts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rig.service import Service

C2S = "c2s"  # client -> server (pcscd)
S2C = "s2c"  # server -> client


@dataclass(frozen=True)
class Chunk:
    conn: int
    direction: str  # C2S or S2C
    data: bytes
    time: float  # time.monotonic() when received


@dataclass
class RelayConnection:
    conn: int
    opened: float
    eof: dict[str, float] = field(default_factory=dict)  # direction -> when its sender closed

    @property
    def closed_first_by(self) -> str | None:
        """ "client" or "server": whose EOF reached the relay first (None while both open)."""
        if not self.eof:
            return None
        first = min(self.eof, key=lambda d: self.eof[d])
        return "client" if first == C2S else "server"

    @property
    def finished(self) -> bool:
        return len(self.eof) == 2


class LoggingRelay(Service):
    def __init__(self, listen_path: str, upstream_path: str) -> None:
        self.listen_path = listen_path
        self.upstream_path = upstream_path
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._cond = threading.Condition()
        self._chunks: list[Chunk] = []
        self._connections: dict[int, RelayConnection] = {}
        self._next_conn = 0

    # -- life cycle

    def start(self) -> LoggingRelay:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.listen_path)
        os.chmod(self.listen_path, 0o666)
        listener.listen(64)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="relay-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        with self._cond:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        for sock in sockets:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen_path)

    # -- records

    def take(self) -> tuple[list[Chunk], list[RelayConnection]]:
        """Return and forget everything recorded so far; connection ids restart at 0."""
        with self._cond:
            chunks, self._chunks = self._chunks, []
            connections = [self._connections[c] for c in sorted(self._connections)]
            # Keep live connections' bookkeeping (their pumps still report), but renumbering
            # only makes sense once they are gone: callers take() between idle periods.
            self._connections = {c.conn: c for c in connections if not c.finished}
            if not self._connections:
                self._next_conn = 0
            return chunks, connections

    def chunks(self) -> list[Chunk]:
        with self._cond:
            return list(self._chunks)

    def wait_for(self, predicate: Callable[[list[Chunk]], bool], timeout: float = 10.0) -> None:
        """Block until predicate(chunks so far) holds; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._chunks), timeout):
                raise TimeoutError("relay: condition not reached")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until every connection seen so far is closed in both directions."""
        with self._cond:
            done = self._cond.wait_for(
                lambda: all(c.finished for c in self._connections.values()), timeout
            )
            if not done:
                raise TimeoutError("relay: connections still open")

    # -- plumbing

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener shut down
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream_path)
            except OSError:
                upstream.close()
                client.close()  # as if the daemon were not there
                continue
            with self._cond:
                conn = self._next_conn
                self._next_conn += 1
                self._connections[conn] = RelayConnection(conn, time.monotonic())
                self._sockets += [client, upstream]
                self._cond.notify_all()
            for src, dst, direction in ((client, upstream, C2S), (upstream, client, S2C)):
                thread = threading.Thread(
                    target=self._pump,
                    args=(conn, src, dst, direction),
                    name=f"relay-{conn}-{direction}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, conn: int, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                try:
                    data = src.recv(1 << 17)
                except OSError:
                    data = b""  # reset counts as a close
                now = time.monotonic()
                with self._cond:
                    if data:
                        self._chunks.append(Chunk(conn, direction, data, now))
                    else:
                        self._connections[conn].eof.setdefault(direction, now)
                    self._cond.notify_all()
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    # The other side is gone; keep draining src so its EOF gets recorded.
                    continue
        finally:
            with self._cond:
                connection = self._connections.get(conn)
                if connection is not None and connection.finished:
                    for sock in (src, dst):
                        with contextlib.suppress(ValueError):
                            self._sockets.remove(sock)
                        sock.close()
