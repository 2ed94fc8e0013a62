"""The policy's pure parts: the file (keys, defaults, errors naming the line), APDU patterns and
the read-only preset, PIN masking, PC/SC part 10 features; and `pcscbridge policy check`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pcscbridge.host.apdu_rules import ApduPattern, ApduRules
from pcscbridge.host.policy_file import (
    DEFAULTS,
    PolicyError,
    load_policy,
    parse_policy,
)
from pcscbridge.iso7816 import pin
from pcscbridge.link.calls import Control, SetAttrib, Transmit
from pcscbridge.part10 import (
    PIN_PAD_FEATURES,
    Feature,
    parse_features,
    pin_structure_apdu,
    without_features,
)
from rig.bridge_processes import PCSCBRIDGE

EXAMPLE = Path(__file__).parent.parent / "contrib" / "policy.example.toml"
VERIFY_PIN = bytes.fromhex("0020008008") + b"735194\xff\xff"


def test_a_guest_gets_its_table_else_the_star_table_else_the_defaults() -> None:
    policy = parse_policy(
        '[guests."*"]\ndirect = true\n\n[guests."vm"]\nreaders = ["A *"]\nhold_limit = 2.5\n'
    )
    assert policy.for_guest("vm").readers == ("A *",)
    assert policy.for_guest("vm").hold_limit == 2.5
    assert policy.for_guest("vm").direct is False  # a named table does not inherit from "*"
    assert policy.for_guest("other").direct is True
    assert parse_policy("").for_guest("anyone") == DEFAULTS


def test_the_safe_defaults() -> None:
    assert DEFAULTS.readers == ("*",) and not DEFAULTS.direct and DEFAULTS.exclusive
    assert DEFAULTS.hold_limit == 60 and not DEFAULTS.set_attrib and DEFAULTS.get_attrib
    assert DEFAULTS.control_codes == () and DEFAULTS.apdus == "all" and DEFAULTS.pin_guard == 1
    assert (DEFAULTS.max_contexts, DEFAULTS.max_cards, DEFAULTS.max_in_flight) == (32, 64, 64)


def test_readers_are_globs_and_hidden_ones_win() -> None:
    guest = parse_policy(
        '[guests.g]\nreaders = ["Virtual PCD 00 *"]\nhide_readers = ["* 01"]\n'
    ).for_guest("g")
    assert guest.sees("Virtual PCD 00 00")
    assert not guest.sees("Virtual PCD 00 01")
    assert not guest.sees("Virtual PCD 01 00")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('# c\n[guests."vm"]\ndirect = true\nexclusiv = false\n', 4, "unknown key 'exclusiv'"),
        ('[guests."vm"]\n\n\nhold_limit = "long"\n', 4, "hold_limit must be a number"),
        ('[guests."*"]\nreaders = "all"\n', 2, "readers must be a list"),
        ("[guests.a]\napdu_deny = ['00 D6', 'zz']\n", 2, "bad APDU pattern 'zz'"),
        ("[guests.a]\nrename = { A = 'X', B = 'X' }\n", 2, "two readers the same name"),
        ("[guests.a]\napdus = 'read-write'\n", 2, "apdus must be one of"),
        ("[guests.a]\ncontrol_codes = [-1]\n", 2, "control_codes must be"),
        ("[guests.a]\nmax_contexts = true\n", 2, "max_contexts must be a whole number"),
        ("[server]\nport = 1\n", 1, "unknown top-level key 'server'"),
        ('[guests."vm"]\ndirect = \n', 2, "not valid TOML"),
    ],
)
def test_a_bad_file_is_refused_with_its_line(text: str, line: int, words: str) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policy(text, "p.toml")
    assert str(refused.value).startswith(f"p.toml:{line}:"), refused.value
    assert words in str(refused.value)


def test_the_example_file_is_valid_and_policy_check_summarises_it(tmp_path: Path) -> None:
    load_policy(EXAMPLE)
    result = subprocess.run(
        [*PCSCBRIDGE, "policy", "check", str(EXAMPLE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "every other guest" in result.stdout
    assert "APDUs: read-only" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[guests."vm"]\n\nreaders = ["*"]\nsharing = true\n')
    result = subprocess.run(
        [*PCSCBRIDGE, "policy", "check", str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"{bad}:4:" in result.stderr and "unknown key 'sharing'" in result.stderr


def test_apdu_patterns() -> None:
    assert ApduPattern.parse("xx D6").matches(bytes.fromhex("0CD6000001AA"))
    assert not ApduPattern.parse("00 D6").matches(bytes.fromhex("0CD6000001AA"))
    assert ApduPattern.parse("0x 20 00 8x").matches(bytes.fromhex("01200081"))
    assert not ApduPattern.parse("0x 20 00 8x").matches(bytes.fromhex("01200091"))
    for bad in ("", "0", "00 11 22 33 44", "gg", "00D6"):
        with pytest.raises(ValueError):
            ApduPattern.parse(bad)


def test_the_read_only_preset_refuses_writes_under_any_class() -> None:
    rules = ApduRules("read-only")
    for command in ("00D600000101", "0CD6000001AA", "00DA010203010203", "00E4000000",
                    "0024008010" + "31" * 16, "002C008010" + "31" * 16, "00470000",
                    "00E6000000", "0044000000", "80E6020003010203"):  # fmt: skip
        assert rules.refusal(bytes.fromhex(command)) is not None, command
    for command in ("00B0000020", "00A4040C02F070", "0020008008" + "31" * 8, "00CA006E00",
                    "002A9E9A0101", "0084000008"):  # fmt: skip
        assert rules.refusal(bytes.fromhex(command)) is None, command


def test_deny_wins_then_allow_then_the_preset() -> None:
    allow = (ApduPattern.parse("00 DA 01"),)
    deny = (ApduPattern.parse("xx B0"),)
    rules = ApduRules("read-only", allow, deny)
    assert rules.refusal(bytes.fromhex("00DA0102")) is None  # allowed despite the preset
    assert rules.refusal(bytes.fromhex("00B0000010")) is not None  # denied
    listed = ApduRules("listed", allow)
    assert listed.refusal(bytes.fromhex("00DA0102")) is None
    assert listed.refusal(bytes.fromhex("00A40000")) == "not in apdu_allow"


def test_pin_data_is_never_shown() -> None:
    for command in (
        VERIFY_PIN,
        bytes.fromhex("0024008010") + b"735194\xff\xff" + b"123456\xff\xff",
        bytes.fromhex("002C008010") + b"84120637" + b"735194\xff\xff",
        bytes.fromhex("0C20008008") + b"735194\xff\xff",  # secure messaging class
    ):
        for text in (
            pin.show_command(command),
            pin.show_command(command, with_data=True),
            repr(Transmit(1, 2, command)),
        ):
            assert "735194" not in text and b"735194".hex() not in text.lower(), text
            assert "masked" in text
    assert pin.show_command(bytes.fromhex("80100000020102"), with_data=True) == "80100000020102"
    assert "0102" not in pin.show_command(bytes.fromhex("80100000020102"))
    assert "735194" not in repr(Control(1, 0x42330006, b"\x00" * 19 + b"735194"))
    assert "secret" not in repr(SetAttrib(1, 2, b"secret"))


def test_tries_left_and_classes() -> None:
    assert pin.tries_left(b"\x63\xc2") == 2
    assert pin.tries_left(b"\x69\x83") == 0
    assert pin.tries_left(b"\x90\x00") is None and pin.tries_left(b"\x6a\x88") is None
    assert pin.is_interindustry_in_clear(0x00) and pin.is_interindustry_in_clear(0x03)
    assert not pin.is_interindustry_in_clear(0x0C) and not pin.is_interindustry_in_clear(0x80)
    assert pin.is_interindustry_in_clear(0x40) and not pin.is_interindustry_in_clear(0x60)


def test_part10_features_and_pin_structures() -> None:
    answer = bytes.fromhex("0604 42330006 0704 42330007 0A04 4233000A 1304 42330013")
    features = parse_features(answer)
    assert features == {
        Feature.VERIFY_PIN_DIRECT: 0x42330006,
        Feature.MODIFY_PIN_DIRECT: 0x42330007,
        Feature.IFD_PIN_PROPERTIES: 0x4233000A,
        Feature.CCID_ESC_COMMAND: 0x42330013,
    }
    kept = parse_features(without_features(answer, PIN_PAD_FEATURES))
    assert set(kept) == {Feature.IFD_PIN_PROPERTIES, Feature.CCID_ESC_COMMAND}
    verify = bytes(15) + (13).to_bytes(4, "little") + bytes.fromhex("0020008008") + bytes(8)
    assert pin_structure_apdu(Feature.VERIFY_PIN_DIRECT, verify) == bytes.fromhex("00200080")
    modify = bytes(20) + (21).to_bytes(4, "little") + bytes.fromhex("0024008010") + bytes(16)
    assert pin_structure_apdu(Feature.MODIFY_PIN_DIRECT, modify) == bytes.fromhex("00240080")
    assert pin_structure_apdu(Feature.CCID_ESC_COMMAND, verify) is None
