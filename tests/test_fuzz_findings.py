"""What `make fuzz` and `make soak` found, each reproduced small on the real rig."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pcscbridge.testing.rawclient import RawClient
from rig.bridge_processes import Bridge
from rig.pcscd_rig import PcscdRig
from rig.processes import expect_line, finish, spawn_program
from rig.service import wait_until

READER = "Virtual PCD 00 00"


def test_a_client_gone_during_a_connect_leaves_no_card_handle_in_the_guest(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """pcscd holds an SCardConnect while another application holds a transaction on the
    reader. A guest client that gives up meanwhile (closes its socket) must take its card handle
    number with it: the guest's registry kept it for ever (status card_handles never 0)."""
    host_app = spawn_program(["hold-transaction", READER], pcscd_rig.socket_path)
    try:
        expect_line(host_app, "LOCKED")
        with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
            bridge.start(expected_readers=pcscd_rig.reader_names)
            client = RawClient(bridge.socket_path)
            client.version()
            client.establish()
            client.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):  # pcscd holds the connect
                client.connect(READER)
            client.close()
            wait_until(
                lambda: bridge.status("guest")["guest"]["card_handles"] == 0,
                10,
                "the guest to forget the abandoned connect's card handle",
            )
            assert bridge.status("guest")["guest"]["contexts"] == 0
            host_app.stdin.write("\n")  # type: ignore[union-attr]
            host_app.stdin.flush()  # type: ignore[union-attr]
            expect_line(host_app, "UNLOCKED")
            wait_until(
                lambda: bridge.status("host")["service"]["host_contexts"] == 0,
                10,
                "the host to release the context once the connect returned",
            )
            time.sleep(0.2)
            assert "Traceback" not in bridge.logs()
    finally:
        finish(host_app)
