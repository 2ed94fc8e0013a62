"""SSHLink: the exec channel as a `trio.abc.HalfCloseableStream`, and its keepalive watchdog.

Receiving needs no thread: `Channel.fileno()` is a pipe that paramiko's transport thread makes
readable whenever data (or stderr, or EOF/close) is buffered, so the loop waits with
`trio.lowlevel.wait_readable` and then takes the buffered bytes with a `recv` that cannot block.
The exception: a `recv` that crosses paramiko's window threshold (every ~200 KiB) writes a
WINDOW_ADJUST to the socket, which can block during a re-key: that one runs in a worker thread.
Sending is the _Sender's (sender.py).

Dead peers
paramiko's `set_keepalive` only sends keepalives that want no reply, so it never notices a
server that stopped answering. With ServerAliveInterval N and ServerAliveCountMax M, a watchdog
(a trio system task per link) sends `keepalive@openssh.com` with want-reply every N seconds and
gives each one N*M seconds to be answered (any answer counts; OpenSSH answers "failure"). No
answer: the SSH connection is closed and `receive_some` raises `trio.BrokenResourceError`. A dead
server is thus noticed after N*M .. N*(M+1) seconds (OpenSSH: about N*M). `set_keepalive(N)` is
set too (on every hop, see dial.py): it keeps NAT and firewall state alive on idle links.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import paramiko
import trio

from .config import _Endpoint
from .dial import _Session
from .errors import SSHLinkError
from .remote import _exit_error, _StderrLog
from .sender import _EOF, _Sender

log = logging.getLogger("pcscbridge.ssh")

DEFAULT_RECEIVE_SIZE = 65536
CLOSE_TIMEOUT = 5.0
FLUSH_TIMEOUT = 2.0  # aclose delivers what send_all accepted, unless the peer stalls this long


class _Guard:
    """trio's rule: one task at a time per direction (trio's own ConflictDetector is private)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.busy = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.busy:
            raise trio.BusyResourceError(f"another task is already in {self.what}")
        self.busy = True
        try:
            yield
        finally:
            self.busy = False


class SSHLink(trio.abc.HalfCloseableStream):
    """The guest command's stdin/stdout as a trio stream.

    receive_some returns b"" when the remote command closed its stdout, and raises
    trio.BrokenResourceError when the SSH connection itself was lost (peer gone, keepalives
    unanswered). After the stream ends, `exit_status` / `wait_exit_status()` / `remote_error()`
    tell why the remote command ended.
    """

    def __init__(
        self,
        ep: _Endpoint,
        session: _Session,
        channel: paramiko.Channel,
        stderr: _StderrLog,
        initial: bytes = b"",
        remote_command: str = "",
    ) -> None:
        self._ep = ep
        self._session = session
        self._chan = channel
        self._fd = channel.fileno()
        self._stderr = stderr
        self._pending = initial
        self._closed = False
        self._sender = _Sender(channel, ep.display)
        self._eof_queued = False
        self._lost: str | None = None  # why the connection was declared dead, by the watchdog
        self._recv_guard = _Guard("receive_some")
        self._send_guard = _Guard("send_all or send_eof")
        self._task_scopes: list[trio.CancelScope] = []
        self.remote_command = remote_command

    @property
    def peer(self) -> str:
        """user@host (as [host]:port when not 22), for log lines."""
        return self._ep.display

    @property
    def route(self) -> tuple[str, ...]:
        """Every SSH login this link went through: ProxyJump hops first, the target last."""
        return tuple(self._session.route)

    @property
    def transport(self) -> paramiko.Transport:
        """The target's paramiko Transport (for diagnostics: cipher, socket options)."""
        transport = self._chan.get_transport()
        assert transport is not None
        return transport

    def __repr__(self) -> str:
        return f"<SSHLink {' -> '.join(self.route) or self.peer} closed={self._closed}>"

    # --- receiving

    def _recv_would_block(self, n: int, buffered: int) -> bool:
        """True if recv would send a WINDOW_ADJUST, i.e. write the socket (may block in a re-key).

        Reads paramiko's window accounting (public attributes, unchanged for a decade); if they
        ever go away, every recv simply goes to a thread.
        """
        try:
            sofar = self._chan.in_window_sofar
            threshold = self._chan.in_window_threshold
        except AttributeError:
            return True
        return bool(sofar + min(n, buffered) > threshold)

    async def _take(self, read: Callable[[int], bytes], n: int, buffered: int) -> bytes:
        if self._recv_would_block(n, buffered):
            return await trio.to_thread.run_sync(read, n)
        return read(n)

    async def _drain_stderr(self) -> None:
        while self._chan.recv_stderr_ready():
            buffered = len(self._chan.in_stderr_buffer)
            self._stderr.feed(await self._take(self._chan.recv_stderr, 65536, buffered))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        n = max_bytes or DEFAULT_RECEIVE_SIZE
        with self._recv_guard():
            if self._closed:
                raise trio.ClosedResourceError("SSH link was closed")
            # A checkpoint before taking data, never after: a cancel must not lose bytes.
            await trio.lowlevel.checkpoint()
            if self._pending:
                data, self._pending = self._pending[:n], self._pending[n:]
                return data
            while True:
                await self._drain_stderr()
                chan = self._chan
                if chan.recv_ready():
                    return await self._take(chan.recv, n, len(chan.in_buffer))
                if chan.eof_received:
                    self._stderr.flush()
                    return b""
                if chan.closed:
                    self._stderr.flush()
                    raise trio.BrokenResourceError(self._lost_reason())
                if self._closed:
                    raise trio.ClosedResourceError("SSH link was closed")
                # paramiko re-arms the pipe on every feed; each wake-up re-checks both buffers,
                # so a wake-up lost to the stdout/stderr "or-pipe" race is recovered here.
                await trio.lowlevel.wait_readable(self._fd)

    def _lost_reason(self) -> str:
        if self._lost:
            return self._lost
        transport = self._chan.get_transport()
        error = transport.get_exception() if transport is not None else None
        if isinstance(error, EOFError):
            detail = ": the server closed it"  # paramiko's EOFError says nothing ("lost: ")
        elif error is not None:
            detail = f": {str(error) or type(error).__name__}"
        else:
            # The channel went before paramiko recorded why (it closes channels first).
            detail = ": the connection closed"
        return f"SSH connection to {self.peer} lost{detail}"

    # --- sending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_guard():
            self._check_can_send()
            payload = bytes(data)
            # Waiting for room happens before queueing, so a cancel here loses nothing.
            await self._sender.wait_room()
            self._check_can_send()
            if payload:
                self._sender.send(payload)
                self._check_can_send()  # the fast path may have failed right away

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("SSH link was closed")
        if self._eof_queued:
            raise trio.ClosedResourceError("send_eof() was called")
        if self._sender.error:
            raise trio.BrokenResourceError(self._lost or self._sender.error)
        if self._chan.closed:
            raise trio.BrokenResourceError(self._lost_reason())

    async def wait_send_all_might_not_block(self) -> None:
        await self._sender.wait_room()

    async def send_eof(self) -> None:
        with self._send_guard():
            if self._closed:
                raise trio.ClosedResourceError("SSH link was closed")
            if not self._eof_queued:
                self._eof_queued = True
                self._sender.put(_EOF)
            await self._sender.flush()
            if self._sender.error:
                raise trio.BrokenResourceError(self._lost or self._sender.error)

    # --- remote exit

    @property
    def exit_status(self) -> int | None:
        """The remote command's exit status once it exited (-1: none sent, e.g. killed)."""
        if self._chan.exit_status_ready():
            return int(self._chan.exit_status)
        return None

    async def wait_exit_status(self, timeout: float = 2.0) -> int | None:
        """Wait (bounded) for the exit status; sshd sends it just after the stdout EOF."""
        status_event = self._chan.status_event
        if not status_event.is_set():
            with trio.move_on_after(timeout):
                await trio.to_thread.run_sync(status_event.wait, timeout, abandon_on_cancel=True)
        return self.exit_status

    def remote_error(self) -> SSHLinkError | None:
        """What the remote command's exit says, as an SSHLinkError; None if running or status 0.

        For the reconnect loop: after the stream ended, `await link.wait_exit_status()` and then
        this tells e.g. "guest server gone" (kind no_guest_server) from a plain disconnect.
        """
        status = self.exit_status
        if not status:
            return None
        return _exit_error(
            self._ep.display, self.remote_command, status, self._stderr.last(), when=""
        )

    # --- closing

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            # Deliver what send_all already accepted (a last reply), unless the peer stalls.
            with trio.move_on_after(FLUSH_TIMEOUT):
                await self._sender.flush()
            self._sender.stop()
            for scope in self._task_scopes:
                scope.cancel()
            self._stderr.flush()
            # Wake a receive_some blocked on the pipe before paramiko closes its fds.
            trio.lowlevel.notify_closing(self._fd)
            with trio.move_on_after(CLOSE_TIMEOUT):
                await trio.to_thread.run_sync(self._session.close, abandon_on_cancel=True)
        await trio.lowlevel.checkpoint()

    # --- background tasks: sender and keepalive watchdog

    def _start_tasks(self) -> None:
        # System tasks, so that open_ssh_link needs no nursery; aclose cancels them.
        self._spawn(self._sender.run, f"ssh-sender {self.peer}")
        if self._ep.alive_interval > 0:
            self._spawn(self._watchdog, f"ssh-watchdog {self.peer}")

    def _spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        scope = trio.CancelScope()
        self._task_scopes.append(scope)

        async def run() -> None:
            with scope:
                await fn()

        trio.lowlevel.spawn_system_task(run, name=name)

    async def _watchdog(self) -> None:
        # Runs as a system task: must never raise (except Cancelled, which trio absorbs).
        interval = self._ep.alive_interval
        patience = interval * self._ep.alive_count_max
        transport = self._chan.get_transport()
        try:
            while transport is not None and transport.is_active():
                await trio.sleep(interval)
                answered = False
                with trio.move_on_after(patience):
                    answered = await trio.to_thread.run_sync(
                        _ping, transport, abandon_on_cancel=True
                    )
                if not answered and not self._closed:
                    await self._declare_dead(
                        f"SSH connection to {self.peer} lost: no answer to keepalives "
                        f"for {patience:g}s (ServerAliveInterval {interval:g}, "
                        f"ServerAliveCountMax {self._ep.alive_count_max})"
                    )
                    return
        except Exception:
            log.exception("%s: keepalive watchdog failed", self.peer)

    async def _declare_dead(self, reason: str) -> None:
        self._lost = reason
        log.warning("%s", reason)
        # Closing the connections closes the channel, which wakes receive_some (BrokenResourceError)
        # and fails a pending send_all.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await trio.to_thread.run_sync(self._session.close_connections, abandon_on_cancel=True)


def _ping(transport: paramiko.Transport) -> bool:
    """One keepalive round trip; True if the server answered (success or failure both count)."""
    transport.global_request("keepalive@openssh.com", wait=True)
    # global_request returns None both for "request failed" (an answer) and for "transport gone".
    return bool(transport.is_active())
