"""What a UNIX socket path is: missing, stale, refused to us, or served, by which process, with
how many connections open now (from /proc: Linux only; other processes' files need root)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags
CONNECTED = "03"  # SS_CONNECTED in its St column
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class Process:
    pid: int
    argv: list[str]

    @property
    def name(self) -> str:
        """`pcscbridge guest`, `pcscd`, `systemd` ...: what a person would call it."""
        for index, word in enumerate(self.argv):
            if Path(word).name.startswith("pcscbridge") and index + 1 < len(self.argv):
                return f"pcscbridge {self.argv[index + 1]}"
            if word == "-m" and self.argv[index + 1 : index + 2] == ["pcscbridge"]:
                return f"pcscbridge {' '.join(self.argv[index + 2 : index + 3])}".strip()
        return Path(self.argv[0]).name if self.argv else f"pid {self.pid}"


@dataclass
class SocketState:
    path: str
    exists: bool = False
    is_socket: bool = False
    mode: int = 0
    error: int = 0  # errno of connecting (0: a server accepted)
    servers: list[Process] = field(default_factory=list)  # processes holding the listener
    connections: int = 0  # connections accepted and open now

    @property
    def alive(self) -> bool:
        return self.is_socket and self.error == 0

    @property
    def stale(self) -> bool:
        return self.is_socket and self.error == errno.ECONNREFUSED


def inspect(path: str, *, connect: bool = True) -> SocketState:
    """`connect` False: tell a live socket from a stale one by its listener in /proc alone
    (a connection to a guest's link socket would start a link there)."""
    state = SocketState(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        state.error = exc.errno or errno.ENOENT
        return state
    state.exists = True
    state.is_socket = stat.S_ISSOCK(info.st_mode)
    state.mode = stat.S_IMODE(info.st_mode)
    if not state.is_socket:
        return state
    listeners, state.connections = _unix_table(path)
    state.servers = _holders(listeners)
    if not connect:
        state.error = 0 if listeners else errno.ECONNREFUSED
        return state
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError as exc:
            state.error = exc.errno or errno.EIO
            return state
        # Who listens, as the kernel says (also across mount namespaces, where the path in
        # /proc/net/unix is another one): systemd itself for an activated socket.
        pid, _, _ = PEERCRED.unpack(
            probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
        )
    if pid > 0 and pid not in (server.pid for server in state.servers):
        state.servers.insert(0, _process(pid))
    return state


def _process(pid: int) -> Process:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return Process(pid, [])
    return Process(pid, [word.decode(errors="replace") for word in argv if word])


def _unix_table(path: str) -> tuple[set[str], int]:
    """The inodes of sockets listening on `path`, and how many accepted ones are open."""
    listeners: set[str] = set()
    connections = 0
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return listeners, 0
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) < 8 or fields[7] != path:
            continue
        if int(fields[3], 16) & LISTENING:
            listeners.add(fields[6])
        elif fields[5] == CONNECTED:
            connections += 1
    return listeners, connections


def _holders(inodes: set[str]) -> list[Process]:
    """The processes with one of these socket inodes open (those we may look at)."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found = []
    if not wanted:
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
            if links & wanted:
                found.append(_process(int(entry.name)))
        except OSError:
            continue  # gone, or not ours to look at
    return sorted(found, key=lambda process: process.pid)


def pcscbridge_processes() -> list[Process]:
    """Every pcscbridge process we can see, but this one."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        process = _process(int(entry.name))
        if process.name.startswith("pcscbridge "):
            found.append(process)
    return sorted(found, key=lambda process: process.pid)
