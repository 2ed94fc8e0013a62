"""Reading and writing a socket without a trip through trio's scheduler when it would not wait.

trio makes every socket operation a checkpoint: even a send that the kernel takes at once, or
a receive whose bytes are already there, goes once round the scheduler (and epoll). On the
bridge's path a card call crosses four such sockets, each way; that round is a good part of
what a call costs. Here a send the kernel takes whole, and a receive with bytes waiting, are
done at once, on the socket's file descriptor (trio keeps it non-blocking); anything that would
wait goes through trio as before. Streams without a socket (SSH, pipes) always go through trio.

A reader that finds data waiting every time would never yield: `DirectReader` yields at least
every YIELD_EVERY receives, so a flooding peer does not starve the others.
"""

from __future__ import annotations

import os

import trio

YIELD_EVERY = 8


def _fd(stream: trio.abc.Stream) -> int | None:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        return int(sock.fileno())
    except (OSError, ValueError):
        return None


def send_now(stream: trio.abc.Stream, data: bytes) -> int:
    """Bytes of `data` the kernel took at once (0 when it would wait, or without a socket).
    BrokenResourceError when the peer is gone."""
    fd = _fd(stream)
    if fd is None or fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise trio.BrokenResourceError(str(exc)) from exc


class DirectReader:
    """`receive_some` for one stream, taking waiting bytes at once."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._direct_in_a_row = 0

    async def receive_some(self, max_bytes: int) -> bytes:
        # The descriptor is asked for each time: once the stream is closed it is -1, and its
        # number may already belong to another socket.
        fd = _fd(self._stream)
        if fd is not None and fd >= 0 and self._direct_in_a_row < YIELD_EVERY:
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            else:
                self._direct_in_a_row += 1
                return data
        self._direct_in_a_row = 0
        return await self._stream.receive_some(max_bytes)
