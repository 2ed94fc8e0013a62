"""Live status over a local control socket: `pcscbridge status` asks, a running guest or host
answers with one JSON document of its counters and closes.

The socket is created mode 0600: the counters name guests and readers, and only the user who
runs the bridge (and root) should read them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .transports.endpoints import EndpointError, unix_listener

log = logging.getLogger("pcscbridge.status")

Provider = Callable[[], Any]
MAX_STATUS = 1 << 20


def default_status_path(role: str) -> str:
    """$XDG_RUNTIME_DIR/pcscbridge/ROLE.status, else /tmp/pcscbridge-UID/ROLE.status."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "pcscbridge" if runtime else Path(f"/tmp/pcscbridge-{os.getuid()}")
    return str(base / f"{role}.status")


def snapshot(role: str, providers: dict[str, Provider], started: float) -> dict[str, Any]:
    document: dict[str, Any] = {
        "role": role,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - started, 1),
    }
    for name, provider in providers.items():
        document[name] = provider()
    return document


async def serve_status(path: str, role: str, providers: dict[str, Provider]) -> None:
    """Answer every connection on `path` with the status document, until cancelled. A path in
    use by another running process is logged and left alone: status is not worth a failure."""
    started = time.monotonic()
    try:
        listener = await unix_listener(path, 0o600)
    except EndpointError as exc:
        log.warning("no status socket: %s", exc)
        await trio.sleep_forever()
    try:
        async with listener:
            while True:
                stream = await listener.accept()
                try:
                    data = json.dumps(snapshot(role, providers, started)).encode() + b"\n"
                    with trio.move_on_after(5):
                        await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                finally:
                    await trio.aclose_forcefully(stream)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def read_status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Blocking: the status document of the process serving `path` (OSError when none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        chunks = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_STATUS:
                raise OSError(f"status from {path} is larger than {MAX_STATUS} bytes")
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
