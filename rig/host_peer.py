"""A real `pcscbridge host` process, serving the rig's pcscd, with the test as its guest.

The test holds the guest's end of the link as a LinkPeer: it can send what no guest server
sends (another guest's handles, names with bytes after a NUL, floods), against the host's real
PC/SC stack.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from pcscbridge.testing.linkpeer import LinkPeer, open_link_peer
from pcscbridge.transports.endpoints import unix_listener

from .bridge_processes import BridgeProcess


@asynccontextmanager
async def host_process_peer(
    pcscd_socket: str, folder: Path, extra: list[str] | None = None, timeout: float = 15
) -> AsyncIterator[tuple[LinkPeer, BridgeProcess]]:
    """`pcscbridge host --connect unix:…` on the rig's pcscd, attached to a LinkPeer."""
    folder.mkdir(parents=True, exist_ok=True)
    link_path = str(folder / "link.sock")
    listener = await unix_listener(link_path, 0o600)
    host = BridgeProcess(
        "host",
        ["host", "-v", "--connect", f"unix:{link_path}", *(extra or [])],
        folder / "host.log",
        {**os.environ, "PCSCLITE_CSOCK_NAME": pcscd_socket},
    )
    try:
        with trio.fail_after(timeout):
            stream = await listener.accept()
        async with open_link_peer(stream) as peer:
            yield peer, host
    except BaseException:
        print(f"--- host log ---\n{host.log}")
        raise
    finally:
        await listener.aclose()
        host.stop()
