"""Every fault heals, on the real rig: the host's pcscd restarts, cards leave mid-transaction and
mid-APDU, the guest server dies and comes back, the link goes silent, a client is slow. After
each, nothing of what the guest held stays on the host (pcscbridge status counts it).
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pcscbridge.pcsc import ReturnCode
from rig.bridge_processes import Bridge
from rig.pcscd_rig import PcscdRig, pcsc_client_env, run_pyscard
from rig.processes import expect_line, finish, read_line, spawn_program
from rig.service import wait_until

READER = "Virtual PCD 00 00"


def ask(app: subprocess.Popen[str], timeout: float = 15) -> dict[str, object]:
    """One round of the long-lived program: list readers, connect, transmit."""
    assert app.stdin is not None
    app.stdin.write("\n")
    app.stdin.flush()
    result: dict[str, object] = json.loads(read_line(app, timeout))
    return result


def nothing_held_on_the_host(bridge: Bridge) -> bool:
    service = bridge.status("host")["service"]
    return (
        service["host_contexts"],
        service["card_handles"],
        service["transactions_held"],
        service["context_threads"],
    ) == (0, 0, 0, 0)


def host_app_takes_the_card(rig: PcscdRig, timeout: float = 20) -> float:
    """Seconds a host application waited for the reader's transaction."""
    code = (
        "import sys, time\nfrom smartcard import scard\n"
        "_, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)\n"
        "_, card, _ = scard.SCardConnect(ctx, sys.argv[1], 2, 2)\n"
        "start = time.monotonic()\n"
        "rv = scard.SCardBeginTransaction(card)\n"
        "print(rv, time.monotonic() - start)\n"
    )
    result = run_pyscard(code, rig.socket_path, READER, timeout=timeout)
    rv, seconds = result.stdout.split()
    assert int(rv) == 0, result
    return float(seconds)


def test_the_host_pcscd_restarting(pcscd_rig: PcscdRig, tmp_path: Path) -> None:
    with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
        bridge.start(expected_readers=pcscd_rig.reader_names)
        app = spawn_program(["long-lived", READER], bridge.socket_path)
        try:
            expect_line(app, "READY")
            assert ask(app)["response"] == "9000"
            pcscd_rig.restart()  # readers gone for a moment, then back with the card
            wait_until(
                lambda: sorted(bridge.guest_readers()) == sorted(pcscd_rig.reader_names),
                20,
                "the readers back in the guest",
            )
            again = ask(app)  # the context from before the restart
            assert again["connect_rv"] == 0 and again["response"] == "9000", again
            fresh = run_pyscard(
                "import sys\nfrom smartcard.System import readers\n"
                "c = readers()[0].createConnection(); c.connect()\n"
                "print(bytes(c.transmit([0, 0xA4, 0, 0x0C, 2, 0x3F, 0])[1:]).hex())",
                bridge.socket_path,
            )
            assert fresh.stdout.strip() == "9000", fresh
        finally:
            finish(app)
        wait_until(lambda: nothing_held_on_the_host(bridge), 10, "the guest's contexts released")


REMOVAL_SCENARIO = """
import sys, json, time
from smartcard import scard
reader, mode = sys.argv[1], sys.argv[2]
_, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
_, card, _ = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1)
codes = {"begin": scard.SCardBeginTransaction(card)}
print("HOLDING", flush=True)
if mode == "mid-apdu":
    # The card takes 1.5 s to answer; it is pulled out meanwhile.
    rv, _ = scard.SCardTransmit(card, scard.SCARD_PCI_T1, [0x80, 0x16, 0x05, 0xDC, 0x00])
    codes["slow transmit"] = rv
else:
    sys.stdin.readline()  # the card is pulled out now
rv, _ = scard.SCardTransmit(card, scard.SCARD_PCI_T1, [0x00, 0xA4, 0x00, 0x0C, 0x02, 0x3F, 0x00])
codes["transmit"] = rv
codes["status"] = scard.SCardStatus(card)[0]
codes["end"] = scard.SCardEndTransaction(card, scard.SCARD_LEAVE_CARD)
codes["reconnect"] = scard.SCardReconnect(
    card, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1, scard.SCARD_LEAVE_CARD)[0]
codes["disconnect"] = scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
codes["release"] = scard.SCardReleaseContext(ctx)
print(json.dumps({k: v & 0xFFFFFFFF for k, v in codes.items()}), flush=True)
"""


def removal_codes(rig: PcscdRig, socket_path: str, mode: str) -> dict[str, int]:
    app = subprocess.Popen(
        [sys.executable, "-c", REMOVAL_SCENARIO, READER, mode],
        env=pcsc_client_env(socket_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(app, 15) == "HOLDING"
        if mode == "mid-apdu":
            time.sleep(0.5)  # the slow APDU is at the card now
        rig.remove_card(0)
        if mode != "mid-apdu":
            assert app.stdin is not None
            app.stdin.write("\n")
            app.stdin.flush()
        codes: dict[str, int] = json.loads(read_line(app, 30))
        return codes
    finally:
        finish(app)
        rig.insert_card(0)


def test_a_card_removed_mid_transaction_and_mid_apdu_gives_pcscds_codes(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    for mode in ("mid-transaction", "mid-apdu"):
        direct = removal_codes(pcscd_rig, pcscd_rig.socket_path, mode)
        assert direct["transmit"] == ReturnCode.SCARD_W_REMOVED_CARD, direct
        with Bridge(tmp_path / mode, pcscd_rig.socket_path) as bridge:
            bridge.start(expected_readers=pcscd_rig.reader_names)
            assert removal_codes(pcscd_rig, bridge.socket_path, mode) == direct, mode
            wait_until(lambda b=bridge: nothing_held_on_the_host(b), 10, "all released")


def test_the_guest_server_killed_and_restarted(pcscd_rig: PcscdRig, tmp_path: Path) -> None:
    with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
        bridge.start(expected_readers=pcscd_rig.reader_names)
        guest_app = spawn_program(["hold-transaction", READER], bridge.socket_path)
        try:
            expect_line(guest_app, "LOCKED")
            assert bridge.guest is not None
            bridge.guest.kill()  # the whole guest side dies, the app's transaction with it
            assert host_app_takes_the_card(pcscd_rig) < 5
            wait_until(lambda: nothing_held_on_the_host(bridge), 10, "the old link's contexts")
        finally:
            finish(guest_app)
        bridge.start_guest()  # the host dials again (backoff) and the readers come back
        bridge.wait_for_readers(pcscd_rig.reader_names, timeout=30)
        assert bridge.status("host")["link"]["links_made"] == 2


class FreezableProxy:
    """A TCP proxy between guest and host that can stop passing bytes, both ways, without
    closing anything: a network path that went silent."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([source], [], [], 0.05)
            if self.frozen.is_set() or not ready:
                continue
            try:
                data = source.recv(65536)
                if not data:
                    return
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_a_silent_link_is_dropped_on_both_sides_and_the_card_freed(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    from rig.sshd import free_port

    guest_port = free_port()
    bridge = Bridge(tmp_path, pcscd_rig.socket_path, link=f"tcp:127.0.0.1:{guest_port}")
    proxy = FreezableProxy(guest_port)
    guest_app = None
    try:
        bridge.start_guest()
        bridge.link = f"tcp:127.0.0.1:{proxy.port}"  # the host dials through the proxy
        bridge.start_host()
        bridge.wait_for_readers(pcscd_rig.reader_names)
        guest_app = spawn_program(["hold-transaction", READER], bridge.socket_path)
        expect_line(guest_app, "LOCKED")
        proxy.frozen.set()
        frozen_at = time.monotonic()
        # Each side pings every 5 s and gives up after 10 s of silence: the guest removes the
        # readers, the host releases the app's transaction.
        bridge.wait_for_readers([], timeout=20)
        waited = host_app_takes_the_card(pcscd_rig, timeout=30)
        assert time.monotonic() - frozen_at < 20, waited
        assert bridge.host is not None and "no answer to a ping" in bridge.host.log
        wait_until(lambda: nothing_held_on_the_host(bridge), 10, "the silent guest's contexts")
        proxy.frozen.clear()  # the path comes back: the host dials again
        bridge.wait_for_readers(pcscd_rig.reader_names, timeout=30)
    finally:
        if guest_app is not None:
            finish(guest_app)
        bridge.stop()
        proxy.close()


def test_a_slow_card_call_delays_no_other_client(pcscd_rig: PcscdRig, tmp_path: Path) -> None:
    pcscd_rig.insert_card(2)
    other = pcscd_rig.reader_names[2]
    slow_then_fast = (
        "import sys, time\nfrom smartcard import scard\n"
        "_, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)\n"
        "_, card, _ = scard.SCardConnect(ctx, sys.argv[1], 2, 2)\n"
        "print('CONNECTED', flush=True)\n"
        "start = time.monotonic()\n"
        "apdu = list(bytes.fromhex(sys.argv[2]))\n"
        "rv, _ = scard.SCardTransmit(card, scard.SCARD_PCI_T1, apdu)\n"
        "print(rv, round(time.monotonic() - start, 3), flush=True)\n"
    )
    with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
        bridge.start(expected_readers=pcscd_rig.reader_names)
        slow = subprocess.Popen(
            [sys.executable, "-c", slow_then_fast, READER, "801607D000"],  # 2 s at the card
            env=pcsc_client_env(bridge.socket_path),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert read_line(slow, 15) == "CONNECTED"
            time.sleep(0.3)  # the slow APDU is at the card
            fast = run_pyscard(slow_then_fast, bridge.socket_path, other, "00A4000C023F00")
            assert int(fast.stdout.split()[-2]) == 0, fast
            assert slow.poll() is None  # done while the slow one still waits for its card
            rv, seconds = read_line(slow, 15).split()
            assert int(rv) == 0 and float(seconds) >= 1.9
        finally:
            finish(slow)
