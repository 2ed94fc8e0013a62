"""open_ssh_link, the entry: resolve the destination, dial it in a worker thread, wait for the
remote command's first bytes (or its exit), and hand back the SSHLink."""

from __future__ import annotations

import logging

import paramiko
import trio

from .config import SSHTarget, _Endpoint, _Resolver
from .dial import _open_blocking, _Session
from .errors import SSHLinkError
from .link import CLOSE_TIMEOUT, DEFAULT_RECEIVE_SIZE, SSHLink
from .remote import _exit_error, _StderrLog

log = logging.getLogger("pcscbridge.ssh")


async def _first_data(
    channel: paramiko.Channel, stderr: _StderrLog, timeout: float, ep: _Endpoint, command: str
) -> bytes:
    """Wait for the guest's first bytes, or the command's exit (mapped to an SSHLinkError).

    Returns the bytes, or b"" if none came within `timeout` (the command may not speak first).
    """
    fd = channel.fileno()
    ended = False
    with trio.move_on_after(timeout):
        while True:
            while channel.recv_stderr_ready():
                stderr.feed(channel.recv_stderr(65536))
            if channel.recv_ready():
                # Small (a hello), so far below the window threshold: recv does not write.
                return bytes(channel.recv(DEFAULT_RECEIVE_SIZE))
            if channel.eof_received or channel.closed or channel.exit_status_ready():
                ended = True
                break
            await trio.lowlevel.wait_readable(fd)
    if not ended:
        return b""
    # The output ended before any data: the exit status, sent right after the EOF, says why.
    if not channel.status_event.is_set():
        with trio.move_on_after(timeout):
            await trio.to_thread.run_sync(channel.status_event.wait, abandon_on_cancel=True)
    while channel.recv_stderr_ready():
        stderr.feed(channel.recv_stderr(65536))
    stderr.flush()
    raise _exit_error(ep.display, command, int(channel.exit_status), stderr.last())


def _plan(target: SSHTarget) -> tuple[_Resolver, _Endpoint]:
    resolver = _Resolver(target)
    return resolver, resolver.resolve(target.destination)


async def open_ssh_link(target: SSHTarget) -> SSHLink:
    """Log in to `target.destination`, run `target.remote_command`, return the link stream.

    Raises SSHLinkError (see EXIT_CODES) when it cannot. Blocking work runs in worker threads;
    cancelling this call abandons and closes the half-open connection.
    """
    # Reading the config can block too (file I/O; `Match exec` runs commands; canonicalization
    # resolves names).
    resolver, ep = await trio.to_thread.run_sync(_plan, target)
    session = _Session()
    # Each step (TCP connect, handshake, auth, channel) has its own timeout; this bounds the sum.
    hops = 1 + len(ep.proxy_jump)
    deadline = ep.connect_timeout * 4 * hops
    try:
        with trio.move_on_after(deadline) as scope:
            channel = await trio.to_thread.run_sync(
                _open_blocking, resolver, ep, session, abandon_on_cancel=True
            )
        if scope.cancelled_caught:
            raise SSHLinkError(
                "connect", f"connecting to {ep.display} timed out after {deadline:g}s"
            )
        stderr = _StderrLog(ep.display)
        wait = target.first_data_timeout
        wait = ep.connect_timeout if wait is None else wait
        initial = b""
        if wait > 0:
            initial = await _first_data(channel, stderr, wait, ep, target.remote_command)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await trio.to_thread.run_sync(session.close, abandon_on_cancel=True)
        raise
    link = SSHLink(ep, session, channel, stderr, initial, target.remote_command)
    link._start_tasks()
    log.info("SSH link to %s open (command: %s)", ep.display, target.remote_command)
    return link
