"""A PC/SC stack in software: readers, cards and pcscd's arbitration, for demos and fast tests.

What a caller sees is what a pcsc-lite 1.9.9 application sees through libpcsclite and pcscd
(read from their source and checked against the real daemon with pyscard). Three parts:

* :mod:`.daemon`: pcscd's arbitration as pure state transitions (readers, contexts, handles,
  sharing count, transaction lock, per-handle reset/removed events, protocol negotiation);
* :mod:`.status`: SCardGetStatusChange as libpcsclite computes it from the readers-state table
  (pure, PnP reader-events included);
* :mod:`.backend`: :class:`SimulatedBackend`, the blocking backend (per-context call locks,
  waits, cancel, close) and its test controls (insert_card, remove_card, add_reader,
  remove_reader, wait_for_blocked_calls).

Each module's docstring lists its deliberate deviations from pcsc-lite 1.9.9.
"""

from ....iso7816.atr import offered_protocols
from .backend import SimulatedBackend
from .daemon import (
    CM_IOCTL_GET_FEATURE_REQUEST,
    MAX_READERNAME,
    SCARD_ATTR_ATR_STRING,
    SCARD_ATTR_DEVICE_FRIENDLY_NAME,
    SCARD_ATTR_DEVICE_SYSTEM_NAME,
    TAG_IFD_ATR,
    negotiate_protocol,
)
from .status import MAX_READER_STATES

atr_protocols = offered_protocols  # the name the backend's tests know

__all__ = [
    "CM_IOCTL_GET_FEATURE_REQUEST",
    "MAX_READERNAME",
    "MAX_READER_STATES",
    "SCARD_ATTR_ATR_STRING",
    "SCARD_ATTR_DEVICE_FRIENDLY_NAME",
    "SCARD_ATTR_DEVICE_SYSTEM_NAME",
    "TAG_IFD_ATR",
    "SimulatedBackend",
    "atr_protocols",
    "negotiate_protocol",
]
