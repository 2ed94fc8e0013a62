"""Byte-level mutations of a valid message: what a broken or hostile peer sends instead."""

from __future__ import annotations

import itertools
import random
import struct

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
INTERESTING_U32 = (
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
)


def mutate(rng: random.Random, data: bytes, rounds: int = 0) -> bytes:
    """`data` with 1-4 random mutations (bit flips, interesting values, cuts, insertions,
    duplicated or swapped chunks, random 32-bit words); never empty."""
    out = bytearray(data or b"\0")
    for _ in range(rounds or rng.randint(1, 4)):
        MUTATIONS[rng.randrange(len(MUTATIONS))](rng, out)
        if not out:
            out.append(rng.randrange(256))
    return bytes(out)


def _flip_bit(rng: random.Random, out: bytearray) -> None:
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)


def _interesting_byte(rng: random.Random, out: bytearray) -> None:
    out[rng.randrange(len(out))] = rng.choice(INTERESTING_BYTES)


def _interesting_word(rng: random.Random, out: bytearray) -> None:
    if len(out) < 4:
        return
    offset = (
        rng.randrange(0, len(out) - 3) & ~3 if rng.random() < 0.8 else rng.randrange(len(out) - 3)
    )
    fmt = rng.choice(("<I", ">I"))
    out[offset : offset + 4] = struct.pack(fmt, rng.choice(INTERESTING_U32))


def _random_word(rng: random.Random, out: bytearray) -> None:
    if len(out) >= 4:
        offset = rng.randrange(len(out) - 3)
        out[offset : offset + 4] = rng.randbytes(4)


def _truncate(rng: random.Random, out: bytearray) -> None:
    del out[rng.randrange(len(out)) :]


def _cut_middle(rng: random.Random, out: bytearray) -> None:
    start = rng.randrange(len(out))
    del out[start : start + rng.randint(1, 16)]


def _insert(rng: random.Random, out: bytearray) -> None:
    at = rng.randrange(len(out) + 1)
    out[at:at] = rng.randbytes(rng.choice((1, 2, 4, 8, rng.randint(1, 300))))


def _duplicate(rng: random.Random, out: bytearray) -> None:
    start = rng.randrange(len(out))
    chunk = out[start : start + rng.randint(1, 64)]
    at = rng.randrange(len(out) + 1)
    out[at:at] = chunk


def _swap(rng: random.Random, out: bytearray) -> None:
    if len(out) >= 2:
        a, b = rng.randrange(len(out)), rng.randrange(len(out))
        out[a], out[b] = out[b], out[a]


MUTATIONS = (
    _flip_bit,
    _interesting_byte,
    _interesting_word,
    _random_word,
    _truncate,
    _cut_middle,
    _insert,
    _duplicate,
    _swap,
)


def fragments(rng: random.Random, data: bytes) -> list[bytes]:
    """`data` cut into 1-5 pieces at random places (each sent with its own write)."""
    if len(data) < 2 or rng.random() < 0.7:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]
