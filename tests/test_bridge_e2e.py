"""End to end, as a user runs it: `pcscbridge guest` and `pcscbridge host` processes between a
real pcscd with vpcd readers and real clients (pcsc_scan, opensc-tool, scriptor, pyscard)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcscbridge.pcsc import ReturnCode
from rig.bridge_processes import Bridge
from rig.pcsc_programs import assert_full_results_match
from rig.pcscd_rig import PcscdRig, run_pcsc_client
from rig.processes import (
    PROGRAMS,
    die_in_a_transaction,
    echo_side_by_side,
    expect_line,
    finish,
    no_line_within,
    spawn_program,
)

pytestmark = pytest.mark.rig

READER = "Virtual PCD 00 00"


@pytest.fixture
def bridge(pcscd_rig: PcscdRig, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Bridge]:
    with Bridge(tmp_path / "bridge", pcscd_rig.socket_path) as running:
        running.start(expected_readers=pcscd_rig.reader_names)
        yield running
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(running.logs())
    # Whatever happened, neither side may have crashed.
    assert "Traceback" not in running.logs(), running.logs()


def both(args: list[str], rig: PcscdRig, bridge: Bridge, stdin: str | None = None):  # type: ignore[no-untyped-def]
    direct = run_pcsc_client(args, rig.socket_path, stdin=stdin, timeout=30)
    bridged = run_pcsc_client(args, bridge.socket_path, stdin=stdin, timeout=30)
    return direct, bridged


def test_pcsc_scan_lists_the_same_readers(pcscd_rig: PcscdRig, bridge: Bridge) -> None:
    direct, bridged = both(["pcsc_scan", "-r"], pcscd_rig, bridge)
    assert direct.returncode == bridged.returncode == 0
    assert "Virtual PCD 00 00" in direct.stdout
    assert bridged.stdout == direct.stdout


def test_opensc_tool_lists_readers_and_reads_the_atr(pcscd_rig: PcscdRig, bridge: Bridge) -> None:
    direct, bridged = both(["opensc-tool", "-l"], pcscd_rig, bridge)
    assert bridged.returncode == 0 and bridged.stdout == direct.stdout
    direct, bridged = both(["opensc-tool", "-r", "0", "-a"], pcscd_rig, bridge)
    assert direct.returncode == 0, direct.stderr
    assert bridged.returncode == 0, bridged.stderr
    assert bridged.stdout == direct.stdout
    assert "3b:85:81:31" in bridged.stdout.lower()


def test_scriptor_exchanges_apdus(pcscd_rig: PcscdRig, bridge: Bridge) -> None:
    script = (
        "00 A4 04 0C 0B F0 70 63 73 63 62 72 69 64 67 65\n00 A4 02 0C 02 01 01\n"
        "00 B0 00 00 20\n80 10 00 00 03 01 02 03\n00 FF 00 00\n"
    )
    direct, bridged = both(["scriptor", "-r", READER], pcscd_rig, bridge, stdin=script)
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert bridged.returncode == 0, bridged.stdout + bridged.stderr
    assert bridged.stdout == direct.stdout
    assert "01 02 03 90 00" in bridged.stdout


def test_pyscard_every_call_gives_pcscds_results(pcscd_rig: PcscdRig, bridge: Bridge) -> None:
    direct, bridged = both([*PROGRAMS, "full", READER], pcscd_rig, bridge)
    assert direct.returncode == 0, direct.stderr
    assert bridged.returncode == 0, bridged.stderr
    assert_full_results_match(direct.stdout, bridged.stdout)


def test_card_removal_and_insertion_are_seen(pcscd_rig: PcscdRig, bridge: Bridge) -> None:
    pcscd_rig.remove_card(0)
    pcscd_rig.wait_for_card_state(READER, present=False, socket_path=bridge.socket_path)
    pcscd_rig.insert_card(0)
    atr = pcscd_rig.wait_for_card_state(READER, present=True, socket_path=bridge.socket_path)
    assert atr.hex().startswith("3b858131")


def test_host_transaction_makes_the_guest_wait(pcscd_rig: PcscdRig, bridge: Bridge) -> None:
    host_app = spawn_program(["hold-transaction", READER], pcscd_rig.socket_path)
    expect_line(host_app, "LOCKED")
    guest_app = spawn_program(["begin-transaction", READER], bridge.socket_path)
    try:
        # pcscd holds a SCardConnect (and so a BeginTransaction) while another application's
        # transaction is active: the guest app must stay blocked until the host app ends it.
        assert no_line_within(guest_app, 1.5)
        assert host_app.stdin is not None
        host_app.stdin.write("\n")
        host_app.stdin.flush()
        expect_line(host_app, "UNLOCKED")
        expect_line(guest_app, "CONNECTED")
        expect_line(guest_app, "BEGUN")
    finally:
        finish(host_app, guest_app)


def test_host_and_guest_transmit_interleaved(pcscd_rig: PcscdRig, bridge: Bridge) -> None:
    echo_side_by_side(
        {"host": pcscd_rig.socket_path, "guest1": bridge.socket_path, "guest2": bridge.socket_path},
        READER,
        300,
    )


def test_guest_app_dying_in_a_transaction_resets_the_card(
    pcscd_rig: PcscdRig, bridge: Bridge
) -> None:
    result = die_in_a_transaction(pcscd_rig.socket_path, bridge.socket_path, READER)
    # The host app sees the reset that pcscd does for a client dying in a transaction, and
    # the transaction is free again.
    assert result["status_rv"] == ReturnCode.SCARD_W_RESET_CARD, result
    assert result["begin_rv"] in (0, ReturnCode.SCARD_W_RESET_CARD)


def test_link_loss_removes_readers_and_reconnect_brings_them_back(
    pcscd_rig: PcscdRig, bridge: Bridge
) -> None:
    app = spawn_program(["long-lived", READER], bridge.socket_path)
    try:
        expect_line(app, "READY")
        assert bridge.host is not None
        bridge.host.kill()  # the host side vanishes mid-session
        bridge.wait_for_readers([], timeout=10)
        app.stdin.write("\n")  # type: ignore[union-attr]
        app.stdin.flush()  # type: ignore[union-attr]
        assert json.loads(app.stdout.readline()) == {  # type: ignore[union-attr]
            "list_rv": ReturnCode.SCARD_E_NO_READERS_AVAILABLE,
            "readers": [],
        }
        bridge.start_host()
        bridge.wait_for_readers(pcscd_rig.reader_names, timeout=15)
        app.stdin.write("\n")  # type: ignore[union-attr]
        app.stdin.flush()  # type: ignore[union-attr]
        result = json.loads(app.stdout.readline())  # type: ignore[union-attr]
        # The context the app held all along works with the readers that came back.
        assert result["connect_rv"] == 0 and result["transmit_rv"] == 0
        assert result["response"] == "9000"
    finally:
        finish(app)
