"""contrib/ for QEMU and libvirt, checked by the tools that consume them: QEMU runs the command
line of contrib/qemu/run-vm.sh and answers VSCard on its chardev; libvirt's schema accepts the
smartcard snippet; systemd-analyze accepts the unit template."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from pcscbridge.vscard import codec as vsc
from rig.service import wait_until

CONTRIB = Path(__file__).resolve().parents[1] / "contrib"


def test_run_vm_command_line_gives_qemu_a_ccid_reader_on_its_chardev(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    env = {**os.environ, "QEMU_ACCEL": "tcg", "CCID_DIR": str(tmp_path)}
    # -S: the CPUs never start; QEMU still realises the devices and serves the chardev.
    extra = ["-S", "-display", "none", "-monitor", "none", "-serial", "none"]
    qemu = subprocess.Popen(
        [str(CONTRIB / "qemu" / "run-vm.sh"), "vm", str(disk), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        path = tmp_path / "vm.sock"
        wait_until(path.exists, 30, "QEMU's chardev", give_up=lambda: _alive(qemu))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(path))
            client.sendall(vsc.encode(vsc.Init(0)))
            decoder = vsc.VSCardDecoder()
            while (message := decoder.next_message()) is None:
                decoder.receive_data(client.recv(4096))
            assert message == vsc.Init(vsc.UNDEFINED_READER_ID)  # ccid-card-passthru answers
            client.sendall(vsc.encode(vsc.ReaderAdd(vsc.UNDEFINED_READER_ID)))
            while (message := decoder.next_message()) is None:
                decoder.receive_data(client.recv(4096))
            assert message == vsc.Error(0, vsc.SUCCESS)
    finally:
        qemu.kill()
        output = qemu.communicate()[0].decode(errors="replace")
    assert "speed mismatch" not in output, output


def _alive(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        raise AssertionError(f"QEMU exited: {process.communicate()[0].decode(errors='replace')}")


def test_libvirt_snippet_is_valid_domain_xml(tmp_path: Path) -> None:
    snippet = (CONTRIB / "libvirt" / "smartcard-passthrough.xml").read_text()
    domain = tmp_path / "win11.xml"
    domain.write_text(
        "<domain type='qemu'><name>win11</name><memory unit='MiB'>512</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
        f"<controller type='usb' model='qemu-xhci'/>{snippet}</devices></domain>"
    )
    result = subprocess.run(
        ["virt-xml-validate", str(domain), "domain"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.xml"  # the check itself can fail
    broken.write_text(domain.read_text().replace("mode='passthrough'", "mode='passthru'"))
    result = subprocess.run(["virt-xml-validate", str(broken), "domain"], capture_output=True)
    assert result.returncode != 0


def test_systemd_unit_template_verifies(tmp_path: Path) -> None:
    unit = (CONTRIB / "systemd" / "pcscbridge-qemu@.service").read_text()
    program = shutil.which("pcscbridge", path=str(Path(sys.executable).parent))
    assert program is not None
    assert "/usr/local/bin/pcscbridge qemu --vm-name %i --chardev ${CHARDEV}" in unit
    # An instance of the template, with the program where this checkout installed it.
    instance = tmp_path / "pcscbridge-qemu@win11.service"
    instance.write_text(unit.replace("/usr/local/bin/pcscbridge", program))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(instance)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pcscbridge-qemu@win11" not in result.stderr, result.stderr
