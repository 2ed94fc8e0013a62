"""The host's PC/SC stack behind one small interface.

Backends are blocking, like the PC/SC API they wrap; the host agent calls every method from a
worker thread (trio.to_thread), never from the trio loop. Failures raise PCSCError(rv).
Contexts and card handles are opaque values chosen by the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

Context = Any
Card = Any


@dataclass
class ReaderState:
    """One SCARD_READERSTATE: the caller sets current_state; the call fills event_state and atr.

    The upper 16 bits of both states carry the reader's card-event counter, as in pcsc-lite.
    """

    reader: str
    current_state: int = 0
    event_state: int = 0
    atr: bytes = b""


@dataclass(frozen=True)
class CardStatus:
    reader: str
    state: int  # SCardStatus pdwState (pcsc-lite: event counter << 16 | readerState bits)
    protocol: int
    atr: bytes


class Backend(Protocol):
    name: str

    def establish_context(self) -> Context: ...
    def release_context(self, context: Context) -> None: ...
    def list_readers(self, context: Context) -> list[str]: ...

    def get_status_change(
        self, context: Context, timeout_ms: int, states: list[ReaderState]
    ) -> list[ReaderState]:
        """Blocks until a state differs from current_state or timeout; SCARD_E_TIMEOUT then."""
        ...

    def cancel(self, context: Context) -> None: ...

    def connect(
        self, context: Context, reader: str, share_mode: int, preferred_protocols: int
    ) -> tuple[Card, int]:
        """Returns (card handle, active protocol)."""
        ...

    def reconnect(
        self, card: Card, share_mode: int, preferred_protocols: int, initialization: int
    ) -> int: ...
    def disconnect(self, card: Card, disposition: int) -> None: ...
    def begin_transaction(self, card: Card) -> None: ...
    def end_transaction(self, card: Card, disposition: int) -> None: ...
    def status(self, card: Card) -> CardStatus: ...
    def transmit(self, card: Card, protocol: int, command: bytes) -> bytes: ...
    def control(self, card: Card, control_code: int, data: bytes) -> bytes: ...
    def get_attrib(self, card: Card, attr_id: int) -> bytes: ...
    def set_attrib(self, card: Card, attr_id: int, value: bytes) -> None: ...
    def close(self) -> None: ...
