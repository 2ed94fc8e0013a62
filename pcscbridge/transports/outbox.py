"""The bytes waiting to go out on one stream, in order, with a bound.

A peer that stops reading must not make us buffer without end (a pcsc-lite client that never
reads its event signals, a link peer that floods requests and never reads the answers). Every
message for the stream goes through its Outbox: `send` writes at once when nothing is queued
(the common case: no task switch), `put` queues without waiting (event signals, messages that
arrive while a write is under way) and a writer task drains the queue. When more than `limit`
bytes wait, or one write has not gone through for `write_timeout` seconds, the peer is not
reading: the outbox raises PeerNotReading (in its writer task, or in the task that was writing),
which ends the connection it belongs to.
"""

from __future__ import annotations

import math
from collections import deque

import trio

from ..errors import PeerError
from .direct import send_now

# Writes are joined up to this size: fewer system calls, and messages are never split.
JOIN_UP_TO = 256 * 1024


class PeerNotReading(PeerError):
    """More than the outbox's limit is waiting: the peer does not read what it is sent."""


class Outbox:
    def __init__(
        self, stream: trio.abc.SendStream, limit: int, write_timeout: float = math.inf
    ) -> None:
        self._stream = stream
        self._limit = limit
        self._write_timeout = write_timeout
        self._queued: deque[bytes] = deque()
        self._queued_size = 0
        self._writing = False
        self._more = trio.Event()
        self._overflow = False
        self._write_scope: trio.CancelScope | None = None
        self.sent_bytes = 0

    @property
    def queued_size(self) -> int:
        return self._queued_size

    def put(self, data: bytes) -> None:
        """Queue `data` behind everything before it; never waits."""
        self._queued.append(data)
        self._queued_size += len(data)
        if self._queued_size > self._limit and len(self._queued) > 1:
            # One message larger than the limit is ours to send; many are a stalled reader.
            self._overflow = True
            if self._write_scope is not None:
                self._write_scope.cancel()
        self._more.set()

    async def send(self, data: bytes) -> None:
        """Write `data` now if nothing is queued or being written, else queue it."""
        if self._writing or self._queued or self._overflow:
            self.put(data)
            return
        sent = send_now(self._stream, data)  # the common case: the kernel takes it whole
        self.sent_bytes += sent
        if sent < len(data):
            await self._write(data[sent:])

    async def run(self) -> None:
        """The writer task: drains the queue until cancelled; PeerNotReading on overflow."""
        while True:
            if self._overflow:
                raise PeerNotReading(f"more than {self._limit} bytes wait to be read")
            if not self._queued or self._writing:
                await self._more.wait()
                self._more = trio.Event()
                continue
            await self._write(self._take())

    def _take(self) -> bytes:
        first = self._queued.popleft()
        if not self._queued or len(first) >= JOIN_UP_TO:
            self._queued_size -= len(first)
            return first
        parts = [first]
        size = len(first)
        while self._queued and size + len(self._queued[0]) <= JOIN_UP_TO:
            part = self._queued.popleft()
            parts.append(part)
            size += len(part)
        self._queued_size -= size
        return b"".join(parts)

    async def _write(self, data: bytes) -> None:
        self._writing = True
        try:
            with trio.move_on_after(self._write_timeout) as self._write_scope:
                await self._stream.send_all(data)
            if self._write_scope.cancelled_caught:
                if self._overflow:
                    raise PeerNotReading(f"more than {self._limit} bytes wait to be read")
                raise PeerNotReading(f"nothing read for {self._write_timeout:.0f} s")
            self.sent_bytes += len(data)
        finally:
            self._write_scope = None
            self._writing = False
            if self._queued:
                self._more.set()
