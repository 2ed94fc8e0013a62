"""The readers-state table: pcscd's READER_STATE entries (spec §7.1)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..pcsc import MAX_ATR_SIZE

READER_NOT_INITIALIZED = MAX_ATR_SIZE + 1
# PCSCLITE_MAX_READERS_CONTEXTS: the fixed table size of protocols up to 4.5 (and of 0x12 in
# 4.6). Distributions may build pcsc-lite with another value (Fedora: 48).
LEGACY_TABLE_SLOTS = 16

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


def legacy_view(
    slots: Sequence[ReaderEntry | None], count: int, patterns: Sequence[str] = ()
) -> list[ReaderEntry | None]:
    """The fixed-size table a client with `count` table entries sees (protocols up to 4.5).

    When more readers exist than fit, readers are chosen by rank: those matching the first
    pattern (fnmatch, case-sensitive, on the whole name), then those matching the second, ...,
    then the rest; within a rank, in slot order. A chosen reader keeps its own slot when that
    slot is below `count`, so with no reader beyond `count` the view is the table itself, as
    pcscd shows it; chosen readers from higher slots take the free positions, in slot order.

    Returns min(count, len(slots)) entries; encode_table pads the rest.
    """
    used = [(index, entry) for index, entry in enumerate(slots) if entry is not None]
    if all(index < count for index, _ in used):
        return list(slots[:count])

    def rank(item: tuple[int, ReaderEntry]) -> tuple[int, int]:
        index, entry = item
        for position, pattern in enumerate(patterns):
            if fnmatchcase(entry.name, pattern):
                return position, index
        return len(patterns), index

    chosen = sorted(sorted(used, key=rank)[:count], key=lambda item: item[0])
    view: list[ReaderEntry | None] = [None] * count
    for index, entry in chosen:
        if index < count:
            view[index] = entry
    free = [position for position, entry in enumerate(view) if entry is None]
    movers = [entry for index, entry in chosen if index >= count]
    for position, entry in zip(free, movers, strict=False):
        view[position] = entry
    return view  # count entries: a reader sits beyond `count`, so len(slots) > count
