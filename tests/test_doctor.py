"""`pcscbridge doctor` on working and on broken set-ups, as a user runs it: a process, against the
real pcscd with vpcd readers, the real guest server and host, the real client libraries."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcscbridge.doctor.checks import unit_findings
from rig.bridge_processes import PCSCBRIDGE, Bridge, BridgeProcess, _wait_for
from rig.clientlibs import ensure_client_libs
from rig.pcscd_rig import PcscdRig
from rig.service import wait_until

ATR = "3b:85:81:31"  # the test card in reader 0


def doctor(
    socket_path: str | Path, *args: str, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PCSCLITE_CSOCK_NAME": str(socket_path), "XDG_CONFIG_HOME": "/nonexistent"}
    command = [*PCSCBRIDGE, "doctor", *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *command]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1]
    )
    assert "Traceback" not in result.stderr, result.stderr
    print(result.stdout)
    return result


def line(result: subprocess.CompletedProcess[str], level: str, *words: str) -> str:
    """The finding at `level` that has all `words`, with its fix line if any."""
    lines = result.stdout.splitlines()
    for index, text in enumerate(lines):
        if text.startswith(level) and all(word in text for word in words):
            fix = lines[index + 1] if index + 1 < len(lines) else ""
            return text + ("\n" + fix if fix.startswith("      fix: ") else "")
    raise AssertionError(f"no {level} finding with {words}:\n{result.stdout}")


# ------------------------------------------------------------------------------ working


@pytest.mark.rig
def test_a_working_host(pcscd_rig: PcscdRig) -> None:
    result = doctor(pcscd_rig.socket_path)
    assert result.returncode == 0, result.stdout
    line(result, "ok", "served by pcscd (pid", "client protocols 4.4")
    found = line(result, "ok", "4 readers:", "Virtual PCD 00 00 (card", "Virtual PCD 00 01 (empty)")
    assert ATR in found
    line(result, "ok", "libpcsclite.so.1 speaks protocol 4.4: the server accepts it")
    line(result, "info", "systemd is not running here")
    assert result.stdout.splitlines()[-1] == "Nothing is broken."


@pytest.mark.rig
def test_a_guest_before_and_after_its_host_attaches(pcscd_rig: PcscdRig, tmp_path: Path) -> None:
    with Bridge(tmp_path / "bridge", pcscd_rig.socket_path) as bridge:
        bridge.start_guest()
        result = doctor(bridge.socket_path)
        assert result.returncode == 0, result.stdout  # no host yet: nothing broken
        line(result, "ok", "served by pcscbridge guest (pid", "protocols 4.2, 4.3, 4.4, 4.5, 4.6")
        line(result, "warn", "no readers")
        line(result, "warn", "no host attached over", bridge.link)
        bridge.start_host()
        bridge.wait_for_readers(pcscd_rig.reader_names)
        result = doctor(bridge.socket_path)
        assert result.returncode == 0, result.stdout
        line(result, "ok", "a host is attached over", bridge.link)
        assert ATR in line(result, "ok", "4 readers:")
        line(result, "info", "running:", "pcscbridge host")


# ------------------------------------------------------------------------------ broken


def test_missing_socket(tmp_path: Path) -> None:
    result = doctor(tmp_path / "pcscd.comm")
    assert result.returncode == 1
    found = line(result, "FAIL", "pcscd.comm (PCSCLITE_CSOCK_NAME) does not exist")
    assert "fix: on a host, start pcscd" in found
    assert result.stdout.splitlines()[-1] == "1 problem found."


def test_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "pcscd.comm"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # a server that died without removing its socket
    result = doctor(path)
    assert result.returncode == 1
    assert f"rm {path}" in line(result, "FAIL", "is stale: nothing listens on it")


@pytest.mark.rig
def test_pcscd_killed_leaves_no_pcsc(pcscd_rig: PcscdRig) -> None:
    assert pcscd_rig.pid is not None
    os.killpg(pcscd_rig.pid, signal.SIGKILL)  # no time to remove its socket

    def refused() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            return probe.connect_ex(pcscd_rig.socket_path) == errno.ECONNREFUSED

    wait_until(refused, 5, "pcscd to be gone")
    result = doctor(pcscd_rig.socket_path)
    assert result.returncode == 1
    line(result, "FAIL", pcscd_rig.socket_path, "is stale")


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user can enter (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="pcscbridge-doctor-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_socket_another_user_may_not_use(open_folder: Path) -> None:
    path = open_folder / "pcscd.comm"
    guest = BridgeProcess(
        "guest",
        ["guest", "--listen", str(path), "--link", f"unix:{open_folder / 'link.sock'}"],
        open_folder / "guest.log",
        dict(os.environ),
    )
    try:
        _wait_for(lambda: path.exists(), 10, "the socket", guest)
        path.chmod(0o660)
        as_root = doctor(path)
        assert as_root.returncode == 0, as_root.stdout  # root may: works, but look
        assert "fix: pcscd's socket is 0666" in line(as_root, "warn", "(mode 0660)")
        as_nobody = doctor(path, user="nobody")
        assert as_nobody.returncode == 1, as_nobody.stdout + as_nobody.stderr
        found = line(as_nobody, "FAIL", "refuses this user: Permission denied (mode 0660)")
        assert "SocketMode=0666" in found
    finally:
        guest.stop()


@pytest.mark.rig
def test_client_library_newer_than_the_server(pcscd_rig: PcscdRig, tmp_path: Path) -> None:
    # The Flatpak case: the runtime's libpcsclite 2.3.3 (4.5) against the host's pcscd 1.9.9.
    library = str(ensure_client_libs()["4.5"].library_file)
    result = doctor(pcscd_rig.socket_path, "--libpcsclite", library)
    assert result.returncode == 1
    found = line(result, "FAIL", f"{library} speaks protocol 4.5", "only 4.4")
    assert "pcscbridge serve --listen PATH" in found
    # The fix, applied: the same library through `serve`.
    served = str(tmp_path / "served" / "pcscd.comm")
    process = BridgeProcess(
        "serve",
        ["serve", "--listen", served],
        tmp_path / "serve.log",
        {**os.environ, "PCSCLITE_CSOCK_NAME": pcscd_rig.socket_path},
    )
    try:
        _wait_for(lambda: os.path.exists(served), 10, "the socket", process)
        result = doctor(served, "--libpcsclite", library)
        assert result.returncode == 0, result.stdout
        line(result, "ok", f"{library} speaks protocol 4.5: the server accepts it")
        line(result, "ok", "served by pcscbridge serve (pid")
    finally:
        process.stop()


def test_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "pcscbridge.toml"
    config.write_text('[host]\nssh-client = "putty"\n')
    result = doctor(tmp_path / "nothing.comm", "--config", str(config))
    assert result.returncode == 1
    assert "fix: correct or remove that setting" in line(
        result, "FAIL", str(config), "invalid choice: 'putty'"
    )


def test_units_fighting_over_the_socket() -> None:
    # The decision on `systemctl is-active` states (systemd is not PID 1 on the test machine).
    both = unit_findings({"pcscd.socket": "active", "pcscbridge-guest.socket": "active"})
    assert [f.level for f in both] == ["fail"]
    assert "systemctl disable --now pcscd.socket" in both[0].fix
    switched = unit_findings({"pcscd.socket": "inactive", "pcscbridge-guest.socket": "active"})
    assert [f.level for f in switched] == ["ok"]
    assert [f.level for f in unit_findings({})] == ["info"]
