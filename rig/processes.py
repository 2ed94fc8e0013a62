"""Child processes of the tests: a `rig.pcsc_programs` program started against a PC/SC socket,
its output read a line at a time with a deadline, its end; and what OpenSSH's tools say.

Plain functions (no pytest here): the end-to-end tests over a UNIX link and over SSH share them.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

# The pyscard test programs, run by name: `[*PROGRAMS, "full", reader]`.
PROGRAMS = [sys.executable, "-m", "rig.pcsc_programs"]


def spawn_program(args: list[str], socket_path: str) -> subprocess.Popen[str]:
    """Start `python -m rig.pcsc_programs ARGS` as a PC/SC client of `socket_path`, all pipes."""
    return subprocess.Popen(
        [*PROGRAMS, *args],
        env={**os.environ, "PCSCLITE_CSOCK_NAME": socket_path},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(process: subprocess.Popen[str], timeout: float, what: str = "output") -> str:
    """The next line `process` prints (stripped), within `timeout` seconds. Read a byte at a
    time from the pipe: a buffered readline could swallow the next line too, and a select for
    it would then wait in vain."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no {what} within {timeout}s"
        byte = os.read(fd, 1)
        assert byte, f"program ended: {process.stderr.read() if process.stderr else ''}"
        line += byte
    return line.decode().strip()


def expect_line(process: subprocess.Popen[str], wanted: str, timeout: float = 10) -> None:
    """The next line `process` prints is `wanted`, within `timeout` seconds."""
    line = read_line(process, timeout, what=repr(wanted))
    assert line == wanted, (
        f"expected {wanted!r}, got {line!r}: {process.stderr.read() if process.stderr else ''}"
    )


def no_line_within(process: subprocess.Popen[str], seconds: float) -> bool:
    """True if `process` prints nothing for `seconds` (it is blocked, as it should be)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    return not ready


def finish(*processes: subprocess.Popen[str]) -> None:
    """Kill what still runs, reap it and close its pipes."""
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=5)
