"""PC/SC API vocabulary shared by every layer: return codes, modes, state bits.

Values are those of pcsc-lite (see protocol/pcsc-lite.md and the PC/SC spec); return codes are
kept as unsigned 32-bit numbers, as they travel on the wire.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from .errors import BridgeError


class ReturnCode(IntEnum):
    SCARD_S_SUCCESS = 0x00000000
    SCARD_F_INTERNAL_ERROR = 0x80100001
    SCARD_E_CANCELLED = 0x80100002
    SCARD_E_INVALID_HANDLE = 0x80100003
    SCARD_E_INVALID_PARAMETER = 0x80100004
    SCARD_E_INVALID_TARGET = 0x80100005
    SCARD_E_NO_MEMORY = 0x80100006
    SCARD_F_WAITED_TOO_LONG = 0x80100007
    SCARD_E_INSUFFICIENT_BUFFER = 0x80100008
    SCARD_E_UNKNOWN_READER = 0x80100009
    SCARD_E_TIMEOUT = 0x8010000A
    SCARD_E_SHARING_VIOLATION = 0x8010000B
    SCARD_E_NO_SMARTCARD = 0x8010000C
    SCARD_E_UNKNOWN_CARD = 0x8010000D
    SCARD_E_CANT_DISPOSE = 0x8010000E
    SCARD_E_PROTO_MISMATCH = 0x8010000F
    SCARD_E_NOT_READY = 0x80100010
    SCARD_E_INVALID_VALUE = 0x80100011
    SCARD_E_SYSTEM_CANCELLED = 0x80100012
    SCARD_F_COMM_ERROR = 0x80100013
    SCARD_F_UNKNOWN_ERROR = 0x80100014
    SCARD_E_INVALID_ATR = 0x80100015
    SCARD_E_NOT_TRANSACTED = 0x80100016
    SCARD_E_READER_UNAVAILABLE = 0x80100017
    SCARD_P_SHUTDOWN = 0x80100018
    SCARD_E_PCI_TOO_SMALL = 0x80100019
    SCARD_E_READER_UNSUPPORTED = 0x8010001A
    SCARD_E_DUPLICATE_READER = 0x8010001B
    SCARD_E_CARD_UNSUPPORTED = 0x8010001C
    SCARD_E_NO_SERVICE = 0x8010001D
    SCARD_E_SERVICE_STOPPED = 0x8010001E
    # pcsc-lite uses one value for SCARD_E_UNEXPECTED and SCARD_E_UNSUPPORTED_FEATURE.
    SCARD_E_UNSUPPORTED_FEATURE = 0x8010001F
    SCARD_E_ICC_INSTALLATION = 0x80100020
    SCARD_E_ICC_CREATEORDER = 0x80100021
    SCARD_E_DIR_NOT_FOUND = 0x80100023
    SCARD_E_FILE_NOT_FOUND = 0x80100024
    SCARD_E_NO_DIR = 0x80100025
    SCARD_E_NO_FILE = 0x80100026
    SCARD_E_NO_ACCESS = 0x80100027
    SCARD_E_WRITE_TOO_MANY = 0x80100028
    SCARD_E_BAD_SEEK = 0x80100029
    SCARD_E_INVALID_CHV = 0x8010002A
    SCARD_E_UNKNOWN_RES_MNG = 0x8010002B
    SCARD_E_NO_SUCH_CERTIFICATE = 0x8010002C
    SCARD_E_CERTIFICATE_UNAVAILABLE = 0x8010002D
    SCARD_E_NO_READERS_AVAILABLE = 0x8010002E
    SCARD_E_COMM_DATA_LOST = 0x8010002F
    SCARD_E_NO_KEY_CONTAINER = 0x80100030
    SCARD_E_SERVER_TOO_BUSY = 0x80100031
    SCARD_W_UNSUPPORTED_CARD = 0x80100065
    SCARD_W_UNRESPONSIVE_CARD = 0x80100066
    SCARD_W_UNPOWERED_CARD = 0x80100067
    SCARD_W_RESET_CARD = 0x80100068
    SCARD_W_REMOVED_CARD = 0x80100069
    SCARD_W_SECURITY_VIOLATION = 0x8010006A
    SCARD_W_WRONG_CHV = 0x8010006B
    SCARD_W_CHV_BLOCKED = 0x8010006C
    SCARD_W_EOF = 0x8010006D
    SCARD_W_CANCELLED_BY_USER = 0x8010006E
    SCARD_W_CARD_NOT_AUTHENTICATED = 0x8010006F


def rv_name(rv: int) -> str:
    try:
        return ReturnCode(rv).name
    except ValueError:
        return f"0x{rv:08X}"


class PCSCError(BridgeError):
    """A PC/SC call failed with return code `rv` (unsigned 32-bit). `result`: an out-value the
    call reported all the same (SCardConnect's active protocol when it failed after settling
    the card's protocol), else None."""

    def __init__(self, rv: int, message: str = "", *, result: object = None) -> None:
        self.rv = rv & 0xFFFFFFFF
        self.result = result
        super().__init__(f"{rv_name(self.rv)}{': ' + message if message else ''}")


class Scope(IntEnum):
    USER = 0
    TERMINAL = 1
    SYSTEM = 2
    GLOBAL = 3


class ShareMode(IntEnum):
    EXCLUSIVE = 1
    SHARED = 2
    DIRECT = 3


class Protocol(IntFlag):
    UNDEFINED = 0
    T0 = 1
    T1 = 2
    RAW = 4
    T15 = 8
    ANY = T0 | T1
    ANY_OLD = 0x1000


class Disposition(IntEnum):
    LEAVE_CARD = 0
    RESET_CARD = 1
    UNPOWER_CARD = 2
    EJECT_CARD = 3


class ReaderStatus(IntFlag):
    """pcscd's readerState bits in the readers-state table (not the API's SCARD_STATE_*)."""

    NONE = 0
    SCARD_UNKNOWN = 0x0001
    SCARD_ABSENT = 0x0002
    SCARD_PRESENT = 0x0004
    SCARD_SWALLOWED = 0x0008
    SCARD_POWERED = 0x0010
    SCARD_NEGOTIABLE = 0x0020
    SCARD_SPECIFIC = 0x0040


class State(IntFlag):
    """SCARD_STATE_* bits of SCARD_READERSTATE.dwCurrentState / dwEventState (low 16 bits).

    The upper 16 bits carry the event counter, which is not a member: clear a bit with
    `value & ~int(State.CHANGED)`, since `~State.CHANGED` keeps only the named bits.
    """

    UNAWARE = 0x0000
    IGNORE = 0x0001
    CHANGED = 0x0002
    UNKNOWN = 0x0004
    UNAVAILABLE = 0x0008
    EMPTY = 0x0010
    PRESENT = 0x0020
    ATRMATCH = 0x0040
    EXCLUSIVE = 0x0080
    INUSE = 0x0100
    MUTE = 0x0200
    UNPOWERED = 0x0400


PNP_NOTIFICATION = "\\\\?PnP?\\Notification"
INFINITE = 0xFFFFFFFF
MAX_ATR_SIZE = 33
MAX_BUFFER_SIZE = 264
MAX_BUFFER_SIZE_EXTENDED = 65548
