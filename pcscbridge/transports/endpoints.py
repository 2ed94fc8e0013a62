"""Link endpoints: `unix:PATH`, `tcp:HOST:PORT`, `tls:HOST:PORT`, `stdio`, `exec:COMMAND`;
listeners and connections for each (TLS: transports/tls.py)."""

from __future__ import annotations

import errno
import ipaddress
import os
import shlex
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from ..errors import SetupError
from .process import open_process_stream
from .stdio import StdioStream
from .tls import PinnedTLSListener, PinnedTLSStream, TLSSettings


class EndpointError(SetupError):
    """An endpoint that cannot be used, with a message for the user."""


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "unix", "tcp", "tls", "stdio" or "exec"
    path: str = ""
    host: str = ""
    port: int = 0
    command: tuple[str, ...] = ()  # exec: the program and its arguments

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind in ("tcp", "tls"):
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{self.kind}:{host}:{self.port}"
        if self.kind == "exec":
            return f"exec:{shlex.join(self.command)}"
        return "stdio"


def default_link_endpoint(
    environ: Mapping[str, str] | None = None, uid: int | None = None
) -> Endpoint:
    """$XDG_RUNTIME_DIR/pcscbridge/link.sock, else /tmp/pcscbridge-UID/link.sock (of this
    process, or of one with that environment and user id)."""
    runtime = (os.environ if environ is None else environ).get("XDG_RUNTIME_DIR")
    uid = os.getuid() if uid is None else uid
    base = Path(runtime) / "pcscbridge" if runtime else Path(f"/tmp/pcscbridge-{uid}")
    return Endpoint("unix", path=str(base / "link.sock"))


def parse_endpoint(text: str) -> Endpoint:
    if text == "stdio":
        return Endpoint("stdio")
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Endpoint("unix", path=rest)
    if kind in ("tcp", "tls") and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return Endpoint(kind, host=host, port=int(port))
    if kind == "exec":
        return _exec_endpoint(text, rest)
    raise EndpointError(
        f"bad endpoint {text!r}: use unix:PATH, tcp:HOST:PORT, tls:HOST:PORT, stdio or exec:COMMAND"
    )


def _exec_endpoint(text: str, command: str) -> Endpoint:
    """`exec:COMMAND`, COMMAND split as a shell would (no shell runs it)."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise EndpointError(f"bad endpoint {text!r}: {exc}") from None
    if not argv:
        raise EndpointError(f"bad endpoint {text!r}: exec: needs a command")
    return Endpoint("exec", command=tuple(argv))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def open_listener(
    endpoint: Endpoint, mode: int = 0o600, tls: TLSSettings | None = None
) -> trio.abc.Listener[trio.abc.Stream]:
    if endpoint.kind == "unix":
        return await unix_listener(endpoint.path, mode)
    if endpoint.kind == "tcp" and not _is_loopback(endpoint.host):
        raise EndpointError(
            f"refusing to listen on {endpoint}: a plain TCP link has no authentication, so a "
            "non-loopback TCP link would be open to anyone. Listen on 127.0.0.1 or ::1, use "
            "a tls: endpoint, or carry the link over SSH (pcscbridge host --ssh)."
        )
    if endpoint.kind in ("tcp", "tls"):
        listener = (await trio.open_tcp_listeners(endpoint.port, host=endpoint.host))[0]
        if endpoint.kind == "tcp":
            return listener
        return PinnedTLSListener(listener, _required(tls))
    raise EndpointError(f"cannot listen on {endpoint}")


def _required(tls: TLSSettings | None) -> TLSSettings:
    return tls if tls is not None else TLSSettings.load(None, None)  # raises: what is missing


async def connect(endpoint: Endpoint, tls: TLSSettings | None = None) -> trio.abc.Stream:
    if endpoint.kind == "unix":
        return await trio.open_unix_socket(endpoint.path)
    if endpoint.kind in ("tcp", "tls"):
        settings = _required(tls) if endpoint.kind == "tls" else None
        stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        # Every link message is one send; never let Nagle hold one back.
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if settings is None:
            return stream
        secured = PinnedTLSStream(stream, settings, dialer=True)
        await secured.handshake()
        return secured
    if endpoint.kind == "stdio":
        return StdioStream()
    if endpoint.kind == "exec":
        # The command's stderr is ours: what it says goes to the same log.
        return await open_process_stream(endpoint.command, what=str(endpoint))
    raise EndpointError(f"cannot connect to {endpoint}")


async def unix_listener(path: str, mode: int, group: int | None = None) -> trio.SocketListener:
    """Listen on a UNIX socket path, replacing a stale socket file but never a live one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise EndpointError(f"{path} exists and is not a socket; refusing to replace it")
        if await _socket_alive(path):
            raise EndpointError(f"{path} is in use by a running server")
        target.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, group)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise EndpointError(f"cannot listen on {path}: {exc.strerror}") from None
    return trio.SocketListener(sock)


async def _socket_alive(path: str) -> bool:
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(path)
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()


def systemd_listeners() -> list[trio.SocketListener]:
    """Sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), in order."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    listeners = []
    for fd in range(3, 3 + count):
        sock = trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
        os.close(fd)
        listeners.append(trio.SocketListener(sock))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return listeners
