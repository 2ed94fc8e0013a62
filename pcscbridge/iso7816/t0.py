"""The guest's T=0 TPDUs in front of the host's card: when to add Le, when to answer 61xx and
serve GET RESPONSE from what the card returned, when to re-send. Pure: bytes in, steps out.

QEMU 7.2's emulated CCID reader is a TPDU-level T=0 reader, so a guest sends T=0 command
TPDUs (ISO/IEC 7816-3 §12.2): a case-1 command with P3 = 00, a case-4 command without its Le
(case-3 form). The host's card may speak T=1, where the command is the APDU itself and a strict
card answers a command without Le with no data. The translator is the T=0 card the guest talks
to; the host's card sits behind it at the APDU level. protocol/vscard-t0.md states the rule
and why; in short:

* a 5-byte TPDU ``CLA INS P1 P2 P3`` goes to the card with Le = P3 (00 = 256), except for an
  instruction that never returns data (VERIFY, UPDATE BINARY, ...: :data:`NO_DATA_INSTRUCTIONS`)
  with P3 = 00, which goes as case 1;
* a case-3-form TPDU ``CLA INS P1 P2 Lc data`` goes with Le = 00 added (case 4), except for
  those same instructions; a card that refuses the added Le (``67 00``, ``6C xx``: checking
  errors, the command did not run) gets it once more without it, or with Le = xx;
* the guest gets at most the data its command allows in one exchange (Ne of a case-2 form,
  none for a case-3 form, never more than 256 bytes: one T=0 exchange, well below the 372
  data bytes QEMU 7.2 carries); the rest waits, announced by ``61 xx``, for the guest's GET
  RESPONSE, and the card's own status word ends the last part. Nothing is cut.

    translator = T0Translator(card_speaks_t1=True)
    step = translator.command(tpdu)
    while isinstance(step, ToCard):
        step = translator.card_answered(transmit(step.apdu))
    reply(step.response)
"""

from __future__ import annotations

from dataclasses import dataclass

from .apdu import APDUError, CommandAPDU

SHORT_MAX = 256  # data bytes one T=0 exchange (or one short Le) can carry
INS_GET_RESPONSE = 0xC0
INS_SELECT = 0xA4

# ISO/IEC 7816-4 instructions that never return response data (case 1 or 3 only); the odd
# variants (BER-TLV data) likewise. A PIN command among them must never be sent twice, so no
# Le is ever added to them (a card may refuse an Le it does not expect).
NO_DATA_INSTRUCTIONS = frozenset(
    {
        0x04,  # DEACTIVATE FILE
        0x0C,  # ERASE RECORD(S)
        0x0E,  # ERASE BINARY
        0x0F,
        0x20,  # VERIFY
        0x21,
        0x22,  # MANAGE SECURITY ENVIRONMENT
        0x24,  # CHANGE REFERENCE DATA
        0x26,  # DISABLE VERIFICATION REQUIREMENT
        0x28,  # ENABLE VERIFICATION REQUIREMENT
        0x2C,  # RESET RETRY COUNTER
        0x44,  # ACTIVATE FILE
        0xD0,  # WRITE BINARY
        0xD1,
        0xD2,  # WRITE RECORD
        0xD6,  # UPDATE BINARY
        0xD7,
        0xDA,  # PUT DATA
        0xDB,
        0xDC,  # UPDATE RECORD
        0xDD,
        0xE0,  # CREATE FILE
        0xE2,  # APPEND RECORD
        0xE4,  # DELETE FILE
        0xE6,  # TERMINATE DF
        0xE8,  # TERMINATE EF
    }
)


@dataclass(frozen=True, slots=True)
class ToCard:
    """Transmit this APDU to the card, then give its response to ``card_answered``."""

    apdu: bytes


@dataclass(frozen=True, slots=True)
class ToGuest:
    """Answer the guest's TPDU with this response (data + SW1 SW2)."""

    response: bytes


Step = ToCard | ToGuest


def returns_no_data(header: bytes) -> bool:
    """Whether ISO 7816-4 says the command with this header never returns data: one of
    :data:`NO_DATA_INSTRUCTIONS`, or a SELECT that asks for no FCI (P2 bits 0C)."""
    ins, p2 = header[1], header[3]
    return ins in NO_DATA_INSTRUCTIONS or (ins == INS_SELECT and p2 & 0x0C == 0x0C)


@dataclass(frozen=True, slots=True)
class _Exchange:
    """The guest's command under way: how much data its answer may carry, and what to send
    instead if the card refuses the length form the translator chose (None: nothing)."""

    budget: int
    on_wrong_length: bytes | None = None  # re-send after 67 00
    lengthless: bytes | None = None  # the command without Le, for a re-send with 6C's Le


class T0Translator:
    """The T=0 card a guest talks to, in front of the host's card. One per host card handle;
    ``reset()`` when the card is reset, removed or reconnected."""

    def __init__(self, card_speaks_t1: bool) -> None:
        # T=1 card: APDUs; add Le where the TPDU form dropped it. T=0 card: the guest's TPDUs
        # are what it expects, as they are.
        self.card_speaks_t1 = card_speaks_t1
        self._pending: tuple[bytes, bytes] | None = None  # data not yet delivered, final SW
        self._exchange: _Exchange | None = None

    def reset(self) -> None:
        self._pending = None
        self._exchange = None

    def command(self, tpdu: bytes) -> Step:
        """The guest sent a command TPDU: the first step."""
        tpdu = bytes(tpdu)
        pending, self._pending = self._pending, None
        if pending is not None and _is_get_response(tpdu):
            data, sw = pending
            return self._deliver(data, sw, tpdu[4] or SHORT_MAX)
        apdu, self._exchange = self._plan(tpdu)
        return ToCard(apdu)

    def card_answered(self, response: bytes) -> Step:
        """The card's response to the last ToCard: the next step."""
        response = bytes(response)
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            raise RuntimeError("card_answered without a command under way")
        if len(response) < 2:
            return ToGuest(response)  # no status word: not ours to invent one
        data, sw = response[:-2], response[-2:]
        if not data and sw == b"\x67\x00" and exchange.on_wrong_length is not None:
            self._exchange = _Exchange(exchange.budget)
            return ToCard(exchange.on_wrong_length)
        if not data and sw[0] == 0x6C and sw[1] and exchange.lengthless is not None:
            self._exchange = _Exchange(exchange.budget)
            return ToCard(exchange.lengthless + sw[1:])
        return self._deliver(data, sw, exchange.budget)

    # --- the rule -----------------------------------------------------------------------------
    def _plan(self, tpdu: bytes) -> tuple[bytes, _Exchange]:
        """What to send the card for the guest's TPDU, and how to answer."""
        n = len(tpdu)
        if n == 5:  # case 1 (P3 = 00) or case 2 (Le = P3, 00 = 256)
            if not self.card_speaks_t1:
                return tpdu, _Exchange(tpdu[4] or SHORT_MAX)
            if tpdu[4] == 0 and returns_no_data(tpdu):
                return tpdu[:4], _Exchange(0)
            # P3 = 00 may stand for a case-1 command: a card that refuses the Le gets none.
            fallback = tpdu[:4] if tpdu[4] == 0 else None
            return tpdu, _Exchange(tpdu[4] or SHORT_MAX, on_wrong_length=fallback)
        if n > 5 and tpdu[4] and n == 5 + tpdu[4]:  # case 3, or case 4 without its Le
            if not self.card_speaks_t1 or returns_no_data(tpdu):
                return tpdu, _Exchange(0)
            return tpdu + b"\x00", _Exchange(0, on_wrong_length=tpdu, lengthless=tpdu)
        # Not a T=0 TPDU (a bare header, an APDU with Le or extended lengths): as it is.
        return tpdu, _Exchange(min(_expected_length(tpdu), SHORT_MAX))

    def _deliver(self, data: bytes, sw: bytes, budget: int) -> ToGuest:
        if len(data) <= budget:
            return ToGuest(data + sw)
        rest = data[budget:]
        self._pending = (rest, sw)
        return ToGuest(data[:budget] + bytes([0x61, len(rest) if len(rest) < SHORT_MAX else 0]))


def _is_get_response(tpdu: bytes) -> bool:
    return len(tpdu) == 5 and tpdu[1] == INS_GET_RESPONSE and tpdu[2] == 0 and tpdu[3] == 0


def _expected_length(apdu: bytes) -> int:
    """Ne of an APDU, 0 when it has no Le; SHORT_MAX when it cannot be parsed (the card's
    answer to it is then a status word anyway)."""
    try:
        return CommandAPDU.parse(apdu).ne or 0
    except APDUError:
        return SHORT_MAX
