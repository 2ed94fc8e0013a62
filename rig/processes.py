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


# --- scenes that end-to-end tests of every path share ------------------------------------------


def echo_side_by_side(sockets: dict[str, str], reader: str, count: int) -> None:
    """`echo-loop` COUNT times in one process per tag, each on its socket, all at once; every
    answer must be that process's own."""
    from .pcsc_programs import json_lines

    apps = [
        spawn_program(["echo-loop", reader, tag, str(count)], path) for tag, path in sockets.items()
    ]
    try:
        results = []
        for app in apps:
            out, err = app.communicate(timeout=60)
            assert app.returncode == 0, err
            results.extend(json_lines(out))
        assert sorted(r["tag"] for r in results) == sorted(sockets)
        assert all(r["wrong"] == 0 and r["count"] == count for r in results)
    finally:
        finish(*apps)


def die_in_a_transaction(host_socket: str, client_socket: str, reader: str) -> dict[str, int]:
    """A client on `client_socket` begins a transaction and is killed; what a host application
    on `host_socket` sees next: {"status_rv", "begin_rv"} (pcscd resets the card)."""
    from .pcsc_programs import json_lines

    host_app = spawn_program(["card-after-reset", reader], host_socket)
    expect_line(host_app, "CONNECTED")
    client_app = spawn_program(["begin-transaction", reader], client_socket)
    try:
        expect_line(client_app, "CONNECTED")
        expect_line(client_app, "BEGUN")
        client_app.kill()  # dies holding the transaction
        client_app.wait(5)
        assert host_app.stdin is not None
        host_app.stdin.write("\n")
        host_app.stdin.flush()
        out, err = host_app.communicate(timeout=30)
        results = json_lines(out)
        assert len(results) == 1, err
        return {key: int(value) for key, value in results[0].items()}
    finally:
        finish(host_app, client_app)
