"""`pcscbridge serve`, as a container or Flatpak user runs it: one process serving the host's
pcscd (the real Debian 12 pcscd 1.9.9 with vpcd readers) on a socket of its own, used by real
clients with the client libraries of protocols 4.4, 4.5 and 4.6.

The known breakage it fixes: a sandbox's newer libpcsclite against the host's older pcscd
("Communication protocol mismatch"). Seen here first, directly against pcscd, then through
`serve`.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcscbridge.pcsc import ReturnCode
from rig.bridge_processes import BridgeProcess, _wait_for
from rig.clientlibs import ClientLib, ClientLibs, ensure_client_libs
from rig.pcsc_programs import assert_full_results_match
from rig.pcscd_rig import PcscdRig
from rig.processes import PROGRAMS, die_in_a_transaction, echo_side_by_side

pytestmark = pytest.mark.rig

READER = "Virtual PCD 00 00"


@pytest.fixture(scope="module")
def libs() -> ClientLibs:
    return ensure_client_libs()


class Served:
    def __init__(self, process: BridgeProcess, socket_path: str) -> None:
        self.process = process
        self.socket_path = socket_path


@pytest.fixture
def served(pcscd_rig: PcscdRig, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    socket_path = str(tmp_path / "sandbox" / "pcscd.comm")  # what the sandbox gets bind-mounted
    process = BridgeProcess(
        "serve",
        ["serve", "-v", "--listen", socket_path],
        tmp_path / "serve.log",
        {**os.environ, "PCSCLITE_CSOCK_NAME": pcscd_rig.socket_path},
    )
    _wait_for(lambda: os.path.exists(socket_path), 10, "the socket", process)
    yield Served(process, socket_path)
    status = process.stop(signal.SIGTERM)
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(f"--- serve log ---\n{process.log}")
    assert status == 0, process.log
    assert not os.path.exists(socket_path)  # removed at exit, as pcscd does
    assert "Traceback" not in process.log, process.log


def run(lib: ClientLib, argv: list[str], socket_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lib.command(argv),
        env=lib.env({**os.environ, "PCSCLITE_CSOCK_NAME": socket_path}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("protocol", ["4.5", "4.6"])
def test_newer_client_library_fails_against_the_hosts_pcscd_and_works_through_serve(
    pcscd_rig: PcscdRig, served: Served, libs: ClientLibs, protocol: str
) -> None:
    lib, system = libs[protocol], libs["4.4"]
    expected = run(system, ["pcsc_scan", "-r"], pcscd_rig.socket_path)
    assert expected.returncode == 0 and READER in expected.stdout, expected
    # The breakage, as a sandbox with this library sees the host's pcscd directly.
    direct = run(lib, ["pcsc_scan", "-r"], pcscd_rig.socket_path)
    assert direct.stdout != expected.stdout
    # Through serve: what the system's own library sees directly.
    through = run(lib, ["pcsc_scan", "-r"], served.socket_path)
    assert through.returncode == 0, through.stdout + through.stderr
    assert through.stdout == expected.stdout
    expected = run(system, ["opensc-tool", "-r", "0", "-a"], pcscd_rig.socket_path)
    through = run(lib, ["opensc-tool", "-r", "0", "-a"], served.socket_path)
    assert through.returncode == 0, through.stdout + through.stderr
    assert through.stdout == expected.stdout and "3b:85:81:31" in through.stdout.lower()


@pytest.mark.parametrize("protocol", ["4.4", "4.5", "4.6"])
def test_pyscard_every_call_gives_pcscds_results(
    pcscd_rig: PcscdRig, served: Served, libs: ClientLibs, protocol: str
) -> None:
    program = [*PROGRAMS, "full", READER]
    direct = run(libs["4.4"], program, pcscd_rig.socket_path)
    through = run(libs[protocol], program, served.socket_path)
    assert direct.returncode == 0, direct.stderr
    assert through.returncode == 0, through.stderr
    assert_full_results_match(direct.stdout, through.stdout)


def test_host_application_and_served_clients_share_the_card(
    pcscd_rig: PcscdRig, served: Served
) -> None:
    echo_side_by_side(
        {
            "host": pcscd_rig.socket_path,
            "sandbox1": served.socket_path,
            "sandbox2": served.socket_path,
        },
        READER,
        200,
    )


def test_client_dying_in_a_transaction_releases_it(pcscd_rig: PcscdRig, served: Served) -> None:
    result = die_in_a_transaction(pcscd_rig.socket_path, served.socket_path, READER)
    # As pcscd does for a client that dies in a transaction: the card is reset and the
    # transaction is free again.
    assert result["status_rv"] == ReturnCode.SCARD_W_RESET_CARD, result
    assert result["begin_rv"] in (0, ReturnCode.SCARD_W_RESET_CARD)
