"""Who is on the other end of a connection: the kernel's credentials of a UNIX socket peer
(SO_PEERCRED), and the identity a link authenticates as."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import trio

_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Credentials:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # supplementary groups, when /proc tells them

    def __str__(self) -> str:
        return f"uid {self.uid}, gid {self.gid}, pid {self.pid}"


def peer_credentials(stream: trio.abc.Stream) -> Credentials | None:
    """The credentials of a UNIX socket's peer, or None for any other stream."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return None
    return Credentials(pid, uid, gid, _supplementary_groups(pid))


def _supplementary_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def link_identity(stream: trio.abc.Stream) -> str | None:
    """What a link authenticates as: the pinned TLS peer, or the uid of a UNIX socket peer;
    None when the transport says nothing (TCP, stdio)."""
    identity = getattr(stream, "peer_identity", None)
    if identity is not None:
        return str(identity)
    credentials = peer_credentials(stream)
    return f"uid {credentials.uid}" if credentials is not None else None
