"""The audit checkpoint: one JSON line per call of every guest.

    {"time": "2025-01-31T12:00:00.123Z", "guest": "vm", "call": "transmit",
     "reader": "Virtual PCD 00 00", "rv": "SCARD_S_SUCCESS", "duration": 0.0012,
     "apdu": "00A4040C", "lc": 11, "le": null, "response_length": 2, "sw": "9000"}

`reader` is the name the guest uses; `note` says why a checkpoint inside (the policy) refused
or answered a call itself. With `trace`, transmit lines also carry the whole command and
response in hex. Secrets are never written: the data of VERIFY, CHANGE REFERENCE DATA and
RESET RETRY COUNTER is masked (iso7816/pin.py), and SCardControl and SetAttrib data (PIN-pad
structures, escape commands) is shown by its length only. Pings (the guest's keepalive) are
not written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

from ..iso7816 import pin
from ..iso7816.apdu import APDUError, CommandAPDU
from ..link.calls import (
    Call,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    GetAttrib,
    Ping,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Transmit,
)
from ..pcsc import ShareMode, rv_name
from .checkpoint import AllowAll, Outcome
from .service import Session


class Audit:
    """The Checkpoint writing audit lines to `sink` (a file, or stderr for journald)."""

    def __init__(self, sink: TextIO, *, trace: bool = False) -> None:
        self.sink = sink
        self.trace = trace

    @classmethod
    def to_path(cls, path: str, *, trace: bool = False) -> Audit:
        """Appending to `path` ("-": stderr); a new file is created mode 0600."""
        if path == "-":
            return cls(sys.stderr, trace=trace)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return cls(os.fdopen(fd, "a", buffering=1, encoding="utf-8"), trace=trace)

    def rules_for(self, guest: str) -> AuditRules:
        return AuditRules(self, guest)

    def write(self, line: dict[str, Any]) -> None:
        self.sink.write(json.dumps(line) + "\n")
        self.sink.flush()


class AuditRules(AllowAll):
    def __init__(self, audit: Audit, guest: str) -> None:
        self.audit = audit
        self.guest = guest
        self._readers: dict[int, tuple[int, str]] = {}  # h_card -> (h_context, reader)

    async def before(self, call: Call, session: Session) -> Call:
        return call

    def after(self, call: Call, outcome: Outcome) -> None:
        if isinstance(call, Ping):
            return
        line: dict[str, Any] = {
            "time": _utc_now(),
            "guest": self.guest,
            "call": call.method,
        }
        h_card = getattr(call, "h_card", None)
        if isinstance(call, Connect):
            line["reader"] = call.reader
            if outcome.rv == 0:
                self._readers[call.h_card] = (call.h_context, call.reader)
        elif h_card in self._readers:
            line["reader"] = self._readers[h_card][1]
        line["rv"] = rv_name(outcome.rv)
        line["duration"] = round(outcome.duration, 6)
        line.update(self._details(call, outcome))
        if outcome.note:
            line["note"] = outcome.note
        self.audit.write(line)
        if isinstance(call, Disconnect):
            self._readers.pop(call.h_card, None)
        elif isinstance(call, ReleaseContext):
            for handle, (h_context, _) in list(self._readers.items()):
                if h_context == call.h_context:
                    del self._readers[handle]

    def _details(self, call: Call, outcome: Outcome) -> dict[str, Any]:
        result = outcome.result
        match call:
            case Connect() | Reconnect():
                details: dict[str, Any] = {"share_mode": _share_mode(call.share_mode)}
                if isinstance(call, Reconnect):
                    details["initialization"] = call.initialization
                if outcome.rv == 0:
                    details["protocol"] = result
                return details
            case Transmit():
                return self._apdu(call.command, result)
            case Control():
                details = {"code": f"0x{call.control_code:08X}", "length": len(call.data)}
                if isinstance(result, bytes):
                    details["response_length"] = len(result)
                return details
            case GetAttrib() | SetAttrib():
                details = {"attr": f"0x{call.attr_id:08X}"}
                value = result if isinstance(call, GetAttrib) else call.value
                if isinstance(value, bytes):
                    details["length"] = len(value)
                return details
            case Disconnect() | EndTransaction():
                return {"disposition": call.disposition}
        return {}

    def _apdu(self, command: bytes, response: Any) -> dict[str, Any]:
        details: dict[str, Any] = {"apdu": pin.header_hex(command)}
        try:
            apdu = CommandAPDU.parse(command)
            details["lc"] = len(apdu.data)
            details["le"] = apdu.ne
        except APDUError:
            details["length"] = len(command)
        if isinstance(response, bytes):
            details["response_length"] = len(response)
            details["sw"] = response[-2:].hex().upper()
        if self.audit.trace:
            details["command"] = pin.show_command(command, with_data=True)
            if isinstance(response, bytes):
                details["response"] = response.hex().upper()
        return details


def _share_mode(value: int) -> str:
    try:
        return ShareMode(value).name
    except ValueError:
        return str(value)


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
