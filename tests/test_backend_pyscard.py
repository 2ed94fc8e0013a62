"""PyscardBackend against the real pcscd 1.9.9 + vpcd rig.

pyscard runs in a child process (tests/pyscard_worker.py) with the rig's PCSCLITE_CSOCK_NAME:
libpcsclite reads it once per process and every test has a pcscd of its own. The rig's card
is the SimulatedCard behind vpcd, so these tests also pin down the real behaviour the
simulated backend copies (tests/test_backend_sim.py).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyscard_worker import PyscardWorker, spin_during

from pcscbridge.host.backend import ReaderState
from pcscbridge.host.backends.pyscard import PyscardBackend
from pcscbridge.host.backends.simcard import APP_AID, DEFAULT_ATR
from pcscbridge.pcsc import (
    INFINITE,
    PNP_NOTIFICATION,
    Disposition,
    PCSCError,
    Protocol,
    ShareMode,
    State,
)
from pcscbridge.pcsc import ReturnCode as RC
from rig.pcscd_rig import PcscdRig

rig = pytest.mark.rig

SHARED = ShareMode.SHARED
T0, T1, ANY = Protocol.T0, Protocol.T1, Protocol.ANY
LEAVE, RESET = Disposition.LEAVE_CARD, Disposition.RESET_CARD
SELECT_APP = bytes([0x00, 0xA4, 0x04, 0x0C, len(APP_AID)]) + APP_AID
ECHO_123 = bytes.fromhex("8010000003010203")
OK = b"\x90\x00"
SCARD_ATTR_ATR_STRING = 0x00090303
TAG_IFD_ATR = 0x0303  # the IFD handler's own tag, which vpcd answers
CM_IOCTL_GET_FEATURE_REQUEST = 0x42000D48
CARD_READY = 0x34  # pcscd's SCARD_PRESENT | SCARD_POWERED | SCARD_NEGOTIABLE
STILL_BLOCKED = 0.5  # > libpcsclite's 100 ms retry period: a blocked call stays blocked


@pytest.fixture
def worker(pcscd_rig: PcscdRig) -> Iterator[PyscardWorker]:
    with PyscardWorker(pcscd_rig.env) as pyscard:
        yield pyscard


def rv_of(worker: PyscardWorker, method: str, *args: object) -> int:
    with pytest.raises(PCSCError) as info:
        worker.call(method, *args)
    return info.value.rv


def known(state: ReaderState) -> ReaderState:
    return ReaderState(state.reader, state.event_state & ~int(State.CHANGED))


@rig
def test_importing_the_module_loads_no_pcsc_library(rig_prerequisites: None) -> None:
    code = (
        "import sys\n"
        "import pcscbridge.host.backends.pyscard as module\n"
        "def loaded():\n"
        "    maps = open('/proc/self/maps').read()\n"
        "    return int('smartcard' in sys.modules), int('libpcsclite' in maps)\n"
        "print(*loaded())\n"
        "module.PyscardBackend()\n"
        "print(*loaded())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split("\n")
    assert out[0] == "0 0", "importing the module loaded pyscard/libpcsclite"
    assert out[1] == "1 1", "creating the backend did not load them (is the probe blind?)"


@rig
def test_list_readers(pcscd_rig: PcscdRig, worker: PyscardWorker) -> None:
    context = worker.call("establish_context")
    assert worker.call("list_readers", context) == pcscd_rig.reader_names
    worker.call("release_context", context)
    assert rv_of(worker, "list_readers", context) == RC.SCARD_E_INVALID_HANDLE


@rig
def test_connect_transmit_status_disconnect(pcscd_rig: PcscdRig, worker: PyscardWorker) -> None:
    full, empty = pcscd_rig.reader_names[:2]
    context = worker.call("establish_context")
    assert rv_of(worker, "connect", context, "no such reader", SHARED, ANY) == (
        RC.SCARD_E_UNKNOWN_READER
    )
    assert rv_of(worker, "connect", context, empty, SHARED, ANY) == RC.SCARD_E_NO_SMARTCARD
    assert rv_of(worker, "connect", context, full, SHARED, T0) == RC.SCARD_E_PROTO_MISMATCH
    card, protocol = worker.call("connect", context, full, SHARED, ANY)
    assert protocol == T1

    assert worker.call("transmit", card, T1, SELECT_APP) == OK
    assert worker.call("transmit", card, T1, ECHO_123) == b"\x01\x02\x03" + OK
    assert worker.call("transmit", card, Protocol.ANY_OLD, ECHO_123) == b"\x01\x02\x03" + OK
    assert rv_of(worker, "transmit", card, T0, SELECT_APP) == RC.SCARD_E_PROTO_MISMATCH
    assert rv_of(worker, "transmit", card, 0, SELECT_APP) == RC.SCARD_E_PROTO_MISMATCH

    status = worker.call("status", card)
    assert status.reader == full
    assert status.state == (1 << 16) | CARD_READY  # the rig inserted the card once
    assert status.protocol == T1
    assert status.atr == DEFAULT_ATR

    # vpcd knows the IFD tag for the ATR but not the PC/SC attribute, nor any control code.
    assert worker.call("get_attrib", card, TAG_IFD_ATR) == DEFAULT_ATR
    assert rv_of(worker, "get_attrib", card, SCARD_ATTR_ATR_STRING) == (
        RC.SCARD_E_UNSUPPORTED_FEATURE
    )
    assert rv_of(worker, "control", card, CM_IOCTL_GET_FEATURE_REQUEST, b"") == (
        RC.SCARD_E_UNSUPPORTED_FEATURE
    )

    worker.call("disconnect", card, LEAVE)
    assert rv_of(worker, "transmit", card, T1, SELECT_APP) == RC.SCARD_E_INVALID_HANDLE
    assert rv_of(worker, "status", 0) == RC.SCARD_E_INVALID_HANDLE  # pyscard itself chokes on 0
    worker.call("release_context", context)


@rig
def test_get_status_change_sees_insertion_and_removal(
    pcscd_rig: PcscdRig, worker: PyscardWorker
) -> None:
    reader = pcscd_rig.reader_names[1]
    context = worker.call("establish_context")
    empty, pnp = worker.call(
        "get_status_change", context, 0, [ReaderState(reader), ReaderState(PNP_NOTIFICATION)]
    )
    assert empty.event_state == State.CHANGED | State.EMPTY
    assert pnp.reader == PNP_NOTIFICATION

    wait = worker.submit("get_status_change", context, INFINITE, [known(empty), pnp])
    assert not wait.done(STILL_BLOCKED)
    pcscd_rig.insert_card(1)
    inserted, _ = wait.result()
    assert inserted.event_state == (1 << 16) | State.CHANGED | State.PRESENT
    assert inserted.atr == DEFAULT_ATR

    wait = worker.submit("get_status_change", context, 10_000, [known(inserted)])
    assert not wait.done(STILL_BLOCKED)
    pcscd_rig.remove_card(1)
    (removed,) = wait.result()
    assert removed.event_state == (2 << 16) | State.CHANGED | State.EMPTY
    assert removed.atr == b""

    # pcscd 1.9.9: the PnP pseudo-reader changes only when readers come or go.
    assert rv_of(worker, "get_status_change", context, 100, [ReaderState(PNP_NOTIFICATION)]) == (
        RC.SCARD_E_TIMEOUT
    )
    assert rv_of(worker, "get_status_change", context, 0, [ReaderState("nope")]) == (
        RC.SCARD_E_UNKNOWN_READER
    )


@rig
def test_cancel_ends_a_status_change_wait(pcscd_rig: PcscdRig, worker: PyscardWorker) -> None:
    context = worker.call("establish_context")
    (state,) = worker.call(
        "get_status_change", context, 0, [ReaderState(pcscd_rig.reader_names[0])]
    )
    wait = worker.submit("get_status_change", context, INFINITE, [known(state)])
    assert not wait.done(STILL_BLOCKED)
    worker.call("cancel", context)
    with pytest.raises(PCSCError) as info:
        wait.result()
    assert info.value.rv == RC.SCARD_E_CANCELLED


@rig
def test_transaction_blocks_another_context(pcscd_rig: PcscdRig, worker: PyscardWorker) -> None:
    reader = pcscd_rig.reader_names[0]
    first, second = worker.call("establish_context"), worker.call("establish_context")
    owner, _ = worker.call("connect", first, reader, SHARED, T1)
    other, _ = worker.call("connect", second, reader, SHARED, T1)
    worker.call("begin_transaction", owner)
    begin = worker.submit("begin_transaction", other)
    assert not begin.done(STILL_BLOCKED)  # libpcsclite retries it in any case
    # The backend loads libpcsclite with PCSCLITE_NO_BLOCKING: transmit, status and reconnect
    # hand the violation back at once (the guest's own libpcsclite retries), and control is
    # never retried.
    assert rv_of(worker, "transmit", other, T1, ECHO_123) == RC.SCARD_E_SHARING_VIOLATION
    assert rv_of(worker, "status", other) == RC.SCARD_E_SHARING_VIOLATION
    assert rv_of(worker, "control", other, CM_IOCTL_GET_FEATURE_REQUEST, b"") == (
        RC.SCARD_E_SHARING_VIOLATION
    )
    assert worker.call("transmit", owner, T1, SELECT_APP) == OK
    worker.call("end_transaction", owner, LEAVE)
    begin.result()
    assert worker.call("transmit", other, T1, ECHO_123) == b"\x01\x02\x03" + OK
    worker.call("end_transaction", other, LEAVE)
    assert rv_of(worker, "end_transaction", other, LEAVE) == RC.SCARD_E_NOT_TRANSACTED


@rig
def test_card_events_reach_handles_until_reconnect(
    pcscd_rig: PcscdRig, worker: PyscardWorker
) -> None:
    reader = pcscd_rig.reader_names[0]
    context = worker.call("establish_context")
    mine, _ = worker.call("connect", context, reader, SHARED, T1)
    other, _ = worker.call("connect", context, reader, SHARED, T1)
    worker.call("disconnect", other, RESET)
    # Told on every call, not once, until SCardReconnect acknowledges it.
    assert rv_of(worker, "transmit", mine, T1, SELECT_APP) == RC.SCARD_W_RESET_CARD
    assert rv_of(worker, "transmit", mine, T1, SELECT_APP) == RC.SCARD_W_RESET_CARD
    assert worker.call("reconnect", mine, SHARED, T1, LEAVE) == T1
    assert worker.call("transmit", mine, T1, SELECT_APP) == OK
    pcscd_rig.remove_card(0)
    assert rv_of(worker, "transmit", mine, T1, SELECT_APP) == RC.SCARD_W_REMOVED_CARD
    assert rv_of(worker, "reconnect", mine, SHARED, T1, LEAVE) == RC.SCARD_E_NO_SMARTCARD


@rig
def test_blocking_calls_release_the_gil(pcscd_rig: PcscdRig, worker: PyscardWorker) -> None:
    context = worker.call("establish_context")
    (state,) = worker.call(
        "get_status_change", context, 0, [ReaderState(pcscd_rig.reader_names[0])]
    )
    probe = worker.call("probe_gil", context, 600, [known(state)])
    assert probe["rv"] == RC.SCARD_E_TIMEOUT and probe["seconds"] >= 0.5
    # A call holding the GIL would let the spinning thread run next to nothing.
    assert probe["rate_during_wait"] > 0.25 * probe["reference_rate"], probe


# --- without the rig ----------------------------------------------------------------------------
WIN_TIMEOUT = RC.SCARD_E_TIMEOUT - 2**32  # a C LONG of 32 bits, as on Windows


def fake_scard(calls: list[tuple[object, ...]]) -> types.ModuleType:
    """A stand-in for smartcard.scard answering as pyscard does on Windows (signed LONGs)."""
    scard: Any = types.ModuleType("smartcard.scard")
    scard.SCARD_SCOPE_USER = 0
    scard.SCARD_PCI_T0, scard.SCARD_PCI_T1, scard.SCARD_PCI_RAW = 1, 2, 4

    def record(name: str, reply: object) -> Callable[..., object]:
        def function(*args: object) -> object:
            calls.append((name, *args))
            return reply

        return function

    scard.SCardEstablishContext = record("SCardEstablishContext", [0, 7])
    scard.SCardGetStatusChange = record(
        "SCardGetStatusChange", [0, [("R", -(2**16) + 0x22, [0x3B, 0x00])]]
    )
    scard.SCardTransmit = record("SCardTransmit", [WIN_TIMEOUT, []])
    scard.SCardCancel = record("SCardCancel", 0)
    scard.SCardReleaseContext = record("SCardReleaseContext", 0)
    return scard


def test_results_are_normalised_to_unsigned(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    package = types.ModuleType("smartcard")
    package.scard = fake_scard(calls)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "smartcard", package)
    monkeypatch.setitem(sys.modules, "smartcard.scard", package.scard)  # type: ignore[attr-defined]
    monkeypatch.delenv("PCSCLITE_NO_BLOCKING", raising=False)
    seen: list[str | None] = []
    establish = package.scard.SCardEstablishContext  # type: ignore[attr-defined]
    package.scard.SCardEstablishContext = lambda *args: (  # type: ignore[attr-defined]
        seen.append(os.environ.get("PCSCLITE_NO_BLOCKING")) or establish(*args)
    )
    backend = PyscardBackend()
    # libpcsclite's first establish (at creation) saw PCSCLITE_NO_BLOCKING; nothing else will.
    assert seen == ["1"] and "PCSCLITE_NO_BLOCKING" not in os.environ
    assert backend.establish_context() == 7
    (state,) = backend.get_status_change(7, INFINITE, [ReaderState("R", 0xFFFF0010)])
    assert state.event_state == 0xFFFF0022  # counter 0xFFFF, CHANGED | PRESENT
    assert state.atr == b"\x3b\x00"
    assert calls[-1] == ("SCardGetStatusChange", 7, 0xFFFFFFFF, [("R", 0xFFFF0010)])
    with pytest.raises(PCSCError) as info:
        backend.transmit(9, T1, b"\x00\xa4")
    assert info.value.rv == RC.SCARD_E_TIMEOUT
    assert calls[-1] == ("SCardTransmit", 9, 2, [0x00, 0xA4])
    with pytest.raises(PCSCError) as info:
        backend.transmit(9, ANY, b"\x00\xa4")  # 3 is no send PCI
    assert info.value.rv == RC.SCARD_E_PROTO_MISMATCH
    with pytest.raises(PCSCError) as info:
        backend.cancel(0)  # pyscard would raise SystemError for 0
    assert info.value.rv == RC.SCARD_E_INVALID_HANDLE
    assert calls[-1][0] == "SCardTransmit"


def test_the_gil_probe_sees_a_call_that_holds_the_gil() -> None:
    libc_keeping_the_gil = ctypes.PyDLL(None)  # PyDLL does not release the GIL in calls
    reference = spin_during(lambda: time.sleep(0.3))
    holding = spin_during(lambda: libc_keeping_the_gil.usleep(300_000))
    assert holding < 0.25 * reference
