"""PC/SC part 10 (readers with a PIN pad or a display): the feature list and the PIN structures.

A reader announces what it can do in answer to SCardControl(CM_IOCTL_GET_FEATURE_REQUEST):
a list of TLVs, each a feature tag, length 4 and the control code (big-endian) that invokes
it. Codes differ between drivers, so only that answer says which code is which feature.
Pure: bytes in, values out.
"""

from __future__ import annotations

from enum import IntEnum

CM_IOCTL_GET_FEATURE_REQUEST = 0x42000D48  # SCARD_CTL_CODE(3400)


class Feature(IntEnum):
    VERIFY_PIN_START = 0x01
    VERIFY_PIN_FINISH = 0x02
    MODIFY_PIN_START = 0x03
    MODIFY_PIN_FINISH = 0x04
    GET_KEY_PRESSED = 0x05
    VERIFY_PIN_DIRECT = 0x06
    MODIFY_PIN_DIRECT = 0x07
    MCT_READER_DIRECT = 0x08
    MCT_UNIVERSAL = 0x09
    IFD_PIN_PROPERTIES = 0x0A
    ABORT = 0x0B
    SET_SPE_MESSAGE = 0x0C
    VERIFY_PIN_DIRECT_APP_ID = 0x0D
    MODIFY_PIN_DIRECT_APP_ID = 0x0E
    WRITE_DISPLAY = 0x0F
    GET_KEY = 0x10
    IFD_DISPLAY_PROPERTIES = 0x11
    GET_TLV_PROPERTIES = 0x12
    CCID_ESC_COMMAND = 0x13
    EXECUTE_PACE = 0x20


# Features that only report properties of the reader.
READ_ONLY_FEATURES = frozenset(
    {Feature.IFD_PIN_PROPERTIES, Feature.IFD_DISPLAY_PROPERTIES, Feature.GET_TLV_PROPERTIES}
)
# Features through which a PIN is entered or changed on the reader's own keypad.
PIN_PAD_FEATURES = frozenset(
    {
        Feature.VERIFY_PIN_START,
        Feature.VERIFY_PIN_FINISH,
        Feature.MODIFY_PIN_START,
        Feature.MODIFY_PIN_FINISH,
        Feature.GET_KEY_PRESSED,
        Feature.VERIFY_PIN_DIRECT,
        Feature.MODIFY_PIN_DIRECT,
        Feature.VERIFY_PIN_DIRECT_APP_ID,
        Feature.MODIFY_PIN_DIRECT_APP_ID,
        Feature.ABORT,
        Feature.EXECUTE_PACE,
    }
)
_VERIFY_STRUCTURES = {Feature.VERIFY_PIN_START, Feature.VERIFY_PIN_DIRECT}
_MODIFY_STRUCTURES = {Feature.MODIFY_PIN_START, Feature.MODIFY_PIN_DIRECT}
# Where abData (the APDU the reader completes with the PIN) starts in each structure.
VERIFY_APDU_OFFSET = 19  # PIN_VERIFY_STRUCTURE
MODIFY_APDU_OFFSET = 24  # PIN_MODIFY_STRUCTURE


def parse_features(answer: bytes) -> dict[int, int]:
    """Feature tag -> control code, from a GET_FEATURE_REQUEST answer (malformed tail
    ignored)."""
    features: dict[int, int] = {}
    offset = 0
    while offset + 6 <= len(answer):
        tag, length = answer[offset], answer[offset + 1]
        if length != 4:
            break
        features[tag] = int.from_bytes(answer[offset + 2 : offset + 6], "big")
        offset += 6
    return features


def without_features(answer: bytes, tags: frozenset[int]) -> bytes:
    """The answer with the TLVs of `tags` left out."""
    kept = b""
    for tag, code in parse_features(answer).items():
        if tag not in tags:
            kept += bytes([tag, 4]) + code.to_bytes(4, "big")
    return kept


def pin_structure_apdu(feature: int, structure: bytes) -> bytes | None:
    """The command APDU header a PIN verify/modify structure carries (the reader adds the PIN),
    or None when the feature takes no such structure or it is too short."""
    if feature in _VERIFY_STRUCTURES:
        offset = VERIFY_APDU_OFFSET
    elif feature in _MODIFY_STRUCTURES:
        offset = MODIFY_APDU_OFFSET
    else:
        return None
    apdu = structure[offset:]
    return apdu[:4] if len(apdu) >= 4 else None
