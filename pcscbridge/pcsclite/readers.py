"""The readers-state table: pcscd's READER_STATE entries (spec §7.1)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..pcsc import MAX_ATR_SIZE

READER_NOT_INITIALIZED = MAX_ATR_SIZE + 1
LEGACY_TABLE_SLOTS = 16  # PCSCLITE_MAX_READERS_CONTEXTS

_ENTRY = {128: struct.Struct("=128sIIi33s3xII"), 100: struct.Struct("=100sIIi33s3xII")}


@dataclass(frozen=True)
class ReaderEntry:
    """One used slot: what libpcsclite reads to answer ListReaders, Status, GetStatusChange."""

    name: str
    event_counter: int = 0  # card insertions + removals, 0..0xFFFF
    state: int = 0  # ReaderStatus bits (SCARD_ABSENT, SCARD_PRESENT | SCARD_POWERED | ...)
    sharing: int = 0  # -1 exclusive, 0 unused, n shared handles
    atr: bytes = b""
    protocol: int = 0  # active protocol, 0 when no handle negotiated one


def entry_size(name_size: int = 128) -> int:
    return _ENTRY[name_size].size


def encode_entry(entry: ReaderEntry | None, name_size: int = 128) -> bytes:
    layout = _ENTRY[name_size]
    if entry is None:
        # An empty slot, as pcscd leaves it: zeroes, cardAtrLength = READER_NOT_INITIALIZED.
        return layout.pack(b"", 0, 0, 0, b"", READER_NOT_INITIALIZED, 0)
    name = entry.name.encode("utf-8")[: name_size - 1]
    atr = entry.atr[:MAX_ATR_SIZE]
    return layout.pack(
        name,
        entry.event_counter & 0xFFFF,
        entry.state,
        entry.sharing,
        atr,
        len(atr),
        entry.protocol,
    )


def encode_table(
    slots: Sequence[ReaderEntry | None], count: int, name_size: int = 128, pad_zero: bool = False
) -> bytes:
    """`count` entries from `slots`; slots past the end are empty (or all-zero with pad_zero,
    as pcscd 2.5 fills the legacy 16-entry array beyond its own slot count)."""
    size = entry_size(name_size)
    parts = []
    for index in range(count):
        if index < len(slots):
            parts.append(encode_entry(slots[index], name_size))
        else:
            parts.append(bytes(size) if pad_zero else encode_entry(None, name_size))
    return b"".join(parts)


def decode_table(data: bytes, name_size: int = 128) -> list[ReaderEntry | None]:
    """Inverse of encode_table (used by tests and the transcript tools)."""
    layout = _ENTRY[name_size]
    slots: list[ReaderEntry | None] = []
    for offset in range(0, len(data), layout.size):
        name, counter, state, sharing, atr, atr_len, protocol = layout.unpack_from(data, offset)
        if name[:1] == b"\0":
            slots.append(None)
            continue
        slots.append(
            ReaderEntry(
                name=name.split(b"\0", 1)[0].decode("utf-8", "replace"),
                event_counter=counter,
                state=state,
                sharing=sharing,
                atr=atr[: min(atr_len, MAX_ATR_SIZE)],
                protocol=protocol,
            )
        )
    return slots
