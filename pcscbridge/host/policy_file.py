"""The policy file (TOML): one table per guest, checked key by key, errors naming the line.

    [guests."*"]                 # every guest without a table of its own
    readers = ["Virtual PCD *"]
    [guests."work-vm"]
    apdus = "read-only"

A key a guest's table leaves out has its built-in default (GuestPolicy's field defaults; a
named guest does not inherit from "*"). Pure: text in, settings or a PolicyError out.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NoReturn

from ..errors import SetupError
from .apdu_rules import PRESETS, ApduPattern, ApduRules

ANY_GUEST = "*"
U32_MAX = 0xFFFFFFFF


class PolicyError(SetupError):
    """A policy file that cannot be used; the message names the file and line."""

    exit_code = 78  # EX_CONFIG


@dataclass(frozen=True)
class GuestPolicy:
    """What one guest may do. Defaults are the documented safe defaults (README, Policy)."""

    readers: tuple[str, ...] = ("*",)  # globs of host reader names the guest sees
    hide_readers: tuple[str, ...] = ()  # globs it never sees, even when `readers` match
    rename: tuple[tuple[str, str], ...] = ()  # (host name, name in the guest)
    direct: bool = False  # SCARD_SHARE_DIRECT connects
    exclusive: bool = True  # SCARD_SHARE_EXCLUSIVE connects
    hold_limit: float = 60.0  # seconds one transaction or EXCLUSIVE hold may last; 0 = none
    get_attrib: bool = True
    set_attrib: bool = False
    pin_pad: bool = True  # PC/SC part 10 PIN entry on the reader's keypad
    control_codes: tuple[int, ...] = ()  # other SCardControl codes allowed (escape, firmware)
    apdus: str = "all"  # preset: "all", "read-only" or "listed"
    apdu_allow: tuple[str, ...] = ()
    apdu_deny: tuple[str, ...] = ()
    pin_guard: int = 1  # refuse a PIN try when the card has this many left or fewer; 0 = off
    pin_guard_unknown: str = "pass"  # cards that do not tell: "pass" or "refuse"
    max_contexts: int = 32  # host PC/SC contexts
    max_cards: int = 64  # card handles
    max_in_flight: int = 64  # calls in progress at once
    max_apdus_per_second: int = 0  # 0 = no limit

    def sees(self, host_reader: str) -> bool:
        return any(fnmatchcase(host_reader, glob) for glob in self.readers) and not any(
            fnmatchcase(host_reader, glob) for glob in self.hide_readers
        )

    @property
    def apdu_rules(self) -> ApduRules:
        return ApduRules(
            self.apdus,
            tuple(ApduPattern.parse(p) for p in self.apdu_allow),
            tuple(ApduPattern.parse(p) for p in self.apdu_deny),
        )


DEFAULTS = GuestPolicy()
KEYS = {f.name for f in fields(GuestPolicy)}


@dataclass(frozen=True)
class PolicyFile:
    guests: dict[str, GuestPolicy] = field(default_factory=dict)
    source: str = "built-in defaults"

    def for_guest(self, guest: str) -> GuestPolicy:
        return self.guests.get(guest) or self.guests.get(ANY_GUEST) or DEFAULTS


def load_policy(path: str | Path) -> PolicyFile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read the policy file {path}: {exc}") from None
    return parse_policy(text, str(path))


def parse_policy(text: str, source: str = "<policy>") -> PolicyFile:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"at line (\d+)", str(exc))
        where = f"{source}:{line.group(1)}" if line else source
        raise PolicyError(f"{where}: not valid TOML: {exc}") from None
    checker = _Checker(text, source)
    for key in document:
        if key != "guests":
            checker.fail(None, key, f"unknown top-level key {key!r}: the file holds [guests.NAME]")
    tables = document.get("guests", {})
    if not isinstance(tables, dict):
        checker.fail(None, "guests", 'guests must be tables: [guests."NAME"]')
    guests = {name: checker.guest(name, table) for name, table in tables.items()}
    return PolicyFile(guests, source)


class _Checker:
    """Turns one guest's table into a GuestPolicy, failing with the line of the bad key."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def fail(self, guest: str | None, key: str | None, message: str) -> NoReturn:
        where = f" [guests.{_quoted(guest)}]" if guest is not None else ""
        raise PolicyError(f"{self.source}:{self._line(guest, key)}:{where} {message}")

    def _line(self, guest: str | None, key: str | None) -> int:
        """The line of `key` in the guest's table (best effort: the table's header, else 1)."""
        start = 0
        if guest is not None:
            header = re.compile(
                r"\s*\[\s*guests\s*\.\s*(\""
                + re.escape(guest)
                + r"\"|'"
                + re.escape(guest)
                + r"'|"
                + re.escape(guest)
                + r")\s*\]"
            )
            found = [n for n, line in enumerate(self.lines) if header.match(line)]
            if not found:
                found = [n for n, line in enumerate(self.lines) if guest in line]
            if not found:
                return 1
            start = found[0]
        if key is not None:
            assignment = re.compile(r"\s*(\"?)" + re.escape(key) + r"\1\s*=")
            for number in range(start, len(self.lines)):
                line = self.lines[number]
                if number > start and line.lstrip().startswith("[") and guest is not None:
                    break
                if assignment.match(line) or (number == start and f"{key} =" in line):
                    return number + 1
        return start + 1

    def guest(self, name: str, table: Any) -> GuestPolicy:
        if not isinstance(table, dict):
            self.fail(None, name, f"guests.{_quoted(name)} must be a table")
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in KEYS:
                self.fail(name, key, f"unknown key {key!r}; known keys: {', '.join(sorted(KEYS))}")
            values[key] = self._value(name, key, value)
        return GuestPolicy(**values)

    def _value(self, guest: str, key: str, value: Any) -> Any:
        default = getattr(DEFAULTS, key)
        problem = None
        if isinstance(default, bool):
            problem = None if isinstance(value, bool) else "must be true or false"
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
            problem = None if ok else "must be a number of seconds, 0 or more"
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            problem = None if ok else "must be a whole number, 0 or more"
        elif key == "rename":
            problem, value = _rename(value)
        elif key == "control_codes":
            ok = isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U32_MAX for v in value
            )
            problem = None if ok else "must be a list of control codes (0 .. 0xFFFFFFFF)"
            value = tuple(value) if ok else value
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(
                isinstance(v, str) and "\0" not in v for v in value
            )
            problem = None if ok else "must be a list of strings"
            value = tuple(value) if ok else value
            if ok and key in ("apdu_allow", "apdu_deny"):
                for pattern in value:
                    try:
                        ApduPattern.parse(pattern)
                    except ValueError as exc:
                        self.fail(guest, key, str(exc))
        elif key == "apdus":
            problem = None if value in PRESETS else f"must be one of {', '.join(PRESETS)}"
        elif key == "pin_guard_unknown":
            problem = None if value in ("pass", "refuse") else 'must be "pass" or "refuse"'
        if problem is not None:
            self.fail(guest, key, f"{key} {problem} (got {value!r})")
        return value


def _rename(value: Any) -> tuple[str | None, Any]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v and "\0" not in k + v
        for k, v in value.items()
    ):
        return 'must be a table of "host reader name" = "name in the guest"', value
    if len(set(value.values())) != len(value):
        return "gives two readers the same name", value
    return None, tuple(value.items())


def _quoted(name: str | None) -> str:
    return '"' + (name or "") + '"'


def summary(policy: PolicyFile) -> str:
    """What each guest may do, in words (`pcscbridge policy check`)."""
    lines = [f"{policy.source}: valid"]
    for name, guest in policy.guests.items():
        title = "every other guest" if name == ANY_GUEST else f'guest "{name}"'
        lines.append(f"{title}:")
        lines.extend("  " + line for line in describe(guest))
    if ANY_GUEST not in policy.guests:
        lines.append("every other guest: the built-in defaults:")
        lines.extend("  " + line for line in describe(DEFAULTS))
    return "\n".join(lines)


def describe(guest: GuestPolicy) -> list[str]:
    readers = "all" if guest.readers == ("*",) else ", ".join(guest.readers)
    if guest.hide_readers:
        readers += f"; never {', '.join(guest.hide_readers)}"
    lines = [f"readers: {readers}"]
    lines += [f'  "{host}" shown as "{name}"' for host, name in guest.rename]
    hold = f"{guest.hold_limit:g} s" if guest.hold_limit else "no limit"
    lines.append(
        f"share modes: SHARED, {'EXCLUSIVE' if guest.exclusive else 'not EXCLUSIVE'}, "
        f"{'DIRECT' if guest.direct else 'not DIRECT'}; transaction/EXCLUSIVE hold: {hold}"
    )
    control = ["feature query", "reader properties"]
    if guest.pin_pad:
        control.append("PIN pad")
    control += [f"0x{code:08X}" for code in guest.control_codes]
    lines.append(f"SCardControl: {', '.join(control)}; nothing else")
    lines.append(
        f"GetAttrib: {'yes' if guest.get_attrib else 'no'}; "
        f"SetAttrib: {'yes' if guest.set_attrib else 'no'}"
    )
    apdus = f"APDUs: {guest.apdus}"
    if guest.apdu_deny:
        apdus += f"; denied: {', '.join(guest.apdu_deny)}"
    if guest.apdu_allow:
        apdus += f"; allowed: {', '.join(guest.apdu_allow)}"
    lines.append(apdus + " (refused ones answer SW 6982)")
    if guest.pin_guard:
        lines.append(
            f"PIN guard: no PIN try when the card has {guest.pin_guard} or fewer left; "
            f"cards that do not tell: {guest.pin_guard_unknown}"
        )
    else:
        lines.append("PIN guard: off")
    rate = guest.max_apdus_per_second or "unlimited"
    lines.append(
        f"limits: {guest.max_contexts} contexts, {guest.max_cards} card handles, "
        f"{guest.max_in_flight} calls at once, APDUs per second: {rate}"
    )
    return lines
