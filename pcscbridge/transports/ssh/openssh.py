"""`--ssh-client openssh`: the system's `ssh -T DESTINATION COMMAND`, its stdin/stdout the link.

For what paramiko does not follow (ssh_config `Include` and `Match`, certificates, FIDO and
PKCS#11 keys, GSSAPI, the system-wide /etc/ssh/ssh_config): ssh reads its configuration
itself. pcscbridge adds `-T`, `BatchMode=yes` (a service never prompts), `-F FILE` for
`--ssh-config`, `StrictHostKeyChecking=accept-new` for `--accept-new`, and, only where the
configuration leaves them unset (asked with `ssh -G`), the paramiko client's defaults:
ConnectTimeout 15 s, ServerAliveInterval 15 s x ServerAliveCountMax 3.

Failures map to the paramiko client's SSHLinkError kinds, so `pcscbridge host` exits with the
same statuses: ssh's own failures (exit status 255) by what ssh says on stderr, the remote
command's by its exit status (remote.py). Differences from paramiko's messages: an unknown host
key's fingerprint is not shown (ssh in batch mode does not print it); `~` in ssh_config is the
user's home from the password database, not $HOME.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Sequence

import trio

from ..process import ProcessStream, open_process_stream
from .config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_SERVER_ALIVE_COUNT_MAX, SSHTarget
from .config import DEFAULT_SERVER_ALIVE_INTERVAL as DEFAULT_ALIVE_INTERVAL
from .errors import SSHLinkError
from .remote import _exit_error

log = logging.getLogger("pcscbridge.ssh")

SSH = "ssh"
EXIT_SSH_FAILED = 255  # ssh's own failure; any other status is the remote command's
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/=]+")
_CONNECT_WORDS = (
    "Connection refused",
    "Connection timed out",
    "timed out during banner exchange",
    "Connection closed",
    "Connection reset",
    "No route to host",
    "Network is unreachable",
    "kex_exchange_identification",
    "not responding",
)


class _Settings:
    """What `ssh -G` says it would use for the destination."""

    def __init__(self, text: str) -> None:
        self.values: dict[str, list[str]] = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            self.values.setdefault(key.lower(), []).append(value)

    def first(self, key: str, default: str = "") -> str:
        return self.values.get(key, [default])[0]

    @property
    def display(self) -> str:
        host, port = self.first("hostname"), self.first("port", "22")
        name = host if port == "22" else f"[{host}]:{port}"
        return f"{self.first('user')}@{name}"

    @property
    def known_hosts_name(self) -> str:
        return self.display.partition("@")[2]

    def user_known_hosts(self) -> list[str]:
        files = " ".join(self.values.get("userknownhostsfile", [])).split()
        return [os.path.expanduser(path) for path in files]


def _config_args(target: SSHTarget) -> list[str]:
    return ["-F", str(target.ssh_config)] if target.ssh_config is not None else []


async def _run_ssh(argv: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
    except FileNotFoundError:
        raise SSHLinkError(
            "usage", f"`{argv[0]}` is not installed (Debian: openssh-client)"
        ) from None


async def _settings(target: SSHTarget) -> _Settings:
    result = await _run_ssh([SSH, "-G", *_config_args(target), "--", target.destination])
    if result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip().replace("\n", " | ")
        raise SSHLinkError("usage", f"ssh cannot use {target.destination!r}: {said}")
    return _Settings(result.stdout.decode(errors="replace"))


def _ssh_argv(target: SSHTarget, settings: _Settings) -> list[str]:
    argv = [SSH, "-T", "-o", "BatchMode=yes", *_config_args(target)]
    if target.accept_new:
        argv += ["-o", "StrictHostKeyChecking=accept-new"]
    if settings.first("connecttimeout", "none") == "none":
        argv += ["-o", f"ConnectTimeout={DEFAULT_CONNECT_TIMEOUT:g}"]
    if settings.first("serveraliveinterval", "0") == "0":
        argv += [
            "-o",
            f"ServerAliveInterval={DEFAULT_ALIVE_INTERVAL:g}",
            "-o",
            f"ServerAliveCountMax={DEFAULT_SERVER_ALIVE_COUNT_MAX}",
        ]
    return [*argv, "--", target.destination, target.remote_command]


def _first_data_timeout(target: SSHTarget, settings: _Settings) -> float:
    """Connecting, logging in and starting the command: four steps of ConnectTimeout each."""
    if target.first_data_timeout is not None:
        return target.first_data_timeout
    timeout = settings.first("connecttimeout", "none")
    return 4 * (float(timeout) if timeout.isdigit() else DEFAULT_CONNECT_TIMEOUT)


async def open_openssh_link(target: SSHTarget) -> ProcessStream:
    """Run `ssh -T` to `target.destination` with the remote command; the link stream once the
    guest has spoken. Raises SSHLinkError (the paramiko client's kinds) when it cannot."""
    settings = await _settings(target)
    argv = _ssh_argv(target, settings)
    try:
        stream = await open_process_stream(
            argv, capture_stderr=True, what=f"ssh {target.destination}"
        )
    except OSError as exc:
        raise SSHLinkError("usage", f"cannot run {SSH}: {exc.strerror or exc}") from None
    timeout = _first_data_timeout(target, settings)
    try:
        with trio.move_on_after(timeout):
            if await stream.wait_first_data():
                log.info("SSH link to %s open (ssh -T, command: %s)", settings.display, argv[-1])
                return stream
            with trio.move_on_after(timeout):
                status = await stream.wait()
                raise await _failure(target, settings, status, stream.stderr_text())
        raise SSHLinkError(
            "connect", f"{settings.display}: no answer from the guest within {timeout:g}s"
        )
    except BaseException:
        await stream.aclose()
        raise


async def _failure(
    target: SSHTarget, settings: _Settings, status: int, stderr: str
) -> SSHLinkError:
    """Why ssh ended before the guest spoke, as the paramiko client would say it."""
    who = settings.display
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if status != EXIT_SSH_FAILED:
        return _exit_error(who, target.remote_command, status, " | ".join(lines[-5:]))
    said = " | ".join(line for line in lines if not line.startswith("@"))[-600:]
    if "Could not resolve hostname" in stderr:
        return SSHLinkError("resolve", f"{who}: {said}")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        offered = FINGERPRINT.search(stderr)
        known = await _known_fingerprint(settings)
        return SSHLinkError(
            "hostkey",
            f"host key of {settings.known_hosts_name} has CHANGED: the server offers "
            f"{offered.group(0) if offered else 'another key'} but known_hosts has "
            f"{known or 'another one'}; refusing to connect (someone may be intercepting the "
            f"connection; if the change is expected, remove the old entry with `ssh-keygen -R "
            f"'{settings.known_hosts_name}'`, verify the new fingerprint, then use --accept-new)",
        )
    if "Host key verification failed" in stderr:
        return SSHLinkError(
            "hostkey",
            f"host key of {settings.known_hosts_name} is not known ({said}); verify it, then "
            f"connect once with --accept-new, or add it to known_hosts",
        )
    if "Permission denied" in stderr:
        keys = ", ".join(settings.values.get("identityfile", [])) or "none"
        return SSHLinkError(
            "auth", f"{who}: authentication failed (identity files: {keys}): {said}"
        )
    if any(words in stderr for words in _CONNECT_WORDS):
        return SSHLinkError("connect", f"{who}: {said}")
    return SSHLinkError("connect", f"{who}: ssh failed: {said or 'no message'}")


async def _known_fingerprint(settings: _Settings) -> str | None:
    """The fingerprint known_hosts has for the server (ssh-keygen -F), if any."""
    for path in settings.user_known_hosts():
        result = await _run_ssh(["ssh-keygen", "-l", "-F", settings.known_hosts_name, "-f", path])
        found = FINGERPRINT.search(result.stdout.decode(errors="replace"))
        if found:
            return found.group(0)
    return None
