"""Small pyscard programs that tests and benchmarks run as child processes.

libpcsclite reads PCSCLITE_CSOCK_NAME once per process, so each program runs in its own process
against whichever socket (a rig's pcscd, or the bridge's guest server) its environment names.

    python -m rig.pcsc_programs PROGRAM [ARGS...]

Programs print one JSON object per line (results) or plain marker lines (for coordination).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

APP_AID = bytes.fromhex("F0") + b"pcscbridge"
SELECT_APP = bytes([0x00, 0xA4, 0x04, 0x0C, len(APP_AID)]) + APP_AID
CM_IOCTL_GET_FEATURE_REQUEST = 0x42000D48
SCARD_ATTR_ATR_STRING = 0x00090303


def _scard() -> Any:
    from smartcard import scard

    return scard


def _check(what: str, hresult: int) -> None:
    if hresult != 0:
        raise SystemExit(f"{what} failed: 0x{hresult & 0xFFFFFFFF:08X}")


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _connect(scard: Any, reader: str, share: int | None = None) -> tuple[Any, Any, Any]:
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _check("SCardEstablishContext", hresult)
    hresult, card, protocol = scard.SCardConnect(
        context,
        reader,
        share or scard.SCARD_SHARE_SHARED,
        scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
    )
    _check("SCardConnect", hresult)
    pci = scard.SCARD_PCI_T1 if protocol == scard.SCARD_PROTOCOL_T1 else scard.SCARD_PCI_T0
    return context, card, pci


def _transmit(scard: Any, card: Any, pci: Any, apdu: bytes) -> bytes:
    hresult, response = scard.SCardTransmit(card, pci, list(apdu))
    _check("SCardTransmit", hresult)
    return bytes(response)


def full(reader: str) -> int:
    """Every call a client can make, with results that must equal pcscd's (randomness aside)."""
    scard = _scard()
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _check("SCardEstablishContext", hresult)
    hresult, readers = scard.SCardListReaders(context, [])
    _emit(call="SCardListReaders", rv=hresult, readers=readers)
    hresult, states = scard.SCardGetStatusChange(context, 0, [(r, 0) for r in readers])
    _emit(
        call="SCardGetStatusChange",
        rv=hresult,
        states=[[n, s & ~scard.SCARD_STATE_CHANGED & 0xFFFF, bytes(a).hex()] for n, s, a in states],
    )
    hresult, card, protocol = scard.SCardConnect(
        context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    )
    _emit(call="SCardConnect", rv=hresult, protocol=protocol)
    pci = scard.SCARD_PCI_T1
    hresult, name, state, protocol, atr = scard.SCardStatus(card)
    _emit(
        call="SCardStatus",
        rv=hresult,
        reader=name,
        state=state & 0xFFFF,
        protocol=protocol,
        atr=bytes(atr).hex(),
    )
    for label, apdu in [
        ("select app", SELECT_APP),
        ("select 0102", bytes.fromhex("00A4020C020102")),
        ("read 4 KiB", bytes.fromhex("00B00000000000")),
        ("select 0103", bytes.fromhex("00A4020C020103")),
        ("read 60 KiB", bytes.fromhex("00B00000000000")),
        ("respond 4096", bytes.fromhex("80121000")),
        (
            "echo 60000",
            bytes.fromhex("80100000 00")
            + (60000).to_bytes(2, "big")
            + bytes(i & 0xFF for i in range(60000)),
        ),
        ("unknown ins", bytes.fromhex("00FF0000")),
        ("status word", bytes.fromhex("80146A88")),
    ]:
        hresult, response = scard.SCardTransmit(card, pci, list(apdu))
        _emit(
            call="SCardTransmit",
            what=label,
            rv=hresult,
            length=len(response),
            head=bytes(response[:16]).hex(),
            tail=bytes(response[-4:]).hex(),
        )
    hresult, response = scard.SCardTransmit(card, pci, list(bytes.fromhex("0084000008")))
    _emit(
        call="SCardTransmit",
        what="challenge",
        rv=hresult,
        length=len(response),
        sw=bytes(response[-2:]).hex(),
    )
    hresult, value = scard.SCardGetAttrib(card, SCARD_ATTR_ATR_STRING)
    _emit(call="SCardGetAttrib", rv=hresult, value=bytes(value).hex())
    hresult, response = scard.SCardControl(card, CM_IOCTL_GET_FEATURE_REQUEST, [])
    _emit(call="SCardControl", rv=hresult & 0xFFFFFFFF, length=len(response))
    _emit(call="SCardBeginTransaction", rv=scard.SCardBeginTransaction(card))
    _emit(call="SCardEndTransaction", rv=scard.SCardEndTransaction(card, scard.SCARD_LEAVE_CARD))
    hresult, protocol = scard.SCardReconnect(
        card, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1, scard.SCARD_RESET_CARD
    )
    _emit(call="SCardReconnect", rv=hresult, protocol=protocol)
    _emit(call="SCardDisconnect", rv=scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD))
    hresult, card, protocol = scard.SCardConnect(
        context, reader, scard.SCARD_SHARE_EXCLUSIVE, scard.SCARD_PROTOCOL_T1
    )
    _emit(call="SCardConnect exclusive", rv=hresult, protocol=protocol)
    _emit(call="SCardDisconnect", rv=scard.SCardDisconnect(card, scard.SCARD_RESET_CARD))
    hresult, card, protocol = scard.SCardConnect(
        context, "No Such Reader 00 00", scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
    )
    _emit(call="SCardConnect unknown", rv=hresult & 0xFFFFFFFF)
    _emit(call="SCardReleaseContext", rv=scard.SCardReleaseContext(context))
    return 0


def session(reader: str, reads: str = "20") -> int:
    """A typical application session: establish, list, connect, select, N READ BINARY, release."""
    scard = _scard()
    started = time.perf_counter()
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _check("SCardEstablishContext", hresult)
    hresult, _readers = scard.SCardListReaders(context, [])
    _check("SCardListReaders", hresult)
    hresult, card, _protocol = scard.SCardConnect(
        context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    )
    _check("SCardConnect", hresult)
    pci = scard.SCARD_PCI_T1
    ok = _transmit(scard, card, pci, SELECT_APP) == b"\x90\x00"
    ok &= _transmit(scard, card, pci, bytes.fromhex("00A4020C020101")) == b"\x90\x00"
    for _ in range(int(reads)):
        ok &= _transmit(scard, card, pci, bytes.fromhex("00B0000020"))[-2:] == b"\x90\x00"
    _check("SCardDisconnect", scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD))
    _check("SCardReleaseContext", scard.SCardReleaseContext(context))
    _emit(ok=ok, seconds=time.perf_counter() - started)
    return 0 if ok else 1


def hold_transaction(reader: str) -> int:
    """Connect, begin a transaction, say LOCKED, end it when a line arrives on stdin."""
    scard = _scard()
    context, card, _ = _connect(scard, reader)
    _check("SCardBeginTransaction", scard.SCardBeginTransaction(card))
    print("LOCKED", flush=True)
    sys.stdin.readline()
    _check("SCardEndTransaction", scard.SCardEndTransaction(card, scard.SCARD_LEAVE_CARD))
    print("UNLOCKED", flush=True)
    sys.stdin.readline()
    scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(context)
    return 0


def begin_transaction(reader: str) -> int:
    """Connect, say CONNECTED, begin a transaction (may block), say BEGUN, hold until stdin."""
    scard = _scard()
    _context, card, _pci = _connect(scard, reader)
    print("CONNECTED", flush=True)
    _check("SCardBeginTransaction", scard.SCardBeginTransaction(card))
    print("BEGUN", flush=True)
    sys.stdin.readline()
    return 0


def echo_loop(reader: str, tag: str, count: str) -> int:
    """Transmit ECHO with data unique to this client `count` times; check every answer."""
    scard = _scard()
    context, card, pci = _connect(scard, reader)
    wrong = 0
    for index in range(int(count)):
        data = f"{tag}:{index}".encode()
        apdu = bytes([0x80, 0x10, 0x00, 0x00, len(data)]) + data
        if _transmit(scard, card, pci, apdu) != data + b"\x90\x00":
            wrong += 1
    scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(context)
    _emit(tag=tag, count=int(count), wrong=wrong)
    return 0 if wrong == 0 else 1


def echo_until_line(reader: str, tag: str) -> int:
    """Say RUNNING, then transmit ECHO (data unique to this client) until a line arrives on
    stdin; check every answer and report how many."""
    scard = _scard()
    context, card, pci = _connect(scard, reader)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("RUNNING", flush=True)
    count = wrong = 0
    while not stop.is_set():
        data = f"{tag}:{count}".encode()
        apdu = bytes([0x80, 0x10, 0x00, 0x00, len(data)]) + data
        wrong += _transmit(scard, card, pci, apdu) != data + b"\x90\x00"
        count += 1
    scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(context)
    _emit(tag=tag, count=count, wrong=wrong)
    return 0 if wrong == 0 else 1


def select_hold_read(reader: str, fid: str) -> int:
    """In a transaction: select EF `fid` of the test application, say LOCKED, and when a line
    arrives on stdin read 32 bytes of it and end the transaction. Another client that slipped a
    SELECT in between would make the read return another file's bytes."""
    scard = _scard()
    context, card, pci = _connect(scard, reader)
    _check("SCardBeginTransaction", scard.SCardBeginTransaction(card))
    selected = _transmit(scard, card, pci, SELECT_APP)
    selected += _transmit(scard, card, pci, bytes.fromhex("00A4020C02") + bytes.fromhex(fid))
    print("LOCKED", flush=True)
    sys.stdin.readline()
    read = _transmit(scard, card, pci, bytes.fromhex("00B0000020"))
    _check("SCardEndTransaction", scard.SCardEndTransaction(card, scard.SCARD_LEAVE_CARD))
    scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(context)
    _emit(selected=selected.hex(), read=read.hex())
    return 0


def long_lived(reader: str) -> int:
    """Establish a context, say READY, and on each stdin line list readers and transmit."""
    scard = _scard()
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _check("SCardEstablishContext", hresult)
    print("READY", flush=True)
    for _ in sys.stdin:
        hresult, readers = scard.SCardListReaders(context, [])
        result: dict[str, Any] = {"list_rv": hresult & 0xFFFFFFFF, "readers": readers or []}
        if hresult == 0 and reader in readers:
            hresult, card, _protocol = scard.SCardConnect(
                context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
            )
            result["connect_rv"] = hresult & 0xFFFFFFFF
            if hresult == 0:
                hresult, response = scard.SCardTransmit(card, scard.SCARD_PCI_T1, list(SELECT_APP))
                result["transmit_rv"] = hresult & 0xFFFFFFFF
                result["response"] = bytes(response).hex()
                scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
        _emit(**result)
    return 0


def card_after_reset(reader: str) -> int:
    """Connect, say CONNECTED; on a stdin line, report SCardStatus's rv (W_RESET_CARD?) and
    whether a transaction can be begun now."""
    scard = _scard()
    _context, card, _pci = _connect(scard, reader)
    print("CONNECTED", flush=True)
    sys.stdin.readline()
    hresult, *_ = scard.SCardStatus(card)
    status_rv = hresult & 0xFFFFFFFF
    begin_rv = scard.SCardBeginTransaction(card) & 0xFFFFFFFF
    _emit(status_rv=status_rv, begin_rv=begin_rv)
    return 0


def connect_retry(reader: str, seconds: str = "30") -> int:
    """Connect SHARED, retrying while the reader is held EXCLUSIVE (SCARD_E_SHARING_VIOLATION),
    as a user trying again would; say CONNECTED, then transmit a SELECT and say OK."""
    scard = _scard()
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _check("SCardEstablishContext", hresult)
    deadline = time.monotonic() + float(seconds)
    while True:
        hresult, card, _ = scard.SCardConnect(
            context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
        )
        if hresult != scard.SCARD_E_SHARING_VIOLATION or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    _check("SCardConnect", hresult)
    print("CONNECTED", flush=True)
    ok = _transmit(scard, card, scard.SCARD_PCI_T1, SELECT_APP) == b"\x90\x00"
    print("OK" if ok else "FAILED", flush=True)
    scard.SCardReleaseContext(context)
    return 0


def pin_paths(reader: str, pin: str, new_pin: str, puk: str, control_code: str) -> int:
    """Send a PIN every way an application can: VERIFY, CHANGE REFERENCE DATA (to new_pin and
    back), RESET RETRY COUNTER, and SCardControl with PC/SC part 10 PIN verify and modify
    structures carrying it. Prints each step's return code and status word."""
    scard = _scard()
    context, card, pci = _connect(scard, reader)

    def padded(value: str) -> bytes:
        return value.encode().ljust(8, b"\xff")

    steps = [
        ("verify", bytes.fromhex("0020008008") + padded(pin)),
        ("change", bytes.fromhex("0024008010") + padded(pin) + padded(new_pin)),
        ("change back", bytes.fromhex("0024008010") + padded(new_pin) + padded(pin)),
        ("reset retry counter", bytes.fromhex("002C008010") + padded(puk) + padded(pin)),
    ]
    for what, apdu in steps:
        hresult, response = scard.SCardTransmit(card, pci, list(apdu))
        _emit(step=what, rv=hresult & 0xFFFFFFFF, sw=bytes(response[-2:]).hex())
    # PIN_VERIFY_STRUCTURE / PIN_MODIFY_STRUCTURE (abData at 19 / 24) with the PIN in abData.
    verify = bytes(15) + (13).to_bytes(4, "little") + steps[0][1]
    modify = bytes(20) + (21).to_bytes(4, "little") + steps[1][1]
    for what, data in (("pin pad verify", verify), ("pin pad modify", modify)):
        hresult, _ = scard.SCardControl(card, int(control_code, 0), list(data))
        _emit(step=what, rv=hresult & 0xFFFFFFFF)
    scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(context)
    return 0


PROGRAMS: dict[str, Callable[..., int]] = {
    "full": full,
    "session": session,
    "hold-transaction": hold_transaction,
    "begin-transaction": begin_transaction,
    "echo-loop": echo_loop,
    "echo-until-line": echo_until_line,
    "select-hold-read": select_hold_read,
    "long-lived": long_lived,
    "card-after-reset": card_after_reset,
    "connect-retry": connect_retry,
    "pin-paths": pin_paths,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PROGRAMS:
        print(f"usage: pcsc_programs {{{','.join(PROGRAMS)}}} ARGS...", file=sys.stderr)
        return 2
    return PROGRAMS[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON results a program printed, skipping marker lines."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_full_results_match(direct_stdout: str, bridged_stdout: str) -> list[dict[str, Any]]:
    """`full` through the bridge must give pcscd's results; returns the bridged results."""
    expected, got = json_lines(direct_stdout), json_lines(bridged_stdout)
    assert len(expected) > 15, direct_stdout
    for want, have in zip(expected, got, strict=True):
        if want["call"] == "SCardGetStatusChange":
            # The guest does not mirror the host's exact handle count (the API only says
            # "in use"): compare presence, ATR and the event counter.
            want["states"] = [[n, s & ~0x100, a] for n, s, a in want["states"]]
            have["states"] = [[n, s & ~0x100, a] for n, s, a in have["states"]]
        assert have == want
    by_call = {(r["call"], r.get("what")): r for r in got}
    assert by_call[("SCardTransmit", "echo 60000")]["length"] == 60002
    assert by_call[("SCardTransmit", "read 60 KiB")]["length"] == 61442
    return got
