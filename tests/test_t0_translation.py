"""The T=0 rule of protocol/vscard-t0.md on bytes: the ATR shown to a T=0-only reader, and the
translation of the guest's T=0 TPDUs for a T=1 card (and for a T=0 card, as they are).

The card behind the translator is the project's test card (SimulatedCard, a strict T=1 card:
READ BINARY without Le is 6700) or a scripted card where a test needs answers the test card
does not give (6Cxx, a card that refuses an Le).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pcscbridge.host.backends.simcard import DEFAULT_ATR, SimulatedCard, pattern
from pcscbridge.iso7816.atr import ATRError, append_tck, offer_t0, offered_protocols, parse_atr
from pcscbridge.iso7816.t0 import T0Translator, ToCard, ToGuest, returns_no_data
from pcscbridge.pcsc import Protocol


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- ATR ---------------------------------------------------------------------------------------
def test_t1_only_test_card_atr_offers_t0_with_historical_bytes_kept() -> None:
    rewritten = offer_t0(DEFAULT_ATR)
    assert h("3B 85 81 31 FE 45 80 73 B0 01 40 8C") == DEFAULT_ATR
    # TD1 81 -> 80, TD2 31 -> 30; only T=0 named now, so no TCK.
    assert rewritten == h("3B 85 80 30 FE 45 80 73 B0 01 40")
    assert offered_protocols(rewritten) == Protocol.T0
    parsed = parse_atr(rewritten)
    assert parsed.historical == parse_atr(DEFAULT_ATR).historical == h("80 73 B0 01 40")
    assert parsed.tck is None and not parsed.tck_required


def test_tck_recomputed_when_another_protocol_stays_named() -> None:
    # T=1 in TD1 and TD2, global bytes (T=15) after TD3: TCK stays, recomputed.
    card = h("3B DA 18 FF 81 B1 FE 75 1F 03 00 31 C5 73 C0 01 40 00 90 00 0C")
    rewritten = offer_t0(card)
    assert rewritten[:6] == h("3B DA 18 FF 80 B0")
    parsed = parse_atr(rewritten)
    assert parsed.protocols == (0, 15) and parsed.tck_valid is True
    assert parsed.historical == parse_atr(card).historical


def test_specific_mode_t1_becomes_specific_mode_t0() -> None:
    # TD1 = 11: TA2 follows, T=1; TA2 = 81: specific mode, T=1.
    card = append_tck(h("3B 80 11 81"))
    assert offer_t0(card) == h("3B 80 10 80")


def test_atrs_that_offer_t0_are_left_alone() -> None:
    for atr in (h("3B 80 80 01 01"), h("3B 02 14 50"), h("3F 65 25 00 2C 09 69 90 00")):
        assert offer_t0(atr) == atr


def test_unparsable_t1_atr_is_an_error() -> None:
    with pytest.raises(ATRError):
        offer_t0(h("3B 81 81 31"))  # TD1 announces a TD2 and one historical byte: truncated


# --- TPDU translation ---------------------------------------------------------------------------
Card = Callable[[bytes], bytes]


def run(
    translator: T0Translator, tpdu: bytes, card: Card, sent: list[bytes] | None = None
) -> bytes:
    """One guest exchange: the steps until the guest's answer; what reached the card in `sent`."""
    step = translator.command(tpdu)
    while isinstance(step, ToCard):
        if sent is not None:
            sent.append(step.apdu)
        step = translator.card_answered(card(step.apdu))
    assert isinstance(step, ToGuest)
    return step.response


@pytest.fixture
def card() -> SimulatedCard:
    card = SimulatedCard(label="t0")
    card.power_on()
    return card


SELECT_EF_4K = h("00 A4 08 0C 04 50 43 01 02")  # path 5043/0102, no FCI: case 3


def test_case2_read_binary_256_bytes(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    sent: list[bytes] = []
    assert run(t, SELECT_EF_4K, card.process_apdu, sent) == h("90 00")
    # SELECT with P2=0C returns no data: sent as case 3, no Le added.
    assert sent == [SELECT_EF_4K]
    answer = run(t, h("00 B0 00 00 00"), card.process_apdu)
    assert answer == pattern(4096, 0x02)[:256] + h("90 00")


def test_case4_command_gets_le_and_its_data_by_get_response(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    echo = h("80 10 00 00 03 AA BB CC")  # the guest's case-4 ECHO in case-3 form
    sent: list[bytes] = []
    assert run(t, echo, card.process_apdu, sent) == h("61 03")
    assert sent == [echo + h("00")]  # Le = 00 added
    sent.clear()
    assert run(t, h("00 C0 00 00 03"), card.process_apdu, sent) == h("AA BB CC 90 00")
    assert sent == []  # served from what the card returned: the card sees one command


def test_select_with_fci_is_case4(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    sent: list[bytes] = []
    answer = run(t, h("00 A4 00 00 02 3F 00"), card.process_apdu, sent)
    assert sent == [h("00 A4 00 00 02 3F 00 00")]
    assert answer[0] == 0x61
    fci = run(t, h("00 C0 00 00") + answer[1:], card.process_apdu)
    assert fci[0] == 0x6F and fci[-2:] == h("90 00")


def test_long_answer_comes_in_256_byte_parts_never_cut(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    respond_600 = h("80 12 02 58 00")  # RESPOND 600 bytes; the card ignores Le
    first = run(t, respond_600, card.process_apdu)
    assert first == pattern(600, 0x12)[:256] + h("61 00")  # 344 more: 256 next
    second = run(t, h("00 C0 00 00 00"), card.process_apdu)
    assert second == pattern(600, 0x12)[256:512] + h("61 58")  # 88 left
    third = run(t, h("00 C0 00 00 58"), card.process_apdu)
    assert third == pattern(600, 0x12)[512:] + h("90 00")
    assert all(len(part) <= 258 for part in (first, second, third))  # QEMU 7.2 carries 374


def test_get_response_asking_less_keeps_the_rest(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    assert run(t, h("80 10 00 00 04 01 02 03 04"), card.process_apdu) == h("61 04")
    assert run(t, h("00 C0 00 00 01"), card.process_apdu) == h("01 61 03")
    assert run(t, h("00 C0 00 00 03"), card.process_apdu) == h("02 03 04 90 00")


def test_answer_longer_than_case2_le_is_not_cut(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    # RESPOND 32 with Le 16: the card ignores Le; the guest gets 16 now and 16 on request.
    assert run(t, h("80 12 00 20 10"), card.process_apdu) == pattern(32, 0x12)[:16] + h("61 10")
    assert run(t, h("00 C0 00 00 10"), card.process_apdu) == pattern(32, 0x12)[16:] + h("90 00")


def test_shorter_answer_than_le_is_passed_as_the_card_gave_it(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    run(t, h("00 A4 08 0C 04 50 43 01 01"), card.process_apdu)  # the 32-byte EF
    assert run(t, h("00 B0 00 10 20"), card.process_apdu) == pattern(32, 0x01)[16:] + h("62 82")


def test_any_other_command_drops_what_get_response_would_have_served(
    card: SimulatedCard,
) -> None:
    t = T0Translator(card_speaks_t1=True)
    assert run(t, h("80 10 00 00 02 01 02"), card.process_apdu) == h("61 02")
    assert run(t, h("80 14 90 00 00"), card.process_apdu) == h("90 00")  # STATUS WORD 9000
    sent: list[bytes] = []
    # GET RESPONSE now reaches the card, which does not know it.
    assert run(t, h("00 C0 00 00 02"), card.process_apdu, sent) == h("6D 00")
    assert sent == [h("00 C0 00 00 02")]


def test_case1_with_p3_zero() -> None:
    t = T0Translator(card_speaks_t1=True)
    sent: list[bytes] = []

    def strict(apdu: bytes) -> bytes:
        return h("67 00") if len(apdu) != 4 else h("90 00")  # a case-1 command, strictly

    # A no-data instruction with P3 = 00 goes as case 1 straight away...
    assert run(t, h("00 20 00 81 00"), strict, sent) == h("90 00")
    assert sent == [h("00 20 00 81")]
    # ...another goes with Le = 256; a card that refuses the Le gets it again without.
    sent.clear()
    assert run(t, h("80 EE 00 00 00"), strict, sent) == h("90 00")
    assert sent == [h("80 EE 00 00 00"), h("80 EE 00 00")]


def test_verify_is_never_sent_twice() -> None:
    t = T0Translator(card_speaks_t1=True)
    sent: list[bytes] = []
    verify = h("00 20 00 81 04 31 32 33 34")
    assert run(t, verify, lambda apdu: h("63 C2"), sent) == h("63 C2")
    assert sent == [verify]  # case 3 as it came, no Le added, one try
    sent.clear()
    assert run(t, verify, lambda apdu: h("67 00"), sent) == h("67 00")
    assert sent == [verify]
    assert returns_no_data(verify) and returns_no_data(h("00 D6 00 00 01 00"))
    assert not returns_no_data(h("00 A4 04 00 01 F0")) and not returns_no_data(h("00 88 00 00"))


def test_card_that_refuses_the_added_le_gets_the_command_without_it() -> None:
    t = T0Translator(card_speaks_t1=True)
    sent: list[bytes] = []

    def no_le_please(apdu: bytes) -> bytes:
        return h("67 00") if len(apdu) == 5 + apdu[4] + 1 else h("90 00")

    command = h("80 30 00 00 02 01 02")  # a proprietary case-3 command
    assert run(t, command, no_le_please, sent) == h("90 00")
    assert sent == [command + h("00"), command]


def test_6cxx_to_the_added_le_resends_with_the_exact_le() -> None:
    t = T0Translator(card_speaks_t1=True)
    sent: list[bytes] = []

    def exact_le(apdu: bytes) -> bytes:
        return h("11 22 33 90 00") if apdu[-1] == 3 else h("6C 03")

    command = h("80 88 00 00 02 AA BB")
    assert run(t, command, exact_le, sent) == h("61 03")
    assert sent == [command + h("00"), command + h("03")]
    assert run(t, h("00 C0 00 00 03"), exact_le) == h("11 22 33 90 00")


def test_6cxx_to_the_guests_own_le_is_the_guests_to_handle() -> None:
    t = T0Translator(card_speaks_t1=True)
    sent: list[bytes] = []
    assert run(t, h("80 CA 00 01 10"), lambda apdu: h("6C 04"), sent) == h("6C 04")
    assert sent == [h("80 CA 00 01 10")]  # the guest re-sends with P3 = 04 (ISO 7816-3 T=0)


def test_card_61xx_passes_to_the_guest_whose_get_response_reaches_the_card() -> None:
    t = T0Translator(card_speaks_t1=True)
    answers = {h("80 50 00 00 01 AA 00"): h("61 05"), h("00 C0 00 00 05"): h("0102030405 9000")}
    assert run(t, h("80 50 00 00 01 AA"), answers.__getitem__) == h("61 05")
    assert run(t, h("00 C0 00 00 05"), answers.__getitem__) == h("0102030405 9000")


def test_t0_card_gets_the_tpdus_as_they_are() -> None:
    t = T0Translator(card_speaks_t1=False)
    sent: list[bytes] = []
    answers = {h("80 10 00 00 02 01 02"): h("61 02"), h("00 C0 00 00 02"): h("01 02 90 00")}
    assert run(t, h("80 10 00 00 02 01 02"), answers.__getitem__, sent) == h("61 02")
    assert run(t, h("00 C0 00 00 02"), answers.__getitem__, sent) == h("01 02 90 00")
    assert sent == list(answers)


def test_apdus_that_are_not_tpdus_go_as_they_are(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    sent: list[bytes] = []
    run(t, SELECT_EF_4K, card.process_apdu)
    extended = h("00 B0 00 00 00 10 00")  # case 2E, Ne 4096: 256 per exchange
    assert run(t, extended, card.process_apdu, sent) == pattern(4096, 0x02)[:256] + h("61 00")
    assert sent == [extended]
    case4_with_le = h("80 10 00 00 02 01 02 02")
    assert run(t, case4_with_le, card.process_apdu) == h("01 02 90 00")
    assert run(t, h("80 14 90 00"), card.process_apdu) == h("90 00")  # a bare header


def test_reset_forgets_the_pending_answer(card: SimulatedCard) -> None:
    t = T0Translator(card_speaks_t1=True)
    assert run(t, h("80 10 00 00 01 01"), card.process_apdu) == h("61 01")
    t.reset()
    assert run(t, h("00 C0 00 00 01"), card.process_apdu) == h("6D 00")


def test_answer_without_status_word_is_passed_on() -> None:
    t = T0Translator(card_speaks_t1=True)
    assert run(t, h("00 B0 00 00 01"), lambda apdu: h("90")) == h("90")
    with pytest.raises(RuntimeError):
        t.card_answered(h("90 00"))
