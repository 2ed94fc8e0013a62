"""Golden transcripts: a relay's chunks cut into pcsc-lite protocol 4.4 messages, as JSON.

:func:`split_messages` cuts one connection's byte streams into requests and replies (in causal
order); :func:`build_vector` turns a captured scenario into the JSON document described in
``protocol/vectors/README.md``. :mod:`rig.capture_vectors` drives the scenarios.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pcscbridge.host.backends.simcard import DEFAULT_ATR
from pcscbridge.pcsclite.messages import Command
from rig.pcscd_rig import PcscdRig
from rig.relay import C2S, S2C, Chunk, RelayConnection

# The commands of protocol 4.4 (pcscd 1.9.9 knows no others), by code.
COMMAND_NAMES = {
    int(command): command.name
    for command in Command
    if command <= Command.CMD_STOP_WAITING_READER_STATE_CHANGE
}
# Fixed body sizes of the requests pcscd 1.9.9 serves (= sizes of their fixed replies).
BODY_SIZES = {
    0x01: 12, 0x02: 8, 0x04: 152, 0x05: 24, 0x06: 12, 0x07: 8, 0x08: 12, 0x09: 32,
    0x0A: 24, 0x0B: 8, 0x0D: 8, 0x0F: 280, 0x10: 280, 0x11: 12, 0x12: 0, 0x13: 0, 0x14: 0,
}  # fmt: skip
READERS_STATE_ARRAY = 16 * 184
SCARD_E_CANCELLED = 0x80100002

RANDOM_FIELDS = {
    "hContext": (
        "chosen at random by pcscd per run: SCARD_ESTABLISH_CONTEXT reply offset 4; "
        "request offset 0 of SCARD_RELEASE_CONTEXT, SCARD_CONNECT (and its reply), "
        "SCARD_CANCEL (and its reply)"
    ),
    "hCard": (
        "chosen at random by pcscd per run: SCARD_CONNECT reply offset 140; offset 0 of "
        "RECONNECT, DISCONNECT, BEGIN/END_TRANSACTION, TRANSMIT, CONTROL, STATUS, GET/SET_ATTRIB "
        "requests and replies"
    ),
    "eventCounter": (
        "readers-state array, entry offset 128: counts card insertions/removals since the rig "
        "started, so it depends on the scenarios run before"
    ),
    "readerSharing/cardProtocol": (
        "readers-state array, entry offsets 136/180: reflect connections of the same scenario "
        "(deterministic within a scenario, but mind the 400 ms polling for card state)"
    ),
}


@dataclass
class Message:
    direction: str
    seq: int  # index (in the scenario's chunk list) of the chunk holding the first byte
    offset: int  # offset in the connection's concatenated stream of that direction
    name: str
    data: bytes
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dir": self.direction, "name": self.name, "hex": self.data.hex()}
        if self.note:
            out["note"] = self.note
        return out


class _Stream:
    """One direction of one connection: the bytes plus which chunk each byte came in."""

    def __init__(self, chunks: list[tuple[int, bytes]]) -> None:
        self.data = b"".join(data for _, data in chunks)
        self._starts: list[tuple[int, int]] = []  # (stream offset, seq)
        offset = 0
        for seq, data in chunks:
            self._starts.append((offset, seq))
            offset += len(data)

    def seq_at(self, offset: int) -> int:
        seq = -1
        for start, chunk_seq in self._starts:
            if start > offset:
                break
            seq = chunk_seq
        return seq


def split_messages(chunks: list[tuple[int, Chunk]]) -> list[Message]:
    """Cut one connection's byte streams into protocol 4.4 messages, in causal order.

    Requests carry a header; replies do not, so they are cut by replaying the client's view:
    each request's reply size is known (TRANSMIT/CONTROL trailers: from the reply body, only
    when rv = 0). After CMD_WAIT_READER_STATE_CHANGE's array one 8-byte message is owed: the
    event/cancel signal, or the STOP reply. The client reads it before its next request, so it
    sits in the reply stream before the reply to that request.
    """
    c2s = _Stream([(seq, c.data) for seq, c in chunks if c.direction == C2S])
    s2c = _Stream([(seq, c.data) for seq, c in chunks if c.direction == S2C])
    messages: list[Message] = []
    requests: list[tuple[int, int]] = []  # (command, request offset)
    pos = 0
    data = c2s.data
    while pos < len(data):
        if len(data) - pos < 8:
            messages.append(Message(C2S, c2s.seq_at(pos), pos, "truncated header", data[pos:]))
            break
        size, command = struct.unpack_from("<II", data, pos)
        name = COMMAND_NAMES.get(command, f"unknown command 0x{command:02X}")
        expected = BODY_SIZES.get(command)
        note = ""
        end = pos + 8 + size
        if expected is None:
            note = "not served by pcscd 1.9.9: it closes the connection"
            end = len(data)  # whatever follows is not framed for pcscd
        elif size != expected:
            note = f"header size {size} != {expected}: pcscd closes the connection"
            end = len(data)
        elif command == 0x09:
            end += struct.unpack_from("<I", data, pos + 8 + 12)[0]  # cbSendLength
        elif command == 0x0A:
            end += struct.unpack_from("<I", data, pos + 8 + 8)[0]  # cbSendLength
        end = min(end, len(data))
        messages.append(Message(C2S, c2s.seq_at(pos), pos, name, data[pos:end], note))
        if not note:
            requests.append((command, pos))
        pos = end

    reply = s2c.data
    rpos = 0
    owed_signal = False

    def take(length: int, name: str, note: str = "") -> bytes:
        nonlocal rpos
        chunk = reply[rpos : rpos + length]
        if len(chunk) < length:
            note = (note + "; " if note else "") + f"truncated: {len(chunk)} of {length} bytes"
        messages.append(Message(S2C, s2c.seq_at(rpos), rpos, name, chunk, note))
        rpos += len(chunk)
        return chunk

    def take_signal(before_request_at: int | None) -> None:
        nonlocal owed_signal
        owed_signal = False
        if rpos + 8 > len(reply):
            return
        _, rv = struct.unpack_from("<II", reply, rpos)
        if rv == SCARD_E_CANCELLED:
            take(8, "signal", "cancelled by SCARD_CANCEL")
        elif before_request_at is None:
            take(8, "signal", "event")
        else:
            came_first = s2c.seq_at(rpos) < c2s.seq_at(before_request_at)
            if came_first:
                take(8, "signal", "event (before the STOP, which then gets no reply)")
            else:
                take(8, "CMD_STOP_WAITING_READER_STATE_CHANGE reply")

    for command, req_pos in requests:
        name = COMMAND_NAMES[command]
        if command == 0x14:
            if owed_signal:
                take_signal(req_pos)
            continue  # no reply when not registered
        if owed_signal:
            take_signal(None)
        if rpos >= len(reply):
            break  # no reply (connection closed, or capture ended)
        if command in (0x12, 0x13):
            take(READERS_STATE_ARRAY, f"{name} reply", "readers-state array, 16 x 184 bytes")
            owed_signal = command == 0x13
        elif command in (0x09, 0x0A):
            body = take(BODY_SIZES[command], f"{name} reply")
            if (
                len(body) == BODY_SIZES[command]
                and struct.unpack_from("<I", body, len(body) - 4)[0] == 0
            ):
                length_at = 24 if command == 0x09 else 16
                length = struct.unpack_from("<I", body, length_at)[0]
                if length:
                    take(length, f"{name} reply trailer")
        else:
            take(BODY_SIZES[command], f"{name} reply")
    if owed_signal:
        take_signal(None)
    if rpos < len(reply):
        take(len(reply) - rpos, "unparsed", "bytes the 4.4 model did not expect")
    messages.sort(key=lambda m: (m.seq, m.offset))
    return messages


def _observed_handles(messages: list[Message]) -> dict[str, list[str]]:
    """Random values seen (hex of their wire bytes), so replay tests can mask or substitute."""
    contexts: list[str] = []
    cards: list[str] = []
    for message in messages:
        if message.name == "SCARD_ESTABLISH_CONTEXT reply" and len(message.data) == 12:
            contexts.append(message.data[4:8].hex())
        elif message.name == "SCARD_CONNECT reply" and len(message.data) == 152:
            cards.append(message.data[140:144].hex())
    # 0 is what pcscd sends back on failure (e.g. no card), not a random value.
    contexts = [c for c in contexts if c != "00000000"]
    cards = [c for c in cards if c != "00000000"]
    return {"hContext": sorted(set(contexts)), "hCard": sorted(set(cards))}


def build_vector(
    name: str,
    description: str,
    client: str,
    chunks: list[Chunk],
    connections: list[RelayConnection],
    results: Any,
    rig: PcscdRig,
) -> dict[str, Any]:
    numbered = list(enumerate(chunks))
    conns_json = []
    observed: dict[str, set[str]] = {"hContext": set(), "hCard": set()}
    for connection in connections:
        mine = [(seq, c) for seq, c in numbered if c.conn == connection.conn]
        messages = split_messages(mine)
        for key, values in _observed_handles(messages).items():
            observed[key].update(values)
        conns_json.append(
            {
                "conn": connection.conn,
                "closed_first_by": connection.closed_first_by,
                "c2s": b"".join(c.data for _, c in mine if c.direction == C2S).hex(),
                "s2c": b"".join(c.data for _, c in mine if c.direction == S2C).hex(),
                "messages": [m.as_json() for m in messages],
            }
        )
    return {
        "scenario": name,
        "description": description,
        "captured_from": "pcscd 1.9.9 (Debian 12), protocol 4.4, x86_64 (little-endian)",
        "client": client,
        "readers": rig.reader_names[:2],
        "card_atr": DEFAULT_ATR.hex(),
        "client_results": results,
        "random_fields": RANDOM_FIELDS,
        "observed_random_values": {k: sorted(v) for k, v in observed.items()},
        "connections": conns_json,
        "chunks": [{"conn": c.conn, "dir": c.direction, "hex": c.data.hex()} for c in chunks],
    }
