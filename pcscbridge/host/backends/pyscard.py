"""The host's own PC/SC stack (pcsc-lite, WinSCard, macOS) through pyscard's smartcard.scard.

Every method is one PC/SC call; a non-zero result raises PCSCError with the unsigned 32-bit
code (pyscard hands back a C LONG: positive on Linux, negative on Windows and macOS).

Environment: libpcsclite reads PCSCLITE_CSOCK_NAME once, when the process first talks to
pcscd, and pyscard dlopens libpcsclite when `smartcard.scard` is imported. Set the variable
before the first PyscardBackend is created; one process reaches one pcscd. This module imports
pyscard only inside PyscardBackend(), so importing it loads nothing.

Sharing violations: libpcsclite retries SCardTransmit, SCardStatus and SCardReconnect every
100 ms while another handle holds the reader's transaction, unless PCSCLITE_NO_BLOCKING is set
when it loads. The host sets it: the violation then goes back to the guest, whose own
libpcsclite retries with its context free in between, exactly as a direct client does (two
threads of one guest context, one holding a transaction, no longer deadlock on the host).
SCardBeginTransaction retries in any case, unlocking its context between tries, so
disconnecting its card from another thread ends it (host/service.py HostContext.end_wait;
releasing the context from another thread is never safe: libpcsclite frees it under a call).

Blocking: pyscard releases the GIL around every SCard* call (SWIG %exception with
Py_BEGIN_ALLOW_THREADS; checked in tests/test_backend_pyscard.py), so a call blocked in
SCardGetStatusChange or SCardBeginTransaction in one worker thread does not stall the others.
libpcsclite serialises calls per context: while SCardGetStatusChange waits, every other call
on that context (connect, transmit on its handles, release) waits too; SCardCancel does not.
"""

from __future__ import annotations

import os
from typing import Any

from ...pcsc import PCSCError, Protocol, ReturnCode
from ..backend import CardStatus, ReaderState


def _check_handle(value: Any) -> int:
    # pyscard fails with a SystemError (NULL without an exception) for a handle of 0, and
    # with TypeError for a non-int: answer as pcsc-lite does for an unknown handle.
    if not isinstance(value, int) or isinstance(value, bool) or value == 0:
        raise PCSCError(ReturnCode.SCARD_E_INVALID_HANDLE)
    return value


class PyscardBackend:
    name = "pyscard"

    def __init__(self) -> None:
        # Loads libpcsclite (or winscard.dll / PCSC.framework) now, not at module import.
        from smartcard import scard

        _first_context_without_blocking(scard)

        self._scard: Any = scard
        # pyscard's SCardTransmit takes the PCI as the protocol number (SCARD_PCI_T0 == 1...).
        self._pci = {
            int(Protocol.T0): scard.SCARD_PCI_T0,
            int(Protocol.T1): scard.SCARD_PCI_T1,
            int(Protocol.RAW): scard.SCARD_PCI_RAW,
        }

    # --- contexts ---------------------------------------------------------------------------
    def establish_context(self) -> int:
        return self._call("SCardEstablishContext", self._scard.SCARD_SCOPE_USER)

    def release_context(self, context: int) -> None:
        self._call("SCardReleaseContext", _check_handle(context))

    def list_readers(self, context: int) -> list[str]:
        return list(self._call("SCardListReaders", _check_handle(context), []))

    def get_status_change(
        self, context: int, timeout_ms: int, states: list[ReaderState]
    ) -> list[ReaderState]:
        # pyscard copies an ATR given as third tuple item into a 36-byte array without a
        # bound check; SCardGetStatusChange never reads it, so it is not passed.
        request = [(state.reader, state.current_state & 0xFFFFFFFF) for state in states]
        result = self._call(
            "SCardGetStatusChange", _check_handle(context), timeout_ms & 0xFFFFFFFF, request
        )
        return [
            ReaderState(state.reader, state.current_state, event & 0xFFFFFFFF, bytes(atr))
            for state, (_, event, atr) in zip(states, result, strict=True)
        ]

    def cancel(self, context: int) -> None:
        self._call("SCardCancel", _check_handle(context))

    # --- card handles -----------------------------------------------------------------------
    def connect(
        self, context: int, reader: str, share_mode: int, preferred_protocols: int
    ) -> tuple[int, int]:
        hresult, card, protocol = self._raw(
            "SCardConnect", _check_handle(context), reader, share_mode, preferred_protocols
        )
        if hresult:
            # libpcsclite copies pcscd's active protocol out whatever the result: not 0 when
            # the card's protocol was settled before the failure (pcscd leaves it otherwise).
            raise PCSCError(hresult & 0xFFFFFFFF, "SCardConnect", result=protocol or None)
        return card, protocol

    def reconnect(
        self, card: int, share_mode: int, preferred_protocols: int, initialization: int
    ) -> int:
        hresult, protocol = self._raw(
            "SCardReconnect", _check_handle(card), share_mode, preferred_protocols, initialization
        )
        if hresult:
            raise PCSCError(hresult & 0xFFFFFFFF, "SCardReconnect", result=protocol or None)
        return int(protocol)

    def disconnect(self, card: int, disposition: int) -> None:
        self._call("SCardDisconnect", _check_handle(card), disposition)

    def begin_transaction(self, card: int) -> None:
        self._call("SCardBeginTransaction", _check_handle(card))

    def end_transaction(self, card: int, disposition: int) -> None:
        self._call("SCardEndTransaction", _check_handle(card), disposition)

    def status(self, card: int) -> CardStatus:
        reader, state, protocol, atr = self._call("SCardStatus", _check_handle(card))
        return CardStatus(reader, state & 0xFFFFFFFF, protocol, bytes(atr))

    def transmit(self, card: int, protocol: int, command: bytes) -> bytes:
        card = _check_handle(card)
        if protocol == Protocol.ANY_OLD:
            # pcscd sends with the card's protocol; pyscard has no PCI for ANY_OLD.
            protocol = self.status(card).protocol
        pci = self._pci.get(protocol)
        if pci is None:
            # pcscd's answer to a send PCI that is not the card's protocol (pyscard itself
            # would map 0 to RAW and refuse the rest with SCARD_E_INVALID_PARAMETER).
            raise PCSCError(ReturnCode.SCARD_E_PROTO_MISMATCH, f"send PCI protocol {protocol}")
        return bytes(self._call("SCardTransmit", card, pci, list(command)))

    def control(self, card: int, control_code: int, data: bytes) -> bytes:
        return bytes(self._call("SCardControl", _check_handle(card), control_code, list(data)))

    def get_attrib(self, card: int, attr_id: int) -> bytes:
        return bytes(self._call("SCardGetAttrib", _check_handle(card), attr_id))

    def set_attrib(self, card: int, attr_id: int, value: bytes) -> None:
        self._call("SCardSetAttrib", _check_handle(card), attr_id, list(value))

    def close(self) -> None:
        """Nothing to free: contexts are released by the agent, the library stays loaded."""

    # --- plumbing ---------------------------------------------------------------------------
    def _raw(self, function: str, *args: Any) -> Any:
        """Calls scard.<function>; returns what pyscard returns, hresult first."""
        try:
            return getattr(self._scard, function)(*args)
        except (TypeError, ValueError, OverflowError, UnicodeError, SystemError) as exc:
            # Arguments pyscard cannot convert (a reader name outside ASCII, a negative
            # value): the PC/SC call was never made.
            raise PCSCError(ReturnCode.SCARD_E_INVALID_PARAMETER, f"{function}: {exc}") from exc

    def _call(self, function: str, *args: Any) -> Any:
        """Calls scard.<function>; returns its results after the hresult (one value bare)."""
        result = self._raw(function, *args)
        if isinstance(result, list | tuple):
            hresult, values = result[0], tuple(result[1:])
        else:
            hresult, values = result, ()
        if hresult != 0:
            raise PCSCError(hresult & 0xFFFFFFFF, function)
        if not values:
            return None
        return values[0] if len(values) == 1 else values


def _first_context_without_blocking(scard: Any) -> None:
    """libpcsclite reads PCSCLITE_NO_BLOCKING once, in the process's first
    SCardEstablishContext (whether or not pcscd answers). Set it for that call only, so the
    processes the host starts (an SSH ProxyCommand, ...) do not inherit it."""
    previous = os.environ.get("PCSCLITE_NO_BLOCKING")
    os.environ["PCSCLITE_NO_BLOCKING"] = "1"
    try:
        rv, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if rv == 0:
            scard.SCardReleaseContext(context)
    finally:
        if previous is None:
            del os.environ["PCSCLITE_NO_BLOCKING"]
        else:
            os.environ["PCSCLITE_NO_BLOCKING"] = previous
