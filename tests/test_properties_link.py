"""Properties of the link codec (pcscbridge/link/protocol.py and calls.py), with hypothesis."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pcscbridge.link.calls import CATALOGUE, U32_MAX, BadResult, Call, InvalidCall, decode_call
from pcscbridge.link.protocol import (
    DEFAULT_MAX_MESSAGE,
    Hello,
    LinkConnection,
    LinkProtocolError,
    Message,
    Push,
    Request,
    Response,
    decode_readers,
    encode,
    readers_push,
)
from pcscbridge.pcsclite.readers import ReaderEntry, encode_table
from pcscbridge.testing.streams import pieces

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U32 = st.integers(0, U32_MAX)
# Every integer msgpack can carry.
MSGPACK_INT = st.integers(-(2**63), 2**64 - 1)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    MSGPACK_INT,
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
# Anything msgpack can encode: what a hostile peer can put in a well-formed frame.
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
METHODS = st.one_of(st.sampled_from(sorted(CATALOGUE)), st.text(max_size=12))
_ARG = {int: U32, str: st.text(max_size=40), bytes: st.binary(max_size=300)}


def calls() -> st.SearchStrategy[Call]:
    """Every call of the catalogue with valid arguments."""
    return st.one_of(
        [
            st.tuples(*(_ARG[kind] for _, kind in cls._field_types)).map(
                lambda args, cls=cls: cls(*args)
            )
            for cls in CATALOGUE.values()
        ]
    )


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def received(data: bytes, cuts: list[int], max_size: int = DEFAULT_MAX_MESSAGE) -> list[Message]:
    conn = LinkConnection(max_size)
    messages = []
    for piece in pieces(data, cuts):
        conn.receive_data(piece)
        while (message := conn.next_message()) is not None:
            messages.append(message)
    return messages


# --- any input: messages or LinkProtocolError ----------------------------------------------------


@FAST
@given(st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=6))
def test_any_bytes_are_messages_or_a_protocol_error(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(LinkProtocolError):
        received(data, cuts, max_size=4096)


@FAST
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_any_framed_payload_is_a_message_or_a_protocol_error(payloads: list[bytes]) -> None:
    with contextlib.suppress(LinkProtocolError):
        received(b"".join(frame(payload) for payload in payloads), [])


@FAST
@given(
    st.one_of(
        VALUES,
        st.tuples(st.integers(0, 4), VALUES, VALUES).map(list),
        st.tuples(st.just(1), VALUES, METHODS, st.lists(VALUES, max_size=6)).map(list),
        st.tuples(st.just(2), VALUES, VALUES, VALUES).map(list),
        st.tuples(st.just(0), st.dictionaries(st.sampled_from(["role", "protocol"]), VALUES)).map(
            list
        ),
    )
)
def test_any_msgpack_value_is_a_message_or_a_protocol_error(value: Any) -> None:
    payload = msgpack.packb(value, use_bin_type=True)
    try:
        [message] = received(frame(payload), [])
    except LinkProtocolError:
        return
    assert isinstance(message, Hello | Request | Response | Push)


# --- round trips ---------------------------------------------------------------------------------


def messages() -> st.SearchStrategy[Message]:
    return st.one_of(
        st.builds(
            Hello,
            role=st.sampled_from(["guest", "host"]),
            protocol=st.integers(0, 3),
            software=st.text(max_size=30),
            max_message_size=st.integers(0, 2**32),
        ),
        st.builds(Request, id=MSGPACK_INT, call=calls()),
        st.builds(
            Response,
            id=MSGPACK_INT,
            rv=U32,
            result=st.one_of(st.none(), st.lists(SCALARS, max_size=3)),
        ),
        st.builds(Push, topic=st.text(max_size=10), data=VALUES),
    )


@FAST
@given(st.lists(messages(), max_size=6), st.lists(st.integers(0, 4096), max_size=6))
def test_every_message_round_trips_in_any_fragmentation(
    sent: list[Message], cuts: list[int]
) -> None:
    data = b"".join(encode(message) for message in sent)
    assert received(data, cuts) == sent


@FAST
@given(calls())
def test_every_call_round_trips_through_its_args(call: Call) -> None:
    assert decode_call(call.method, call.to_args()) == call


@FAST
@given(METHODS, st.lists(VALUES, max_size=6))
def test_decode_call_never_raises(method: str, args: list[Any]) -> None:
    call = decode_call(method, args)
    if isinstance(call, InvalidCall):
        assert call.rv != 0 and call.reason
    else:
        assert call.method == method and call.to_args() == args


def results_for(call: Call) -> st.SearchStrategy[Any]:
    if call.result is None:
        return st.none()
    return _ARG[call.result]


@FAST
@given(calls().flatmap(lambda call: st.tuples(st.just(call), results_for(call))))
def test_every_result_round_trips(case: tuple[Call, Any]) -> None:
    call, value = case
    wire = msgpack.unpackb(msgpack.packb(call.encode_result(value)), raw=False)
    assert call.decode_result(wire) == value


@FAST
@given(calls(), st.one_of(st.none(), VALUES, st.lists(VALUES, max_size=3)))
def test_any_result_decodes_or_is_a_bad_result(call: Call, result: Any) -> None:
    try:
        value = call.decode_result(result)
    except BadResult:
        return
    if call.result is None:
        assert value is None
    else:
        assert isinstance(value, call.result) and not isinstance(value, bool)


# --- the readers push ----------------------------------------------------------------------------

ENTRIES = st.builds(
    ReaderEntry,
    name=st.text(min_size=1, max_size=30),
    event_counter=st.integers(0, 0xFFFF),
    state=U32,
    sharing=st.integers(-(2**31), 2**31 - 1),
    atr=st.binary(max_size=33),
    protocol=U32,
)


@FAST
@given(st.lists(ENTRIES, max_size=8))
def test_the_readers_push_round_trips(entries: list[ReaderEntry]) -> None:
    [push] = received(encode(readers_push(entries)), [])
    assert isinstance(push, Push)
    assert decode_readers(push) == entries


ROWS = st.lists(
    st.one_of(
        VALUES,
        st.tuples(
            st.text(max_size=10), MSGPACK_INT, MSGPACK_INT, MSGPACK_INT, st.binary(), MSGPACK_INT
        ).map(list),
    ),
    max_size=4,
)


@FAST
@given(st.one_of(VALUES, ROWS))
@example([["Reader", 0, 2**32, 0, b"", 0]])  # once accepted; then every client's read failed
@example([["Reader", 0, 0, 0, b"", -1]])
def test_a_readers_push_the_guest_accepts_fits_pcscds_table(data: Any) -> None:
    """A host's push is either refused (the link closes) or fits the table every client reads:
    a row that cannot be encoded would fail every guest client instead of the one link."""
    try:
        entries = decode_readers(Push("readers", data))
    except LinkProtocolError:
        return
    encode_table(entries, len(entries))
