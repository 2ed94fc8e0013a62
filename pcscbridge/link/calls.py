"""The calls a guest makes on the host: one frozen dataclass per link method (protocol/link.md).

This is the one list of link methods. A request travels as `[1, id, method, args]` with the
fields below, in order, as `args`; it is decoded and validated here, in the pure layer. The
host service dispatches on the type, and the policy and the audit see the same objects.

    call = decode_call("transmit", [7, 2, b"\\x00\\xa4\\x04\\x00"])   # Transmit(...) or InvalidCall
    args = call.to_args()                                          # what goes on the wire
    value = call.decode_result([b"\\x90\\x00"])                      # the typed result
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..errors import PeerError
from ..iso7816.pin import show_command
from ..pcsc import ReturnCode

U32_MAX = 0xFFFFFFFF


class BadResult(PeerError):
    """The host answered a call with a result of the wrong shape."""


@dataclass(frozen=True, slots=True)
class Call:
    """A link method. `method` is its name on the wire; `result` the kind of value it returns
    (None: nothing but the return code)."""

    method: ClassVar[str]
    result: ClassVar[type | None] = None
    _field_types: ClassVar[tuple[tuple[str, type], ...]] = ()

    def to_args(self) -> list[Any]:
        return [getattr(self, name) for name, _ in self._field_types]

    def encode_result(self, value: Any) -> list[Any]:
        return [] if self.result is None else [value]

    def decode_result(self, result: list[Any] | None) -> Any:
        if self.result is None:
            if result:
                raise BadResult(f"{self.method}: expected no result, got {_show(result)}")
            return None
        if (
            not isinstance(result, list)
            or len(result) != 1
            or not _is(result[0], self.result)
            or (self.result is int and not 0 <= result[0] <= U32_MAX)
        ):
            raise BadResult(
                f"{self.method}: expected [{self.result.__name__}], got {_show(result)}"
            )
        return result[0]


@dataclass(frozen=True, slots=True)
class InvalidCall:
    """A request the host cannot execute: an unknown method or arguments of the wrong shape.
    The host answers it with `rv` and logs `reason`; the link stays up."""

    method: str
    rv: int
    reason: str


CATALOGUE: dict[str, type[Call]] = {}
_TYPES = {"int": int, "str": str, "bytes": bytes}


def _link_method(name: str, result: type | None = None):  # type: ignore[no-untyped-def]
    """Class decorator: a frozen dataclass registered in the catalogue under `name`."""

    def register(cls: type[Call]) -> type[Call]:
        cls = dataclass(frozen=True, slots=True)(cls)
        cls.method = name
        cls.result = result
        cls._field_types = tuple((f.name, _TYPES[str(f.type)]) for f in fields(cls))
        CATALOGUE[name] = cls
        return cls

    return register


# --- the catalogue, in protocol/link.md's order ---------------------------------------------
@_link_method("connect", int)
class Connect(Call):
    """SCardConnect on a context; the result is the active protocol."""

    h_context: int
    h_card: int  # chosen by the guest: the name the guest's later calls use for the handle
    reader: str
    share_mode: int
    preferred_protocols: int


@_link_method("reconnect", int)
class Reconnect(Call):
    h_card: int
    share_mode: int
    preferred_protocols: int
    initialization: int


@_link_method("disconnect")
class Disconnect(Call):
    """The handle is gone afterwards, even when the call fails."""

    h_card: int
    disposition: int


@_link_method("begin_transaction")
class BeginTransaction(Call):
    h_card: int


@_link_method("end_transaction")
class EndTransaction(Call):
    h_card: int
    disposition: int


@_link_method("status")
class Status(Call):
    """Only the return code matters: SCARD_W_RESET_CARD, SCARD_W_REMOVED_CARD, ..."""

    h_card: int


@_link_method("transmit", bytes)
class Transmit(Call):
    h_card: int
    send_pci_protocol: int
    command: bytes

    def __repr__(self) -> str:
        # Logs show the header and length only: the data may be a PIN.
        return f"Transmit({self.h_card}, {self.send_pci_protocol}, {show_command(self.command)})"


@_link_method("control", bytes)
class Control(Call):
    h_card: int
    control_code: int
    data: bytes

    def __repr__(self) -> str:
        # A PIN-pad structure or an escape command may hold a PIN: never shown.
        return f"Control({self.h_card}, 0x{self.control_code:08X}, {len(self.data)} bytes)"


@_link_method("get_attrib", bytes)
class GetAttrib(Call):
    h_card: int
    attr_id: int


@_link_method("set_attrib")
class SetAttrib(Call):
    h_card: int
    attr_id: int
    value: bytes

    def __repr__(self) -> str:
        return f"SetAttrib({self.h_card}, 0x{self.attr_id:08X}, {len(self.value)} bytes)"


@_link_method("release_context")
class ReleaseContext(Call):
    """Everything the context holds is released: handles left, a held transaction reset."""

    h_context: int


@_link_method("ping")
class Ping(Call):
    """Liveness: answered at once."""


CardCall = Reconnect | Disconnect | BeginTransaction | EndTransaction | Status | Transmit
CardCall |= Control | GetAttrib | SetAttrib  # calls on one card handle
AnyCall = Connect | CardCall | ReleaseContext | Ping


def decode_call(method: str, args: list[Any]) -> Call | InvalidCall:
    """The typed call for a request's method and args, or why it cannot be one."""
    cls = CATALOGUE.get(method)
    if cls is None:
        return InvalidCall(method, ReturnCode.SCARD_E_UNSUPPORTED_FEATURE, "unknown method")
    expected = cls._field_types
    if len(args) != len(expected):
        return InvalidCall(
            method,
            ReturnCode.SCARD_E_INVALID_PARAMETER,
            f"{len(args)} arguments, expected {len(expected)}",
        )
    for (name, kind), value in zip(expected, args, strict=True):
        if not _is(value, kind) or (kind is int and not 0 <= value <= U32_MAX):
            return InvalidCall(
                method,
                ReturnCode.SCARD_E_INVALID_PARAMETER,
                f"{name} must be {'a 32-bit unsigned int' if kind is int else kind.__name__}, "
                f"got {_show(value)}",
            )
    return cls(*args)


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
