"""What the remote command says besides its stdout: its stderr (forwarded to the log, the last
lines kept) and its exit status (mapped to an SSHLinkError)."""

from __future__ import annotations

import logging
from collections import deque

from .errors import SSHLinkError

log = logging.getLogger("pcscbridge.ssh")

# Remote shells exit 127 for "command not found" and 126 for "found but not executable".
EXIT_STATUS_NOT_FOUND = (126, 127)
# `pcscbridge attach` exits EX_UNAVAILABLE when it cannot reach the guest server.
EXIT_STATUS_NO_GUEST_SERVER = 69
STDERR_TAIL_LINES = 5
STDERR_MAX_LINE = 4096


class _StderrLog:
    """Forwards the remote command's stderr to the log, line by line; keeps the last few lines."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.partial = b""
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def feed(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > STDERR_MAX_LINE:  # a runaway line: log it in pieces
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            self._emit(line)

    def flush(self) -> None:
        if self.partial:
            self._emit(self.partial)
            self.partial = b""

    def _emit(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        if line:
            self.tail.append(line)
            log.warning("%s: remote stderr: %s", self.who, line)

    def last(self) -> str:
        return " | ".join(self.tail)


def _exit_error(
    who: str, command: str, status: int, stderr: str, when: str = " before the link started"
) -> SSHLinkError:
    """Map the remote command's exit status (and its last stderr lines) to an SSHLinkError;
    `who` names the SSH server."""
    said = f": {stderr}" if stderr else ""
    if status in EXIT_STATUS_NOT_FOUND:
        return SSHLinkError(
            "remote_missing",
            f"{who}: the remote command could not be run (exit status {status}){said}; "
            f"is pcscbridge installed in the guest, on the PATH of non-interactive SSH sessions? "
            f"(command: {command})",
        )
    if status == EXIT_STATUS_NO_GUEST_SERVER:
        # attach's own message names the endpoint and how to start the server; add a hint only
        # when it said nothing.
        hint = "" if stderr else " (start `pcscbridge guest` in the guest)"
        return SSHLinkError(
            "no_guest_server", f"{who}: the guest server is not running{said}{hint}"
        )
    how = "without an exit status (killed by a signal?)" if status < 0 else f"with status {status}"
    return SSHLinkError(
        "remote_failed",
        f"{who}: the remote command exited {how}{when}{said} (command: {command})",
    )
