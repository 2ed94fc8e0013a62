"""Host key checking: known_hosts files, unknown keys (refused, or added with accept_new) and
changed keys (always refused), with messages that say how to fix it.

What OpenSSH has and this does not (see config.py): `StrictHostKeyChecking` (the `accept_new`
option decides), `CheckHostIP`, `HostKeyAlias`, host certificates (`@cert-authority`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import paramiko

from .config import DEFAULT_USER_KNOWN_HOSTS, _Endpoint
from .errors import SSHLinkError

log = logging.getLogger("pcscbridge.ssh")


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
