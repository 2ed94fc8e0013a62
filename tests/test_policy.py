"""The policy checkpoint and the audit on the host service, against the simulated readers and
test card: a link peer sends what a guest (careless or hostile) may send. The same rules
against the real pcscd are in test_policy_rig.py."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager

import pytest
import trio

from pcscbridge.host.audit import Audit
from pcscbridge.host.backends.sim import SimulatedBackend
from pcscbridge.host.backends.simcard import (
    APP_AID,
    PIN_TRIES,
    TEST_PIN,
    SimulatedCard,
    pad_pin,
)
from pcscbridge.host.checkpoint import Checkpoint
from pcscbridge.host.policy import Policy
from pcscbridge.host.policy_file import parse_policy
from pcscbridge.link.calls import (
    BeginTransaction,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    GetAttrib,
    Reconnect,
    SetAttrib,
    Status,
    Transmit,
)
from pcscbridge.part10 import CM_IOCTL_GET_FEATURE_REQUEST
from pcscbridge.pcsc import Disposition, PCSCError, Protocol, ReturnCode, ShareMode
from pcscbridge.testing.linkpeer import LinkPeer, attached_to_host

R0, R1 = "Sim Reader 00 00", "Sim Reader 01 00"
SHARED, EXCLUSIVE, DIRECT = ShareMode.SHARED, ShareMode.EXCLUSIVE, ShareMode.DIRECT
T1 = Protocol.T1
SELECT_APP = bytes([0x00, 0xA4, 0x04, 0x0C, len(APP_AID)]) + APP_AID
SELECT_EF = bytes.fromhex("00A4020C020101")
READ_BINARY = bytes.fromhex("00B0000004")
UPDATE_BINARY = bytes.fromhex("00D6000004CAFEBABE")
WRONG_PIN = bytes.fromhex("0020008008") + pad_pin(b"000000")
RIGHT_PIN = bytes.fromhex("0020008008") + pad_pin(TEST_PIN)
SW_DENIED = b"\x69\x82"
RC = ReturnCode


@pytest.fixture
def backend() -> Iterator[SimulatedBackend]:
    sim = SimulatedBackend([R0, R1])
    sim.insert_card(R0, SimulatedCard(label="slot0"))
    yield sim
    sim.close()


def policy(text: str = "") -> Policy:
    return Policy(parse_policy(f'[guests."*"]\n{text}'))


def attached(
    backend: SimulatedBackend, *checkpoints: Checkpoint
) -> AbstractAsyncContextManager[LinkPeer]:
    return attached_to_host(backend, *checkpoints, guest="vm")


async def rv(peer: LinkPeer, call: object) -> int:
    return (await peer.call(call)).rv  # type: ignore[arg-type]


async def test_share_modes_by_default_and_when_allowed(backend: SimulatedBackend) -> None:
    async with attached(backend, policy()) as peer:
        assert await rv(peer, Connect(1, 2, R1, DIRECT, 0)) == RC.SCARD_E_SHARING_VIOLATION
        assert await peer.ok(Connect(1, 3, R0, EXCLUSIVE, T1)) == T1
        assert await rv(peer, Reconnect(3, DIRECT, T1, 0)) == RC.SCARD_E_SHARING_VIOLATION
    async with attached(backend, policy("direct = true\nexclusive = false")) as peer:
        await peer.ok(Connect(1, 2, R1, DIRECT, 0))
        assert await rv(peer, Connect(1, 3, R0, EXCLUSIVE, T1)) == RC.SCARD_W_SECURITY_VIOLATION
        await peer.ok(Connect(1, 4, R0, SHARED, T1))
        assert await rv(peer, Reconnect(4, EXCLUSIVE, T1, 0)) == RC.SCARD_W_SECURITY_VIOLATION


async def test_control_and_attributes(backend: SimulatedBackend) -> None:
    async with attached(backend, policy()) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        assert await peer.ok(Control(2, CM_IOCTL_GET_FEATURE_REQUEST, b"")) == b""
        escape = Control(2, 0x42000001, b"\x01\x02")
        assert await rv(peer, escape) == RC.SCARD_W_SECURITY_VIOLATION
        await peer.ok(GetAttrib(2, 0x00090303))
        assert await rv(peer, SetAttrib(2, 0x00090303, b"x")) == RC.SCARD_W_SECURITY_VIOLATION
    listed = policy(f"control_codes = [{0x42000001}]\nget_attrib = false\nset_attrib = true")
    async with attached(backend, listed) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        # Listed: it reaches the reader, whose driver does not know it.
        assert await rv(peer, Control(2, 0x42000001, b"")) == RC.SCARD_E_UNSUPPORTED_FEATURE
        assert await rv(peer, GetAttrib(2, 0x00090303)) == RC.SCARD_W_SECURITY_VIOLATION
        assert await rv(peer, SetAttrib(2, 0x00090303, b"x")) == RC.SCARD_E_UNSUPPORTED_FEATURE


async def test_read_only_preset_answers_6982_and_the_card_never_sees_it(
    backend: SimulatedBackend,
) -> None:
    card = backend.card_in(R0)
    assert card is not None
    async with attached(backend, policy('apdus = "read-only"')) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        for command in (SELECT_APP, SELECT_EF):
            assert await peer.ok(Transmit(2, T1, command)) == b"\x90\x00"
        assert await peer.ok(Transmit(2, T1, UPDATE_BINARY)) == SW_DENIED
        assert await peer.ok(Transmit(2, T1, READ_BINARY)) == bytes.fromhex("01020304 9000")
    async with attached(backend, policy()) as peer:  # the defaults let it through
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        for command in (SELECT_APP, SELECT_EF, UPDATE_BINARY):
            assert await peer.ok(Transmit(2, T1, command)) == b"\x90\x00"
        assert await peer.ok(Transmit(2, T1, READ_BINARY)) == bytes.fromhex("CAFEBABE 9000")


async def test_pin_guard_stops_at_the_last_try(backend: SimulatedBackend) -> None:
    card = backend.card_in(R0)
    assert card is not None
    async with attached(backend, policy()) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        assert await peer.ok(Transmit(2, T1, WRONG_PIN)) == b"\x63\xc2"
        assert await peer.ok(Transmit(2, T1, WRONG_PIN)) == b"\x63\xc1"
        # One try left (pin_guard = 1): refused here, the card keeps its last try.
        assert await peer.ok(Transmit(2, T1, WRONG_PIN)) == SW_DENIED
        assert await peer.ok(Transmit(2, T1, RIGHT_PIN)) == SW_DENIED
        assert card.pin_tries == 1
    # The host's owner verifies on the host (no policy): the tries are full again.
    context = backend.establish_context()
    handle, _ = backend.connect(context, R0, SHARED, T1)
    assert backend.transmit(handle, T1, RIGHT_PIN) == b"\x90\x00"
    backend.release_context(context)
    assert card.pin_tries == PIN_TRIES
    async with attached(backend, policy("pin_guard = 0")) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        for expected in (b"\x63\xc2", b"\x63\xc1", b"\x69\x83"):
            assert await peer.ok(Transmit(2, T1, WRONG_PIN)) == expected
    assert card.pin_tries == 0


async def test_a_card_that_does_not_tell_its_tries_is_handled_as_the_policy_says(
    backend: SimulatedBackend,
) -> None:
    card = backend.card_in(R0)
    assert card is not None
    # Under secure messaging (CLA 0C) the question has no meaning: the card "does not tell".
    sm_verify = bytes([0x0C]) + WRONG_PIN[1:]
    async with attached(backend, policy('pin_guard_unknown = "refuse"')) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        assert await peer.ok(Transmit(2, T1, sm_verify)) == SW_DENIED
    async with attached(backend, policy()) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        assert await peer.ok(Transmit(2, T1, sm_verify)) == b"\x6e\x00"  # it reached the card


async def test_limits_on_contexts_handles_and_calls_in_flight(backend: SimulatedBackend) -> None:
    limits = policy("max_contexts = 3\nmax_cards = 4\nmax_in_flight = 2")
    async with attached(backend, limits) as peer:
        for context in (1, 2, 3):
            await peer.ok(Connect(context, 10 + context, R0, SHARED, T1))
        assert await rv(peer, Connect(4, 14, R0, SHARED, T1)) == RC.SCARD_E_NO_MEMORY
        await peer.ok(Connect(3, 15, R0, SHARED, T1))  # a context it has already: fine
        assert await rv(peer, Connect(3, 16, R0, SHARED, T1)) == RC.SCARD_E_NO_MEMORY
        await peer.ok(Disconnect(15, Disposition.LEAVE_CARD))
        await peer.ok(Connect(3, 16, R0, SHARED, T1))
        # Two slow APDUs (the card's DELAY instruction) in flight: a third call is refused.
        slow = bytes.fromhex("80160300")  # 768 ms
        results: list[int] = []
        async with trio.open_nursery() as nursery:
            for h_card in (11, 12):
                nursery.start_soon(
                    lambda h: _append_rv(peer, Transmit(h, T1, slow), results), h_card
                )
            await trio.sleep(0.3)
            assert await rv(peer, Transmit(13, T1, SELECT_APP)) == RC.SCARD_E_SERVER_TOO_BUSY
        assert results == [0, 0]
        await peer.ok(Transmit(13, T1, SELECT_APP))


async def _append_rv(peer: LinkPeer, call: Transmit, results: list[int]) -> None:
    results.append(await rv(peer, call))


async def test_apdus_per_second(backend: SimulatedBackend) -> None:
    async with attached(backend, policy("max_apdus_per_second = 20")) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        started = trio.current_time()
        for _ in range(40):  # a burst of 20, then 20 more at 20 a second
            await peer.ok(Transmit(2, T1, SELECT_APP))
        assert trio.current_time() - started >= 0.9


async def test_a_transaction_held_too_long_is_cut_and_the_handle_reset(
    backend: SimulatedBackend,
) -> None:
    async with attached(backend, policy("hold_limit = 0.5")) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        await peer.ok(BeginTransaction(2))
        started = trio.current_time()
        host_app = _host_app_transaction(backend)
        waited = trio.to_thread.run_sync
        assert not await waited(host_app.wait, 0.2), "the host app got the card while held"
        assert await waited(host_app.wait, 5), "the guest's transaction was not cut"
        # Later calls on the guest's handle say the card was reset, until it reconnects.
        assert await rv(peer, Transmit(2, T1, SELECT_APP)) == RC.SCARD_W_RESET_CARD
        assert await rv(peer, Status(2)) == RC.SCARD_W_RESET_CARD
        assert await rv(peer, EndTransaction(2, 0)) == RC.SCARD_W_RESET_CARD
        assert await peer.ok(Reconnect(2, SHARED, T1, Disposition.LEAVE_CARD)) == T1
        assert await peer.ok(Transmit(2, T1, SELECT_APP)) == b"\x90\x00"
        # Its next transaction waits out the cooldown (1 s after the cut, at 0.5 s).
        await peer.ok(BeginTransaction(2))
        assert trio.current_time() - started >= 1.4


async def test_an_exclusive_handle_held_too_long_is_cut(backend: SimulatedBackend) -> None:
    context = backend.establish_context()
    async with attached(backend, policy("hold_limit = 0.5")) as peer:
        await peer.ok(Connect(1, 2, R0, EXCLUSIVE, T1))
        with pytest.raises(PCSCError) as refused:
            backend.connect(context, R0, SHARED, T1)
        assert refused.value.rv == RC.SCARD_E_SHARING_VIOLATION
        await trio.sleep(0.8)
        handle, _ = backend.connect(context, R0, SHARED, T1)  # the host app gets in now
        assert await rv(peer, Transmit(2, T1, SELECT_APP)) == RC.SCARD_W_RESET_CARD
        assert await peer.ok(Reconnect(2, SHARED, T1, Disposition.LEAVE_CARD)) == T1
        assert backend.transmit(handle, T1, SELECT_APP) == b"\x90\x00"  # both share it now
        assert await peer.ok(Transmit(2, T1, SELECT_APP)) == b"\x90\x00"
        backend.disconnect(handle, Disposition.LEAVE_CARD)
    backend.release_context(context)


def _host_app_transaction(backend: SimulatedBackend) -> threading.Event:
    """A host application that begins a transaction (blocking) in a thread; set when it has."""
    done = threading.Event()

    def run() -> None:
        context = backend.establish_context()
        handle, _ = backend.connect(context, R0, SHARED, T1)
        backend.begin_transaction(handle)
        done.set()
        backend.end_transaction(handle, Disposition.LEAVE_CARD)
        backend.release_context(context)

    threading.Thread(target=run, daemon=True).start()
    return done


async def test_hidden_renamed_and_nul_names(backend: SimulatedBackend) -> None:
    rules = policy(
        f'readers = ["Sim *"]\nhide_readers = ["* 01 00"]\nrename = {{ "{R0}" = "Card" }}'
    )
    async with attached(backend, rules) as peer:
        assert await peer.table() == ["Card"]
        for name in (R1, R0, "Card\0junk", "Card ", "card"):
            assert await rv(peer, Connect(1, 2, name, SHARED, T1)) == RC.SCARD_E_UNKNOWN_READER
        await peer.ok(Connect(1, 3, "Card", SHARED, T1))


async def test_audit_lines_with_the_policy_s_refusals_and_no_pin() -> None:
    sink = io.StringIO()
    sim = SimulatedBackend([R0])
    sim.insert_card(R0, SimulatedCard())
    # The policy inside the audit, as cli.checked_service composes them.
    async with attached(sim, policy('apdus = "read-only"'), Audit(sink, trace=True)) as peer:
        await peer.ok(Connect(7, 8, R0, SHARED, T1))
        await peer.ok(Transmit(8, T1, SELECT_APP))
        await peer.ok(Transmit(8, T1, RIGHT_PIN))
        await peer.ok(Transmit(8, T1, UPDATE_BINARY))
        await peer.call(Connect(7, 9, R0, DIRECT, 0))
    sim.close()
    text = sink.getvalue()
    assert "735194" not in text and b"735194".hex() not in text.lower()
    lines = [json.loads(line) for line in text.splitlines()]
    connect, select, verify, update, direct, release = lines
    assert connect["call"] == "connect" and connect["reader"] == R0 and connect["protocol"] == T1
    assert set(connect) >= {"time", "guest", "rv", "duration", "share_mode"}
    assert select["apdu"] == "00A4040C" and select["lc"] == len(APP_AID) and select["sw"] == "9000"
    assert select["command"] == SELECT_APP.hex().upper() and select["reader"] == R0
    assert verify["sw"] == "9000" and "masked" in verify["command"]
    assert update["sw"] == "6982" and "read-only" in update["note"]
    assert direct["rv"] == "SCARD_E_SHARING_VIOLATION" and "DIRECT" in direct["note"]
    assert release["call"] == "release_context"


class PinPadBackend(SimulatedBackend):
    """Simulated readers with a PIN pad (PC/SC part 10), standing in for a real one, which the
    rig has not got: the keypad "types" `typed` into the APDU of a verify structure."""

    FEATURES = bytes.fromhex("0604 42330006 0704 42330007 0A04 4233000A 1304 42330013")

    def __init__(self, readers: list[str], typed: bytes) -> None:
        super().__init__(readers)
        self.typed = typed

    def control(self, card: int, control_code: int, data: bytes) -> bytes:
        if control_code == CM_IOCTL_GET_FEATURE_REQUEST:
            return self.FEATURES
        if control_code == 0x4233000A:
            return bytes(4)  # wLcdLayout, bEntryValidationCondition, bTimeOut2
        if control_code == 0x42330006:
            header = data[19:23]
            return self.transmit(card, T1, header + b"\x08" + pad_pin(self.typed))
        return b"\x90\x00"


def verify_structure() -> bytes:
    return bytes(15) + (13).to_bytes(4, "little") + bytes.fromhex("0020008008") + bytes(8)


async def test_a_pin_pad_is_usable_guarded_and_hidden_when_not_allowed() -> None:
    backend = PinPadBackend([R0], typed=b"000000")
    card = SimulatedCard()
    backend.insert_card(R0, card)
    async with attached(backend, policy()) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        assert await peer.ok(Control(2, CM_IOCTL_GET_FEATURE_REQUEST, b"")) == backend.FEATURES
        assert await peer.ok(Control(2, 0x4233000A, b"")) == bytes(4)
        assert await rv(peer, Control(2, 0x42330013, b"\x01")) == RC.SCARD_W_SECURITY_VIOLATION
        answers = [await peer.ok(Control(2, 0x42330006, verify_structure())) for _ in range(3)]
        assert answers == [b"\x63\xc2", b"\x63\xc1", SW_DENIED]  # the guard keeps the last try
        assert card.pin_tries == 1
    async with attached(backend, policy("pin_pad = false")) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
        features = await peer.ok(Control(2, CM_IOCTL_GET_FEATURE_REQUEST, b""))
        assert features == bytes.fromhex("0A04 4233000A 1304 42330013")  # no PIN entry
        refused = await rv(peer, Control(2, 0x42330006, verify_structure()))
        assert refused == RC.SCARD_W_SECURITY_VIOLATION
    backend.close()


async def test_the_audit_goes_to_stderr_for_journald(capsys: pytest.CaptureFixture[str]) -> None:
    sim = SimulatedBackend([R0])
    sim.insert_card(R0, SimulatedCard())
    async with attached(sim, Audit.to_path("-")) as peer:
        await peer.ok(Connect(1, 2, R0, SHARED, T1))
    sim.close()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["call"] for line in lines] == ["connect", "release_context"]
    assert lines[0]["guest"] == "vm"
