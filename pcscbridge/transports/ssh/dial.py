"""Dialing: the TCP connection, ProxyJump and ProxyCommand, login and authentication, and the
exec channel that runs the remote command; every failure mapped to an SSHLinkError.

- Connecting, authenticating and opening the channel are blocking paramiko calls: they all run
  in `_open_blocking`, in one `trio.to_thread.run_sync` call that open_ssh_link bounds by an
  overall deadline. A `_Session` collects what they open, so the loop can close it on timeout
  or cancel while the thread still runs.
- TCP_NODELAY is set on our TCP socket (to the target, or to the first ProxyJump hop).
- `set_keepalive(ServerAliveInterval)` is set on every hop: it keeps NAT and firewall state
  alive on idle links (the link's watchdog notices dead servers, see link.py).
- Authentication is by public key only (key files, ssh-agent, default ~/.ssh/id_* keys); no
  password or keyboard-interactive authentication, no `ControlMaster`.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import socket
import threading
from pathlib import Path
from typing import Any

import paramiko

from .config import _Endpoint, _Resolver
from .errors import SSHLinkError
from .hostkeys import _changed_key_error, _RefuseUnknownPolicy

MAX_PROXY_JUMP_DEPTH = 8


class _Session:
    """Everything one link holds open: SSH clients (hops first, target last) and proxy commands.

    Thread-safe: the connecting thread adds to it while the loop may close it (timeout, cancel).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self.clients: list[paramiko.SSHClient] = []
        self.proxies: list[paramiko.ProxyCommand] = []
        self.channel: paramiko.Channel | None = None
        self.route: list[str] = []  # user@host of each login, first hop first, target last

    def add(self, thing: Any) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                if isinstance(thing, paramiko.SSHClient):
                    self.clients.append(thing)
                elif isinstance(thing, paramiko.ProxyCommand):
                    self.proxies.append(thing)
                else:
                    self.channel = thing
        if closed:
            _close_quietly(thing)
            raise SSHLinkError("connect", "connection abandoned")

    def close(self) -> None:
        """Blocking: closes the channel, then the connections from the target back to hop 1."""
        with self._lock:
            channel, self.channel = self.channel, None
        if channel is not None:
            # Also closes the channel's pipe: the loop must not be waiting on it (notify_closing).
            _close_quietly(channel)
        self.close_connections()

    def close_connections(self) -> None:
        """Blocking: closes the SSH connections (and proxy commands) but not the channel object.

        The channel is then marked closed and its pipe stays open and readable, which wakes a
        receive_some waiting on it; closing the pipe under it would leave it waiting forever.
        """
        with self._lock:
            self._closed = True
            things: list[Any] = [*reversed(self.clients), *self.proxies]
        for thing in things:
            _close_quietly(thing)


def _close_quietly(thing: Any) -> None:
    with contextlib.suppress(Exception):
        thing.close()
    if isinstance(thing, paramiko.ProxyCommand):
        # ProxyCommand.close only sends SIGTERM; reap the process so it does not linger as a zombie.
        with contextlib.suppress(Exception):
            thing.process.wait(timeout=2)


class _ProxyCommand(paramiko.ProxyCommand):
    """paramiko's ProxyCommand with socket-like recv and close.

    - recv returns what is there (paramiko's waits for `size` bytes) and b"" at EOF (paramiko's
      spins on the readable-at-EOF pipe until its timeout: a proxy command that failed was
      only noticed at the banner timeout).
    - close may run twice, from two threads: Transport.close() does not wait for its thread,
      which closes the socket again on its way out, when we may have reaped the process already
      (paramiko's bare os.kill then raised ProcessLookupError in that thread).
    """

    def recv(self, size: int) -> bytes:
        fd = self.process.stdout.fileno()
        try:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                raise TimeoutError()  # what socket.timeout is, and what paramiko expects
            return os.read(fd, size)  # b"" once the command exited: EOF, as a socket says it
        except TimeoutError:
            raise
        except OSError as e:
            raise paramiko.ssh_exception.ProxyCommandFailure(" ".join(self.cmd), e.strerror) from e

    def close(self) -> None:
        self.process.terminate()

    def stderr_text(self) -> str:
        """What the command wrote on stderr so far (for error messages); never blocks."""
        fd = self.process.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            return os.read(fd, 4096).decode(errors="replace").strip()
        except OSError:
            return ""


def _tcp_connect(ep: _Endpoint) -> socket.socket:
    try:
        infos = socket.getaddrinfo(ep.hostname, ep.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        via = f" (from {ep.alias!r})" if ep.alias != ep.hostname else ""
        raise SSHLinkError(
            "resolve", f"cannot resolve host name {ep.hostname!r}{via}: {e.strerror}"
        ) from e
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(ep.connect_timeout)
        try:
            sock.connect(address)
        except OSError as e:
            sock.close()
            last = e
            continue
        # Link messages are written in one send each; without NODELAY a small one waits for the
        # ACK of the previous one (Nagle + delayed ACK: ~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock
    reason = (
        f"timed out after {ep.connect_timeout:g}s"
        if isinstance(last, TimeoutError)
        else (last.strerror or str(last))
        if last
        else "no address"
    )
    raise SSHLinkError("connect", f"cannot connect to {ep.hostname} port {ep.port}: {reason}")


def _direct_tcpip(via: paramiko.SSHClient, via_ep: _Endpoint, ep: _Endpoint) -> paramiko.Channel:
    """A channel through the jump host to ep's host:port (what `ssh -J` / `ssh -W` use)."""
    transport = via.get_transport()
    assert transport is not None
    try:
        return transport.open_channel(
            "direct-tcpip",
            (ep.hostname, ep.port),
            ("127.0.0.1", 0),
            timeout=ep.connect_timeout,
        )
    except paramiko.ChannelException as e:
        raise SSHLinkError(
            "connect",
            f"jump host {via_ep.display} cannot connect to {ep.hostname} port {ep.port}: "
            f"{e.text} (code {e.code})",
        ) from e
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise SSHLinkError(
            "connect", f"jump host {via_ep.display}: cannot open a channel to {ep.hostname}: {e}"
        ) from e


def _proxy_command(ep: _Endpoint) -> paramiko.ProxyCommand:
    # paramiko splits the command with shlex and runs it without a shell; ssh runs it with
    # `$SHELL -c "exec ..."`, so pipes, redirections and quoting work there. Do the same.
    assert ep.proxy_command is not None
    shell = os.environ.get("SHELL") or "/bin/sh"
    try:
        return _ProxyCommand(shlex.join([shell, "-c", "exec " + ep.proxy_command]))
    except paramiko.ssh_exception.ProxyCommandFailure as e:
        raise SSHLinkError("connect", f"ProxyCommand for {ep.alias} failed: {e}") from e


def _login(ep: _Endpoint, sock: Any, accept_new: bool, home: Path) -> paramiko.SSHClient:
    """SSH handshake, host key check and public key authentication over an open socket."""
    client = paramiko.SSHClient()
    for path in ep.global_known_hosts:
        if path.is_file():
            with contextlib.suppress(OSError):
                client.load_system_host_keys(str(path))
    for path in ep.user_known_hosts:
        if path.is_file():
            # Loaded without remembering the file name: paramiko would rewrite it on save.
            with contextlib.suppress(OSError):
                client.get_host_keys().load(str(path))
    client.set_missing_host_key_policy(_RefuseUnknownPolicy(ep, accept_new))
    key_files = [str(p) for p in ep.identity_files if p.is_file()]
    # ssh: IdentityFile given -> those files (+ agent unless IdentitiesOnly); none given -> the
    # default ~/.ssh/id_* files. paramiko's look_for_keys is exactly the default-files search.
    allow_agent = not ep.identities_only and bool(os.environ.get("SSH_AUTH_SOCK"))
    look_for_keys = not ep.identity_files and (home / ".ssh").is_dir()
    try:
        client.connect(
            ep.hostname,
            ep.port,
            username=ep.user,
            key_filename=key_files or None,
            allow_agent=allow_agent,
            look_for_keys=look_for_keys,
            sock=sock,
            timeout=ep.connect_timeout,
            banner_timeout=ep.connect_timeout,
            auth_timeout=ep.connect_timeout,
            channel_timeout=ep.connect_timeout,
        )
    except SSHLinkError:
        _close_quietly(client)
        raise
    except paramiko.BadHostKeyException as e:
        _close_quietly(client)
        raise _changed_key_error(ep, e) from e
    except paramiko.AuthenticationException as e:
        _close_quietly(client)
        raise _auth_error(ep, key_files, allow_agent, look_for_keys, e) from e
    except paramiko.SSHException as e:
        reason = _handshake_failure(client, e, ep.connect_timeout)
        _close_quietly(client)
        if "authentication methods" in str(e):  # no key at all to offer
            raise _auth_error(ep, key_files, allow_agent, look_for_keys, e) from e
        raise SSHLinkError("connect", f"SSH handshake with {ep.display} failed: {reason}") from e
    except (OSError, EOFError) as e:
        _close_quietly(client)
        raise SSHLinkError("connect", f"SSH handshake with {ep.display} failed: {e!r}") from e
    return client


def _handshake_failure(client: paramiko.SSHClient, exc: Exception, timeout: float) -> str:
    """Why the handshake failed: the transport thread's own error beats what connect() says.

    When the server stays silent (a VM still booting, a frozen sshd), start_client gives up at
    `timeout` without raising, and connect() then fails with a misleading "No existing session";
    the real cause ("Error reading SSH protocol banner") is saved on the transport.
    """
    transport = client.get_transport()
    saved = transport.get_exception() if transport is not None else None
    if saved is not None and str(saved):
        return str(saved)
    if str(exc) == "No existing session":
        return f"no SSH handshake within {timeout:g}s (the server accepted but did not answer)"
    return str(exc) or type(exc).__name__


def _auth_error(
    ep: _Endpoint, key_files: list[str], agent: bool, defaults: bool, exc: Exception
) -> SSHLinkError:
    tried = [f"key file {f}" for f in key_files]
    if agent:
        tried.append("ssh-agent keys")
    if defaults:
        tried.append("default ~/.ssh/id_* keys")
    missing = [str(p) for p in ep.identity_files if not p.is_file()]
    note = f"; missing IdentityFile: {', '.join(missing)}" if missing else ""
    return SSHLinkError(
        "auth",
        f"authentication as {ep.display} failed ({exc}); tried: "
        f"{', '.join(tried) or 'no keys'}{note}",
    )


def _connect(
    resolver: _Resolver,
    ep: _Endpoint,
    session: _Session,
    *,
    via: tuple[paramiko.SSHClient, _Endpoint] | None = None,
    depth: int = 0,
) -> paramiko.SSHClient:
    """Log in to ep (through `via`, ep's own ProxyJump/ProxyCommand, or directly). Blocking."""
    if depth > MAX_PROXY_JUMP_DEPTH:
        raise SSHLinkError(
            "usage",
            f"ProxyJump nesting deeper than {MAX_PROXY_JUMP_DEPTH} (a loop?) at {ep.alias!r}",
        )
    sock: Any
    if via is not None:
        sock = _direct_tcpip(via[0], via[1], ep)
    elif ep.proxy_jump:
        # ssh -J a,b,c: log in to a (with a's own config), then to b through a, c through b.
        hop_via: tuple[paramiko.SSHClient, _Endpoint] | None = None
        for hop in ep.proxy_jump:
            hop_ep = resolver.resolve(hop.strip())
            hop_client = _connect(resolver, hop_ep, session, via=hop_via, depth=depth + 1)
            hop_via = (hop_client, hop_ep)
        assert hop_via is not None
        sock = _direct_tcpip(hop_via[0], hop_via[1], ep)
    elif ep.proxy_command:
        sock = _proxy_command(ep)
        session.add(sock)
    else:
        sock = _tcp_connect(ep)
    try:
        client = _login(ep, sock, resolver.target.accept_new, resolver.home)
    except SSHLinkError as e:
        if isinstance(sock, _ProxyCommand) and e.kind == "connect":
            _close_quietly(sock)
            said = sock.stderr_text()
            raise SSHLinkError(
                "connect", f"{e} (ProxyCommand {ep.proxy_command!r} said: {said or 'nothing'})"
            ) from e
        _close_quietly(sock)
        raise
    except BaseException:
        _close_quietly(sock)
        raise
    session.add(client)
    session.route.append(ep.display)
    transport = client.get_transport()
    if transport is not None and ep.alive_interval > 0:
        transport.set_keepalive(max(1, round(ep.alive_interval)))
    return client


def _open_blocking(resolver: _Resolver, ep: _Endpoint, session: _Session) -> paramiko.Channel:
    """Connect, authenticate and start the remote command; runs in a worker thread."""
    client = _connect(resolver, ep, session)
    transport = client.get_transport()
    assert transport is not None
    try:
        channel = transport.open_session(timeout=ep.connect_timeout)
        session.add(channel)
        channel.set_combine_stderr(False)
        channel.exec_command(resolver.target.remote_command)
    except SSHLinkError:
        raise
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise SSHLinkError(
            "remote_failed", f"{ep.display}: cannot start the remote command: {e}"
        ) from e
    return channel
