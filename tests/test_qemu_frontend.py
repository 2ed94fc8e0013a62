"""The QEMU front-end in one process: VirtualReader on the host service with simulated readers,
and the test as QEMU's end of the chardev (a UNIX socket it listens on), speaking VSCard as
QEMU does. The real QEMU with a real guest is tests/test_qemu_e2e.py; here every bad input and
every ordering can be sent on purpose.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from pcscbridge.host.backends.sim import SimulatedBackend
from pcscbridge.host.backends.simcard import DEFAULT_ATR, SimulatedCard, pattern
from pcscbridge.host.service import HostService, open_host_service
from pcscbridge.iso7816.atr import offer_t0
from pcscbridge.link.calls import BeginTransaction, Connect, Disconnect, EndTransaction, Transmit
from pcscbridge.pcsc import Disposition, Protocol, ShareMode
from pcscbridge.qemu.frontend import VirtualReader, VirtualReaderConfig
from pcscbridge.transports.endpoints import Endpoint, unix_listener
from pcscbridge.vscard import codec as vsc
from rig.bridge_processes import BridgeProcess

R0, R1 = "Sim Reader 00 00", "Sim Reader 01 00"
SHOWN_ATR = offer_t0(DEFAULT_ATR)  # the test card is T=1 only
SELECT_EF_4K = bytes.fromhex("00 A4 08 0C 04 50 43 01 02")


class QemuSide:
    """QEMU's end of one chardev connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = vsc.VSCardDecoder()

    async def receive(self, timeout: float = 5.0) -> vsc.Message:
        with trio.fail_after(timeout):
            while (message := self.decoder.next_message()) is None:
                data = await self.stream.receive_some(65536)
                assert data, "the front-end closed the connection"
                self.decoder.receive_data(data)
        return message

    async def expect(self, wanted: vsc.Message) -> None:
        assert await self.receive() == wanted

    async def send(self, message: vsc.Message) -> None:
        await self.stream.send_all(vsc.encode(message))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def ack(self, wanted: vsc.Message) -> None:
        """Expect `wanted` and acknowledge it, as QEMU does."""
        await self.expect(wanted)
        await self.send(vsc.Error(0, vsc.SUCCESS))

    async def handshake(self) -> None:
        await self.expect(vsc.Init(0))
        await self.send(vsc.Init(vsc.UNDEFINED_READER_ID))
        await self.expect(vsc.ReaderAdd(vsc.UNDEFINED_READER_ID))
        await self.send(vsc.Error(0, vsc.SUCCESS))  # reader id 0 assigned
        await self.ack(vsc.CardRemove(0))  # clears what an earlier connection left

    async def transmit(self, command: str) -> bytes:
        await self.send(vsc.APDU(0, bytes.fromhex(command)))
        answer = await self.receive()
        assert isinstance(answer, vsc.APDU), answer
        return answer.data

    async def expect_closed(self, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while await self.stream.receive_some(65536):
                pass


@dataclass
class Setup:
    backend: SimulatedBackend
    service: HostService
    listener: trio.SocketListener
    stop: trio.CancelScope

    async def accept(self) -> QemuSide:
        with trio.fail_after(5):
            return QemuSide(await self.listener.accept())

    async def card_inserted(self) -> QemuSide:
        """The next connection, past the handshake and the card's ATR."""
        qemu = await self.accept()
        await qemu.handshake()
        await qemu.ack(vsc.ATR(0, SHOWN_ATR))
        return qemu


@asynccontextmanager
async def frontend(tmp_path: Path, *, reader: str = R0, card: bool = True) -> AsyncIterator[Setup]:
    backend = SimulatedBackend([R0, R1])
    if card:
        backend.insert_card(R0, SimulatedCard(label="qemu"))
    path = str(tmp_path / "ccid.sock")
    listener = await unix_listener(path, 0o600)
    config = VirtualReaderConfig(Endpoint("unix", path=path), reader, "vm", idle_release=0.3)
    async with open_host_service(backend) as service, trio.open_nursery() as nursery:
        stop = trio.CancelScope()

        async def run() -> None:
            with stop:
                await VirtualReader(service, config).run()

        nursery.start_soon(run)
        yield Setup(backend, service, listener, stop)
        stop.cancel()
    await listener.aclose()


async def test_handshake_then_the_rewritten_atr_then_apdus(tmp_path: Path) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.card_inserted()
        assert await qemu.transmit("00 A4 08 0C 04 50 43 01 02") == bytes.fromhex("9000")
        data = await qemu.transmit("00 B0 00 00 00")  # 256 bytes, case 2 with P3 = 00
        assert data == pattern(4096, 0x02)[:256] + bytes.fromhex("9000")
        # A case-4 ECHO in the guest's case-3 form: 61 03, then GET RESPONSE.
        assert await qemu.transmit("80 10 00 00 03 AA BB CC") == bytes.fromhex("6103")
        assert await qemu.transmit("00 C0 00 00 03") == bytes.fromhex("AABBCC 9000")
        setup.stop.cancel()
        # A clean stop tells QEMU the card and the reader are gone, then closes.
        await qemu.expect(vsc.CardRemove(0))
        await qemu.expect(vsc.ReaderRemove(0))
        await qemu.expect_closed()


async def test_host_removal_and_insertion_reach_qemu(tmp_path: Path) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.card_inserted()
        setup.backend.remove_card(R0)
        await qemu.ack(vsc.CardRemove(0))
        # A command in flight when the card went gets a failed exchange, not an answer.
        await qemu.send(vsc.APDU(0, bytes.fromhex("00A4000C023F00")))
        assert await qemu.receive() == vsc.Error(0, vsc.GENERAL_ERROR)
        setup.backend.insert_card(R0, SimulatedCard(label="second"))
        await qemu.ack(vsc.ATR(0, SHOWN_ATR))
        assert await qemu.transmit("00 A4 00 0C 02 2F 10") == bytes.fromhex("9000")
        assert await qemu.transmit("00 B0 00 00 06") == b"second" + bytes.fromhex("9000")
        setup.backend.remove_reader(R0)  # unplugged: the card is removed for the guest
        await qemu.ack(vsc.CardRemove(0))


async def test_no_card_then_a_card(tmp_path: Path) -> None:
    async with frontend(tmp_path, reader="Sim Reader 01*", card=False) as setup:
        qemu = await setup.accept()
        await qemu.handshake()
        setup.backend.insert_card(R0)  # not the reader the pattern picks
        setup.backend.insert_card(R1, SimulatedCard(label="one"))
        await qemu.ack(vsc.ATR(0, SHOWN_ATR))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(vsc.encode(vsc.Init(0))[:12] + b"XSCD" + bytes(8), id="wrong magic"),
        pytest.param(bytes.fromhex("0000002a 00000000 00000000"), id="unknown type"),
        pytest.param(bytes.fromhex("00000007 00000000 7fffffff"), id="oversize length"),
        pytest.param(vsc.encode(vsc.ATR(0, DEFAULT_ATR)), id="a card's message from qemu"),
    ],
)
async def test_bad_input_closes_the_connection_then_it_reconnects(
    tmp_path: Path, bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.card_inserted()
        await qemu.send_raw(bad)
        await qemu.expect_closed()
        assert "closing the connection" in caplog.text
        again = await setup.card_inserted()  # the process lives on and connects again
        assert await again.transmit("80 14 90 00 00") == bytes.fromhex("9000")


async def test_wrong_magic_in_qemus_init(tmp_path: Path) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.accept()
        await qemu.expect(vsc.Init(0))
        await qemu.send_raw(bytes.fromhex("00000001 ffffffff 0000000c 00000000 00000002 00000000"))
        await qemu.expect_closed()
        await (await setup.accept()).handshake()


async def test_apdu_before_any_atr_closes_the_connection(tmp_path: Path) -> None:
    async with frontend(tmp_path, card=False) as setup:
        qemu = await setup.accept()
        await qemu.handshake()  # the opening CardRemove is acknowledged: no card in QEMU
        await qemu.send(vsc.APDU(0, bytes.fromhex("00A4000C023F00")))
        await qemu.expect_closed()
        await (await setup.accept()).handshake()


async def test_apdu_for_a_card_an_earlier_connection_announced_fails_politely(
    tmp_path: Path,
) -> None:
    async with frontend(tmp_path, card=False) as setup:
        qemu = await setup.accept()
        await qemu.expect(vsc.Init(0))
        await qemu.send(vsc.Init(vsc.UNDEFINED_READER_ID))
        await qemu.ack(vsc.ReaderAdd(vsc.UNDEFINED_READER_ID))
        await qemu.expect(vsc.CardRemove(0))
        # Before QEMU has taken the CardRemove, a guest command for the old card: not an error.
        await qemu.send(vsc.APDU(0, bytes.fromhex("00A4000C023F00")))
        await qemu.send(vsc.Error(0, vsc.SUCCESS))
        assert await qemu.receive() == vsc.Error(0, vsc.GENERAL_ERROR)


async def test_qemu_restart_reconnects_and_shows_the_card_again(tmp_path: Path) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.card_inserted()
        await qemu.stream.aclose()  # QEMU quits
        again = await setup.card_inserted()
        assert await again.transmit("80 14 90 00 00") == bytes.fromhex("9000")


async def test_flush_is_answered(tmp_path: Path) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.card_inserted()
        await qemu.send(vsc.Flush(0))
        await qemu.expect(vsc.FlushComplete(0))


async def test_a_guest_burst_keeps_host_applications_out_until_it_is_idle(
    tmp_path: Path,
) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.card_inserted()
        assert await qemu.transmit("00 A4 08 0C 04 50 43 01 02") == bytes.fromhex("9000")
        host_app = setup.service.open_session("host application")
        got_card = trio.Event()

        async def host_transaction() -> None:
            # pcscd holds even a shared connect while another handle has a transaction.
            await host_app.call(Connect(1, 1, R0, ShareMode.SHARED, Protocol.ANY))
            await host_app.call(BeginTransaction(1))
            got_card.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(host_transaction)
            for _ in range(10):  # a burst, with gaps shorter than the idle release (0.3 s)
                await trio.sleep(0.1)
                assert not got_card.is_set()
                answer = await qemu.transmit("00 B0 00 00 10")  # the guest's READ after SELECT
                assert answer == pattern(4096, 0x02)[:16] + bytes.fromhex("9000")
            with trio.fail_after(5):
                await got_card.wait()  # the guest went quiet: the host application's turn
        # Now the guest waits for the host application, and does not interleave.
        await host_app.call(Transmit(1, Protocol.T1, bytes.fromhex("00A4000C023F00")))
        await qemu.send(vsc.APDU(0, bytes.fromhex("00 B0 00 00 10")))
        with pytest.raises(trio.TooSlowError):
            await qemu.receive(timeout=0.5)
        await host_app.call(EndTransaction(1, Disposition.LEAVE_CARD))
        # The host application selected the MF in its transaction: READ BINARY has no EF now.
        assert await qemu.receive() == vsc.APDU(0, bytes.fromhex("6986"))
        await host_app.aclose()


async def test_a_silent_qemu_is_given_up_and_dialled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pcscbridge.qemu.frontend.HANDSHAKE_TIMEOUT", 0.5)
    async with frontend(tmp_path) as setup:
        silent = await setup.accept()
        await silent.expect(vsc.Init(0))  # and never answers
        await silent.expect_closed()
        await (await setup.accept()).handshake()


async def test_two_readers_in_one_process_over_unix_and_tcp(tmp_path: Path) -> None:
    backend = SimulatedBackend([R0, R1])
    backend.insert_card(R0, SimulatedCard(label="zero"))
    backend.insert_card(R1, SimulatedCard(label="one"))
    unix = await unix_listener(str(tmp_path / "a.sock"), 0o600)
    (tcp,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = tcp.socket.getsockname()[1]
    configs = [
        VirtualReaderConfig(Endpoint("unix", path=str(tmp_path / "a.sock")), R0, "vm"),
        VirtualReaderConfig(Endpoint("tcp", host="127.0.0.1", port=port), "*01 00", "vm"),
    ]
    async with open_host_service(backend) as service, trio.open_nursery() as nursery:
        for config in configs:
            nursery.start_soon(VirtualReader(service, config).run)
        for listener, label in ((unix, b"zero"), (tcp, b"one")):
            with trio.fail_after(5):
                qemu = QemuSide(await listener.accept())  # type: ignore[arg-type]
            await qemu.handshake()
            await qemu.ack(vsc.ATR(0, SHOWN_ATR))
            assert await qemu.transmit("00 A4 00 0C 02 2F 10") == bytes.fromhex("9000")
            assert await qemu.transmit(f"00 B0 00 00 {len(label):02X}") == label + b"\x90\x00"
        nursery.cancel_scope.cancel()


def test_cli_serves_each_pair_and_tells_qemu_on_sigterm(tmp_path: Path) -> None:
    """`pcscbridge qemu` as users run it (simulated readers): two chardevs, each with its
    reader; SIGTERM removes the card and the reader from each."""
    listeners = []
    for name in ("a", "b"):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / f"{name}.sock"))
        listener.listen(1)
        listener.settimeout(10)
        listeners.append(listener)
    bridge = BridgeProcess(
        "qemu",
        [
            *("qemu", "--backend", "sim", "--vm-name", "win11"),
            *("--chardev", f"unix:{tmp_path / 'a.sock'}", "--reader", "Sim Reader 00*"),
            *("--chardev", f"unix:{tmp_path / 'b.sock'}", "--reader", "Sim Reader 01*"),
        ],
        tmp_path / "bridge.log",
        dict(os.environ),
    )
    try:
        a, b = (SyncQemu(listener.accept()[0]) for listener in listeners)
        for qemu in (a, b):
            qemu.handshake()
        a.ack(vsc.ATR(0, SHOWN_ATR))  # the demo card sits in the first reader only
        a.send(vsc.APDU(0, bytes.fromhex("80 14 90 00 00")))
        assert a.receive() == vsc.APDU(0, bytes.fromhex("9000"))
        assert bridge.stop(signal.SIGTERM) == 0
        assert [a.receive(), a.receive()] == [vsc.CardRemove(0), vsc.ReaderRemove(0)]
        assert b.receive() == vsc.ReaderRemove(0)
        assert a.closed() and b.closed()
    finally:
        bridge.stop()
        for listener in listeners:
            listener.close()


class SyncQemu:
    """QEMU's end of a chardev connection, blocking (for a test that runs a process)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.decoder = vsc.VSCardDecoder()

    def receive(self) -> vsc.Message:
        while (message := self.decoder.next_message()) is None:
            data = self.sock.recv(65536)
            assert data, "closed"
            self.decoder.receive_data(data)
        return message

    def send(self, message: vsc.Message) -> None:
        self.sock.sendall(vsc.encode(message))

    def ack(self, wanted: vsc.Message) -> None:
        assert self.receive() == wanted
        self.send(vsc.Error(0, vsc.SUCCESS))

    def handshake(self) -> None:
        assert self.receive() == vsc.Init(0)
        self.send(vsc.Init(vsc.UNDEFINED_READER_ID))
        self.ack(vsc.ReaderAdd(vsc.UNDEFINED_READER_ID))
        self.ack(vsc.CardRemove(0))

    def closed(self) -> bool:
        return self.sock.recv(1) == b"" and self.decoder.buffered == 0


async def test_a_qemu_that_never_acknowledges_is_dropped(tmp_path: Path) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.accept()
        await qemu.expect(vsc.Init(0))
        await qemu.send(vsc.Init(vsc.UNDEFINED_READER_ID))
        await qemu.ack(vsc.ReaderAdd(vsc.UNDEFINED_READER_ID))
        await qemu.expect(vsc.CardRemove(0))  # from here on, nothing is acknowledged
        await qemu.expect(vsc.ATR(0, SHOWN_ATR))
        received = []
        with trio.fail_after(10):
            while True:  # each swap is a CardRemove and an ATR left unanswered
                card = setup.backend.remove_card(R0)
                setup.backend.insert_card(R0, card)
                data = await qemu.stream.receive_some(65536)
                if not data:
                    break
                qemu.decoder.receive_data(data)
                while (message := qemu.decoder.next_message()) is not None:
                    received.append(message)
        assert 10 <= len(received) <= 16  # dropped at 16 unanswered, the opening ones counted
        assert set(received) == {vsc.CardRemove(0), vsc.ATR(0, SHOWN_ATR)}
        await (await setup.accept()).handshake()


async def test_a_card_reset_by_a_host_application_is_reconnected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with frontend(tmp_path) as setup:
        qemu = await setup.card_inserted()
        assert await qemu.transmit("00 A4 08 0C 04 50 43 01 02") == bytes.fromhex("9000")
        host_app = setup.service.open_session("host application")
        # Once the guest's transaction has ended (idle gap), a host application resets the card.
        with trio.fail_after(5):
            await host_app.call(Connect(1, 1, R0, ShareMode.SHARED, Protocol.ANY))
        await host_app.call(Disconnect(1, Disposition.RESET_CARD))
        # The guest's next command is answered by the reset card: its selected EF is gone.
        assert await qemu.transmit("00 B0 00 00 10") == bytes.fromhex("6986")
        assert "reset by another application" in caplog.text
        await host_app.aclose()
