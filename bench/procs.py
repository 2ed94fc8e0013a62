"""Child processes of the benchmark: started in sessions of their own, always stopped.

Every process the benchmark starts (socat, ssh, the delay proxy, measuring clients) is the
leader of a new session, dies with the benchmark (PR_SET_PDEATHSIG) if the benchmark is
killed outright, and is stopped with its whole process group by :func:`stop_process`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs the child when the benchmark's main thread dies."""
    if threading.current_thread() is threading.main_thread():
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """SIGTERM the process group, SIGKILL it after ``timeout``; close the pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # Whatever is left in the group (socat's forked children, ssh's helpers) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    return proc.returncode


class LineReader:
    """Reads lines from a child's stdout with a deadline (select on the raw fd, own buffer)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = bytearray()

    def read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (end := self.buffer.find(b"\n")) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer from pid {self.proc.pid} within {timeout:.1f} s")
            readable, _, _ = select.select([self.fd], [], [], remaining)
            if not readable:
                continue
            data = os.read(self.fd, 1 << 20)
            if not data:
                raise EOFError(f"pid {self.proc.pid} exited (status {self.proc.poll()})")
            self.buffer += data
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        return line.decode(errors="replace")

    def read_json(self, timeout: float) -> dict[str, Any]:
        line = self.read_line(timeout)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"pid {self.proc.pid} wrote {line[:200]!r}") from exc
        if not isinstance(value, dict):
            raise RuntimeError(f"pid {self.proc.pid} wrote {line[:200]!r}")
        return value


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (the peak resident set size since the process started), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
