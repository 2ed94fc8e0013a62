"""A child process's stdin and stdout as one trio Stream: the link when a command carries it.

The guest's `--link exec:COMMAND` (qrexec-client-vm, `ssh -T host pcscbridge host --link
stdio`) and the host's `--ssh-client openssh` run a command and speak the link over its pipes.
Its stderr goes where the caller says: inherited (the command speaks to the user's log), or a
file that the caller reads when the command failed, and that is logged when the stream closes.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from typing import IO

import trio

log = logging.getLogger("pcscbridge.transports")

RECEIVE_SIZE = 65536
EXIT_GRACE = 2.0  # seconds a command gets to exit after its stdin closed, then after SIGTERM
STDERR_KEPT = 65536  # the end of a captured stderr that is read


class ProcessStream(trio.abc.HalfCloseableStream):
    """Sends to the command's stdin, receives from its stdout. Closing the stream closes
    stdin, waits a little for the command to end, then terminates (and at last kills) it."""

    def __init__(
        self, process: trio.Process, what: str, stderr_file: IO[bytes] | None = None
    ) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.what = what
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._initial = b""  # read by wait_first_data, not yet received
        self._stderr_file = stderr_file
        self._stderr_read = 0  # what stderr_text returned already is not logged again

    def stderr_text(self) -> str:
        """What the command wrote to the captured stderr so far (its last STDERR_KEPT bytes)."""
        if self._stderr_file is None:
            return ""
        end = self._stderr_file.seek(0, 2)
        self._stderr_file.seek(max(0, end - STDERR_KEPT))
        self._stderr_read = end
        return self._stderr_file.read().decode(errors="replace")

    def _log_stderr(self) -> None:
        if self._stderr_file is None:
            return
        end = self._stderr_file.seek(0, 2)
        self._stderr_file.seek(max(self._stderr_read, end - STDERR_KEPT))
        for line in self._stderr_file.read().decode(errors="replace").splitlines():
            if line.strip():
                log.warning("%s: %s", self.what, line.rstrip())
        self._stderr_file.close()
        self._stderr_file = None

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
            self._log_stderr()


async def open_process_stream(
    argv: Sequence[str],
    *,
    capture_stderr: bool = False,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> ProcessStream:
    """Start `argv` with pipes for stdin and stdout; its stderr is ours, or with
    `capture_stderr` a temporary file (stderr_text; logged when the stream closes). OSError
    when it cannot be run."""
    stderr = tempfile.TemporaryFile() if capture_stderr else None  # noqa: SIM115
    try:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=dict(env) if env is not None else None,
        )
    except BaseException:
        if stderr is not None:
            stderr.close()
        raise
    return ProcessStream(process, what or argv[0], stderr)
