"""What to dial: the SSHTarget, and the ssh_config resolution that turns it into _Endpoints.

Destinations are read the way ssh(1) reads them: an ssh_config alias or `[user@]host[:port]`
(also `ssh://user@host:port`), looked up in ~/.ssh/config (or the target's `ssh_config`) with
paramiko's `SSHConfig`. Values set on the SSHTarget override the file, like ssh's -p/-o.

Not supported from ssh_config (paramiko's `SSHConfig` does not parse them, or we do not
implement them): `Include`, the system-wide /etc/ssh/ssh_config, `StrictHostKeyChecking` (the
`accept_new` option decides), `CheckHostIP`, `HostKeyAlias`, host certificates
(`@cert-authority`), password and keyboard-interactive authentication, `ControlMaster`.
ProxyJump wins over ProxyCommand when both are set (OpenSSH takes whichever comes first in the
file; paramiko does not tell us the order).
"""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass
from pathlib import Path

import paramiko

from .errors import SSHLinkError

DEFAULT_CONNECT_TIMEOUT = 15.0
# OpenSSH's default is no keepalive; a bridge exists to notice a lost link and reconnect, so we do.
DEFAULT_SERVER_ALIVE_INTERVAL = 15.0
DEFAULT_SERVER_ALIVE_COUNT_MAX = 3
DEFAULT_USER_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


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
