"""This process's stdin and stdout as one trio Stream (the link under SSH and qrexec)."""

from __future__ import annotations

import os

import trio


class StdioStream(trio.abc.HalfCloseableStream):
    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        # Duplicates, so closing the stream never closes the process's own descriptors.
        self._receive = trio.lowlevel.FdStream(os.dup(stdin_fd))
        self._send = trio.lowlevel.FdStream(os.dup(stdout_fd))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._send.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._receive.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()
