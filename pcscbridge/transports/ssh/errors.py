"""SSHLinkError: every way of failing to open the SSH link, as a kind and a CLI exit code."""

from __future__ import annotations

from ...errors import SetupError

# kind -> process exit code of the CLI (the lead's `pcscbridge host` exits with these).
EXIT_CODES: dict[str, int] = {
    "remote_failed": 1,  # the remote command exited some other way before the link started
    "usage": 2,  # bad destination or unreadable ssh config
    "resolve": 3,
    "connect": 4,
    "auth": 5,
    "hostkey": 6,
    "remote_missing": 7,
    "no_guest_server": 8,
}
# Kinds a reconnect loop may retry: the condition can go away by itself (VM booting, guest server
# starting). Authentication, host keys, a missing program or bad usage need a human.
RETRYABLE_KINDS = frozenset({"resolve", "connect", "no_guest_server", "remote_failed"})


class SSHLinkError(SetupError):
    """Opening the SSH link failed. `kind`: a key of EXIT_CODES; `exit_code`: the CLI's status."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in EXIT_CODES:
            raise ValueError(f"unknown SSHLinkError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.exit_code = EXIT_CODES[kind]
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS
