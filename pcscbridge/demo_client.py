"""The demo's client: an ordinary pyscard program, run with PCSCLITE_CSOCK_NAME pointing at the
guest server. It prints what it does; the demo reacts to its "waiting for" lines."""

from __future__ import annotations

import sys
import time

WAITING_FOR_REMOVAL = "waiting for the card to be removed"
WAITING_FOR_INSERTION = "waiting for a card to be inserted"
AID = bytes.fromhex("F0") + b"pcscbridge"


def hexs(data: bytes | list[int]) -> str:
    return bytes(data).hex(" ").upper()


def main() -> int:
    from smartcard import scard  # loads libpcsclite, which reads PCSCLITE_CSOCK_NAME now

    def check(what: str, hresult: int) -> None:
        if hresult != scard.SCARD_S_SUCCESS:
            print(f"  {what} failed: {scard.SCardGetErrorMessage(hresult)}", flush=True)
            raise SystemExit(1)

    def say(text: str) -> None:
        print(f"  {text}", flush=True)

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    check("SCardEstablishContext", hresult)
    hresult, readers = scard.SCardListReaders(context, [])
    check("SCardListReaders", hresult)
    say(f"SCardListReaders -> {readers}")
    reader = readers[0]

    hresult, card, protocol = scard.SCardConnect(
        context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    )
    check("SCardConnect", hresult)
    say(f"SCardConnect({reader!r}, SHARED) -> T={0 if protocol == 1 else 1}")
    hresult, _name, _state, protocol, atr = scard.SCardStatus(card)
    check("SCardStatus", hresult)
    say(f"SCardStatus -> ATR {hexs(atr)}")

    pci = scard.SCARD_PCI_T1 if protocol == scard.SCARD_PROTOCOL_T1 else scard.SCARD_PCI_T0
    for label, apdu in [
        ("SELECT the application by AID", bytes([0x00, 0xA4, 0x04, 0x0C, len(AID)]) + AID),
        ("SELECT EF 0101", bytes.fromhex("00 A4 02 0C 02 01 01")),
        ("READ BINARY 32 bytes", bytes.fromhex("00 B0 00 00 20")),
        ("GET CHALLENGE 8 bytes", bytes.fromhex("00 84 00 00 08")),
    ]:
        hresult, response = scard.SCardTransmit(card, pci, list(apdu))
        check("SCardTransmit", hresult)
        say(f"{label}: {hexs(apdu)} -> {hexs(response)}")
    check("SCardDisconnect", scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD))

    for wanted, waiting in [
        (scard.SCARD_STATE_EMPTY, WAITING_FOR_REMOVAL),
        (scard.SCARD_STATE_PRESENT, WAITING_FOR_INSERTION),
    ]:
        hresult, states = scard.SCardGetStatusChange(context, 0, [(reader, 0)])
        check("SCardGetStatusChange", hresult)
        current = states[0][1]
        say(f"{waiting} (SCardGetStatusChange on {reader!r}) ...")
        started = time.monotonic()
        while not current & wanted:
            hresult, states = scard.SCardGetStatusChange(context, 10_000, [(reader, current)])
            check("SCardGetStatusChange", hresult)
            current = states[0][1] & ~scard.SCARD_STATE_CHANGED
        elapsed = (time.monotonic() - started) * 1000
        atr = states[0][2]
        what = (
            f"card present, ATR {hexs(atr)}"
            if current & scard.SCARD_STATE_PRESENT
            else ("reader empty")
        )
        say(f"  -> {what} (seen after {elapsed:.0f} ms, event counter {current >> 16})")

    check("SCardReleaseContext", scard.SCardReleaseContext(context))
    say("SCardReleaseContext -> done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
