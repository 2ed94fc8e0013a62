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
from rig.pcsc_programs import assert_full_results_match, json_lines
from rig.pcscd_rig import PcscdRig
from rig.processes import PROGRAMS, expect_line, finish, spawn_program

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
    apps = [
        spawn_program(["echo-loop", READER, "host", "200"], pcscd_rig.socket_path),
        spawn_program(["echo-loop", READER, "sandbox1", "200"], served.socket_path),
        spawn_program(["echo-loop", READER, "sandbox2", "200"], served.socket_path),
    ]
    try:
        results = []
        for app in apps:
            out, err = app.communicate(timeout=60)
            assert app.returncode == 0, err
            results.extend(json_lines(out))
        assert sorted(r["tag"] for r in results) == ["host", "sandbox1", "sandbox2"]
        assert all(r["wrong"] == 0 and r["count"] == 200 for r in results)
    finally:
        finish(*apps)


def test_client_dying_in_a_transaction_releases_it(pcscd_rig: PcscdRig, served: Served) -> None:
    host_app = spawn_program(["card-after-reset", READER], pcscd_rig.socket_path)
    expect_line(host_app, "CONNECTED")
    sandbox_app = spawn_program(["begin-transaction", READER], served.socket_path)
    try:
        expect_line(sandbox_app, "CONNECTED")
        expect_line(sandbox_app, "BEGUN")
        sandbox_app.kill()  # dies holding the transaction
        sandbox_app.wait(5)
        assert host_app.stdin is not None
        host_app.stdin.write("\n")
        host_app.stdin.flush()
        out, err = host_app.communicate(timeout=30)
        [result] = json_lines(out)
        # As pcscd does for a client that dies in a transaction: the card is reset and the
        # transaction is free again.
        assert result["status_rv"] == ReturnCode.SCARD_W_RESET_CARD, err
        assert result["begin_rv"] in (0, ReturnCode.SCARD_W_RESET_CARD)
    finally:
        finish(host_app, sandbox_app)
