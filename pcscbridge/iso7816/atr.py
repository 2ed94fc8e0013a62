"""The Answer-to-Reset (ISO/IEC 7816-3 §8), as bytes and as its parts.

Layout: ``TS T0 [TA1 TB1 TC1 TD1] [TA2 TB2 TC2 TD2] ... historical bytes [TCK]``.

* TS: 3B direct convention, 3F inverse convention.
* T0: high nibble Y1 says which of TA1, TB1, TC1, TD1 follow (bits 0x10, 0x20, 0x40, 0x80); low
  nibble K is the number of historical bytes (0..15).
* TDi: high nibble Y(i+1) announces the bytes of level i+1 in the same way; low nibble T names
  a transport protocol (0: T=0, 1: T=1, 15: global interface bytes follow). A level exists
  when the byte before it announces it, so TDi with Y(i+1) = 0 opens an empty level i+1.
* TCK: XOR of T0 .. the last historical byte. Absent when only T=0 is indicated, present
  (and then checked by the reader) in all other cases.
* At most 33 bytes in all (TS and 32 more).

:func:`parse_atr` reads a well-formed ATR strictly; :func:`offered_protocols` answers the one
question pcsc-lite asks of any ATR, however broken, the way pcsc-lite answers it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..pcsc import Protocol

TS_DIRECT = 0x3B
TS_INVERSE = 0x3F
MAX_ATR_SIZE = 33  # pcsc-lite's MAX_ATR_SIZE too

_TA, _TB, _TC, _TD = 0x10, 0x20, 0x40, 0x80


class ATRError(ValueError):
    """The bytes are not a well-formed ATR; the message says where they go wrong."""


@dataclass(frozen=True)
class InterfaceBytes:
    """One level i >= 1 of interface bytes: TAi, TBi, TCi (None when absent) and the protocol
    that TDi names (None when level i has no TDi, which makes it the last level)."""

    ta: int | None = None
    tb: int | None = None
    tc: int | None = None
    t: int | None = None

    @property
    def indicator(self) -> int:
        """The presence bits (Yi << 4) that announce this level, in T0 or in TD(i-1)."""
        bits = 0
        for value, bit in ((self.ta, _TA), (self.tb, _TB), (self.tc, _TC), (self.t, _TD)):
            if value is not None:
                bits |= bit
        return bits


@dataclass(frozen=True)
class ATR:
    """A parsed ATR. ``levels[0]`` holds TA1, TB1, TC1 and TD1's T; ``to_bytes()`` gives the
    bytes back exactly."""

    ts: int
    levels: tuple[InterfaceBytes, ...]
    historical: bytes
    tck: int | None

    @property
    def t0(self) -> int:
        first = self.levels[0].indicator if self.levels else 0
        return first | len(self.historical)

    @property
    def inverse_convention(self) -> bool:
        return self.ts == TS_INVERSE

    def ta(self, i: int) -> int | None:
        return self._level(i).ta

    def tb(self, i: int) -> int | None:
        return self._level(i).tb

    def tc(self, i: int) -> int | None:
        return self._level(i).tc

    def td(self, i: int) -> int | None:
        """TDi as sent: Y(i+1) in the high nibble, T in the low one."""
        level = self._level(i)
        if level.t is None:
            return None
        following = self.levels[i].indicator if i < len(self.levels) else 0
        return following | level.t

    def _level(self, i: int) -> InterfaceBytes:
        if i < 1:
            raise IndexError("interface byte levels count from 1")
        return self.levels[i - 1] if i <= len(self.levels) else InterfaceBytes()

    @property
    def protocols(self) -> tuple[int, ...]:
        """The T values that TD1, TD2, ... name, each once, in order (15 included)."""
        named: list[int] = []
        for level in self.levels:
            if level.t is not None and level.t not in named:
                named.append(level.t)
        return tuple(named)

    @property
    def tck_required(self) -> bool:
        """ISO 7816-3: TCK is absent when only T=0 is indicated, present otherwise."""
        return any(t != 0 for t in self.protocols)

    @property
    def tck_valid(self) -> bool | None:
        """Whether TCK makes the XOR of T0 .. TCK zero; None when the ATR has no TCK."""
        if self.tck is None:
            return None
        return compute_tck(self._body()) == self.tck

    def with_computed_tck(self) -> ATR:
        """This ATR with TCK recomputed: present and right when required, absent otherwise
        (what a front-end that rewrites interface bytes must send)."""
        return replace(self, tck=compute_tck(self._body()) if self.tck_required else None)

    def to_bytes(self) -> bytes:
        return self._body() + (b"" if self.tck is None else bytes([self.tck]))

    def _body(self) -> bytes:
        """TS .. the last historical byte."""
        if len(self.historical) > 0x0F:
            raise ATRError("at most 15 historical bytes")
        out = bytearray([self.ts, self.t0])
        for i, level in enumerate(self.levels, start=1):
            if level.t is None and i < len(self.levels):
                raise ATRError(f"level {i} has no TD{i} but level {i + 1} follows")
            out += bytes(b for b in (level.ta, level.tb, level.tc) if b is not None)
            td = self.td(i)
            if td is not None:
                out.append(td)
        return bytes(out) + self.historical


def compute_tck(body: bytes) -> int:
    """TCK for ``body`` = TS .. the last historical byte: the XOR of all but TS."""
    tck = 0
    for byte in body[1:]:
        tck ^= byte
    return tck


def append_tck(body: bytes) -> bytes:
    """``body`` (TS .. the last historical byte) with its TCK appended."""
    return bytes(body) + bytes([compute_tck(body)])


def _read_levels(raw: bytes) -> tuple[list[InterfaceBytes], int | None]:
    """The complete levels of interface bytes from T0 on, and the offset after the last one
    (None when the bytes end inside a level: the levels read so far are still returned)."""
    levels: list[InterfaceBytes] = []
    indicator = raw[1]
    position = 2
    if not indicator & 0xF0:
        return levels, position
    while True:
        values: list[int | None] = []
        for bit in (_TA, _TB, _TC, _TD):
            if not indicator & bit:
                values.append(None)
                continue
            if position >= len(raw):
                return levels, None
            values.append(raw[position])
            position += 1
        ta, tb, tc, td = values
        levels.append(InterfaceBytes(ta, tb, tc, None if td is None else td & 0x0F))
        if td is None:
            return levels, position
        indicator = td  # TDi announces level i+1, even an empty one


def parse_atr(raw: bytes) -> ATR:
    """Parse a well-formed ATR; raises ATRError on a bad TS, a truncated ATR, or bytes beyond
    TCK. A missing or wrong TCK is reported (``tck``, ``tck_valid``), not refused."""
    raw = bytes(raw)
    if len(raw) < 2:
        raise ATRError(f"an ATR has at least TS and T0, not {len(raw)} byte(s)")
    if raw[0] not in (TS_DIRECT, TS_INVERSE):
        raise ATRError(f"TS 0x{raw[0]:02X} is neither 3B (direct) nor 3F (inverse)")
    if len(raw) > MAX_ATR_SIZE:
        raise ATRError(f"{len(raw)} bytes: an ATR has at most {MAX_ATR_SIZE}")
    levels, position = _read_levels(raw)
    if position is None:
        raise ATRError(f"the ATR ends inside the interface bytes of level {len(levels) + 1}")
    end = position + (raw[1] & 0x0F)
    if end > len(raw):
        raise ATRError(
            f"T0 announces {raw[1] & 0x0F} historical bytes, only {len(raw) - position} follow"
        )
    rest = raw[end:]
    if len(rest) > 1:
        raise ATRError(f"{len(rest)} bytes after the historical bytes, where TCK is at most one")
    return ATR(raw[0], tuple(levels), raw[position:end], rest[0] if rest else None)


def offered_protocols(atr: bytes) -> int:
    """The transport protocols an ATR offers, as pcsc-lite's ATRDecodeAtr finds them: T=0 and
    T=1 named by any TDi that is there (a truncated ATR offers what it named before it ends),
    and T=0 when none is named."""
    offered = Protocol.UNDEFINED
    if len(atr) >= 2:
        levels, _ = _read_levels(bytes(atr))
        for level in levels:
            if level.t == 0:
                offered |= Protocol.T0
            elif level.t == 1:
                offered |= Protocol.T1
    return offered or Protocol.T0


def offer_t0(raw: bytes) -> bytes:
    """The ATR a reader that speaks only T=0 (QEMU 7.2's emulated CCID reader) must be shown
    for this card: unchanged when it offers T=0 already; else every TDi that names T=1 names
    T=0 instead, a TA2 (specific mode) naming T=1 names T=0, and TCK is recomputed (absent
    when only T=0 remains named). Levels, their other bytes and the historical bytes are kept,
    so the ATR keeps its length give or take TCK. Raises ATRError for an ATR that cannot be
    parsed. The rule and its reasons: protocol/vscard-t0.md."""
    if offered_protocols(raw) & Protocol.T0:
        return bytes(raw)
    parsed = parse_atr(raw)
    levels = [replace(level, t=0) if level.t == 1 else level for level in parsed.levels]
    if len(levels) > 1 and levels[1].ta is not None and levels[1].ta & 0x0F == 1:
        levels[1] = replace(levels[1], ta=levels[1].ta & 0xF0)
    return replace(parsed, levels=tuple(levels)).with_computed_tck().to_bytes()
