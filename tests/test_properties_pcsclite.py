"""Properties of the pcsc-lite codec (pcscbridge/pcsclite/), checked with hypothesis.

One file per codec: test_properties_pcsclite.py, test_properties_link.py, and the VSCard
codec's (pcscbridge/vscard/) in test_properties_vscard.py. The live fuzzers are `make fuzz`.
"""

from __future__ import annotations

import contextlib
import re
import struct
from typing import Any, NamedTuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcscbridge.pcsc import MAX_ATR_SIZE, MAX_BUFFER_SIZE, MAX_BUFFER_SIZE_EXTENDED, ReturnCode
from pcscbridge.pcsclite import dialect as dialects
from pcscbridge.pcsclite.messages import (
    BODY_OF_COMMAND,
    CONNECT_SHORT_NAME,
    HEADER,
    LAYOUTS,
    AttribBody,
    Command,
    ConnectBody,
    ControlBody,
    Empty,
    TransmitBody,
    VersionBody,
    WaitBody,
    encode_reply,
    encode_request,
    pack_body,
    unpack_body,
)
from pcscbridge.pcsclite.readers import (
    ReaderEntry,
    decode_table,
    encode_table,
    entry_size,
    legacy_view,
)
from pcscbridge.pcsclite.server import ProtocolViolation, ServerConnection
from pcscbridge.testing.streams import pieces

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_FIELD = re.compile(r"(\d*)([a-zA-Z])")
_INTEGERS = {
    "i": st.integers(-(2**31), 2**31 - 1),
    "I": st.integers(0, 2**32 - 1),
}
# The largest message a client can send: header, the largest body, the largest trailer.
_LARGEST_MESSAGE = HEADER.size + max(layout.size for layout in LAYOUTS.values())
_LARGEST_MESSAGE += MAX_BUFFER_SIZE_EXTENDED


def fields(layout: struct.Struct) -> st.SearchStrategy[tuple[Any, ...]]:
    """Any values for a body layout's fields: 'i' and 'I' integers, 'Ns' byte strings."""
    parts = []
    for count, code in _FIELD.findall(layout.format):
        if code == "s":
            parts.append(st.binary(min_size=int(count), max_size=int(count)))
        elif code != "x":
            parts.append(_INTEGERS[code])
    return st.tuples(*parts)


def body_of(body_type: type, layout: struct.Struct | None = None) -> st.SearchStrategy[Any]:
    return fields(layout or LAYOUTS[body_type]).map(lambda values: body_type(*values))


def trailer_for(body: NamedTuple) -> bytes:
    """The trailer a body announces (the APDU or control data of TRANSMIT and CONTROL)."""
    if isinstance(body, TransmitBody | ControlBody):
        return bytes(body.send_length)
    return b""


def parse_all(data: bytes, conn: ServerConnection, cuts: list[int]) -> list[Any]:
    """Every request in `data`, fed to `conn` in pieces cut at `cuts`."""
    requests = []
    for piece in pieces(data, cuts):
        conn.receive_data(piece)
        while (request := conn.next_request()) is not None:
            requests.append(request)
    return requests


def connection(version: tuple[int, int] | None) -> ServerConnection:
    conn = ServerConnection()
    if version is not None:
        conn.negotiate(VersionBody(*version, 0))
    return conn


VERSIONS = st.sampled_from([None, *dialects.DIALECTS])


# --- any bytes: requests or ProtocolViolation, never anything else ------------------------------


@FAST
@given(VERSIONS, st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=6))
def test_any_bytes_parse_to_requests_or_a_violation(
    version: tuple[int, int] | None, data: bytes, cuts: list[int]
) -> None:
    conn = connection(version)
    try:
        requests = parse_all(data, conn, cuts)
    except ProtocolViolation:
        return
    consumed = sum(HEADER.size + len(pack_body(r.body)) + len(r.data) for r in requests)
    # What is kept is the start of one message, never more.
    assert len(data) - consumed < _LARGEST_MESSAGE


def headers(version: tuple[int, int] | None) -> st.SearchStrategy[bytes]:
    """A header with a real command and a size near the right one, then a body of that size:
    the garbage that gets past the first checks."""
    commands = st.sampled_from(list(Command))
    sizes = st.sampled_from(sorted({layout.size for layout in LAYOUTS.values()} | {0, 100, 1}))
    return st.tuples(commands, sizes).flatmap(
        lambda item: st.binary(min_size=item[1], max_size=item[1]).map(
            lambda body: HEADER.pack(item[1], item[0]) + body
        )
    )


@FAST
@given(
    VERSIONS.flatmap(lambda v: st.tuples(st.just(v), st.lists(headers(v), max_size=8))),
    st.lists(st.integers(0, 4096), max_size=4),
)
def test_plausible_messages_parse_to_requests_or_a_violation(
    case: tuple[tuple[int, int] | None, list[bytes]], cuts: list[int]
) -> None:
    version, messages = case
    with contextlib.suppress(ProtocolViolation):
        parse_all(b"".join(messages), connection(version), cuts)


# --- round trips of every message body, per dialect ---------------------------------------------


def allowed(command: Command, version: tuple[int, int] | None) -> bool:
    dialect = dialects.DIALECTS.get(version) if version else dialects.DEFAULT
    assert dialect is not None
    if command == Command.CMD_GET_READER_EVENTS:
        return dialect.has_reader_events
    if command in (Command.CMD_GET_READERS_STATE_SIZE, Command.CMD_GET_READERS_STATE_ARRAY):
        return dialect.has_variable_array
    return True


def request_body(command: Command, version: tuple[int, int] | None) -> st.SearchStrategy[Any]:
    body_type = BODY_OF_COMMAND[command]
    if command in (
        Command.CMD_WAIT_READER_STATE_CHANGE,
        Command.CMD_STOP_WAITING_READER_STATE_CHANGE,
    ):
        dialect = dialects.DIALECTS.get(version) if version else None
        if dialect is None:  # no CMD_VERSION yet: both forms are accepted
            return st.one_of(st.just(Empty()), body_of(WaitBody))
        return body_of(WaitBody) if dialect.wait_has_body else st.just(Empty())
    strategy = body_of(body_type)
    if body_type in (TransmitBody, ControlBody):
        strategy = strategy.map(lambda b: b._replace(send_length=b.send_length % 300))
    if body_type is AttribBody:
        strategy = strategy.map(lambda b: b._replace(attr_length=b.attr_length % MAX_BUFFER_SIZE))
    if command == Command.SCARD_CONNECT and version == (4, 2):
        strategy = st.one_of(strategy, body_of(ConnectBody, CONNECT_SHORT_NAME))
    return strategy


def requests_in(version: tuple[int, int] | None) -> st.SearchStrategy[list[tuple[Command, Any]]]:
    commands = [c for c in BODY_OF_COMMAND if c != Command.CMD_VERSION and allowed(c, version)]
    one = st.sampled_from(commands).flatmap(
        lambda c: request_body(c, version).map(lambda body: (c, body))
    )
    return st.lists(one, min_size=1, max_size=6)


@FAST
@given(
    VERSIONS.flatmap(lambda v: st.tuples(st.just(v), requests_in(v))),
    st.lists(st.integers(0, 4096), max_size=4),
)
def test_every_request_round_trips_in_its_dialect(
    case: tuple[tuple[int, int] | None, list[tuple[Command, Any]]], cuts: list[int]
) -> None:
    version, sent = case
    data = b"".join(encode_request(c, body, trailer_for(body)) for c, body in sent)
    received = parse_all(data, connection(version), cuts)
    assert [(r.command, r.body, r.data) for r in received] == [
        (c, body, trailer_for(body)) for c, body in sent
    ]


@FAST
@given(st.sampled_from(sorted(LAYOUTS, key=lambda t: t.__name__)).flatmap(body_of))
def test_every_reply_body_round_trips(body: Any) -> None:
    assert unpack_body(type(body), encode_reply(body)) == body


@FAST
@given(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1))
def test_version_negotiation_echoes_served_versions_and_refuses_the_rest(
    major: int, minor: int
) -> None:
    answer = ServerConnection().negotiate(VersionBody(major, minor, 0))
    if (major, minor) in dialects.DIALECTS:
        assert answer == VersionBody(major, minor, ReturnCode.SCARD_S_SUCCESS)
    else:
        assert answer == VersionBody(4, 6, ReturnCode.SCARD_E_SERVICE_STOPPED)


# --- the readers table ---------------------------------------------------------------------------


def reader_names(name_size: int) -> st.SearchStrategy[str]:
    """Names that fit the table: no NUL, not empty, at most name_size - 1 bytes of UTF-8."""
    text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"))
    return text.filter(lambda name: 0 < len(name.encode()) < name_size)


def entries(name_size: int) -> st.SearchStrategy[ReaderEntry]:
    return st.builds(
        ReaderEntry,
        name=reader_names(name_size),
        event_counter=st.integers(0, 0xFFFF),
        state=st.integers(0, 2**32 - 1),
        sharing=st.integers(-(2**31), 2**31 - 1),
        atr=st.binary(max_size=MAX_ATR_SIZE),
        protocol=st.integers(0, 2**32 - 1),
    )


def tables(name_size: int) -> st.SearchStrategy[list[ReaderEntry | None]]:
    return st.lists(st.one_of(st.none(), entries(name_size)), max_size=20)


@FAST
@given(st.sampled_from([128, 100]).flatmap(lambda n: st.tuples(st.just(n), tables(n))))
def test_the_readers_table_round_trips(case: tuple[int, list[ReaderEntry | None]]) -> None:
    name_size, slots = case
    data = encode_table(slots, len(slots), name_size)
    assert len(data) == len(slots) * entry_size(name_size)
    assert decode_table(data, name_size) == slots


@FAST
@given(st.sampled_from([128, 100]), st.integers(0, 8), st.data())
def test_any_table_bytes_decode(name_size: int, count: int, data: st.DataObject) -> None:
    size = entry_size(name_size)
    raw = data.draw(st.binary(min_size=count * size, max_size=count * size))
    assert len(decode_table(raw, name_size)) == count


@FAST
@given(tables(128), st.integers(1, 20), st.lists(st.sampled_from(["*", "A*", "*0?", "[!B]*"])))
def test_the_legacy_view_shows_a_fitting_choice_of_readers(
    slots: list[ReaderEntry | None], count: int, patterns: list[str]
) -> None:
    view = legacy_view(slots, count, patterns)
    assert len(view) <= count
    shown = [entry for entry in view if entry is not None]
    used = [entry for entry in slots if entry is not None]
    assert len(shown) == min(count, len(used))
    assert all(any(entry is other for other in used) for entry in shown)
    assert len({id(entry) for entry in shown}) == len(shown)
    # A reader shown whose own slot fits keeps that slot.
    for index, entry in enumerate(slots[:count]):
        if entry is not None and any(entry is other for other in shown):
            assert view[index] is entry
    encode_table(view, count)  # always encodable
