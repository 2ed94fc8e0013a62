"""`pcscbridge status`: what a running guest and host hold and have done, over 0600 sockets."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from rig.bridge_processes import Bridge
from rig.pcscd_rig import run_pcsc_client

SIM_READERS = ["Sim Reader 00 00", "Sim Reader 01 00"]
STATUS = [sys.executable, "-m", "pcscbridge", "status"]


def test_status_shows_clients_calls_and_what_guests_hold(tmp_path: Path) -> None:
    with Bridge(tmp_path, None, backend="sim") as bridge:
        bridge.start(expected_readers=SIM_READERS)
        assert run_pcsc_client(["opensc-tool", "-a"], bridge.socket_path).returncode == 0
        for role in ("guest", "host"):
            mode = os.stat(bridge.status_socket(role)).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        result = subprocess.run(
            [
                *STATUS,
                "--json",
                "--socket",
                bridge.status_socket("guest"),
                "--socket",
                bridge.status_socket("host"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        guest, host = (json.loads(line) for line in result.stdout.splitlines())
        assert guest["role"] == "guest" and guest["pid"] == bridge.guest.pid  # type: ignore[union-attr]
        assert guest["guest"]["readers"] == 2
        assert guest["guest"]["host_link"]["attached"] is True
        assert guest["guest"]["calls"]["calls"]["SCARD_CONNECT"] >= 1
        assert guest["guest"]["clients"]["accepted"] >= 1
        assert host["role"] == "host"
        assert host["service"]["calls"]["calls"]["connect"] >= 1
        assert host["service"]["host_contexts"] == 0  # opensc-tool released its context
        assert host["link"]["established"] is True
        human = subprocess.run(
            [*STATUS, "--socket", bridge.status_socket("host")],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "host_contexts: 0" in human and "transactions_held: 0" in human


def test_status_says_when_nothing_answers(tmp_path: Path) -> None:
    result = subprocess.run(
        [*STATUS, "--socket", str(tmp_path / "none.status")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "nothing answers at" in result.stderr
