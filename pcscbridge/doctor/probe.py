"""Which pcsc-lite protocol a client library speaks: let it connect to a socket of ours and read
the CMD_VERSION it sends first (header {12, CMD_VERSION} + {major, minor, rv}, spec §5.1/§6).

No pcscd is involved: the connection is closed after those 20 bytes, which makes the client's
SCardEstablishContext fail quickly in every version.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..pcsclite.messages import Command

PROBE_TIMEOUT = 20.0
VERSION_MESSAGE = struct.Struct("<IIiiI")  # size, command, major, minor, rv

# Run by a Python interpreter: load the library given as argv[1] as any client would, and try
# to establish a context (against our socket).
LOAD_AND_CONNECT = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
context = ctypes.c_long()  # SCARDCONTEXT is a C long in pcsc-lite on Linux
lib.SCardEstablishContext(2, None, None, ctypes.byref(context))  # SCARD_SCOPE_SYSTEM
"""


class ProbeError(RuntimeError):
    """The client never sent a CMD_VERSION; the message says what it did instead."""


@dataclass(frozen=True)
class ClientProbe:
    major: int
    minor: int
    stdout: str  # what the client program printed

    @property
    def protocol(self) -> str:
        return f"{self.major}.{self.minor}"


def probe_client(
    argv: Sequence[str], env: Mapping[str, str], timeout: float = PROBE_TIMEOUT
) -> ClientProbe:
    """Run `argv` (a program using libpcsclite) with PCSCLITE_CSOCK_NAME on a socket of ours."""
    with tempfile.TemporaryDirectory(prefix="pcscbridge-probe-") as folder:
        socket_path = os.path.join(folder, "pcscd.comm")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(socket_path)
            server.listen(1)
            process = subprocess.Popen(
                list(argv),
                env={**env, "PCSCLITE_CSOCK_NAME": socket_path},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                data = _first_bytes(server, process, VERSION_MESSAGE.size, timeout)
                out, err = process.communicate(timeout=timeout)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
    if len(data) != VERSION_MESSAGE.size:
        said = err.strip().splitlines()[-1:] or [f"exit status {process.returncode}"]
        raise ProbeError(f"it sent no CMD_VERSION ({said[0]})")
    size, command, major, minor, rv = VERSION_MESSAGE.unpack(data)
    if (size, command, rv) != (12, Command.CMD_VERSION, 0):
        raise ProbeError(f"its first message is not a CMD_VERSION: {data.hex()}")
    return ClientProbe(major, minor, out)


def probe_library(path: str, python: str, timeout: float = PROBE_TIMEOUT) -> ClientProbe:
    """The protocol of the libpcsclite at `path` (or named `path`), loaded by `python` with
    ctypes. A library given by its path finds its siblings there (2.3+ loads
    libpcsclite_real.so.1 by name), as in the runtime it comes from."""
    env = dict(os.environ)
    if os.sep in path:
        folders = [os.path.dirname(os.path.abspath(path)), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(folder for folder in folders if folder)
    return probe_client([python, "-I", "-c", LOAD_AND_CONNECT, path], env, timeout)


def _first_bytes(
    server: socket.socket, process: subprocess.Popen[str], size: int, timeout: float
) -> bytes:
    """Accept one connection and read `size` bytes, unless the client dies or time runs out."""
    deadline = time.monotonic() + timeout
    server.settimeout(0.05)
    connection = None
    while connection is None:
        if time.monotonic() > deadline or process.poll() is not None:
            return b""
        with contextlib.suppress(TimeoutError):
            connection, _ = server.accept()
    with connection:
        # libpcsclite sends header and body with separate sends: read until all came.
        connection.settimeout(max(0.1, deadline - time.monotonic()))
        data = b""
        with contextlib.suppress(OSError):
            while len(data) < size and (chunk := connection.recv(size - len(data))):
                data += chunk
        return data
