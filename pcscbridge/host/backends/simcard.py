"""A pure ISO 7816-4 test card: the one card behind the simulated backend and the vpcd test card.

No I/O: bytes in, bytes out. The simulated backend (``sim``) and the vpcd card program
(``rig.vpcd_card``) wrap the same :class:`SimulatedCard`, so a test sees the same
card whichever way it reaches it. Command APDUs are parsed by :mod:`pcscbridge.iso7816.apdu`.

ATR
    ``3B 85 81 31 FE 45 80 73 B0 01 40 xx`` (T=1 only; IFSC 254; historical bytes announce
    selection by DF name/path/file id and extended Lc/Le; ``xx`` = TCK). See :data:`DEFAULT_ATR`.

File system (all EFs transparent)
    ::

        MF 3F00
        ├── EF.DIR     2F00   one application template naming the application below
        ├── EF.LABEL   2F10   the card's label (UTF-8, may be empty): tells two cards apart
        └── DF 5043           the application, AID F0 70 63 73 63 62 72 69 64 67 65
            │                 (F0 = proprietary, unregistered RID; then ASCII "pcscbridge")
            ├── EF 0101       32 bytes   pattern(32, seed=0x01)
            ├── EF 0102       4096 bytes pattern(4096, seed=0x02)
            └── EF 0103       61440 bytes (60 KiB) pattern(61440, seed=0x03)

    :func:`pattern` is public so tests can compute expected contents.

Instruction set (anything else: unknown INS -> 6D00, CLA other than 00/80 -> 6E00)
    ``00 A4`` SELECT
        P1=00 by file id (empty data or 3F00 = MF; else a child of the current DF, then of
        the MF), P1=01 child DF, P1=02 child EF, P1=03 parent DF (no data), P1=04 by DF name
        (AID; a prefix of the AID also matches), P1=08 path from the MF (a leading 3F00 is
        accepted), P1=09 path from the current DF. P2 & 0x0C: 00 returns FCI (6F), 04 FCP (62),
        08 FMD (64), 0C nothing. Other P1/P2 -> 6B00, not found -> 6A82, bad data length -> 6700.
    ``00 B0`` READ BINARY of the current EF
        offset P1P2 (P1 bit 8 must be 0: SFI not supported -> 6A81); Le required (short or
        extended, so up to 65536 bytes). Offset at or beyond the end -> 6B00. Le = 00/0000 reads up
        to the end -> 9000; a non-zero Le that runs past the end returns what there is + 6282.
        No current EF -> 6986.
    ``00 84`` GET CHALLENGE
        P1P2 = 0000 (else 6B00), Le required: Le random bytes.
    ``00 D6`` UPDATE BINARY of the current EF
        offset P1P2 (as READ BINARY), data written in place; past the end -> 6B00 (the EF
        never grows). Changes last as long as the card object.
    ``00 20`` VERIFY, ``00 24`` CHANGE REFERENCE DATA, ``00 2C`` RESET RETRY COUNTER
        Two references, PIV style: P2=80 the PIN (:data:`TEST_PIN`), P2=81 the PUK
        (:data:`TEST_PUK`), each 8 bytes padded with FF, :data:`PIN_TRIES` tries. VERIFY
        without data tells the state: 9000 verified, 63Cx x tries left, 6983 blocked. VERIFY
        with a wrong value -> 63Cx (one try less), the last one -> 6983; a right one -> 9000
        and the tries are full again. CHANGE REFERENCE DATA (P1=00): old || new value, tries
        counted as VERIFY. RESET RETRY COUNTER (P1=00, P2=80): PUK || new PIN, counting PUK
        tries; the PIN is unblocked with full tries. Verification lasts until a reset. Other
        P1/P2 -> 6A86, data not 8/16 bytes -> 6700.
    ``80 10`` ECHO
        responds with the command data (0..65535 bytes) + 9000; P1P2 and Le are ignored.
    ``80 12`` RESPOND N
        N = P1P2 (0..65535): responds with pattern(N, seed=0x12) + 9000; Le is ignored.
    ``80 14`` STATUS WORD
        responds with SW1SW2 = P1 P2 and no data (error-path tests).
    ``80 16`` DELAY
        responds 9000; transports hold the response for P1P2 milliseconds (see
        :func:`requested_delay`) so tests can exercise a slow SCardTransmit.

Malformed APDUs (shorter than 4 bytes, Lc not matching the length, extended Lc = 0) -> 6700.

Limits of the vpcd transport: vpcd frames are at most 65535 bytes, so through vpcd a command
carries at most 65528 data bytes (extended case 4) and a response at most 65533 data bytes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from ...iso7816.apdu import CommandAPDU
from ...iso7816.atr import append_tck

# Status words
SW_OK = b"\x90\x00"
SW_END_OF_FILE = b"\x62\x82"  # fewer bytes than Ne before the end of the EF
SW_WRONG_LENGTH = b"\x67\x00"
SW_FUNCTION_NOT_SUPPORTED = b"\x6a\x81"
SW_FILE_NOT_FOUND = b"\x6a\x82"
SW_NO_CURRENT_EF = b"\x69\x86"
SW_WRONG_P1P2 = b"\x6b\x00"
SW_INCORRECT_P1P2 = b"\x6a\x86"
SW_AUTH_BLOCKED = b"\x69\x83"
SW_INS_NOT_SUPPORTED = b"\x6d\x00"
SW_CLA_NOT_SUPPORTED = b"\x6e\x00"

CLA_ISO = 0x00
CLA_PROPRIETARY = 0x80

INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_GET_CHALLENGE = 0x84
INS_UPDATE_BINARY = 0xD6
INS_VERIFY = 0x20
INS_CHANGE_REFERENCE_DATA = 0x24
INS_RESET_RETRY_COUNTER = 0x2C
INS_ECHO = 0x10
INS_RESPOND_N = 0x12
INS_STATUS_WORD = 0x14
INS_DELAY = 0x16

FID_MF = 0x3F00
FID_EF_DIR = 0x2F00
FID_EF_LABEL = 0x2F10
FID_APP_DF = 0x5043
FID_EF_SMALL = 0x0101
FID_EF_4K = 0x0102
FID_EF_60K = 0x0103

APP_AID = bytes.fromhex("F0") + b"pcscbridge"
SIZE_EF_SMALL = 32
SIZE_EF_4K = 4096
SIZE_EF_60K = 60 * 1024

PIN_REF, PUK_REF = 0x80, 0x81
TEST_PIN = b"735194"  # the test card's PIN and PUK, unpadded
TEST_PUK = b"84120637"
PIN_TRIES = 3


# TS=3B direct convention; T0=85: TD1 present, 5 historical bytes; TD1=81: TD2 present, T=1;
# TD2=31: TA3, TB3 present, T=1; TA3=FE: IFSC 254; TB3=45: BWI 4, CWI 5.
# Historical: 80 = compact-TLV follows; 73 B0 01 40 = card capabilities (selection by full DF
# name, path and file id; data coding 01; extended Lc and Le fields).
# TCK: the XOR of T0 .. the last historical byte (required when T=1 is offered).
DEFAULT_ATR = append_tck(bytes.fromhex("3B 85 81 31 FE 45 80 73 B0 01 40"))


@lru_cache(maxsize=32)
def pattern(length: int, seed: int = 0) -> bytes:
    """Deterministic test data: byte i = (i + (i >> 8) + seed) mod 256.

    The (i >> 8) term makes every 256-byte block differ, so a reordered or duplicated block of
    a large transfer does not go unnoticed.
    """
    return bytes((i + (i >> 8) + seed) & 0xFF for i in range(length))


def requested_delay(command: bytes) -> float:
    """Seconds a transport should hold the response to ``command`` (DELAY instruction), else 0."""
    if len(command) >= 4 and command[0] == CLA_PROPRIETARY and command[1] == INS_DELAY:
        return ((command[2] << 8) | command[3]) / 1000.0
    return 0.0


# ----------------------------------------------------------------------------- file system


@dataclass
class _File:
    fid: int
    # The back link makes the tree cyclic: keep it out of the generated repr and comparisons.
    parent: _DF | None = field(default=None, repr=False, compare=False)


@dataclass
class _EF(_File):
    data: bytes = b""


@dataclass
class _DF(_File):
    aid: bytes | None = None
    children: dict[int, _File] = field(default_factory=dict)

    def add(self, node: _File) -> None:
        node.parent = self
        self.children[node.fid] = node


def _tlv(tag: int, value: bytes) -> bytes:
    # Only short lengths are produced here (FCP/EF.DIR contents stay far below 128 bytes).
    return bytes([tag, len(value)]) + value


def _build_filesystem(label: str) -> tuple[_DF, _DF]:
    mf = _DF(FID_MF)
    app = _DF(FID_APP_DF, aid=APP_AID)
    app_template = _tlv(0x61, _tlv(0x4F, APP_AID) + _tlv(0x50, b"pcscbridge test"))
    mf.add(_EF(FID_EF_DIR, data=app_template))
    mf.add(_EF(FID_EF_LABEL, data=label.encode()))
    mf.add(app)
    app.add(_EF(FID_EF_SMALL, data=pattern(SIZE_EF_SMALL, 0x01)))
    app.add(_EF(FID_EF_4K, data=pattern(SIZE_EF_4K, 0x02)))
    app.add(_EF(FID_EF_60K, data=pattern(SIZE_EF_60K, 0x03)))
    return mf, app


# ----------------------------------------------------------------------------- the card


class _WrongLength(Exception):
    """A length the instruction does not accept: answered with 6700."""


def pad_pin(value: bytes) -> bytes:
    """A PIN or PUK as the card takes it: 8 bytes, padded with FF."""
    return value.ljust(8, b"\xff")


@dataclass
class _Secret:
    """A PIN or PUK: its value and the tries left."""

    value: bytes
    tries: int = PIN_TRIES
    verified: bool = False

    def state(self) -> bytes:
        if self.verified:
            return SW_OK
        return SW_AUTH_BLOCKED if self.tries == 0 else bytes([0x63, 0xC0 | self.tries])

    def check(self, candidate: bytes) -> bytes:
        """Compare, counting a try; the status word of VERIFY."""
        if self.tries == 0:
            return SW_AUTH_BLOCKED
        if candidate == self.value:
            self.tries, self.verified = PIN_TRIES, True
            return SW_OK
        self.tries -= 1
        self.verified = False
        return self.state()


class SimulatedCard:
    """An ISO 7816-4 card with a tiny file system and test instructions (see module docstring).

    Not thread-safe: one owner drives it (the vpcd card thread, or the simulated backend under
    its own lock).
    """

    def __init__(
        self,
        label: str = "",
        atr: bytes = DEFAULT_ATR,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.label = label
        self.atr = atr
        self.powered = False
        self._random_bytes = random_bytes
        self._mf, self._app = _build_filesystem(label)
        self._current_df: _DF = self._mf
        self._current_ef: _EF | None = None
        self._secrets = {PIN_REF: _Secret(pad_pin(TEST_PIN)), PUK_REF: _Secret(pad_pin(TEST_PUK))}

    @property
    def pin_tries(self) -> int:
        """The PIN tries left (tests read it to see what reached the card)."""
        return self._secrets[PIN_REF].tries

    def __repr__(self) -> str:
        return f"SimulatedCard(label={self.label!r})"

    # -- power

    def power_on(self) -> bytes:
        """Cold reset: returns the ATR; the MF becomes the current DF, no EF selected."""
        self.powered = True
        self._current_df = self._mf
        self._current_ef = None
        for secret in self._secrets.values():
            secret.verified = False
        return self.atr

    def power_off(self) -> None:
        self.powered = False
        self._current_ef = None

    def reset(self) -> bytes:
        """Warm reset: same effect as a cold one for this card."""
        return self.power_on()

    # -- APDUs

    def process_apdu(self, command: bytes) -> bytes:
        """Returns the response APDU (data + SW1 SW2).

        An unpowered card answers anyway: readers power cards on demand, and a test card that
        went mute because a driver skipped a power-on would only hide the real failure.
        """
        try:
            apdu = CommandAPDU.parse(bytes(command))
        except ValueError:
            return SW_WRONG_LENGTH
        try:
            if apdu.cla == CLA_ISO:
                handler = self._iso_instructions.get(apdu.ins)
            elif apdu.cla == CLA_PROPRIETARY:
                handler = self._proprietary_instructions.get(apdu.ins)
            else:
                return SW_CLA_NOT_SUPPORTED
            if handler is None:
                return SW_INS_NOT_SUPPORTED
            return handler(self, apdu)
        except _WrongLength:
            return SW_WRONG_LENGTH

    # -- ISO instructions

    def _select(self, apdu: CommandAPDU) -> bytes:
        if apdu.p2 & ~0x0C & 0xFF:  # only "first occurrence" and the response-type bits
            return SW_WRONG_P1P2
        data = apdu.data
        target: _File | None
        if apdu.p1 == 0x00:
            target = self._select_by_fid(data)
        elif apdu.p1 in (0x01, 0x02):
            fid = self._fid(data)
            child = self._current_df.children.get(fid)
            wanted = _DF if apdu.p1 == 0x01 else _EF
            target = child if isinstance(child, wanted) else None
        elif apdu.p1 == 0x03:
            if data:
                raise _WrongLength
            target = self._current_df.parent or self._mf
        elif apdu.p1 == 0x04:
            target = self._select_by_name(data)
        elif apdu.p1 == 0x08:
            path = self._path(data)
            if path and path[0] == FID_MF:
                path = path[1:]
            target = self._walk(self._mf, path)
        elif apdu.p1 == 0x09:
            target = self._walk(self._current_df, self._path(data))
        else:
            return SW_WRONG_P1P2
        if target is None:
            return SW_FILE_NOT_FOUND
        if isinstance(target, _DF):
            self._current_df, self._current_ef = target, None
        else:
            assert isinstance(target, _EF) and target.parent is not None
            self._current_df, self._current_ef = target.parent, target
        return self._file_info(target, apdu.p2 & 0x0C) + SW_OK

    @staticmethod
    def _fid(data: bytes) -> int:
        if len(data) != 2:
            raise _WrongLength
        return (data[0] << 8) | data[1]

    @staticmethod
    def _path(data: bytes) -> list[int]:
        if not data or len(data) % 2:
            raise _WrongLength
        return [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]

    def _select_by_fid(self, data: bytes) -> _File | None:
        if not data:
            return self._mf
        fid = self._fid(data)
        if fid == FID_MF:
            return self._mf
        if fid == self._current_df.fid:
            return self._current_df
        return self._current_df.children.get(fid) or self._mf.children.get(fid)

    def _select_by_name(self, name: bytes) -> _File | None:
        if not name:  # ISO: an absent DF name selects the MF
            return self._mf
        for df in (self._mf, self._app):
            if df.aid is not None and df.aid.startswith(name):
                return df
        return None

    @staticmethod
    def _walk(start: _DF, path: list[int]) -> _File | None:
        node: _File = start
        for fid in path:
            if not isinstance(node, _DF):
                return None
            child = node.children.get(fid)
            if child is None:
                return None
            node = child
        return node

    @staticmethod
    def _file_info(node: _File, kind: int) -> bytes:
        if kind == 0x0C:
            return b""
        if isinstance(node, _DF):
            body = _tlv(0x82, b"\x38") + _tlv(0x83, node.fid.to_bytes(2, "big"))
            if node.aid is not None:
                body += _tlv(0x84, node.aid)
        else:
            assert isinstance(node, _EF)
            body = (
                _tlv(0x80, len(node.data).to_bytes(2, "big"))
                + _tlv(0x82, b"\x01")  # working EF, transparent
                + _tlv(0x83, node.fid.to_bytes(2, "big"))
            )
        tag = {0x00: 0x6F, 0x04: 0x62, 0x08: 0x64}[kind]
        return _tlv(tag, body)

    def _read_binary(self, apdu: CommandAPDU) -> bytes:
        if apdu.p1 & 0x80:
            return SW_FUNCTION_NOT_SUPPORTED
        if apdu.ne is None or apdu.data:
            raise _WrongLength
        ef = self._current_ef
        if ef is None:
            return SW_NO_CURRENT_EF
        offset = (apdu.p1 << 8) | apdu.p2
        if offset >= len(ef.data) and ef.data:
            # Offset outside the EF. (Answering 9000 with no data at the end made GnuPG's
            # scdaemon read EF.DIR at that offset forever.)
            return SW_WRONG_P1P2
        chunk = ef.data[offset : offset + apdu.ne]
        if len(chunk) < apdu.ne and not apdu.le_is_zero:
            return chunk + SW_END_OF_FILE
        return chunk + SW_OK

    def _update_binary(self, apdu: CommandAPDU) -> bytes:
        if apdu.p1 & 0x80:
            return SW_FUNCTION_NOT_SUPPORTED
        if not apdu.data or apdu.ne is not None:
            raise _WrongLength
        ef = self._current_ef
        if ef is None:
            return SW_NO_CURRENT_EF
        offset = (apdu.p1 << 8) | apdu.p2
        if offset + len(apdu.data) > len(ef.data):
            return SW_WRONG_P1P2
        ef.data = ef.data[:offset] + apdu.data + ef.data[offset + len(apdu.data) :]
        return SW_OK

    def _verify(self, apdu: CommandAPDU) -> bytes:
        secret = self._secrets.get(apdu.p2)
        if apdu.p1 != 0x00 or secret is None:
            return SW_INCORRECT_P1P2
        if not apdu.data:
            return secret.state()
        if len(apdu.data) != 8:
            raise _WrongLength
        return secret.check(apdu.data)

    def _change_reference_data(self, apdu: CommandAPDU) -> bytes:
        secret = self._secrets.get(apdu.p2)
        if apdu.p1 != 0x00 or secret is None:
            return SW_INCORRECT_P1P2
        if len(apdu.data) != 16:
            raise _WrongLength
        status = secret.check(apdu.data[:8])
        if status == SW_OK:
            secret.value = apdu.data[8:]
        return status

    def _reset_retry_counter(self, apdu: CommandAPDU) -> bytes:
        if apdu.p1 != 0x00 or apdu.p2 != PIN_REF:
            return SW_INCORRECT_P1P2
        if len(apdu.data) != 16:
            raise _WrongLength
        status = self._secrets[PUK_REF].check(apdu.data[:8])
        if status == SW_OK:
            self._secrets[PIN_REF] = _Secret(apdu.data[8:])
        return status

    def _get_challenge(self, apdu: CommandAPDU) -> bytes:
        if apdu.p1 or apdu.p2:
            return SW_WRONG_P1P2
        if apdu.ne is None or apdu.data:
            raise _WrongLength
        return self._random_bytes(apdu.ne) + SW_OK

    # -- proprietary test instructions

    def _echo(self, apdu: CommandAPDU) -> bytes:
        return apdu.data + SW_OK

    def _respond_n(self, apdu: CommandAPDU) -> bytes:
        return pattern((apdu.p1 << 8) | apdu.p2, INS_RESPOND_N) + SW_OK

    def _status_word(self, apdu: CommandAPDU) -> bytes:
        return bytes([apdu.p1, apdu.p2])

    def _delay(self, apdu: CommandAPDU) -> bytes:
        return SW_OK

    _iso_instructions: dict[int, Callable[[SimulatedCard, CommandAPDU], bytes]] = {
        INS_SELECT: _select,
        INS_READ_BINARY: _read_binary,
        INS_GET_CHALLENGE: _get_challenge,
        INS_UPDATE_BINARY: _update_binary,
        INS_VERIFY: _verify,
        INS_CHANGE_REFERENCE_DATA: _change_reference_data,
        INS_RESET_RETRY_COUNTER: _reset_retry_counter,
    }
    _proprietary_instructions: dict[int, Callable[[SimulatedCard, CommandAPDU], bytes]] = {
        INS_ECHO: _echo,
        INS_RESPOND_N: _respond_n,
        INS_STATUS_WORD: _status_word,
        INS_DELAY: _delay,
    }
