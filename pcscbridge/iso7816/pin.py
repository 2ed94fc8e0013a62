"""PIN-bearing command APDUs (ISO/IEC 7816-4 §11.5): which ones they are, how to show one
without its secret, and what a card says about the tries left.

The data of VERIFY, CHANGE REFERENCE DATA and RESET RETRY COUNTER is a PIN, a PUK or a new
PIN, whatever the class byte says (secure messaging, chaining, logical channels, proprietary
classes that reuse the instruction): it is never shown. Every other command is shown as its
header and lengths; the data only when asked (`with_data`).
"""

from __future__ import annotations

VERIFY = 0x20
CHANGE_REFERENCE_DATA = 0x24
RESET_RETRY_COUNTER = 0x2C
# The even instruction and its odd (BER-TLV data) twin.
PIN_INSTRUCTIONS = frozenset({0x20, 0x21, 0x24, 0x25, 0x2C, 0x2D})


def carries_pin(command: bytes) -> bool:
    return len(command) >= 2 and command[1] in PIN_INSTRUCTIONS


def header_hex(command: bytes) -> str:
    """CLA INS P1 P2 in hex (fewer when the APDU is shorter)."""
    return command[:4].hex().upper()


def show_command(command: bytes, *, with_data: bool = False) -> str:
    """`00A4040C +11 bytes`, or with `with_data` the whole APDU in hex, PIN data masked."""
    head, rest = command[:4], command[4:]
    if not rest:
        return head.hex().upper()
    if carries_pin(command) or not with_data:
        return f"{head.hex().upper()} +{len(rest)} bytes" + (
            " (PIN data masked)" if carries_pin(command) else ""
        )
    return command.hex().upper()


def tries_left(status: bytes) -> int | None:
    """The tries a card reports in answer to VERIFY without data: 63Cx -> x, 6983 (blocked)
    -> 0; None when the status word says nothing about them (9000: already verified)."""
    if len(status) < 2:
        return None
    sw1, sw2 = status[-2], status[-1]
    if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
        return sw2 & 0x0F
    if (sw1, sw2) == (0x69, 0x83):
        return 0
    return None


def is_interindustry_in_clear(cla: int) -> bool:
    """An interindustry class without secure messaging: a VERIFY without data under it asks the
    card for the tries left (§11.5.6). Under secure messaging or a proprietary class the
    question has no defined meaning."""
    if cla & 0xE0 == 0x00:  # first interindustry values: SM in bits 4-3
        return cla & 0x0C == 0
    if cla & 0xC0 == 0x40:  # further interindustry values: SM in bit 6
        return cla & 0x20 == 0
    return False
