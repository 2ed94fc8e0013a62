"""ISO 7816 byte formats: ATRs of real cards (and broken ones), command APDUs of every case."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from pcscbridge.host.backends.simcard import DEFAULT_ATR
from pcscbridge.iso7816.apdu import APDUError, CommandAPDU
from pcscbridge.iso7816.atr import (
    ATR,
    ATRError,
    InterfaceBytes,
    append_tck,
    compute_tck,
    offered_protocols,
    parse_atr,
)
from pcscbridge.pcsc import Protocol

T0, T1 = Protocol.T0, Protocol.T1


def atr(text: str) -> bytes:
    return bytes.fromhex(text)


# A T=1 card with TA1, TC1, TA3/TB3 (IFSC, BWI/CWI), global bytes after TD3 (T=15) and TCK.
T1_CARD = atr("3B DA 18 FF 81 B1 FE 75 1F 03 00 31 C5 73 C0 01 40 00 90 00 0C")
# T=0 and T=1 named (TD1, TD2), no other interface bytes, no historical bytes; TCK 01.
T0_T1 = atr("3B 80 80 01 01")
# T=1 only, TD1 with an empty level 2 announced by nobody, TCK 81.
T1_ONLY = atr("3B 80 01 81")
# T=0 only (no TDi): TA1 TB1 TC1 and 15 historical bytes, no TCK (a Java Card).
T0_ONLY = atr("3B 7F 96 00 00 80 31 80 65 B0 85 03 00 EF 12 0F FF 82 90 00")
# Inverse convention, TB1 TC1, T=0 implied.
INVERSE = atr("3F 65 25 00 2C 09 69 90 00")
VALID = [T1_CARD, T0_T1, T1_ONLY, T0_ONLY, INVERSE, DEFAULT_ATR]


# --- parse_atr -----------------------------------------------------------------------------
def test_t1_card_interface_bytes_per_level() -> None:
    parsed = parse_atr(T1_CARD)
    assert (parsed.ts, parsed.t0) == (0x3B, 0xDA)
    assert (parsed.ta(1), parsed.tb(1), parsed.tc(1), parsed.td(1)) == (0x18, None, 0xFF, 0x81)
    assert (parsed.ta(2), parsed.tb(2), parsed.tc(2), parsed.td(2)) == (None, None, None, 0xB1)
    assert (parsed.ta(3), parsed.tb(3), parsed.tc(3), parsed.td(3)) == (0xFE, 0x75, None, 0x1F)
    assert (parsed.ta(4), parsed.td(4)) == (0x03, None)
    assert parsed.ta(9) is None
    assert parsed.levels == (
        InterfaceBytes(ta=0x18, tc=0xFF, t=1),
        InterfaceBytes(t=1),
        InterfaceBytes(ta=0xFE, tb=0x75, t=15),
        InterfaceBytes(ta=0x03),
    )
    assert parsed.historical == atr("00 31 C5 73 C0 01 40 00 90 00")
    assert parsed.protocols == (1, 15)
    assert parsed.tck == 0x0C and parsed.tck_required and parsed.tck_valid is True
    assert not parsed.inverse_convention
    with pytest.raises(IndexError):
        parsed.ta(0)


def test_t0_and_t1_without_other_interface_bytes() -> None:
    parsed = parse_atr(T0_T1)
    assert parsed.protocols == (0, 1)
    assert parsed.levels == (InterfaceBytes(t=0), InterfaceBytes(t=1), InterfaceBytes())
    assert parsed.historical == b"" and parsed.tck == 0x01 and parsed.tck_valid is True


def test_t1_only() -> None:
    parsed = parse_atr(T1_ONLY)
    assert parsed.protocols == (1,)
    assert parsed.td(1) == 0x01 and parsed.tck == 0x81 and parsed.tck_valid is True


def test_t0_only_has_no_tck() -> None:
    parsed = parse_atr(T0_ONLY)
    assert parsed.levels == (InterfaceBytes(ta=0x96, tb=0x00, tc=0x00),)
    assert parsed.protocols == () and len(parsed.historical) == 15
    assert parsed.tck is None and parsed.tck_valid is None and not parsed.tck_required


def test_inverse_convention() -> None:
    parsed = parse_atr(INVERSE)
    assert parsed.inverse_convention
    assert (parsed.tb(1), parsed.tc(1)) == (0x25, 0x00)
    assert parsed.historical == atr("2C 09 69 90 00")


def test_the_test_cards_atr() -> None:
    parsed = parse_atr(DEFAULT_ATR)
    assert parsed.protocols == (1,)
    assert (parsed.ta(3), parsed.tb(3)) == (0xFE, 0x45)  # IFSC 254, BWI 4 / CWI 5
    assert parsed.tck_valid is True


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: raw.hex())
def test_to_bytes_gives_the_atr_back(raw: bytes) -> None:
    assert parse_atr(raw).to_bytes() == raw


def test_a_wrong_tck_is_reported() -> None:
    parsed = parse_atr(atr("3B 80 01 80"))
    assert parsed.tck == 0x80 and parsed.tck_valid is False
    assert parsed.with_computed_tck().to_bytes() == T1_ONLY


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "at least TS and T0"),
        (atr("3B"), "at least TS and T0"),
        (atr("3C 00"), "TS 0x3C"),
        (atr("3B 80"), "inside the interface bytes of level 1"),  # TD1 announced, missing
        (atr("3B 90 11"), "inside the interface bytes of level 1"),  # TA1 there, TD1 missing
        (atr("3B 80 81"), "inside the interface bytes of level 2"),  # TD2 announced, missing
        (atr("3B DA 18 FF 81 B1 FE 75 1F"), "level 4"),  # T1_CARD cut after TD3
        (atr("3B 02 14"), "2 historical bytes, only 1"),
        (atr("3B 80 80 01 01 01"), "2 bytes after the historical bytes"),
        (atr("3B 0F") + bytes(15) + bytes(17), "at most 33"),
    ],
)
def test_malformed_atrs_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ATRError, match=message):
        parse_atr(raw)


# --- offered_protocols: pcsc-lite's reading, on any bytes -------------------------------------
@pytest.mark.parametrize(
    ("raw", "offered"),
    [
        (T1_CARD, T1),
        (T0_T1, T0 | T1),
        (T1_ONLY, T1),
        (T0_ONLY, T0),  # no TDi: T=0
        (INVERSE, T0),
        (DEFAULT_ATR, T1),
        (atr("3B 00"), T0),
        (b"", T0),
        (atr("3B"), T0),
        (atr("3B 80"), T0),  # truncated before TD1
        (atr("3B 80 81"), T1),  # TD1 names T=1, then the ATR ends
        (atr("3B 80 80 01 01 01"), T0 | T1),  # a stray byte after TCK does not matter
        (atr("3B 80 0F"), T0),  # T=15 only: no transport protocol named
    ],
)
def test_offered_protocols(raw: bytes, offered: int) -> None:
    assert offered_protocols(raw) == offered


def _reference_atr_protocols(atr: bytes) -> int:
    """The simulated backend's walk before the parser existed (pcsc-lite's ATRDecodeAtr)."""
    offered = 0
    if len(atr) >= 2:
        position, indicator = 1, atr[1]
        while indicator & 0x80:
            position += bin(indicator & 0x70).count("1") + 1
            if position >= len(atr):
                break
            indicator = atr[position]
            if indicator & 0x0F == 0:
                offered |= T0
            elif indicator & 0x0F == 1:
                offered |= T1
    return offered or T0


def test_offered_protocols_reads_any_bytes_as_before() -> None:
    rng = random.Random(7816)
    for _ in range(3000):
        raw = bytes([0x3B]) + rng.randbytes(rng.randrange(0, 12))
        assert offered_protocols(raw) == _reference_atr_protocols(raw), raw.hex()


# --- rewriting an ATR -------------------------------------------------------------------------
def test_offer_t0_on_a_t1_only_card_with_tck_recomputed() -> None:
    """What a CCID front-end does for a guest that wants T=0: name T=0 in TD1, keep the rest."""
    original = parse_atr(DEFAULT_ATR)
    rewritten = replace(original, levels=(InterfaceBytes(t=0), *original.levels))
    raw = rewritten.with_computed_tck().to_bytes()
    assert raw == atr("3B 85 80 81 31 FE 45 80 73 B0 01 40") + bytes([compute_tck(raw[:-1])])
    again = parse_atr(raw)
    assert again.tck_valid is True and again.historical == original.historical
    assert offered_protocols(raw) == T0 | T1


def test_dropping_every_protocol_but_t0_drops_tck() -> None:
    t0_only = replace(parse_atr(T0_T1), levels=()).with_computed_tck()
    assert t0_only.tck is None and t0_only.to_bytes() == atr("3B 00")


def test_encoding_refuses_a_level_after_one_without_td() -> None:
    broken = ATR(0x3B, (InterfaceBytes(ta=0x11), InterfaceBytes(ta=0x11)), b"", None)
    with pytest.raises(ATRError, match="no TD1"):
        broken.to_bytes()


def test_append_tck() -> None:
    assert append_tck(atr("3B 80 80 01")) == T0_T1
    assert compute_tck(T1_CARD) == 0  # over T0 .. TCK the XOR is zero


# --- command APDUs ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "case", "data", "ne", "le_is_zero", "extended"),
    [
        ("00 A4 04 00", 1, "", None, False, False),
        ("00 B0 00 00 10", 2, "", 16, False, False),
        ("00 B0 00 00 00", 2, "", 256, True, False),
        ("00 A4 02 0C 02 01 01", 3, "0101", None, False, False),
        ("00 A4 04 00 02 F0 70 00", 4, "F070", 256, True, False),
        ("00 B0 00 00 00 01 00", 2, "", 256, False, True),
        ("00 B0 00 00 00 00 00", 2, "", 65536, True, True),
        ("80 10 00 00 00 00 02 AA BB", 3, "AABB", None, False, True),
        ("80 10 00 00 00 00 02 AA BB 01 2C", 4, "AABB", 300, False, True),
    ],
)
def test_command_apdu_cases(
    raw: str, case: int, data: str, ne: int | None, le_is_zero: bool, extended: bool
) -> None:
    apdu = CommandAPDU.parse(bytes.fromhex(raw))
    assert (apdu.cla, apdu.ins) == tuple(bytes.fromhex(raw)[:2])
    assert (apdu.case, apdu.data, apdu.ne, apdu.le_is_zero, apdu.extended) == (
        case,
        bytes.fromhex(data),
        ne,
        le_is_zero,
        extended,
    )
    assert apdu.to_bytes() == bytes.fromhex(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("00 A4 04", "shorter than 4"),
        ("00 A4 00 00 02 3F", "short Lc"),
        ("00 A4 00 00 02 3F 00 00 00", "short Lc"),
        ("80 10 00 00 00 00", "truncated extended"),
        ("80 10 00 00 00 00 00 AA", "extended Lc of 0"),
        ("80 10 00 00 00 00 03 AA BB", "extended Lc does not match"),
    ],
)
def test_malformed_apdus(raw: str, message: str) -> None:
    with pytest.raises(APDUError, match=message):
        CommandAPDU.parse(bytes.fromhex(raw))
    assert issubclass(APDUError, ValueError)
