"""A child process's stdin and stdout as one trio Stream: the link when a command carries it.

The guest's `--link exec:COMMAND` (qrexec-client-vm, `ssh -T host pcscbridge host --link
stdio`) and the host's `--ssh-client openssh` run a command and speak the link over its pipes.
Its stderr goes where the caller says: inherited (the command speaks to the user's log), or a
file the caller reads when the command has ended.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO

import trio

log = logging.getLogger("pcscbridge.transports")

RECEIVE_SIZE = 65536
EXIT_GRACE = 2.0  # seconds a command gets to exit after its stdin closed, then after SIGTERM


class ProcessStream(trio.abc.HalfCloseableStream):
    """Sends to the command's stdin, receives from its stdout. Closing the stream closes
    stdin, waits a little for the command to end, then terminates (and at last kills) it."""

    def __init__(self, process: trio.Process, what: str) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.what = what
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._initial = b""  # read by wait_first_data, not yet received

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait_first_data(self) -> bool:
        """Wait for the command's first bytes (kept for receive_some): True; or for the end
        of its output before any byte: False."""
        if not self._initial:
            self._initial = await self._stdout.receive_some(RECEIVE_SIZE)
        return bool(self._initial)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stdin.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stdin.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._initial:
            size = len(self._initial) if max_bytes is None else max_bytes
            data, self._initial = self._initial[:size], self._initial[size:]
            return data
        return await self._stdout.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self._stdin.aclose()

    async def wait(self) -> int:
        """The command's exit status (negative: killed by that signal)."""
        return await self.process.wait()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stdin.aclose()
            with trio.move_on_after(EXIT_GRACE):
                await self.process.wait()
            if self.process.returncode is None:
                log.debug("%s did not exit after its input closed; terminating it", self.what)
                self.process.terminate()
                with trio.move_on_after(EXIT_GRACE):
                    await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            await self._stdout.aclose()


async def open_process_stream(
    argv: Sequence[str],
    *,
    stderr: IO[bytes] | int | None = None,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> ProcessStream:
    """Start `argv` with pipes for stdin and stdout. OSError when it cannot be run."""
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=dict(env) if env is not None else None,
    )
    return ProcessStream(process, what or argv[0])
