"""The host service layer: every link call passes the checkpoints before and after it runs, and
a reader a guest may not see does not exist for it, by name or in its table.

A guest link endpoint talks to a HostAgent over an in-memory stream, so every link method can
be sent as a hostile or careless guest would, not only what the guest server sends.
"""

from __future__ import annotations

import threading
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pcscbridge.host.backends.sim import SimulatedBackend
from pcscbridge.host.backends.simcard import APP_AID, SimulatedCard
from pcscbridge.host.checkpoint import (
    AllowAll,
    Checkpoint,
    Outcome,
    ReaderRules,
)
from pcscbridge.host.readers import HostReader
from pcscbridge.host.service import Session
from pcscbridge.link.calls import (
    CATALOGUE,
    BeginTransaction,
    Call,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    GetAttrib,
    Ping,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Status,
    Transmit,
)
from pcscbridge.pcsc import Disposition, Protocol, ReturnCode, ShareMode
from pcscbridge.testing.linkpeer import LinkPeer, attached_to_host
from rig.host_peer import host_process_peer
from rig.pcscd_rig import PcscdRig

R0, R1, R2 = "Sim Reader 00 00", "Sim Reader 01 00", "Sim Reader 02 00"
SELECT_APP = bytes([0x00, 0xA4, 0x04, 0x0C, len(APP_AID)]) + APP_AID
SCARD_ATTR_ATR_STRING = 0x00090303
CM_IOCTL_GET_FEATURE_REQUEST = 0x42000D48
SHARED, T1 = ShareMode.SHARED, Protocol.T1
LEAVE = Disposition.LEAVE_CARD


@dataclass
class Recorder(AllowAll):
    """Rules that let everything through and write down what they saw."""

    seen: list[tuple[str, str, object]] = field(default_factory=list)

    async def before(self, call: Call, session: Session) -> Call:
        self.seen.append(("before", call.method, call))
        return call

    def after(self, call: Call, outcome: Outcome) -> None:
        self.seen.append(("after", call.method, outcome))

    def rules_for(self, guest: str) -> Recorder:
        assert guest == "recorded guest"
        return self

    def outcomes(self, method: str) -> list[Outcome]:
        return [o for stage, m, o in self.seen if stage == "after" and m == method]  # type: ignore[misc]


def attached(
    checkpoint: Checkpoint, backend: SimulatedBackend
) -> AbstractAsyncContextManager[LinkPeer]:
    return attached_to_host(backend, checkpoint, guest="recorded guest")


@pytest.fixture
def backend() -> SimulatedBackend:
    sim = SimulatedBackend([R0, R1, R2])
    sim.insert_card(R0, SimulatedCard(label="slot0"))
    yield sim
    sim.close()


async def test_every_link_method_passes_the_checkpoint_before_and_after(
    backend: SimulatedBackend,
) -> None:
    recorder = Recorder()
    async with attached(recorder, backend) as guest:
        protocol = await guest.ok(Connect(11, 21, R0, SHARED, T1))
        assert protocol == T1
        assert await guest.ok(Transmit(21, T1, SELECT_APP)) == b"\x90\x00"
        assert await guest.ok(Control(21, CM_IOCTL_GET_FEATURE_REQUEST, b"")) == b""
        atr = await guest.ok(GetAttrib(21, SCARD_ATTR_ATR_STRING))
        unsupported = await guest.call(SetAttrib(21, SCARD_ATTR_ATR_STRING, b"\x3b"))
        assert unsupported.rv == ReturnCode.SCARD_E_UNSUPPORTED_FEATURE
        await guest.ok(Status(21))
        await guest.ok(BeginTransaction(21))
        await guest.ok(EndTransaction(21, LEAVE))
        assert await guest.ok(Reconnect(21, SHARED, T1, LEAVE)) == T1
        await guest.ok(Disconnect(21, LEAVE))
        await guest.ok(ReleaseContext(11))
        await guest.ok(Ping())
        await guest.ok(Connect(12, 22, R0, SHARED, T1))  # still held when the link ends
        await guest.ok(BeginTransaction(22))

    methods_before = {m for stage, m, _ in recorder.seen if stage == "before"}
    methods_after = {m for stage, m, _ in recorder.seen if stage == "after"}
    assert methods_before == methods_after == set(CATALOGUE)
    # Each call's after hook saw how it ended and how long it took.
    assert [o.result for o in recorder.outcomes("connect")] == [T1, T1]
    assert recorder.outcomes("transmit")[0].result == b"\x90\x00"
    assert recorder.outcomes("get_attrib")[0].result == atr
    assert recorder.outcomes("set_attrib")[0].rv == ReturnCode.SCARD_E_UNSUPPORTED_FEATURE
    for _, _, outcome in recorder.seen:
        if isinstance(outcome, Outcome):
            assert 0 <= outcome.duration < 5
    # The context still held when the link ended was released through the checkpoint too, and
    # its transaction ended with a reset (another application can take the card now).
    releases = [c for stage, m, c in recorder.seen if stage == "before" and m == "release_context"]
    assert releases == [ReleaseContext(11), ReleaseContext(12)]
    other = backend.establish_context()
    card, _ = backend.connect(other, R0, SHARED, T1)
    taken = threading.Thread(target=backend.begin_transaction, args=(card,), daemon=True)
    taken.start()
    taken.join(5)
    assert not taken.is_alive(), "the guest's transaction outlived its link"


async def test_a_refusal_in_the_before_hook_never_reaches_the_card(
    backend: SimulatedBackend,
) -> None:
    class NoTransmit(Recorder):
        async def before(self, call: Call, session: Session) -> Call:
            await super().before(call, session)
            if isinstance(call, Transmit):
                from pcscbridge.pcsc import PCSCError

                raise PCSCError(ReturnCode.SCARD_W_SECURITY_VIOLATION, "no APDUs")
            return call

    recorder = NoTransmit()
    card = backend.card_in(R0)
    assert card is not None
    async with attached(recorder, backend) as guest:
        await guest.ok(Connect(1, 2, R0, SHARED, T1))
        refused = await guest.call(Transmit(2, T1, SELECT_APP))
        assert refused.rv == ReturnCode.SCARD_W_SECURITY_VIOLATION
    assert recorder.outcomes("transmit")[0].rv == ReturnCode.SCARD_W_SECURITY_VIOLATION
    # The card never saw it: its application is still not selected.
    assert card.process_apdu(bytes.fromhex("00B0000000"))[-2:] == b"\x69\x86"


async def test_a_hidden_reader_is_not_in_the_table_and_unreachable_by_name(
    backend: SimulatedBackend,
) -> None:
    backend.insert_card(R1)
    rules = ReaderRules(visible=lambda name: name != R1, rename={R2: "Guest Reader"})
    async with attached(rules, backend) as guest:
        assert await guest.table() == [R0, "Guest Reader"]
        for name in (R1, R1 + "\0", R0 + "\0junk", R2, "Sim Reader 03 00"):
            refused = await guest.call(Connect(1, 2, name, ShareMode.DIRECT, 0))
            assert refused.rv == ReturnCode.SCARD_E_UNKNOWN_READER, name
        # The renamed reader answers to its new name, and stays hidden when another comes.
        await guest.ok(Connect(1, 3, "Guest Reader", ShareMode.DIRECT, 0))
        await guest.ok(Connect(1, 4, R0, SHARED, T1))
        backend.add_reader("Sim Reader 03 00")
        table = await guest.table(lambda names: len(names) == 3)
        assert table == [R0, "Guest Reader", "Sim Reader 03 00"]
    assert backend.card_in(R1) is not None


def test_reader_rules_show_renamed_readers_under_their_guest_names() -> None:
    rules = ReaderRules(visible=lambda name: "secret" not in name, rename={"A": "B"})
    readers = (HostReader("A", 0), HostReader("secret C", 0), HostReader("D", 0))
    assert [r.name for r in rules.readers(readers)] == ["B", "D"]
    assert rules.host_name("B") == "A"
    assert rules.host_name("A") is None  # the host name of a renamed reader means nothing
    assert rules.host_name("secret C") is None
    assert rules.host_name("D") == "D"


# --- the same against the host's real PC/SC stack -------------------------------------------


async def test_a_name_with_bytes_after_nul_never_reaches_the_real_reader(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """pyscard passes C strings: "<reader>\\0junk" would connect to <reader> itself."""
    reader = pcscd_rig.reader_names[0]
    async with host_process_peer(pcscd_rig.socket_path, tmp_path) as (peer, _host):
        assert reader in await peer.table(lambda names: reader in names)
        refused = await peer.call(Connect(1, 2, reader + "\0junk", SHARED, T1))
        assert refused.rv == ReturnCode.SCARD_E_UNKNOWN_READER
        assert await peer.ok(Connect(1, 3, reader, SHARED, T1)) == T1
