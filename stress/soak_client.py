"""A soak client process: THREADS pyscard clients (the real libpcsclite), each with its own
context, doing transactions, checked ECHOs, reconnects, status and event waits until DURATION
is over; prints one JSON line: operations, return codes, wrong answers.

    python -m stress.soak_client SEED DURATION THREADS READER [READER...]

Every answer must be right or a PC/SC error code: an ECHO answered with other data, or a code
pcsc-lite does not define, counts as wrong. One exception, counted apart: an ECHO answered
with no bytes and success. vpcd gives that when its card leaves mid-APDU, to clients of pcscd
itself as well (measured without the bridge: 38 of 190,000 transmits in 60 s of removals).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import Counter
from typing import Any

from pcscbridge.pcsc import ReturnCode

KNOWN = frozenset(int(rv) for rv in ReturnCode)


class Client:
    def __init__(self, scard: Any, rng: random.Random, readers: list[str], tag: str) -> None:
        self.scard = scard
        self.rng = rng
        self.readers = readers
        self.tag = tag
        self.codes: Counter[str] = Counter()
        self.ops = 0
        self.wrong: list[str] = []
        self.empty_answers = 0
        self.context: Any = None

    def code(self, what: str, hresult: int) -> int:
        rv = hresult & 0xFFFFFFFF
        self.ops += 1
        if rv not in KNOWN:
            self.wrong.append(f"{what}: unknown return code 0x{rv:08X}")
        elif rv:
            self.codes[f"{what}:{ReturnCode(rv).name}"] += 1
        return rv

    def echo(self, card: Any, pci: Any) -> int:
        data = f"{self.tag}:{self.ops}:".encode() + self.rng.randbytes(self.rng.randint(0, 40))
        apdu = [0x80, 0x10, 0x00, 0x00, len(data), *data]
        hresult, response = self.scard.SCardTransmit(card, pci, apdu)
        rv = self.code("transmit", hresult)
        if rv == 0 and not response:
            self.empty_answers += 1  # vpcd's own answer when the card left mid-APDU
        elif rv == 0 and bytes(response) != data + b"\x90\x00":
            self.wrong.append(f"echo of {data!r} answered {bytes(response)!r}")
        return rv

    def establish(self) -> None:
        scard = self.scard
        if self.context is not None:
            scard.SCardReleaseContext(self.context)
        hresult, self.context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if self.code("establish", hresult):
            self.context = None

    def session(self) -> None:
        """One connection to a reader: a few operations, then disconnect."""
        scard, rng = self.scard, self.rng
        if self.context is None:
            self.establish()
            if self.context is None:
                time.sleep(0.05)
                return
        reader = rng.choice(self.readers)
        hresult, card, protocol = scard.SCardConnect(
            self.context,
            reader,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        rv = self.code("connect", hresult)
        if rv:
            if rv in (ReturnCode.SCARD_E_INVALID_HANDLE, ReturnCode.SCARD_E_NO_SERVICE):
                self.establish()
            time.sleep(rng.random() * 0.05)
            return
        pci = scard.SCARD_PCI_T1 if protocol == scard.SCARD_PROTOCOL_T1 else scard.SCARD_PCI_T0
        for _ in range(rng.randint(1, 6)):
            roll = rng.random()
            if roll < 0.35:
                self.echo(card, pci)
            elif roll < 0.6:
                if self.code("begin", scard.SCardBeginTransaction(card)) == 0:
                    for _ in range(rng.randint(1, 3)):
                        self.echo(card, pci)
                    self.code("end", scard.SCardEndTransaction(card, scard.SCARD_LEAVE_CARD))
            elif roll < 0.7:
                hresult, *_ = scard.SCardStatus(card)
                self.code("status", hresult)
            elif roll < 0.8:
                hresult, protocol = scard.SCardReconnect(
                    card,
                    scard.SCARD_SHARE_SHARED,
                    scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
                    rng.choice((scard.SCARD_LEAVE_CARD, scard.SCARD_RESET_CARD)),
                )
                self.code("reconnect", hresult)
            else:
                hresult, _states = scard.SCardGetStatusChange(
                    self.context, rng.randint(0, 300), [(reader, scard.SCARD_STATE_UNAWARE)]
                )
                self.code("wait", hresult)
        self.code("disconnect", scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD))

    def run(self, until: float) -> None:
        try:
            while time.monotonic() < until:
                self.session()
        except Exception as exc:  # a client library crash in Python clothes counts as wrong
            self.wrong.append(f"{type(exc).__name__}: {exc}")
        finally:
            if self.context is not None:
                self.scard.SCardReleaseContext(self.context)


def main(argv: list[str]) -> int:
    seed, duration, threads, *readers = argv
    from smartcard import scard

    until = time.monotonic() + float(duration)
    clients = [
        Client(scard, random.Random(f"{seed}:{n}"), readers, f"{seed}.{n}")
        for n in range(int(threads))
    ]
    workers = [threading.Thread(target=c.run, args=(until,), daemon=True) for c in clients]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(float(duration) + 120)
    codes: Counter[str] = Counter()
    for client in clients:
        codes.update(client.codes)
    print(
        json.dumps(
            {
                "ops": sum(c.ops for c in clients),
                "codes": dict(codes),
                "wrong": [w for c in clients for w in c.wrong][:20],
                "wrong_count": sum(len(c.wrong) for c in clients),
                "empty_answers": sum(c.empty_answers for c in clients),
                "stuck": sum(worker.is_alive() for worker in workers),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
