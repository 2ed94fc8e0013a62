"""`pcscbridge qemu` with real parts: QEMU 7.2 (TCG) boots a tiny Linux guest (Debian's kernel,
this machine's busybox, pcscd, libccid and opensc-tool: rig/qemu_guest.py) whose emulated CCID
reader is fed by `pcscbridge qemu` from the real pcscd rig (vpcd reader, the project's test
card, which is T=1 only). One boot serves the whole module; the tests run in order, each leaving
the card inserted and `pcscbridge qemu` running. On a failure the guest's console, the
front-end's log and pcscd's log are printed.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pcscbridge.host.backends.simcard import DEFAULT_ATR, pattern
from pcscbridge.iso7816.atr import offer_t0
from rig.bridge_processes import BridgeProcess
from rig.pcsc_programs import json_lines
from rig.pcscd_rig import PcscdRig, RigError, check_rig_prerequisites
from rig.processes import expect_line, finish, spawn_program
from rig.qemu_guest import GuestImage, QemuGuest, ensure_guest_image
from rig.service import wait_until

pytestmark = pytest.mark.rig

GUEST_READER = "Gemalto Gemplus USB SmartCard Reader 433-Swap"  # libccid's name for 08e6:4433
SELECT_EF_4K = "00:A4:08:0C:04:50:43:01:02"
SELECT_EF_SMALL = "00:A4:08:0C:04:50:43:01:01"
OPENSC = "opensc-tool -c default"


@dataclass
class QemuSetup:
    rig: PcscdRig
    guest: QemuGuest
    work: Path
    bridges: list[BridgeProcess] = field(default_factory=list)
    boot_seconds: float = 0.0

    @property
    def reader(self) -> str:
        return self.rig.reader_names[0]

    @property
    def bridge(self) -> BridgeProcess:
        return self.bridges[-1]

    def start_bridge(self) -> BridgeProcess:
        bridge = BridgeProcess(
            "qemu",
            ["qemu", "-v", "--chardev", f"unix:{self.guest.ccid_socket}", "--reader", self.reader],
            self.work / f"bridge-{len(self.bridges)}.log",
            {**os.environ, "PCSCLITE_CSOCK_NAME": self.rig.socket_path},
        )
        self.bridges.append(bridge)
        return bridge

    def guest_card(self) -> str:
        """The guest's card column for its reader: 'Yes', 'No' (or '' when not listed)."""
        _, listing = self.guest.sh("opensc-tool -l")
        found = re.search(rf"^0\s+(\w+)\s+.*{re.escape(GUEST_READER)}", listing, re.M)
        return found.group(1) if found else ""

    def apdus(self, *commands: str, timeout: float = 60) -> list[tuple[bytes, str]]:
        """Send APDUs from the guest with opensc-tool: each answer's data and status word."""
        sends = " ".join(f"-s {command}" for command in commands)
        rc, output = self.guest.sh(f"{OPENSC} {sends}", timeout=timeout)
        assert rc == 0, output
        return parse_opensc_answers(output)


def parse_opensc_answers(output: str) -> list[tuple[bytes, str]]:
    """opensc-tool -s prints `Received (SW1=0x90, SW2=0x00):`, then the data 16 bytes a line:
    hex, then ASCII. The first line is n bytes in 4n characters; later ones pad the hex part to
    16 bytes' width (48 characters) before the ASCII (OpenSC's sc_hex_dump)."""
    answers: list[tuple[bytes, str]] = []
    lines = 0  # data lines of the current answer; -1: not in an answer
    for line in output.splitlines():
        status = re.match(r"Received \(SW1=0x(..), SW2=0x(..)\)", line)
        if status:
            answers.append((b"", (status.group(1) + status.group(2)).upper()))
            lines = 0
            continue
        n = len(line) // 4 if lines == 0 else len(line) - 48
        hex_part = line[: 3 * n]
        if lines < 0 or not 0 < n <= 16 or not re.fullmatch(r"([0-9A-F]{2} )+", hex_part):
            lines = -1
            continue
        data, sw = answers[-1]
        answers[-1] = (data + bytes.fromhex(hex_part), sw)
        lines += 1
    return answers


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return ensure_guest_image()


@pytest.fixture(scope="module")
def qemu(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuSetup]:
    try:
        check_rig_prerequisites()
    except RigError as exc:
        pytest.fail(str(exc), pytrace=False)
    work = tmp_path_factory.mktemp("qemu")
    with PcscdRig(2) as rig, QemuGuest(guest_image, work, work / "ccid.sock") as guest:
        rig.insert_card(0)
        setup = QemuSetup(rig, guest, work)
        setup.start_bridge()
        try:
            setup.boot_seconds = guest.wait_booted()
            wait_until(lambda: setup.guest_card() == "Yes", 30, "the card in the guest")
            yield setup
        finally:
            for bridge in setup.bridges:
                bridge.stop()


@pytest.fixture(autouse=True)
def show_logs_on_failure(request: pytest.FixtureRequest, qemu: QemuSetup) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        console = qemu.guest.console[-6000:]
        print(f"--- guest console (booted in {qemu.boot_seconds:.1f} s) ---\n{console}")
        for bridge in qemu.bridges:
            print(f"--- {bridge.log_path.name} ---\n{bridge.log[-4000:]}")
        print(f"--- pcscd ---\n{qemu.rig.read_log()[-3000:]}")


def in_thread(function: object, *args: object) -> tuple[threading.Thread, list[object]]:
    """Run `function(*args)` in a thread; its result (or exception) lands in the list."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(function(*args))  # type: ignore[operator]
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# --- the tests, in order ----------------------------------------------------------------------
def test_guest_lists_the_reader_and_sees_the_atr_rewritten_to_offer_t0(qemu: QemuSetup) -> None:
    rc, listing = qemu.guest.sh("opensc-tool -l")
    assert rc == 0 and GUEST_READER in listing, listing
    rc, atr = qemu.guest.sh("opensc-tool -a")
    shown = ":".join(f"{byte:02x}" for byte in offer_t0(DEFAULT_ATR))
    assert rc == 0 and atr.splitlines()[-1] == shown == "3b:85:80:30:fe:45:80:73:b0:01:40"
    assert "shown as 3b858030fe458073b00140" in qemu.bridge.log


def test_apdus_reach_the_host_card_while_a_host_client_transmits(qemu: QemuSetup) -> None:
    host = spawn_program(["echo-until-line", qemu.reader, "host"], qemu.rig.socket_path)
    try:
        expect_line(host, "RUNNING")
        data_200 = bytes(range(200))
        echo = "80:10:00:00:C8:" + ":".join(f"{b:02X}" for b in data_200) + ":00"
        answers = qemu.apdus(
            SELECT_EF_4K,
            "00:B0:00:00:00",  # READ BINARY, 256 bytes: case 2 with Le = 00
            echo,  # case 4 with 200 data bytes: case-3 form, 61 C8, GET RESPONSE
            "80:12:02:58:00",  # RESPOND 600: more than fits one exchange (QEMU 7.2: 372)
            "00:B0:01:00:80",  # READ BINARY at 256, 128 bytes
        )
        assert answers == [
            (b"", "9000"),
            (pattern(4096, 0x02)[:256], "9000"),
            (data_200, "9000"),
            (pattern(600, 0x12), "9000"),
            (pattern(4096, 0x02)[256:384], "9000"),
        ]
        for _ in range(3):  # more bursts, the host client still going
            assert qemu.apdus(SELECT_EF_SMALL, "00:B0:00:00:20") == [
                (b"", "9000"),
                (pattern(32, 0x01), "9000"),
            ]
        assert host.poll() is None, "the host client must still be transmitting"
        assert host.stdin is not None
        host.stdin.write("\n")
        host.stdin.flush()
        out, err = host.communicate(timeout=10)
        (result,) = json_lines(out)
        assert result["wrong"] == 0 and result["count"] > 0, (result, err)
    finally:
        finish(host)


def test_a_host_transaction_makes_the_guest_wait_not_interleave(qemu: QemuSetup) -> None:
    host = spawn_program(["select-hold-read", qemu.reader, "0101"], qemu.rig.socket_path)
    try:
        expect_line(host, "LOCKED")
        started = time.monotonic()
        thread, result = in_thread(qemu.apdus, SELECT_EF_4K, "00:B0:00:00:20")
        time.sleep(2.0)
        assert thread.is_alive(), "the guest's commands ran inside the host's transaction"
        assert host.stdin is not None
        host.stdin.write("\n")
        host.stdin.flush()
        out, _ = host.communicate(timeout=10)
        (held,) = json_lines(out)
        # The host application read the file it selected: no guest SELECT came in between.
        assert held == {"selected": "90009000", "read": (pattern(32, 0x01) + b"\x90\x00").hex()}
        thread.join(30)
        waited = time.monotonic() - started
        assert result == [[(b"", "9000"), (pattern(4096, 0x02)[:32], "9000")]]
        assert waited >= 2.0
    finally:
        finish(host)


def test_removal_and_insertion_on_the_host_are_seen_in_the_guest(qemu: QemuSetup) -> None:
    qemu.rig.remove_card(0)
    wait_until(lambda: qemu.guest_card() == "No", 20, "the guest to see the removal")
    qemu.rig.insert_card(0)
    wait_until(lambda: qemu.guest_card() == "Yes", 20, "the guest to see the insertion")
    assert qemu.guest.sh("opensc-tool -a")[1].splitlines()[-1] == "3b:85:80:30:fe:45:80:73:b0:01:40"
    assert qemu.apdus("00:A4:00:0C:02:2F:10", "00:B0:00:00:05") == [
        (b"", "9000"),
        (b"slot0", "9000"),
    ]


def test_killed_and_restarted_front_end_brings_the_card_back(qemu: QemuSetup) -> None:
    qemu.bridge.kill()
    # A command sent while nobody feeds QEMU gets no answer (QEMU does not take a closed chardev
    # for a removal); the new front-end's CardRemove makes QEMU fail it, then the card is back.
    thread, result = in_thread(qemu.guest.sh, f"{OPENSC} -s 00:A4:00:0C:02:3F:00", 120)
    time.sleep(1.0)
    assert thread.is_alive()
    qemu.start_bridge()
    thread.join(60)
    assert not thread.is_alive()
    rc, output = result[0]  # type: ignore[misc]
    assert rc != 0 and "APDU transmit failed" in output, output
    wait_until(lambda: qemu.guest_card() == "Yes", 20, "the card back in the guest")
    assert qemu.apdus(SELECT_EF_SMALL, "00:B0:00:00:20") == [
        (b"", "9000"),
        (pattern(32, 0x01), "9000"),
    ]


def test_a_clean_stop_removes_the_card_from_the_guest(qemu: QemuSetup) -> None:
    assert qemu.bridge.stop(signal.SIGTERM) == 0
    assert "told QEMU the card and the reader are gone" in qemu.bridge.log
    wait_until(lambda: qemu.guest_card() == "No", 20, "the guest to see no card")
    qemu.start_bridge()
    wait_until(lambda: qemu.guest_card() == "Yes", 20, "the card back in the guest")
