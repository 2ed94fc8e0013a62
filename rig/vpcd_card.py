"""The test card program: a :class:`SimulatedCard` plugged into a vpcd virtual reader slot.

vpcd (vsmartcard's pcscd driver) listens on one TCP port per reader slot; a card is a TCP
client of that port: connected = inserted, closed = removed. Both directions use frames of a
2-byte big-endian length and a payload. From vpcd, a 1-byte payload is a control code
(0 power off, 1 power on, 2 reset, 4 "send your ATR" — the only one expecting a reply, the
ATR in a frame); a longer payload is a command APDU that expects the response APDU.

Latency: Debian's vpcd 3.3 writes length and payload with two sends and no TCP_NODELAY, so
with delayed ACKs every message stalls ~40 ms. This card sets TCP_NODELAY on its socket,
re-arms TCP_QUICKACK after every recv (Linux clears it again on its own), and writes each
frame with a single send: then an APDU costs ~0.1 ms instead of ~44 ms.

Library use (thread based, so plain scripts and trio tests alike can use it)::

    card = VpcdCard(port, SimulatedCard(label="A"))
    card.insert()      # connects; a background thread serves vpcd
    ...
    card.remove()      # closes the connection: vpcd reports the card removed

Program use: ``python -m rig.vpcd_card --port N [--label X]`` serves until
vpcd closes the connection or SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import struct
import threading
import time

from pcscbridge.host.backends.simcard import SimulatedCard, requested_delay
from pcscbridge.testing.rawclient import recv_exactly
from rig.service import Service

log = logging.getLogger(__name__)

VPCD_POWER_OFF = 0
VPCD_POWER_ON = 1
VPCD_RESET = 2
VPCD_GET_ATR = 4

MAX_FRAME = 0xFFFF  # the 2-byte length field
_SW_WRONG_LENGTH = b"\x67\x00"


class VpcdCard(Service):
    """One card in one vpcd slot (``port`` = the slot's TCP port)."""

    def __init__(
        self, port: int, card: SimulatedCard | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.port = port
        self.host = host
        self.card = card if card is not None else SimulatedCard()
        self.apdu_count = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VpcdCard(port={self.port}, card={self.card!r}, inserted={self.inserted})"

    @property
    def inserted(self) -> bool:
        """True while the connection to vpcd is open (vpcd may not have polled it yet)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def insert(self, timeout: float = 5.0) -> None:
        """Connect to vpcd; retries while the slot does not listen yet (pcscd still starting)."""
        with self._lock:
            if self.inserted:
                raise RuntimeError(f"card already inserted on port {self.port}")
            if self._sock is not None:  # vpcd closed the previous connection itself
                self._sock.close()
                self._sock = None
            deadline = time.monotonic() + timeout
            while True:
                try:
                    sock = socket.create_connection((self.host, self.port), timeout=timeout)
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)  # pcscd's driver opens the port shortly after start
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._thread = threading.Thread(
                target=self._serve, args=(sock,), name=f"vpcd-card-{self.port}", daemon=True
            )
            self._thread.start()

    def remove(self, timeout: float = 5.0) -> None:
        """Close the connection (card removed) and wait for the serving thread to end."""
        with self._lock:
            sock, thread = self._sock, self._thread
            self._sock = self._thread = None
            if sock is not None:
                # shutdown wakes the thread blocked in recv; close alone would not.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            if thread is not None:
                thread.join(timeout)
            if sock is not None:
                sock.close()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until vpcd closes the connection; True if it did."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def start(self) -> VpcdCard:
        """``with VpcdCard(...)`` inserts the card, and removes it at the end."""
        self.insert()
        return self

    def stop(self) -> None:
        self.remove()

    # -- the serving thread

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                header = _recv_exact(sock, 2)
                if header is None:
                    return
                (length,) = struct.unpack(">H", header)
                payload = _recv_exact(sock, length)
                if payload is None:
                    return
                reply = self._handle(payload)
                if reply is not None:
                    if len(reply) > MAX_FRAME:
                        reply = _SW_WRONG_LENGTH  # cannot be framed for vpcd
                    # One send per frame: a separate length send would invite Nagle stalls.
                    sock.sendall(struct.pack(">H", len(reply)) + reply)
        except OSError as exc:
            log.debug("vpcd card on port %d: connection ended: %s", self.port, exc)
        finally:
            log.debug("vpcd card on port %d: removed", self.port)

    def _handle(self, payload: bytes) -> bytes | None:
        if len(payload) == 1:
            code = payload[0]
            if code == VPCD_GET_ATR:
                return self.card.atr
            if code == VPCD_POWER_ON:
                self.card.power_on()
            elif code == VPCD_POWER_OFF:
                self.card.power_off()
            elif code == VPCD_RESET:
                self.card.reset()
            else:
                log.warning("vpcd card on port %d: unknown control code %d", self.port, code)
            return None
        self.apdu_count += 1
        delay = requested_delay(payload)
        if delay:
            time.sleep(delay)
        return self.card.process_apdu(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Read exactly n bytes; None on EOF. Re-arms TCP_QUICKACK after every recv."""

    def quick_ack() -> None:
        # Linux turns quick-ACK mode off by itself; without it vpcd's second send of a frame
        # waits for our delayed ACK (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    data = recv_exactly(sock, n, quick_ack)
    return data if len(data) == n else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a simulated test card to a vpcd slot.")
    parser.add_argument("--port", type=int, required=True, help="vpcd slot port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--label", default="", help="label stored in EF 2F10")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    card = VpcdCard(args.port, SimulatedCard(label=args.label), host=args.host)
    card.insert()
    log.info("card %r inserted on %s:%d", args.label, args.host, args.port)
    try:
        while not stop.is_set():
            if card.wait_closed(0.2):
                log.info("vpcd closed the connection")
                return 1
    finally:
        card.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
