"""Sending: the link's writes go to paramiko in order, from the loop thread when that cannot
block, else from a worker thread.

`Channel.sendall` waits for the peer's window and writes the socket; both can block, so in
general sending runs in a worker thread. The whole buffer goes to paramiko in one call, so a
link message that fits in one SSH packet (32 KiB) is one packet, hence one TCP segment: no
Nagle stall.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
from collections import deque

import paramiko
import trio

log = logging.getLogger("pcscbridge.ssh")

SEND_HIGH_WATER = 256 * 1024

# SO_MEMINFO (Linux): the socket's send buffer size and how much of it is in use.
_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_HAS_MEMINFO = sys.platform == "linux"
_MEMINFO = struct.Struct("9I")
_SEND_ROOM_MARGIN = 16384


def _socket_has_room(sock: socket.socket, size: int) -> bool:
    """True if a send of an SSH packet carrying `size` bytes cannot block on the send buffer."""
    try:
        info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size))
    except (OSError, struct.error):
        return False
    sndbuf, wmem_queued = info[3], info[5]
    # wmem_queued counts kernel buffer overhead, so demand twice the payload plus a margin.
    return bool(sndbuf - wmem_queued >= 2 * size + _SEND_ROOM_MARGIN)


_EOF = object()  # queued by send_eof: shut the channel's write side after the data before it


class _Sender:
    """Hands send_all's buffers to paramiko, in order, one `sendall` per buffer, never blocking.

    Fast path: when paramiko provably will not block (see `_try_now`), the buffer is sent right
    away from the loop thread. Otherwise it is queued and a task writes it from a worker thread;
    send_all returns once the buffer is queued (as a socket send_all returns once the kernel
    holds the data), and waits while SEND_HIGH_WATER bytes are queued.

    Why: a 40-byte echo through `cat` on loopback (medians, noisy 2-vCPU box) took ~250-450 us
    with a worker-thread hop per send (awaited or queued alike), ~150-300 us when sent from the
    loop thread, against ~250 us for plain blocking paramiko in one thread.
    """

    def __init__(self, channel: paramiko.Channel, who: str) -> None:
        self._channel = channel
        self._who = who
        transport = channel.get_transport()
        self._transport = transport
        # The fast path needs to see the kernel's send buffer: only for a TCP socket of ours
        # (not a ProxyCommand pipe, nor a channel through a ProxyJump host).
        sock = getattr(transport, "sock", None)
        self._tcp = sock if isinstance(sock, socket.socket) and _HAS_MEMINFO else None
        self._queue: deque[bytes | object] = deque()
        self.queued = 0  # bytes in the queue, including the buffer being sent
        self.error: str | None = None
        self._stopping = False
        self._work = trio.Event()
        self._progress = trio.Event()

    def send(self, payload: bytes) -> None:
        """Send now if that cannot block, else queue. Call only after wait_room()."""
        if not self._try_now(payload):
            self.put(payload)

    def _try_now(self, payload: bytes) -> bool:
        """Send from the loop thread if no step of Channel.send can wait; False if unsure.

        Channel.send waits for the peer's window, for the end of a key re-exchange, and for
        room in the socket's send buffer. None applies when: nothing is queued before us (the
        window only shrinks by our own sends), the buffer fits the window and one packet, no
        re-key is running, and the kernel has room to spare (SO_MEMINFO, Linux).
        """
        channel = self._channel
        transport = self._transport
        size = len(payload)
        if (
            self._queue
            or self._tcp is None
            or transport is None
            or size > channel.out_window_size
            or size > channel.out_max_packet_size
            or not transport.clear_to_send.is_set()
            or not _socket_has_room(self._tcp, size)
        ):
            return False
        try:
            sent = channel.send(payload)
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._fail(f"send to {self._who} failed: {e or type(e).__name__}")
            return True
        if sent < size:  # cannot happen given the checks above; stay correct if it does
            self.put(payload[sent:])
        return True

    def put(self, item: bytes | object) -> None:
        self._queue.append(item)
        if isinstance(item, bytes):
            self.queued += len(item)
        self._work.set()

    def stop(self) -> None:
        self._stopping = True
        self._work.set()

    async def wait_room(self) -> None:
        await trio.lowlevel.checkpoint()
        while self.queued >= SEND_HIGH_WATER and not self.error:
            await self._progress.wait()

    async def flush(self) -> None:
        """Wait until everything queued was handed to paramiko (or sending failed)."""
        await trio.lowlevel.checkpoint()
        while self._queue and not self.error:
            await self._progress.wait()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def run(self) -> None:
        # Runs as a system task: must never raise (except Cancelled, which trio absorbs).
        try:
            while True:
                while not self._queue:
                    if self._stopping:
                        return
                    self._work = trio.Event()
                    await self._work.wait()
                item = self._queue[0]
                await trio.to_thread.run_sync(self._write, item, abandon_on_cancel=True)
                self._queue.popleft()
                if isinstance(item, bytes):
                    self.queued -= len(item)
                self._notify()
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._fail(f"send to {self._who} failed: {e or type(e).__name__}")
        except Exception as e:
            log.exception("%s: sender failed", self._who)
            self._fail(f"send to {self._who} failed: {e!r}")

    def _write(self, item: bytes | object) -> None:
        if item is _EOF:
            self._channel.shutdown_write()
        else:
            assert isinstance(item, bytes)
            # The whole buffer in one call: paramiko cuts it only at the peer's max packet
            # size (32 KiB) or window, so one link message is one SSH packet where it fits.
            self._channel.sendall(item)

    def _fail(self, reason: str) -> None:
        self.error = reason
        self._queue.clear()
        self.queued = 0
        self._notify()
