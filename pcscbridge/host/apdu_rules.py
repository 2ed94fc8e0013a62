"""Which command APDUs a guest may send: patterns on CLA INS P1 P2, and the read-only preset.

A pattern is up to four bytes in hex, separated by spaces: `00 D6`, `xx DA 01 xx`, `0x 20`.
Each byte is two hex digits, and either digit may be `x` (any value); `xx` is any byte; bytes
left out match anything. Pure: a verdict from the APDU's bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..iso7816 import pin

# What the read-only preset refuses, by INS (even and odd twin), under every class: a
# proprietary class that reuses one of these codes (GlobalPlatform's INSTALL E6, LOAD E8,
# DELETE E4) changes the card too.
READ_ONLY_DENIED: dict[int, str] = {
    0x0C: "ERASE RECORD",
    0x0E: "ERASE BINARY",
    0x0F: "ERASE BINARY",
    0xD0: "WRITE BINARY",
    0xD1: "WRITE BINARY",
    0xD2: "WRITE RECORD",
    0xD6: "UPDATE BINARY",
    0xD7: "UPDATE BINARY",
    0xDC: "UPDATE RECORD",
    0xDD: "UPDATE RECORD",
    0xE2: "APPEND RECORD",
    0xDA: "PUT DATA",
    0xDB: "PUT DATA",
    0xE0: "CREATE FILE",
    0xE4: "DELETE FILE",
    0x46: "GENERATE ASYMMETRIC KEY PAIR",
    0x47: "GENERATE ASYMMETRIC KEY PAIR",
    pin.CHANGE_REFERENCE_DATA: "CHANGE REFERENCE DATA",
    0x25: "CHANGE REFERENCE DATA",
    pin.RESET_RETRY_COUNTER: "RESET RETRY COUNTER",
    0x2D: "RESET RETRY COUNTER",
    0x04: "DEACTIVATE FILE",
    0x44: "ACTIVATE FILE",
    0xE6: "TERMINATE DF",
    0xE8: "TERMINATE EF",
    0xFE: "TERMINATE CARD USAGE",
}

PRESETS = ("all", "read-only", "listed")
_BYTE = re.compile(r"[0-9a-fA-Fx]{2}")


@dataclass(frozen=True)
class ApduPattern:
    text: str
    mask: bytes  # bits that must match
    value: bytes

    @classmethod
    def parse(cls, text: str) -> ApduPattern:
        parts = text.split()
        if not 1 <= len(parts) <= 4 or not all(_BYTE.fullmatch(part) for part in parts):
            raise ValueError(
                f"bad APDU pattern {text!r}: up to four hex bytes (CLA INS P1 P2), "
                "x for any digit, as in 'xx D6' or '00 20 00 8x'"
            )
        mask, value = bytearray(4), bytearray(4)
        for index, part in enumerate(parts):
            for shift, digit in ((4, part[0]), (0, part[1])):
                if digit not in "xX":
                    mask[index] |= 0xF << shift
                    value[index] |= int(digit, 16) << shift
        return cls(text, bytes(mask), bytes(value))

    def matches(self, command: bytes) -> bool:
        header = command[:4].ljust(4, b"\0")
        return all(h & m == v for h, m, v in zip(header, self.mask, self.value, strict=True))


@dataclass(frozen=True)
class ApduRules:
    """`deny` patterns refuse; then `allow` patterns pass; then the preset decides: "all"
    passes, "read-only" refuses READ_ONLY_DENIED, "listed" refuses what `allow` did not pass."""

    preset: str = "all"
    allow: tuple[ApduPattern, ...] = ()
    deny: tuple[ApduPattern, ...] = ()

    def refusal(self, command: bytes) -> str | None:
        """Why the APDU is refused, or None when it may go to the card."""
        for pattern in self.deny:
            if pattern.matches(command):
                return f"matches apdu_deny {pattern.text!r}"
        if any(pattern.matches(command) for pattern in self.allow):
            return None
        if self.preset == "listed":
            return "not in apdu_allow"
        if self.preset == "read-only" and len(command) >= 2:
            name = READ_ONLY_DENIED.get(command[1])
            if name is not None:
                return f"{name} (read-only preset)"
        return None
