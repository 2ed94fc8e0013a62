"""The policy against the real pcscd with vpcd readers and the project's test card.

A hostile guest (a LinkPeer on a real `pcscbridge host` process) tries what was measured on
the code before the policy: taking every pcscd context, holding EXCLUSIVE or a transaction
while host applications wait, DIRECT to an empty reader, escape codes and SetAttrib for the
reader driver. Real clients (pcsc_scan, scriptor, opensc-tool) see hidden and renamed readers
and the read-only preset through `pcscbridge guest` and `pcscbridge host` processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pcscbridge.host.backends.simcard import APP_AID, pad_pin
from pcscbridge.link.calls import (
    BeginTransaction,
    Connect,
    Control,
    GetAttrib,
    Reconnect,
    SetAttrib,
    Transmit,
)
from pcscbridge.part10 import CM_IOCTL_GET_FEATURE_REQUEST
from pcscbridge.pcsc import Disposition, ReturnCode, ShareMode
from rig.bridge_processes import Bridge
from rig.host_peer import host_process_peer
from rig.pcscd_rig import PcscdRig, run_pcsc_client
from rig.processes import PROGRAMS, expect_line, finish, no_line_within, spawn_program

pytestmark = pytest.mark.rig

READER, EMPTY = "Virtual PCD 00 00", "Virtual PCD 00 01"
SHARED, EXCLUSIVE, DIRECT, T1 = ShareMode.SHARED, ShareMode.EXCLUSIVE, ShareMode.DIRECT, 2
SELECT_APP = bytes([0x00, 0xA4, 0x04, 0x0C, len(APP_AID)]) + APP_AID
SCARD_ATTR_ATR_STRING = 0x00090303
ESCAPE = 0x42000000 + 3500  # SCARD_CTL_CODE(3500): CCID's escape command
RC = ReturnCode


def policy_file(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "policy.toml"
    path.write_text(f'[guests."*"]\n{text}\n')
    return path


async def in_thread(function, *args):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(function, *args)


async def test_a_hostile_guest_cannot_take_every_pcscd_context(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """Measured before: 195 contexts, then host applications got SCARD_W_SECURITY_VIOLATION."""
    async with host_process_peer(pcscd_rig.socket_path, tmp_path) as (peer, _host):
        await peer.table(lambda names: READER in names)
        refused = []
        for n in range(1, 231):
            response = await peer.call(Connect(n, 1000 + n, READER, SHARED, T1))
            if response.rv:
                refused.append(response.rv)
        assert refused == [RC.SCARD_E_NO_MEMORY] * (230 - 32)  # max_contexts = 32
        # The host's own applications still get a context and the card.
        session = await in_thread(
            lambda: run_pcsc_client([*PROGRAMS, "session", READER, "5"], pcscd_rig.socket_path)
        )
        assert session.returncode == 0, session.stderr


@pytest.mark.parametrize(
    ("hold", "host_app", "lines"),
    [
        # An EXCLUSIVE handle refuses a host app's SCardConnect at once: it tries again.
        ("EXCLUSIVE", ["connect-retry", READER, "30"], ["CONNECTED", "OK"]),
        # pcscd keeps a host app's SCardConnect waiting during another's transaction.
        ("a transaction", ["begin-transaction", READER], ["CONNECTED", "BEGUN"]),
    ],
)
async def test_a_hold_is_cut_and_the_waiting_host_app_gets_the_card(
    pcscd_rig: PcscdRig, tmp_path: Path, hold: str, host_app: list[str], lines: list[str]
) -> None:
    """Measured before: a guest held EXCLUSIVE or a transaction, host apps waited forever."""
    policy = policy_file(tmp_path, "hold_limit = 3")
    async with host_process_peer(pcscd_rig.socket_path, tmp_path, ["--policy", str(policy)]) as (
        peer,
        host,
    ):
        await peer.table(lambda names: READER in names)
        if hold == "EXCLUSIVE":
            await peer.ok(Connect(1, 2, READER, EXCLUSIVE, T1))
        else:
            await peer.ok(Connect(1, 2, READER, SHARED, T1))
            await peer.ok(BeginTransaction(2))
        app = spawn_program(host_app, pcscd_rig.socket_path)
        try:
            assert await in_thread(no_line_within, app, 1.0), "got the card during the hold"
            for line in lines:
                await in_thread(expect_line, app, line, 15)
        finally:
            finish(app)
        # The guest's handle was reset: it learns so, and can reconnect.
        assert (await peer.call(Transmit(2, T1, SELECT_APP))).rv == RC.SCARD_W_RESET_CARD
        assert await peer.ok(Reconnect(2, SHARED, T1, Disposition.LEAVE_CARD)) == T1
        assert await peer.ok(Transmit(2, T1, SELECT_APP)) == b"\x90\x00"
        assert f"held {hold} on {READER} for 3 s" in host.log


async def test_direct_escape_codes_and_set_attrib_never_reach_the_reader(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    async with host_process_peer(pcscd_rig.socket_path, tmp_path) as (peer, _host):
        await peer.table(lambda names: EMPTY in names)
        refused = await peer.call(Connect(1, 2, EMPTY, DIRECT, 0))
        assert refused.rv == RC.SCARD_E_SHARING_VIOLATION
        await peer.ok(Connect(1, 3, READER, SHARED, T1))
        # The feature query passes: the answer is vpcd's own (it has no features).
        query = await peer.call(Control(3, CM_IOCTL_GET_FEATURE_REQUEST, b""))
        assert query.rv == RC.SCARD_E_UNSUPPORTED_FEATURE
        controls_before = pcscd_rig.read_log().count("IFDControl()")
        assert controls_before == 1
        assert (await peer.call(Control(3, ESCAPE, b"\x01\x02"))).rv == (
            RC.SCARD_W_SECURITY_VIOLATION
        )
        refused = await peer.call(SetAttrib(3, SCARD_ATTR_ATR_STRING, b"\x3b"))
        assert refused.rv == RC.SCARD_W_SECURITY_VIOLATION
        # GetAttrib passes too: vpcd's own answer (it keeps no ATR attribute).
        attrib = await peer.call(GetAttrib(3, SCARD_ATTR_ATR_STRING))
        assert attrib.rv == RC.SCARD_E_UNSUPPORTED_FEATURE
    # pcscd logs each control its driver refuses: the escape never came to it.
    assert pcscd_rig.read_log().count("IFDControl()") == controls_before


async def test_the_pin_guard_keeps_the_last_try_on_the_card(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    card = pcscd_rig.cards[0].card
    wrong = bytes.fromhex("0020008008") + pad_pin(b"000000")
    async with host_process_peer(pcscd_rig.socket_path, tmp_path) as (peer, host):
        await peer.table(lambda names: READER in names)
        await peer.ok(Connect(1, 2, READER, SHARED, T1))
        answers = [await peer.ok(Transmit(2, T1, wrong)) for _ in range(4)]
        assert answers == [b"\x63\xc2", b"\x63\xc1", b"\x69\x82", b"\x69\x82"]
        assert card.pin_tries == 1
        assert "PIN guard: 1 tries left" in host.log


async def test_a_hidden_reader_is_absent_and_unreachable_and_a_renamed_one_works(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    policy = policy_file(
        tmp_path, f'hide_readers = ["{EMPTY}"]\nrename = {{ "{READER}" = "Guest Card" }}'
    )
    guest_view = ["Guest Card", "Virtual PCD B 00 00", "Virtual PCD B 00 01"]
    with Bridge(tmp_path / "bridge", pcscd_rig.socket_path) as bridge:
        bridge.start_guest()
        bridge.start_host(["--policy", str(policy)])
        bridge.wait_for_readers(guest_view)
        scan = await in_thread(lambda: run_pcsc_client(["pcsc_scan", "-r"], bridge.socket_path))
        assert scan.returncode == 0 and "Guest Card" in scan.stdout
        assert EMPTY not in scan.stdout and READER not in scan.stdout
        script = "00 A4 04 0C 0B F0 70 63 73 63 62 72 69 64 67 65\n"
        for name in (EMPTY, READER):
            result = await in_thread(
                lambda n: run_pcsc_client(["scriptor", "-r", n], bridge.socket_path, stdin=script),
                name,
            )
            assert "90 00" not in result.stdout, result.stdout
        atr = await in_thread(
            lambda: run_pcsc_client(["opensc-tool", "-r", "Guest Card", "-a"], bridge.socket_path)
        )
        assert atr.returncode == 0 and "3b:85:81:31" in atr.stdout, atr.stderr
    # A hostile link peer gets no further with either host name.
    async with host_process_peer(
        pcscd_rig.socket_path, tmp_path / "peer", ["--policy", str(policy)]
    ) as (peer, _host):
        assert await peer.table(lambda names: "Guest Card" in names) == guest_view
        for name in (EMPTY, READER, "Guest Card\0junk"):
            refused = await peer.call(Connect(1, 2, name, SHARED, T1))
            assert refused.rv == RC.SCARD_E_UNKNOWN_READER, name
        assert await peer.ok(Connect(1, 3, "Guest Card", SHARED, T1)) == T1


def test_the_read_only_preset_blocks_update_binary_and_passes_read_binary(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    policy = policy_file(tmp_path, 'apdus = "read-only"')
    script = (
        "00 A4 04 0C 0B F0 70 63 73 63 62 72 69 64 67 65\n00 A4 02 0C 02 01 01\n"
        "00 D6 00 00 04 CA FE BA BE\n00 B0 00 00 04\n"
    )
    with Bridge(tmp_path / "bridge", pcscd_rig.socket_path) as bridge:
        bridge.start_guest()
        bridge.start_host(["--policy", str(policy)])
        bridge.wait_for_readers(pcscd_rig.reader_names)
        result = run_pcsc_client(["scriptor", "-r", READER], bridge.socket_path, stdin=script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "< 69 82" in result.stdout  # the UPDATE BINARY, answered by the host
    assert "< 01 02 03 04 90 00" in result.stdout  # the EF is as it was
    direct = run_pcsc_client(["scriptor", "-r", READER], pcscd_rig.socket_path, stdin=script)
    assert "< 90 00" in direct.stdout.split("00 D6")[1]  # without the policy it writes


async def test_the_guest_name_chooses_the_table(pcscd_rig: PcscdRig, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[guests."*"]\n\n[guests."work-vm"]\nhide_readers = ["{EMPTY}"]\n')
    for extra, sees_empty in ((["--guest-name", "work-vm"], False), ([], True)):
        async with host_process_peer(
            pcscd_rig.socket_path, tmp_path / str(sees_empty), ["--policy", str(policy), *extra]
        ) as (peer, host):
            table = await peer.table(lambda names: READER in names)
            assert (EMPTY in table) is sees_empty
            assert ("'work-vm'" in host.log) is not sees_empty
