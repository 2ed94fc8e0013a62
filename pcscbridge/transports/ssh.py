"""SSH transport: the link byte stream is the stdin/stdout of a command run in the guest.

`pcscbridge host --ssh vm` dials the guest's sshd with paramiko, runs `pcscbridge attach ...` in
an exec channel (no pty), and speaks the link protocol over that channel. This module turns the
channel into a `trio.abc.HalfCloseableStream` (`SSHLink`) and maps every way of failing to open
it to an `SSHLinkError` with a kind and a CLI exit code.

Threads and the trio loop
- Connecting, authenticating and opening the channel are blocking paramiko calls: they run in
  one `trio.to_thread.run_sync` call, bounded by an overall deadline.
- Receiving needs no thread: `Channel.fileno()` is a pipe that paramiko's transport thread makes
  readable whenever data (or stderr, or EOF/close) is buffered, so the loop waits with
  `trio.lowlevel.wait_readable` and then takes the buffered bytes with a `recv` that cannot
  block. The exception: a `recv` that crosses paramiko's window threshold (every ~200 KiB)
  writes a WINDOW_ADJUST to the socket, which can block during a re-key: that one runs in a
  worker thread.
- Sending runs in a worker thread (`Channel.sendall` waits for the peer's window and writes the
  socket; both can block). The whole buffer goes to paramiko in one call, so a link message that
  fits in one SSH packet (32 KiB) is one packet, hence one TCP segment: no Nagle stall.
- TCP_NODELAY is set on our TCP socket (to the target, or to the first ProxyJump hop).

Dead peers
paramiko's `set_keepalive` only sends keepalives that want no reply, so it never notices a
server that stopped answering. With ServerAliveInterval N and ServerAliveCountMax M, a watchdog
(a trio system task per link) sends `keepalive@openssh.com` with want-reply every N seconds and
gives each one N*M seconds to be answered (any answer counts; OpenSSH answers "failure"). No
answer: the SSH connection is closed and `receive_some` raises `trio.BrokenResourceError`. A dead
server is thus noticed after N*M .. N*(M+1) seconds (OpenSSH: about N*M). `set_keepalive(N)` is
set too (on every hop): it keeps NAT and firewall state alive on idle links.

Not supported from ssh_config (paramiko's `SSHConfig` does not parse them, or we do not
implement them): `Include`, the system-wide /etc/ssh/ssh_config, `StrictHostKeyChecking` (the
`accept_new` option decides), `CheckHostIP`, `HostKeyAlias`, host certificates
(`@cert-authority`), password and keyboard-interactive authentication, `ControlMaster`.
ProxyJump wins over ProxyCommand when both are set (OpenSSH takes whichever comes first in the
file; paramiko does not tell us the order).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import select
import shlex
import socket
import struct
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import trio

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

log = logging.getLogger("pcscbridge.ssh")

DEFAULT_CONNECT_TIMEOUT = 15.0
# OpenSSH's default is no keepalive; a bridge exists to notice a lost link and reconnect, so we do.
DEFAULT_SERVER_ALIVE_INTERVAL = 15.0
DEFAULT_SERVER_ALIVE_COUNT_MAX = 3
DEFAULT_USER_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
DEFAULT_RECEIVE_SIZE = 65536
# Remote shells exit 127 for "command not found" and 126 for "found but not executable".
EXIT_STATUS_NOT_FOUND = (126, 127)
# `pcscbridge attach` exits EX_UNAVAILABLE when it cannot reach the guest server.
EXIT_STATUS_NO_GUEST_SERVER = 69
MAX_PROXY_JUMP_DEPTH = 8
CLOSE_TIMEOUT = 5.0
STDERR_TAIL_LINES = 5
STDERR_MAX_LINE = 4096
SEND_HIGH_WATER = 256 * 1024
FLUSH_TIMEOUT = 2.0  # aclose delivers what send_all accepted, unless the peer stalls this long

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


class SSHLinkError(Exception):
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


@dataclass
class SSHTarget:
    """Where and what to run. Values set here override the ssh config file, like ssh's -p/-o."""

    destination: str  # an ssh_config alias or [user@]host[:port] (also ssh://user@host:port)
    remote_command: str = "pcscbridge attach"
    ssh_config: Path | None = None  # None: ~/.ssh/config if it exists; Path("/dev/null"): none
    accept_new: bool = False  # add unknown (never changed) host keys to the user known_hosts
    connect_timeout: float | None = None  # None: ConnectTimeout from the config, else 15 s
    # How long open_ssh_link waits for the guest's first bytes (or the command's exit status).
    # None: connect_timeout; 0: do not wait (for commands that do not speak first).
    first_data_timeout: float | None = None
    server_alive_interval: float | None = None  # None: config, else 15 s; 0 disables the watchdog
    server_alive_count_max: int | None = None  # None: config, else 3


# ----------------------------------------------------------------------------- resolution


def parse_destination(destination: str) -> tuple[str | None, str, int | None]:
    """Split `[user@]host[:port]` (also `ssh://[user@]host[:port]`, `[v6addr]:port`)."""
    rest = destination.strip()
    if rest.startswith("ssh://"):
        rest = rest[len("ssh://") :].rstrip("/")
    user, _, hostport = rest.rpartition("@")
    host, port_text = hostport, ""
    if hostport.startswith("["):
        # [host]:port, or [v6addr] alone
        match = re.fullmatch(r"\[([^\]]+)\](?::(\d*))?", hostport)
        if match is None:
            raise SSHLinkError("usage", f"bad SSH destination {destination!r}")
        host, port_text = match.group(1), match.group(2) or ""
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    # more than one ':' without brackets is a bare IPv6 address: no port
    if not host or (user == "" and "@" in rest):
        raise SSHLinkError("usage", f"bad SSH destination {destination!r}")
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise SSHLinkError("usage", f"bad port in SSH destination {destination!r}")
        port = int(port_text)
    return user or None, host, port


@dataclass(frozen=True)
class _Endpoint:
    """One SSH server to log in to (the target or a ProxyJump hop), resolved from the config."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[Path, ...]
    identities_only: bool
    proxy_jump: tuple[str, ...]
    proxy_command: str | None
    user_known_hosts: tuple[Path, ...]
    global_known_hosts: tuple[Path, ...]
    hash_known_hosts: bool
    connect_timeout: float
    alive_interval: float
    alive_count_max: int

    @property
    def hostkey_name(self) -> str:
        """The host as known_hosts names it: `host`, or `[host]:port` when the port is not 22."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def display(self) -> str:
        return f"{self.user}@{self.hostkey_name}"


class _Resolver:
    """Turns destinations into _Endpoints the way ssh(1) reads ssh_config (paramiko.SSHConfig)."""

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        # paramiko expands ~ in IdentityFile and looks for default keys through $HOME too.
        self.home = Path(os.path.expanduser("~"))
        self.config_text = self._read_config()

    def _read_config(self) -> str:
        path = self.target.ssh_config
        if path is None:
            path = self.home / ".ssh" / "config"
            if not path.exists():
                return ""
        try:
            return Path(path).expanduser().read_text()
        except OSError as e:
            raise SSHLinkError("usage", f"cannot read ssh config {path}: {e.strerror}") from e

    def _lookup(self, host: str, user: str | None, port: int | None) -> paramiko.SSHConfigDict:
        # A User/Port given in the destination beats the file (as ssh's -l/-p do). Putting them in a
        # leading `Host` block makes paramiko also use them when expanding %r / %p tokens.
        override = ""
        if (user or port) and not re.search(r"[\s*?!,]", host):
            override = f"Host {host}\n" + (f"  User {user}\n" if user else "")
            override += f"  Port {port}\n" if port else ""
        try:
            config = paramiko.SSHConfig.from_text(override + self.config_text)
            return config.lookup(host)
        except (paramiko.ssh_exception.ConfigParseError, ValueError) as e:
            raise SSHLinkError("usage", f"bad ssh config: {e}") from e

    def resolve(self, destination: str) -> _Endpoint:
        user, host, port = parse_destination(destination)
        options = self._lookup(host, user, port)
        try:
            return self._endpoint(destination, options, user, port)
        except ValueError as e:
            raise SSHLinkError("usage", f"bad ssh config value for {destination!r}: {e}") from e

    def _endpoint(
        self,
        destination: str,
        options: paramiko.SSHConfigDict,
        user: str | None,
        port: int | None,
    ) -> _Endpoint:
        target = self.target
        timeout = target.connect_timeout
        if timeout is None:
            timeout = float(options.get("connecttimeout", DEFAULT_CONNECT_TIMEOUT))
        interval = target.server_alive_interval
        if interval is None:
            interval = float(options.get("serveraliveinterval", DEFAULT_SERVER_ALIVE_INTERVAL))
        count_max = target.server_alive_count_max
        if count_max is None:
            count_max = int(options.get("serveralivecountmax", DEFAULT_SERVER_ALIVE_COUNT_MAX))
        resolved_user = user or options.get("user") or getpass.getuser()
        resolved_port = port or int(options.get("port", 22))
        hostname = options["hostname"]

        def paths(value: str) -> tuple[Path, ...]:
            return tuple(
                self._expand(p, hostname, resolved_port, resolved_user) for p in value.split()
            )

        jump = options.get("proxyjump", "none")
        command = options.get("proxycommand", "none")
        return _Endpoint(
            alias=destination,
            hostname=hostname,
            port=resolved_port,
            user=resolved_user,
            # paramiko already expanded ~ and the %-tokens of IdentityFile.
            identity_files=tuple(Path(p) for p in options.get("identityfile", [])),
            identities_only=options.get("identitiesonly", "no").lower() == "yes",
            proxy_jump=() if jump.lower() == "none" else tuple(jump.split(",")),
            proxy_command=None if command.lower() == "none" else command,
            user_known_hosts=paths(options.get("userknownhostsfile", DEFAULT_USER_KNOWN_HOSTS)),
            global_known_hosts=paths(
                options.get("globalknownhostsfile", DEFAULT_GLOBAL_KNOWN_HOSTS)
            ),
            hash_known_hosts=options.get("hashknownhosts", "no").lower() == "yes",
            connect_timeout=timeout,
            alive_interval=interval,
            alive_count_max=max(1, count_max),
        )

    def _expand(self, text: str, host: str, port: int, user: str) -> Path:
        """~ and %-tokens in known_hosts file names (paramiko does not expand those)."""
        if text == "~" or text.startswith("~/"):
            text = str(self.home) + text[1:]
        tokens = {
            "%%": "%",
            "%d": str(self.home),
            "%u": getpass.getuser(),
            "%h": host,
            "%p": str(port),
            "%r": user,
        }
        text = re.sub(r"%.", lambda m: tokens.get(m.group(0), m.group(0)), text)
        return Path(os.path.expanduser(text))


# ----------------------------------------------------------------------- host key checking


def _describe_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


def _keyscan_hint(ep: _Endpoint) -> str:
    port = f"-p {ep.port} " if ep.port != 22 else ""
    dest = ep.user_known_hosts[0] if ep.user_known_hosts else DEFAULT_USER_KNOWN_HOSTS
    return f"`ssh-keyscan {port}{ep.hostname} >> {dest}`"


def _known_hosts_files(ep: _Endpoint) -> str:
    return ", ".join(str(p) for p in (*ep.user_known_hosts, *ep.global_known_hosts))


class _RefuseUnknownPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown host keys; with accept_new, append them to the user's known_hosts instead.

    A changed key never reaches a MissingHostKeyPolicy: SSHClient raises BadHostKeyException.
    """

    def __init__(self, ep: _Endpoint, accept_new: bool) -> None:
        self.ep = ep
        self.accept_new = accept_new

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        if not self.accept_new:
            raise SSHLinkError(
                "hostkey",
                f"host key of {hostname} is not known: {_describe_key(key)} "
                f"(known_hosts consulted: {_known_hosts_files(self.ep)}); verify the fingerprint, "
                f"then connect once with --accept-new, or add it with {_keyscan_hint(self.ep)}",
            )
        if not self.ep.user_known_hosts:
            raise SSHLinkError(
                "hostkey",
                f"host key of {hostname} is not known and no "
                "UserKnownHostsFile is configured to add it to",
            )
        path = self.ep.user_known_hosts[0]
        _append_known_host(path, hostname, key, hashed=self.ep.hash_known_hosts)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("added host key of %s (%s) to %s", hostname, _describe_key(key), path)


def _append_known_host(path: Path, hostname: str, key: paramiko.PKey, *, hashed: bool) -> None:
    # Append one line instead of paramiko's save_host_keys, which rewrites the file and drops
    # comments and entries it cannot parse.
    name = paramiko.HostKeys.hash_host(hostname) if hashed else hostname
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        needs_newline = path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    except FileNotFoundError:
        needs_newline = False
    with path.open("a") as f:
        f.write(("\n" if needs_newline else "") + f"{name} {key.get_name()} {key.get_base64()}\n")


def _changed_key_error(ep: _Endpoint, exc: paramiko.BadHostKeyException) -> SSHLinkError:
    name = ep.hostkey_name
    holder = "known_hosts"
    for path in (*ep.user_known_hosts, *ep.global_known_hosts):
        with contextlib.suppress(OSError):
            if path.is_file() and paramiko.HostKeys(str(path)).lookup(name):
                holder = str(path)
                break
    return SSHLinkError(
        "hostkey",
        f"host key of {name} has CHANGED: the server offers {_describe_key(exc.key)} but {holder} "
        f"has {_describe_key(exc.expected_key)}; refusing to connect (someone may be intercepting "
        f"the connection; if the change is expected, remove the old entry with "
        f"`ssh-keygen -R '{name}' -f {holder}`, verify the new fingerprint, then use --accept-new)",
    )


# ------------------------------------------------------------------------------ connecting


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


# ------------------------------------------------------------------------- remote stderr


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


# ----------------------------------------------------------------------------- the stream


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


# SO_MEMINFO (Linux): the socket's send buffer size and how much of it is in use.
_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_HAS_MEMINFO = sys.platform == "linux"
_MEMINFO = struct.Struct("9I")
_SEND_ROOM_MARGIN = 16384


def _socket_has_room(sock: socket.socket, size: int) -> bool:
    """True if a send of an SSH packet carrying `size` bytes cannot block on the send buffer."""
    try:
        info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size))
    except (OSError, struct.error):
        return False
    sndbuf, wmem_queued = info[3], info[5]
    # wmem_queued counts kernel buffer overhead, so demand twice the payload plus a margin.
    return bool(sndbuf - wmem_queued >= 2 * size + _SEND_ROOM_MARGIN)


_EOF = object()  # queued by send_eof: shut the channel's write side after the data before it


class _Sender:
    """Hands send_all's buffers to paramiko, in order, one `sendall` per buffer, never blocking.

    Fast path: when paramiko provably will not block (see `_try_now`), the buffer is sent right
    away from the loop thread. Otherwise it is queued and a task writes it from a worker thread;
    send_all returns once the buffer is queued (as a socket send_all returns once the kernel
    holds the data), and waits while SEND_HIGH_WATER bytes are queued.

    Why: a 40-byte echo through `cat` on loopback (medians, noisy 2-vCPU box) took ~250-450 us
    with a worker-thread hop per send (awaited or queued alike), ~150-300 us when sent from the
    loop thread, against ~250 us for plain blocking paramiko in one thread.
    """

    def __init__(self, channel: paramiko.Channel, who: str) -> None:
        self._channel = channel
        self._who = who
        transport = channel.get_transport()
        self._transport = transport
        # The fast path needs to see the kernel's send buffer: only for a TCP socket of ours
        # (not a ProxyCommand pipe, nor a channel through a ProxyJump host).
        sock = getattr(transport, "sock", None)
        self._tcp = sock if isinstance(sock, socket.socket) and _HAS_MEMINFO else None
        self._queue: deque[bytes | object] = deque()
        self.queued = 0  # bytes in the queue, including the buffer being sent
        self.error: str | None = None
        self._stopping = False
        self._work = trio.Event()
        self._progress = trio.Event()

    def send(self, payload: bytes) -> None:
        """Send now if that cannot block, else queue. Call only after wait_room()."""
        if not self._try_now(payload):
            self.put(payload)

    def _try_now(self, payload: bytes) -> bool:
        """Send from the loop thread if no step of Channel.send can wait; False if unsure.

        Channel.send waits for the peer's window, for the end of a key re-exchange, and for
        room in the socket's send buffer. None applies when: nothing is queued before us (the
        window only shrinks by our own sends), the buffer fits the window and one packet, no
        re-key is running, and the kernel has room to spare (SO_MEMINFO, Linux).
        """
        channel = self._channel
        transport = self._transport
        size = len(payload)
        if (
            self._queue
            or self._tcp is None
            or transport is None
            or size > channel.out_window_size
            or size > channel.out_max_packet_size
            or not transport.clear_to_send.is_set()
            or not _socket_has_room(self._tcp, size)
        ):
            return False
        try:
            sent = channel.send(payload)
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._fail(f"send to {self._who} failed: {e or type(e).__name__}")
            return True
        if sent < size:  # cannot happen given the checks above; stay correct if it does
            self.put(payload[sent:])
        return True

    def put(self, item: bytes | object) -> None:
        self._queue.append(item)
        if isinstance(item, bytes):
            self.queued += len(item)
        self._work.set()

    def stop(self) -> None:
        self._stopping = True
        self._work.set()

    async def wait_room(self) -> None:
        await trio.lowlevel.checkpoint()
        while self.queued >= SEND_HIGH_WATER and not self.error:
            await self._progress.wait()

    async def flush(self) -> None:
        """Wait until everything queued was handed to paramiko (or sending failed)."""
        await trio.lowlevel.checkpoint()
        while self._queue and not self.error:
            await self._progress.wait()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def run(self) -> None:
        # Runs as a system task: must never raise (except Cancelled, which trio absorbs).
        try:
            while True:
                while not self._queue:
                    if self._stopping:
                        return
                    self._work = trio.Event()
                    await self._work.wait()
                item = self._queue[0]
                await trio.to_thread.run_sync(self._write, item, abandon_on_cancel=True)
                self._queue.popleft()
                if isinstance(item, bytes):
                    self.queued -= len(item)
                self._notify()
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._fail(f"send to {self._who} failed: {e or type(e).__name__}")
        except Exception as e:
            log.exception("%s: sender failed", self._who)
            self._fail(f"send to {self._who} failed: {e!r}")

    def _write(self, item: bytes | object) -> None:
        if item is _EOF:
            self._channel.shutdown_write()
        else:
            assert isinstance(item, bytes)
            # The whole buffer in one call: paramiko cuts it only at the peer's max packet
            # size (32 KiB) or window, so one link message is one SSH packet where it fits.
            self._channel.sendall(item)

    def _fail(self, reason: str) -> None:
        self.error = reason
        self._queue.clear()
        self.queued = 0
        self._notify()


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
            detail = ""
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
        return _exit_error(self._ep, self.remote_command, status, self._stderr.last(), when="")

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


# ----------------------------------------------------------------------- exit status mapping


def _exit_error(
    ep: _Endpoint, command: str, status: int, stderr: str, when: str = " before the link started"
) -> SSHLinkError:
    """Map the remote command's exit status (and its last stderr lines) to an SSHLinkError."""
    said = f": {stderr}" if stderr else ""
    if status in EXIT_STATUS_NOT_FOUND:
        return SSHLinkError(
            "remote_missing",
            f"{ep.display}: the remote command could not be run (exit status {status}){said}; "
            f"is pcscbridge installed in the guest, on the PATH of non-interactive SSH sessions? "
            f"(command: {command})",
        )
    if status == EXIT_STATUS_NO_GUEST_SERVER:
        # attach's own message names the endpoint and how to start the server; add a hint only
        # when it said nothing.
        hint = "" if stderr else " (start `pcscbridge guest` in the guest)"
        return SSHLinkError(
            "no_guest_server", f"{ep.display}: the guest server is not running{said}{hint}"
        )
    how = "without an exit status (killed by a signal?)" if status < 0 else f"with status {status}"
    return SSHLinkError(
        "remote_failed",
        f"{ep.display}: the remote command exited {how}{when}{said} (command: {command})",
    )


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
    raise _exit_error(ep, command, int(channel.exit_status), stderr.last())


# ------------------------------------------------------------------------------ the entry


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
