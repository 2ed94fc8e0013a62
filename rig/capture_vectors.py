"""Capture golden byte transcripts of the real pcscd 1.9.9 (protocol 4.4) into JSON files.

``python -m rig.capture_vectors OUTDIR [--only NAME ...]`` starts a private
:class:`~rig.pcscd_rig.PcscdRig` (one vpcd entry: "Virtual PCD 00 00" holds the
test card, "Virtual PCD 00 01" is empty), puts a :class:`~rig.relay.LoggingRelay`
in front of it and drives one scenario per file through the relay: pyscard programs in child
processes (libpcsclite 1.9.9 underneath), real client programs, and raw sockets for what no
client library sends. The file format is described in ``protocol/vectors/README.md``;
:mod:`rig.transcripts` cuts the captured bytes into messages.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcscbridge.testing.rawclient import recv_exactly
from rig.pcscd_rig import PcscdRig, pcsc_client_env, run_pcsc_client
from rig.relay import C2S, S2C, Chunk, LoggingRelay
from rig.transcripts import READERS_STATE_ARRAY, build_vector, split_messages

__all__ = ["SCENARIOS", "Capture", "Scenario", "capture", "main", "split_messages"]

# ----------------------------------------------------------------------------- clients

# One pyscard program for every scenario (run in a child process so that libpcsclite reads
# PCSCLITE_CSOCK_NAME = the relay afresh). Prints a JSON list of [call, rv, extra] results.
PYSCARD_CLIENT = r"""
import json, sys, threading
from smartcard import scard as s

scenario, reader, empty_reader = sys.argv[1], sys.argv[2], sys.argv[3]
results = []

def rec(call, hr, extra=None):
    results.append([call, "0x%08X" % (hr & 0xFFFFFFFF), extra])

def establish():
    hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_SYSTEM)
    rec("SCardEstablishContext", hr)
    return ctx

def connect(ctx, share=s.SCARD_SHARE_SHARED, protocols=s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1,
            name=None):
    hr, card, proto = s.SCardConnect(ctx, name or reader, share, protocols)
    rec("SCardConnect", hr, {"share": share, "preferred": protocols, "active": proto})
    return card, proto

def transmit(card, proto, hexapdu):
    hr, resp = s.SCardTransmit(card, proto, list(bytes.fromhex(hexapdu)))
    data = bytes(resp)
    rec("SCardTransmit", hr, {"apdu_len": len(hexapdu) // 2, "resp_len": len(data),
                               "sw": data[-2:].hex()})
    return data

def disconnect(card, disposition=s.SCARD_LEAVE_CARD):
    rec("SCardDisconnect", s.SCardDisconnect(card, disposition), {"disposition": disposition})

def release(ctx):
    rec("SCardReleaseContext", s.SCardReleaseContext(ctx))

ctx = establish()
if scenario in ("list_readers", "list_readers_no_card"):
    hr, readers = s.SCardListReaders(ctx, [])
    rec("SCardListReaders", hr, readers)
elif scenario == "connect_shared":
    card, proto = connect(ctx)
    disconnect(card)
elif scenario == "connect_exclusive":
    card, proto = connect(ctx, s.SCARD_SHARE_EXCLUSIVE, s.SCARD_PROTOCOL_T1)
    disconnect(card)
elif scenario == "connect_direct":
    card, proto = connect(ctx, s.SCARD_SHARE_DIRECT, 0)
    disconnect(card)
    card, proto = connect(ctx, s.SCARD_SHARE_DIRECT, 0, name=empty_reader)
    disconnect(card)
elif scenario == "connect_no_card":
    connect(ctx, name=empty_reader)
elif scenario == "transmit_short":
    card, proto = connect(ctx)
    transmit(card, proto, "00A404000BF07063736362726964676500")  # SELECT AID, case 4S
    transmit(card, proto, "00A4020C020101")                      # SELECT EF 0101, case 3S
    transmit(card, proto, "00B0000010")                          # READ BINARY 16, case 2S
    transmit(card, proto, "80140000")                            # case 1 -> SW 0000
    disconnect(card)
elif scenario == "transmit_4k":
    card, proto = connect(ctx)
    transmit(card, proto, "80121000")                            # RESPOND N = 4096
    disconnect(card)
elif scenario == "transmit_extended":
    card, proto = connect(ctx)
    transmit(card, proto, "00A4080C0450430103")                  # SELECT path 5043/0103
    transmit(card, proto, "00B00000000000")                      # READ BINARY, Le 0000: 60 KiB
    transmit(card, proto, "8010000000012C" + "A5" * 300 + "0000")  # ECHO 300 bytes, case 4E
    disconnect(card)
elif scenario == "control_get_attrib":
    card, proto = connect(ctx)
    hr, resp = s.SCardControl(card, s.SCARD_CTL_CODE(3400), [])
    rec("SCardControl", hr, bytes(resp).hex())
    hr, attr = s.SCardGetAttrib(card, s.SCARD_ATTR_ATR_STRING)
    rec("SCardGetAttrib", hr, bytes(attr).hex())
    disconnect(card)
elif scenario == "status":
    card, proto = connect(ctx)
    hr, name, state, protocol, atr = s.SCardStatus(card)
    rec("SCardStatus", hr, {"reader": name, "state": state, "protocol": protocol,
                            "atr": bytes(atr).hex()})
    disconnect(card)
elif scenario == "transaction":
    card, proto = connect(ctx)
    rec("SCardBeginTransaction", s.SCardBeginTransaction(card))
    transmit(card, proto, "00A404000BF07063736362726964676500")
    rec("SCardEndTransaction", s.SCardEndTransaction(card, s.SCARD_LEAVE_CARD))
    disconnect(card)
elif scenario == "reconnect":
    card, proto = connect(ctx)
    hr, active = s.SCardReconnect(card, s.SCARD_SHARE_SHARED, s.SCARD_PROTOCOL_T1,
                                  s.SCARD_LEAVE_CARD)
    rec("SCardReconnect", hr, {"initialization": "LEAVE", "active": active})
    hr, active = s.SCardReconnect(card, s.SCARD_SHARE_SHARED,
                                  s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1, s.SCARD_RESET_CARD)
    rec("SCardReconnect", hr, {"initialization": "RESET", "active": active})
    transmit(card, proto, "00A404000BF07063736362726964676500")
    disconnect(card)
elif scenario == "disconnect":
    card, proto = connect(ctx)
    disconnect(card, s.SCARD_RESET_CARD)
    card, proto = connect(ctx)
    disconnect(card, s.SCARD_UNPOWER_CARD)
    card, proto = connect(ctx)
    disconnect(card, s.SCARD_LEAVE_CARD)
elif scenario == "get_status_change_timeout":
    hr, states = s.SCardGetStatusChange(ctx, 0, [(reader, s.SCARD_STATE_UNAWARE)])
    rec("SCardGetStatusChange", hr, {"timeout": 0, "event_state": states[0][1]})
    current = states[0][1] & ~s.SCARD_STATE_CHANGED
    hr, states = s.SCardGetStatusChange(ctx, 300, [(reader, current)])
    rec("SCardGetStatusChange", hr, {"timeout": 300})
elif scenario == "get_status_change_event":
    hr, states = s.SCardGetStatusChange(ctx, 0, [(empty_reader, s.SCARD_STATE_UNAWARE)])
    rec("SCardGetStatusChange", hr, {"timeout": 0, "event_state": states[0][1]})
    current = states[0][1] & ~s.SCARD_STATE_CHANGED
    hr, states = s.SCardGetStatusChange(ctx, 10000, [(empty_reader, current)])
    rec("SCardGetStatusChange", hr, {"timeout": 10000, "event_state": states[0][1]})
elif scenario == "get_status_change_cancel":
    hr, states = s.SCardGetStatusChange(ctx, 0, [(reader, s.SCARD_STATE_UNAWARE)])
    rec("SCardGetStatusChange", hr, {"timeout": 0, "event_state": states[0][1]})
    current = states[0][1] & ~s.SCARD_STATE_CHANGED
    def waiter():
        hr, _ = s.SCardGetStatusChange(ctx, s.INFINITE, [(reader, current)])
        rec("SCardGetStatusChange", hr, {"timeout": "INFINITE"})
    thread = threading.Thread(target=waiter)
    thread.start()
    sys.stdin.readline()  # the capture driver says when the waiter is registered
    rec("SCardCancel", s.SCardCancel(ctx))
    thread.join()
release(ctx)
print(json.dumps(results))
"""


@dataclass
class Scenario:
    name: str
    description: str
    client: str = "pyscard 2.3.1 on libpcsclite 1.9.9"


SCENARIOS = [
    Scenario("establish_release", "CMD_VERSION 4.4, SCardEstablishContext, SCardReleaseContext"),
    Scenario("list_readers", "SCardListReaders; reader 00 00 holds the card, 00 01 is empty"),
    Scenario("list_readers_no_card", "SCardListReaders with no card in any reader"),
    Scenario("connect_shared", "SCardConnect SHARED T0|T1, SCardDisconnect LEAVE"),
    Scenario("connect_exclusive", "SCardConnect EXCLUSIVE T1, SCardDisconnect LEAVE"),
    Scenario("connect_direct", "SCardConnect DIRECT (protocol 0) to the card and the empty reader"),
    Scenario("connect_no_card", "SCardConnect SHARED to the empty reader"),
    Scenario(
        "transmit_short",
        "SCardTransmit short APDUs: SELECT AID (case 4S), SELECT EF (3S), READ BINARY (2S), case 1",
    ),
    Scenario("transmit_4k", "SCardTransmit with a 4096-byte response (+ SW)"),
    Scenario(
        "transmit_extended",
        "SCardTransmit extended APDUs: READ BINARY Le=0000 of a 60 KiB EF (61442-byte "
        "response), ECHO with extended Lc=300",
    ),
    Scenario(
        "control_get_attrib",
        "SCardControl(SCARD_CTL_CODE(3400)) and SCardGetAttrib(SCARD_ATTR_ATR_STRING); "
        "vpcd's driver supports neither",
    ),
    Scenario("status", "SCardStatus on a shared connection"),
    Scenario("transaction", "SCardBeginTransaction, SCardTransmit, SCardEndTransaction LEAVE"),
    Scenario("reconnect", "SCardReconnect LEAVE (T1) then RESET (T0|T1), SCardTransmit"),
    Scenario("disconnect", "SCardDisconnect with RESET_CARD, UNPOWER_CARD and LEAVE_CARD"),
    Scenario(
        "get_status_change_timeout",
        "SCardGetStatusChange UNAWARE (returns at once), then 300 ms with no change: "
        "SCARD_E_TIMEOUT",
    ),
    Scenario(
        "get_status_change_event",
        "SCardGetStatusChange on the empty reader; a card is inserted during the wait "
        "(event signal, re-registration)",
    ),
    Scenario(
        "get_status_change_cancel",
        "SCardGetStatusChange INFINITE in one thread, SCardCancel from another: the cancel "
        "travels on its own connection (conn 1) without CMD_VERSION",
    ),
    Scenario(
        "version_mismatch",
        "raw socket: CMD_VERSION 4.3, 4.5, 5.0, then 4.4 on the same connection",
        "raw socket",
    ),
    Scenario(
        "malformed_wrong_size",
        "raw socket: CMD_VERSION with header size 8 (must be 12): pcscd closes without reply",
        "raw socket",
    ),
    Scenario(
        "malformed_unknown_command",
        "raw socket: CMD_VERSION 4.4, then command 0x03 (SCARD_LIST_READERS, not served): "
        "pcscd closes without reply",
        "raw socket",
    ),
    Scenario("pcsc_scan", "pcsc_scan -r (pcsc-tools 1.6.2)", "pcsc_scan -r"),
    Scenario("opensc_tool_atr", "opensc-tool -r 0 -a (OpenSC 0.23.0)", "opensc-tool -r 0 -a"),
]


class Capture:
    def __init__(self, rig: PcscdRig, relay: LoggingRelay) -> None:
        self.rig = rig
        self.relay = relay

    @property
    def reader(self) -> str:
        return self.rig.reader_names[0]

    @property
    def empty_reader(self) -> str:
        return self.rig.reader_names[1]

    def run(self, scenario: Scenario) -> dict[str, Any]:
        self.relay.wait_idle()
        self.relay.take()  # forget anything from before
        runner: Callable[[str], Any] = getattr(self, f"_run_{scenario.name}", self._run_pyscard)
        results = runner(scenario.name)
        self.relay.wait_idle()
        chunks, connections = self.relay.take()
        return build_vector(
            scenario.name,
            scenario.description,
            scenario.client,
            chunks,
            connections,
            results,
            self.rig,
        )

    # -- pyscard scenarios

    def _spawn_pyscard(self, name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", PYSCARD_CLIENT, name, self.reader, self.empty_reader],
            env=pcsc_client_env(self.relay.listen_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def _finish(proc: subprocess.Popen[str], stdin: str = "") -> Any:
        out, err = proc.communicate(stdin, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode}): {err}")
        return json.loads(out)

    def _run_pyscard(self, name: str) -> Any:
        return self._finish(self._spawn_pyscard(name))

    def _run_list_readers_no_card(self, name: str) -> Any:
        self.rig.remove_card(0)
        try:
            return self._run_pyscard(name)
        finally:
            self.rig.insert_card(0)

    def _waits_registered(self, count: int) -> Callable[[list[Chunk]], bool]:
        """True once conn 0 has sent ``count`` WAITs and received their arrays."""

        def predicate(chunks: list[Chunk]) -> bool:
            c2s = b"".join(c.data for c in chunks if c.conn == 0 and c.direction == C2S)
            s2c = sum(len(c.data) for c in chunks if c.conn == 0 and c.direction == S2C)
            waits = c2s.count(struct.pack("<II", 0, 0x13))
            # version + establish replies (24), then per earlier SCardGetStatusChange pass an
            # array and an 8-byte STOP reply, then the array of the wait in progress.
            expected = 24 + count * READERS_STATE_ARRAY + (count - 1) * 8
            return waits >= count and s2c >= expected

        return predicate

    def _run_get_status_change_event(self, name: str) -> Any:
        proc = self._spawn_pyscard(name)
        try:
            self.relay.wait_for(self._waits_registered(2))
            self.rig.insert_card(1, wait=False)
            return self._finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            if 1 in self.rig.cards:
                self.rig.remove_card(1)

    def _run_get_status_change_cancel(self, name: str) -> Any:
        proc = self._spawn_pyscard(name)
        try:
            self.relay.wait_for(self._waits_registered(2))
            # The client enters its poll right after reading the array; give it a moment so
            # SCardCancel finds the wait in progress (otherwise it is a local no-op).
            time.sleep(0.1)
            return self._finish(proc, "cancel\n")
        finally:
            if proc.poll() is None:
                proc.kill()

    # -- real client programs

    def _run_program(self, args: list[str]) -> Any:
        proc = run_pcsc_client(args, self.relay.listen_path, timeout=20)
        return {"returncode": proc.returncode, "stdout": proc.stdout.splitlines()}

    def _run_pcsc_scan(self, name: str) -> Any:
        return self._run_program(["timeout", "10", "pcsc_scan", "-r"])

    def _run_opensc_tool_atr(self, name: str) -> Any:
        return self._run_program(["timeout", "10", "opensc-tool", "-r", "0", "-a"])

    # -- raw sockets

    def _raw_connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.relay.listen_path)
        return sock

    @staticmethod
    def _recv_until_eof(sock: socket.socket) -> bytes:
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
        return buf

    def _run_version_mismatch(self, name: str) -> Any:
        results = []
        with self._raw_connect() as sock:
            for major, minor in ((4, 3), (4, 5), (5, 0), (4, 4)):
                sock.sendall(struct.pack("<II", 12, 0x11) + struct.pack("<iiI", major, minor, 0))
                reply = recv_exactly(sock, 12)
                got = struct.unpack("<iiI", reply) if len(reply) == 12 else None
                results.append({"sent": [major, minor], "reply": got})
        return results

    def _run_malformed_wrong_size(self, name: str) -> Any:
        with self._raw_connect() as sock:
            sock.sendall(struct.pack("<II", 8, 0x11) + struct.pack("<ii", 4, 4))
            return {"reply_until_eof": self._recv_until_eof(sock).hex()}

    def _run_malformed_unknown_command(self, name: str) -> Any:
        with self._raw_connect() as sock:
            sock.sendall(struct.pack("<II", 12, 0x11) + struct.pack("<iiI", 4, 4, 0))
            version = recv_exactly(sock, 12)
            sock.sendall(struct.pack("<II", 0, 0x03))
            return {
                "version_reply": version.hex(),
                "then_until_eof": self._recv_until_eof(sock).hex(),
            }


def _looks_right(vector: dict[str, Any]) -> bool:
    """Timing-dependent scenarios: check the capture shows what the scenario is about."""
    names = [m["name"] for c in vector["connections"] for m in c["messages"]]
    notes = [m.get("note", "") for c in vector["connections"] for m in c["messages"]]
    if vector["scenario"] == "get_status_change_cancel":
        # SCardCancel is a local no-op unless the waiter is inside its wait.
        return "SCARD_CANCEL" in names and "cancelled by SCARD_CANCEL" in notes
    if vector["scenario"] == "get_status_change_event":
        return "event" in notes
    return True


def capture(outdir: Path, only: list[str] | None = None) -> list[Path]:
    written = []
    with PcscdRig(1) as rig, tempfile.TemporaryDirectory(prefix="capture-relay-") as tmp:
        rig.insert_card(0)
        with LoggingRelay(str(Path(tmp) / "relay.comm"), rig.socket_path) as relay:
            cap = Capture(rig, relay)
            for scenario in SCENARIOS:
                if only and scenario.name not in only:
                    continue
                for _attempt in range(3):
                    vector = cap.run(scenario)
                    if _looks_right(vector):
                        break
                else:
                    raise RuntimeError(f"{scenario.name}: capture did not show the intended flow")
                path = outdir / f"{scenario.name}.json"
                path.write_text(json.dumps(vector, indent=1) + "\n")
                written.append(path)
                unparsed = sum(
                    1
                    for conn in vector["connections"]
                    for m in conn["messages"]
                    if m["name"] == "unparsed" or "truncated" in m.get("note", "")
                )
                flag = f"  ({unparsed} unparsed!)" if unparsed else ""
                print(f"{path}: {len(vector['connections'])} connection(s){flag}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Capture pcscd 1.9.9 golden transcripts.")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--only", action="append", help="scenario name (repeatable)")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    capture(args.outdir, args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
