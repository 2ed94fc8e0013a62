"""SSH transport: the link byte stream is the stdin/stdout of a command run in the guest.

`pcscbridge host --ssh vm` dials the guest's sshd with paramiko, runs `pcscbridge attach ...` in
an exec channel (no pty), and speaks the link protocol over that channel. This package turns the
channel into a `trio.abc.HalfCloseableStream` (`SSHLink`) and maps every way of failing to open
it to an `SSHLinkError` with a kind and a CLI exit code.

Threads and the trio loop: connecting, authenticating and opening the channel are blocking
paramiko calls that run in one worker thread (dial.py); receiving runs in the loop (link.py);
sending runs in the loop when it provably cannot block, else in a worker thread (sender.py).

Modules, one concern each:
- errors: SSHLinkError, its kinds and the CLI's exit codes (EXIT_CODES).
- config: SSHTarget, parse_destination, ssh_config resolution into endpoints (and what of
  ssh_config is not supported).
- hostkeys: known_hosts checking, accept_new, the unknown-key and changed-key refusals.
- dial: TCP connect, ProxyJump, ProxyCommand, login and authentication, the exec channel.
- sender: the send path (loop-thread fast path, worker-thread queue).
- remote: the remote command's stderr and exit status.
- link: SSHLink, the stream, and its keepalive watchdog (dead peers).
- opener: open_ssh_link, which puts them together.
"""

from __future__ import annotations

from .config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_SERVER_ALIVE_COUNT_MAX,
    DEFAULT_SERVER_ALIVE_INTERVAL,
    SSHTarget,
    parse_destination,
)
from .errors import EXIT_CODES, SSHLinkError
from .link import SSHLink
from .opener import open_ssh_link

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_SERVER_ALIVE_COUNT_MAX",
    "DEFAULT_SERVER_ALIVE_INTERVAL",
    "EXIT_CODES",
    "SSHLink",
    "SSHLinkError",
    "SSHTarget",
    "open_ssh_link",
    "parse_destination",
]
