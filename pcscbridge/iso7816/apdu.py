"""Command APDUs (ISO/IEC 7816-4 §5.1): ``CLA INS P1 P2 [Lc data] [Le]``.

The four cases, each with short or extended length fields:

====  ==============================  ============================================
case  short                           extended (a 00 byte opens the length fields)
====  ==============================  ============================================
1     CLA INS P1 P2                   -
2     ... Le (1 byte, 00 = 256)       ... 00 Le (2 bytes, 0000 = 65536)
3     ... Lc (1..FF) data             ... 00 Lc (2 bytes, 0001..FFFF) data
4     ... Lc data Le                  ... 00 Lc data Le (2 bytes)
====  ==============================  ============================================
"""

from __future__ import annotations

from dataclasses import dataclass


class APDUError(ValueError):
    """The bytes are not a well-formed command APDU."""


@dataclass(frozen=True)
class CommandAPDU:
    """A parsed command APDU. ``ne`` (the Ne of the standard) is None when there is no Le field."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    ne: int | None
    le_is_zero: bool  # Le field present and all zero: "as many as available, up to the max"
    extended: bool

    @property
    def case(self) -> int:
        """1 (no data, no Le), 2 (Le only), 3 (data only) or 4 (data and Le)."""
        return 1 + (self.ne is not None) + 2 * bool(self.data)

    @classmethod
    def parse(cls, raw: bytes) -> CommandAPDU:
        """Raises APDUError (a ValueError) on a malformed APDU."""
        n = len(raw)
        if n < 4:
            raise APDUError("APDU shorter than 4 bytes")
        cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
        if n == 4:  # case 1
            return cls(cla, ins, p1, p2, b"", None, False, False)
        if n == 5:  # case 2S
            le = raw[4]
            return cls(cla, ins, p1, p2, b"", le or 256, le == 0, False)
        if raw[4] != 0:  # short Lc
            lc = raw[4]
            if n == 5 + lc:  # case 3S
                return cls(cla, ins, p1, p2, bytes(raw[5:]), None, False, False)
            if n == 6 + lc:  # case 4S
                le = raw[-1]
                return cls(cla, ins, p1, p2, bytes(raw[5:-1]), le or 256, le == 0, False)
            raise APDUError("short Lc does not match the APDU length")
        # raw[4] == 0 and n >= 6: extended length fields
        if n == 6:
            raise APDUError("truncated extended length field")
        if n == 7:  # case 2E
            le = (raw[5] << 8) | raw[6]
            return cls(cla, ins, p1, p2, b"", le or 65536, le == 0, True)
        lc = (raw[5] << 8) | raw[6]
        if lc == 0:
            raise APDUError("extended Lc of 0")
        if n == 7 + lc:  # case 3E
            return cls(cla, ins, p1, p2, bytes(raw[7:]), None, False, True)
        if n == 9 + lc:  # case 4E
            le = (raw[-2] << 8) | raw[-1]
            return cls(cla, ins, p1, p2, bytes(raw[7:-2]), le or 65536, le == 0, True)
        raise APDUError("extended Lc does not match the APDU length")

    def to_bytes(self) -> bytes:
        """The APDU's bytes, in the length form it was parsed from (``extended``)."""
        header = bytes([self.cla, self.ins, self.p1, self.p2])
        size = 2 if self.extended else 1
        body = b""
        if self.data:
            body = (b"\0" if self.extended else b"") + len(self.data).to_bytes(size, "big")
            body += self.data
        if self.ne is not None:
            le = 0 if self.le_is_zero else self.ne
            opener = b"\0" if self.extended and not self.data else b""
            body += opener + le.to_bytes(size, "big")
        return header + body
