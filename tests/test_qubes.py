"""Qubes OS, as a user sets it up: the app qube's `pcscbridge guest --link exec:qrexec-client-vm
sys-usb pcscbridge.Link`, and in sys-usb the RPC service `pcscbridge host --link stdio` serving the
real pcscd with vpcd readers, joined by a qrexec stand-in (rig/qrexec.py: the two processes'
pipes relayed, QREXEC_REMOTE_DOMAIN set, refusals and `ask` delays on request). Real clients
use the guest socket.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pcscbridge.transports.endpoints import EndpointError, parse_endpoint
from rig.bridge_processes import PCSCBRIDGE, Bridge, stop_bridges
from rig.pcscd_rig import PcscdRig, assert_clients_see_the_same, run_pcsc_client
from rig.processes import finish, read_line, spawn_program
from rig.service import wait_until

READER = "Virtual PCD 00 00"


class QubesBridge(Bridge):
    """The app qube's guest server, whose link command is the qrexec stand-in."""

    def __init__(self, folder: Path, rig: PcscdRig, *qrexec_options: str) -> None:
        self.service_log = folder / "service.log"
        self.service_pid = folder / "service.pid"
        # What /etc/qubes-rpc/pcscbridge.Link runs in sys-usb, where pcscd is the rig's.
        service = [*PCSCBRIDGE, "host", "-v", "--link", "stdio"]
        qrexec = [
            sys.executable,
            "-m",
            "rig.qrexec",
            "--source",
            "work-qube",
            "--env",
            f"PCSCLITE_CSOCK_NAME={rig.socket_path}",
            "--service-log",
            str(self.service_log),
            "--pid-file",
            str(self.service_pid),
            *qrexec_options,
            "--",
            *service,
        ]
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder, None, link=f"exec:{shlex.join(qrexec)}")

    def service_text(self) -> str:
        return self.service_log.read_text() if self.service_log.exists() else ""

    def logs(self) -> str:
        return f"{super().logs()}\n--- sys-usb service log ---\n{self.service_text()}"


@pytest.fixture
def qubes(
    pcscd_rig: PcscdRig, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., QubesBridge]]:
    bridges: list[QubesBridge] = []

    def start(*qrexec_options: str) -> QubesBridge:
        bridge = QubesBridge(tmp_path / f"qube{len(bridges)}", pcscd_rig, *qrexec_options)
        bridges.append(bridge)
        bridge.start_guest()
        return bridge

    yield start
    stop_bridges(bridges, request)


def link_runs(bridge: Bridge) -> int:
    """How often the guest ran its link command."""
    assert bridge.guest is not None
    return bridge.guest.log.count("a client needs the host: running")


@pytest.mark.rig
def test_first_client_sees_the_readers_through_qrexec(
    pcscd_rig: PcscdRig, qubes: Callable[..., QubesBridge]
) -> None:
    bridge = qubes()
    # A qube that never uses a card never asks dom0.
    time.sleep(1)
    assert link_runs(bridge) == 0 and not bridge.service_log.exists()
    # The very first client starts the link and gets the readers in its first call.
    shown = assert_clients_see_the_same(pcscd_rig.socket_path, bridge.socket_path)
    assert "3b:85:81:31" in shown.lower()
    assert link_runs(bridge) == 1  # the link stayed up for the second client
    # The calling qube's name is the guest's identity on the host.
    assert "serving the host's readers (pyscard) to work-qube over stdio" in bridge.service_text()


@pytest.mark.rig
def test_lost_link_comes_back_while_an_app_holds_its_context(
    pcscd_rig: PcscdRig, qubes: Callable[..., QubesBridge]
) -> None:
    bridge = qubes()
    app = spawn_program(["long-lived", READER], bridge.socket_path)
    try:
        assert read_line(app, 40) == "READY"
        bridge.wait_for_readers(pcscd_rig.reader_names)
        service_pid = int(bridge.service_pid.read_text())
        os.kill(service_pid, signal.SIGKILL)  # sys-usb's service dies (qube restarted)
        assert bridge.guest is not None
        wait_until(lambda: "readers removed" in bridge.guest.log, 10, "readers to vanish")
        # No new client connects: the app still connected is why the link comes back.
        wait_until(lambda: link_runs(bridge) == 2, 10, "the link command to run again")
        wait_until(
            lambda: bridge.service_text().count("readers now: [('Virtual PCD 00 00'") == 2,
            15,
            "the host's readers to come back",
        )
        assert int(bridge.service_pid.read_text()) != service_pid
        app.stdin.write("\n")  # type: ignore[union-attr]
        app.stdin.flush()  # type: ignore[union-attr]
        result = read_line(app, 15)
        assert '"transmit_rv": 0' in result and '"response": "9000"' in result, result
    finally:
        finish(app)


@pytest.mark.rig
def test_refused_call_is_not_asked_again_until_a_client_connects(
    qubes: Callable[..., QubesBridge],
) -> None:
    bridge = qubes("--deny")
    started = time.monotonic()
    refused = run_pcsc_client(["pcsc_scan", "-r"], bridge.socket_path, timeout=30)
    # No reader, at once: the client does not wait out CLIENT_WAIT for a refused link.
    assert time.monotonic() - started < 10
    assert "No reader found" in refused.stdout + refused.stderr, refused
    time.sleep(2)  # no retry loop: a refusal is not asked again by itself
    assert link_runs(bridge) == 1
    assert bridge.guest is not None
    assert "Request refused" in bridge.guest.log  # qrexec's own words reach the guest's log
    assert "before a host answered" in bridge.guest.log
    run_pcsc_client(["pcsc_scan", "-r"], bridge.socket_path, timeout=30)
    assert link_runs(bridge) == 2  # the next client asks again
    assert bridge.guest.alive()


@pytest.mark.rig
def test_an_ask_dialog_longer_than_the_hello_timeout(
    pcscd_rig: PcscdRig, qubes: Callable[..., QubesBridge]
) -> None:
    # The person answers dom0's dialog after 12 s, longer than the link's 10 s hello timeout:
    # the guest's side of the link starts only when the host speaks, and the first client
    # waits for it.
    bridge = qubes("--delay", "12")
    result = run_pcsc_client(["pcsc_scan", "-r"], bridge.socket_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for reader in pcscd_rig.reader_names:
        assert reader in result.stdout


def test_the_rpc_service_file_runs_what_the_tests_run() -> None:
    # contrib/qubes/pcscbridge.Link, installed as /etc/qubes-rpc/pcscbridge.Link in sys-usb.
    text = (Path(__file__).parents[1] / "contrib" / "qubes" / "pcscbridge.Link").read_text()
    assert text.startswith("#!/bin/sh\n")
    command = [line for line in text.splitlines() if line.startswith("exec ")]
    assert command == ["exec pcscbridge host --link stdio"], text
    assert os.access(Path(__file__).parents[1] / "contrib" / "qubes" / "pcscbridge.Link", os.X_OK)


# ------------------------------------------------------------- the exec: link, misbehaving


def test_exec_endpoints_are_split_as_a_shell_would() -> None:
    link = parse_endpoint("exec:qrexec-client-vm sys-usb 'pcscbridge.Link'")
    assert link.command == ("qrexec-client-vm", "sys-usb", "pcscbridge.Link")
    assert str(link) == "exec:qrexec-client-vm sys-usb pcscbridge.Link"
    assert parse_endpoint(str(parse_endpoint("exec:a 'b c'"))).command == ("a", "b c")
    for bad in ("exec:", "exec:   ", "exec:a 'b"):
        with pytest.raises(EndpointError, match="bad endpoint"):
            parse_endpoint(bad)


@pytest.mark.parametrize(
    ("command", "said"),
    [
        ("/nonexistent/qrexec-client-vm sys-usb pcscbridge.Link", "cannot be run"),
        # A peer that speaks garbage: the link is refused with a log line, nothing else.
        (f"{sys.executable} -c \"print('garbage' * 100)\"", "closing"),
        # Speaks, then dies before any hello.
        (f"{sys.executable} -c \"import os; os.write(1, b'\\\\0\\\\0'); os._exit(3)\"", "exit"),
    ],
)
def test_a_broken_link_command_costs_the_client_nothing(
    tmp_path: Path, command: str, said: str
) -> None:
    bridge = Bridge(tmp_path / "guest", None, link=f"exec:{command}")
    bridge.start_guest()
    try:
        started = time.monotonic()
        for _ in range(2):  # each client tries again; the guest stays up
            assert bridge.guest_readers() == []
        assert time.monotonic() - started < 10
        assert bridge.guest is not None and bridge.guest.alive()
        wait_until(lambda: link_runs(bridge) == 2, 5, "two attempts")
        assert said in bridge.guest.log, bridge.guest.log
    finally:
        bridge.stop()
    assert "Traceback" not in bridge.logs(), bridge.logs()
