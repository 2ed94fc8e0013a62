"""The systemd units of contrib/systemd/, checked by systemd's own tools, and the guest started
the way its socket unit starts it (systemd-socket-activate: PID 1 is not systemd here) with real
clients and the real pcscd rig behind it. The units' paths are moved to the test's folder:
nothing touches the system's /run/pcscd."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pcscbridge.transports.endpoints import parse_endpoint
from rig.bridge_processes import Bridge, BridgeProcess
from rig.pcscd_rig import PcscdRig, assert_clients_see_the_same
from rig.service import wait_until

UNITS = Path(__file__).parents[1] / "contrib" / "systemd"
QUBES = Path(__file__).parents[1] / "contrib" / "qubes"
INSTALLED_AS = "/usr/local/bin/pcscbridge"
PCSCBRIDGE = str(Path(sys.executable).parent / "pcscbridge")  # the venv's, for the tests
DEBIAN_PCSCD_SOCKET = Path("/lib/systemd/system/pcscd.socket")  # from the pcscd package
SECURITY_SCORE_AT_MOST = 2.0  # systemd-analyze security's exposure (0 best, 10 worst)


def unit_values(path: Path, key: str) -> list[str]:
    """Every value of `key` in a unit file (systemd keys may repeat)."""
    return [
        line.split("=", 1)[1]
        for line in path.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def install(folder: Path, source: Path) -> Path:
    """The unit files of `source`, their program the venv's pcscbridge, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for unit in source.glob("*.s*"):
        (folder / unit.name).write_text(unit.read_text().replace(INSTALLED_AS, PCSCBRIDGE))
    return folder


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_system_units_verify(tmp_path: Path) -> None:
    folder = install(tmp_path / "system", UNITS)
    result = analyze(
        "verify",
        "--man=no",
        str(folder / "pcscbridge-guest.socket"),
        str(folder / "pcscbridge-guest.service"),
        str(folder / "pcscbridge-host@vm.service"),  # an instance of the template
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""  # not even a warning


def test_qubes_drop_in_verifies_and_runs_the_qrexec_link(tmp_path: Path) -> None:
    folder = install(tmp_path / "system", UNITS)
    drop_in = folder / "pcscbridge-guest.service.d"
    drop_in.mkdir()
    text = (QUBES / "pcscbridge-guest.service.d" / "qubes.conf").read_text()
    (drop_in / "qubes.conf").write_text(text.replace(INSTALLED_AS, PCSCBRIDGE))
    result = analyze("verify", "--man=no", str(folder / "pcscbridge-guest.service"))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    command = unit_values(QUBES / "pcscbridge-guest.service.d" / "qubes.conf", "ExecStart")[-1]
    argv = shlex.split(command)
    assert argv[1:3] == ["guest", "--link"]
    link = parse_endpoint(argv[3])
    assert link.command == ("qrexec-client-vm", "sys-usb", "pcscbridge.Link")


def test_user_units_verify(tmp_path: Path) -> None:
    folder = install(tmp_path / "user", UNITS / "user")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = analyze(
        "--user",
        "verify",
        "--man=no",
        str(folder / "pcscbridge-guest.socket"),
        str(folder / "pcscbridge-guest.service"),
        str(folder / "pcscbridge-host@vm.service"),
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


@pytest.mark.parametrize("unit", ["pcscbridge-host@vm.service", "pcscbridge-guest.service"])
def test_security_exposure(tmp_path: Path, unit: str) -> None:
    folder = install(tmp_path / "system", UNITS)
    result = analyze("security", "--offline=true", "--no-pager", str(folder / unit))
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", result.stdout)
    assert found, result.stdout
    score = float(found.group(1))
    print(f"systemd-analyze security {unit}: {score} {found.group(2)}")
    assert score <= SECURITY_SCORE_AT_MOST, result.stdout
    for setting in ("NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=", "ProtectHome="):
        assert f"✓ {setting}" in result.stdout, setting


def test_guest_socket_is_pcscds_socket() -> None:
    socket_unit = UNITS / "pcscbridge-guest.socket"
    assert unit_values(socket_unit, "ListenStream") == ["/run/pcscd/pcscd.comm"]
    assert unit_values(DEBIAN_PCSCD_SOCKET, "ListenStream") == ["/run/pcscd/pcscd.comm"]
    assert unit_values(socket_unit, "SocketMode") == unit_values(DEBIAN_PCSCD_SOCKET, "SocketMode")
    for unit in (socket_unit, UNITS / "pcscbridge-guest.service"):
        assert unit_values(unit, "Conflicts") == ["pcscd.socket pcscd.service"]


def test_host_unit_restarts_only_what_can_heal() -> None:
    unit = UNITS / "pcscbridge-host@.service"
    assert unit_values(unit, "Restart") == ["always"]
    # Exit statuses of `pcscbridge host` (transports/ssh/errors.py) that need a person.
    assert unit_values(unit, "RestartPreventExitStatus") == ["2 5 6 7"]
    [command] = unit_values(unit, "ExecStart")
    assert shlex.split(command)[1:4] == ["host", "--ssh", "%i"]


# ------------------------------------------------------------- socket activation, for real


class Activated:
    """`systemd-socket-activate` running a unit's ExecStart on a unit's ListenStream, both
    moved into the test's folder."""

    def __init__(self, folder: Path, service: Path, socket_unit: Path) -> None:
        runtime = folder / "run"  # stands for /run and for %t
        [listen] = unit_values(socket_unit, "ListenStream")
        self.socket_path = _moved(listen, runtime)
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        [command] = unit_values(service, "ExecStart")
        argv = [_moved(word, runtime) for word in shlex.split(command)]
        assert argv[0] == INSTALLED_AS
        self.link = next(word for word in argv if word.startswith("unix:"))
        Path(self.link.removeprefix("unix:")).parent.mkdir(parents=True, exist_ok=True)
        self.process = BridgeProcess(
            "guest",
            [*argv[1:], "-v"],
            folder / "activated.log",
            dict(os.environ),
            program=["systemd-socket-activate", "-l", self.socket_path, PCSCBRIDGE],
        )

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        def alive() -> None:
            assert self.process.alive(), f"exited while waiting for {what}:\n{self.process.log}"

        wait_until(condition, 10, what, give_up=alive)


def _moved(word: str, runtime: Path) -> str:
    """/run/... and %t/... (the user's runtime directory), also after `unix:`, into runtime."""
    return re.sub(r"(^|:)(/run|%t)/", lambda m: f"{m.group(1)}{runtime}/", word)


@pytest.fixture(params=["system", "user"])
def activated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Activated]:
    units = UNITS if request.param == "system" else UNITS / "user"
    running = Activated(
        tmp_path, units / "pcscbridge-guest.service", units / "pcscbridge-guest.socket"
    )
    yield running
    running.process.stop(signal.SIGTERM)
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(f"--- activated guest ---\n{running.process.log}")
    assert "Traceback" not in running.process.log, running.process.log


@pytest.mark.rig
def test_socket_activated_guest_serves_real_clients(
    pcscd_rig: PcscdRig, activated: Activated, tmp_path: Path
) -> None:
    activated.wait_for(lambda: os.path.exists(activated.socket_path), "the socket")
    link_path = activated.link.removeprefix("unix:")
    assert not os.path.exists(link_path)  # nothing runs before the first client
    # The first client starts the guest on the socket systemd (here: the activator) holds.
    bridge = Bridge(tmp_path / "host", pcscd_rig.socket_path, link=activated.link)
    bridge.socket_path = activated.socket_path
    assert bridge.guest_readers() == []  # no host attached yet; the guest now runs
    activated.wait_for(lambda: os.path.exists(link_path), "the link socket")
    assert "Execing" in activated.process.log
    bridge.start_host()
    try:
        bridge.wait_for_readers(pcscd_rig.reader_names)
        assert_clients_see_the_same(pcscd_rig.socket_path, activated.socket_path)
    finally:
        bridge.stop()
    assert activated.process.stop(signal.SIGTERM) == 0, activated.process.log
    # systemd owns the activated socket: the guest leaves it; its own link socket it removes.
    assert os.path.exists(activated.socket_path)
    wait_until(lambda: not os.path.exists(link_path), 5, "the link socket to go")


def test_tools_are_there() -> None:
    # The tests above need these (Makefile: the systemd package).
    assert shutil.which("systemd-analyze") and shutil.which("systemd-socket-activate")
