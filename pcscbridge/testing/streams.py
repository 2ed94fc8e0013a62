"""Byte streams as a socket may deliver them, for tests of the sans-IO codecs."""

from __future__ import annotations

import itertools
from collections.abc import Iterable


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the given offsets (each taken modulo len(data) + 1, so any integers do);
    the pieces join back to `data`, and some may be empty, as reads of zero new bytes."""
    edges = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges)]
