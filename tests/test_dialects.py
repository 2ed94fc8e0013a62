"""pcsc-lite dialects 4.2 to 4.6 in the guest, from the spec (§6, §7, §11) down to the bytes.

Three layers, each without mocks:
* the codec (pcscbridge.pcsclite): what each dialect's messages look like, per the spec;
* the guest server with a real host agent over the simulated backend, driven by a raw client
  that speaks exactly one dialect: WAIT/STOP/signal rules, tables, counters, table sizes;
* the host's reader watcher with more readers than one SCardGetStatusChange may carry.
Real client libraries through real pcscd are in test_dialects_e2e.py.
"""

from __future__ import annotations

import logging
import select
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from pcscbridge.guest.server import GuestServer
from pcscbridge.host import watcher
from pcscbridge.host.agent import table_entry
from pcscbridge.host.backends.sim import SimulatedBackend
from pcscbridge.host.readers import HostReader
from pcscbridge.pcsc import ReaderStatus, ReturnCode
from pcscbridge.pcsclite import dialect as dialects
from pcscbridge.pcsclite.messages import (
    CancelBody,
    Command,
    ConnectBody,
    Empty,
    VersionBody,
    WaitBody,
    encode_reply,
    encode_request,
)
from pcscbridge.pcsclite.readers import (
    ReaderEntry,
    decode_table,
    encode_table,
    entry_size,
    legacy_view,
)
from pcscbridge.pcsclite.server import ProtocolViolation, ServerConnection
from pcscbridge.testing.inprocess import InProcessBridge, inprocess_bridge
from pcscbridge.testing.rawclient import RawClient

SERVICE_STOPPED = ReturnCode.SCARD_E_SERVICE_STOPPED


# --- the codec, per dialect, from the spec -----------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What the spec says a dialect looks like on the wire (§6, §7.3, §11.2, §11.3)."""

    minor: int
    wait_body: int  # header size of WAIT (0x13) and STOP (0x14): 8 up to 4.3, 0 from 4.4
    wait_returns_table: bool  # 4.4 and 4.5: WAIT registers and sends the 16-entry table
    reader_events: bool  # 0x15, from 4.5
    variable_table: bool  # 0x16/0x17, 4.6
    connect_sizes: frozenset[int]  # SCARD_CONNECT body: 124 (100-byte names) only in 4.2


SPECS = {
    "4.2": Spec(2, 8, False, False, False, frozenset({124, 152})),
    "4.3": Spec(3, 8, False, False, False, frozenset({152})),
    "4.4": Spec(4, 0, True, False, False, frozenset({152})),
    "4.5": Spec(5, 0, True, True, False, frozenset({152})),
    "4.6": Spec(6, 0, False, True, True, frozenset({152})),
}
ALL = list(SPECS)


def parse(conn: ServerConnection, data: bytes) -> list[Any]:
    conn.receive_data(data)
    requests = []
    while (request := conn.next_request()) is not None:
        requests.append(request)
    return requests


def negotiated(name: str) -> ServerConnection:
    conn = ServerConnection()
    spec = SPECS[name]
    [request] = parse(
        conn, bytes.fromhex(f"0c000000 11000000 04000000 0{spec.minor}000000 00000000")
    )
    assert conn.negotiate(request.body) == VersionBody(4, spec.minor, 0)
    return conn


@pytest.mark.parametrize("name", ALL)
def test_version_exchange_echoes_every_served_dialect(name: str) -> None:
    conn = negotiated(name)
    assert str(conn.dialect) == name
    # The reply on the wire: {major, minor, rv}, native byte order, no header.
    reply = encode_reply(conn.negotiate(VersionBody(4, SPECS[name].minor, 0)))
    assert reply == bytes.fromhex(f"04000000 0{SPECS[name].minor}000000 00000000")


@pytest.mark.parametrize(
    "major, minor", [(4, 0), (4, 1), (4, 7), (4, 99), (3, 0), (5, 0), (5, 6), (0, 0), (-1, 4)]
)
def test_unknown_versions_get_pcscd_25s_refusal_and_the_connection_stays(
    major: int, minor: int
) -> None:
    conn = ServerConnection()
    # §11.3: the newest version the server speaks, SCARD_E_SERVICE_STOPPED; 2.4.1+ clients
    # retry on the same socket with the numbers they were given.
    assert conn.negotiate(VersionBody(major, minor, 0)) == VersionBody(4, 6, SERVICE_STOPPED)
    assert conn.dialect is None
    assert conn.negotiate(VersionBody(4, 6, 0)) == VersionBody(4, 6, 0)
    assert str(conn.dialect) == "4.6"


def test_a_refused_client_may_retry_with_an_older_dialect() -> None:
    conn = ServerConnection()
    conn.negotiate(VersionBody(4, 7, 0))
    assert conn.negotiate(VersionBody(4, 3, 0)) == VersionBody(4, 3, 0)
    # ... and from then on the 4.3 rules apply: WAIT carries a body.
    [request] = parse(conn, encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, WaitBody(9, 0)))
    assert request.body == WaitBody(9, 0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "command", [Command.CMD_WAIT_READER_STATE_CHANGE, Command.CMD_STOP_WAITING_READER_STATE_CHANGE]
)
def test_wait_and_stop_carry_a_body_up_to_43_only(name: str, command: Command) -> None:
    spec = SPECS[name]
    with_body = encode_request(command, WaitBody(1234, 0))
    without = encode_request(command, Empty())
    accepted, refused = (with_body, without) if spec.wait_body else (without, with_body)
    [request] = parse(negotiated(name), accepted)
    assert request.command == command
    assert request.body == (WaitBody(1234, 0) if spec.wait_body else Empty())
    with pytest.raises(ProtocolViolation, match="body size"):
        parse(negotiated(name), refused)


@pytest.mark.parametrize("name", ALL)
def test_newer_commands_exist_only_in_their_dialects(name: str) -> None:
    spec = SPECS[name]
    for code, present in [
        (Command.CMD_GET_READER_EVENTS, spec.reader_events),
        (Command.CMD_GET_READERS_STATE_SIZE, spec.variable_table),
        (Command.CMD_GET_READERS_STATE_ARRAY, spec.variable_table),
    ]:
        data = encode_request(code, Empty())
        if present:
            assert [r.command for r in parse(negotiated(name), data)] == [code]
        else:
            with pytest.raises(ProtocolViolation, match=f"not part of protocol {name}"):
                parse(negotiated(name), data)
    # 0x12 stays in every dialect (4.6 too: pcscd 2.5 answers it with 16 entries).
    [request] = parse(negotiated(name), encode_request(Command.CMD_GET_READERS_STATE, Empty()))
    assert request.command == Command.CMD_GET_READERS_STATE


@pytest.mark.parametrize("name", ALL)
def test_connect_with_100_byte_names_only_in_42(name: str) -> None:
    spec = SPECS[name]
    short = encode_request(
        Command.SCARD_CONNECT, ConnectBody(1, b"R".ljust(100, b"\0"), 2, 3, 0, 0, 0)
    )
    assert len(short) == 8 + 124
    conn = negotiated(name)
    if 124 in spec.connect_sizes:
        [request] = parse(conn, short)
        assert request.body.reader_name.rstrip(b"\0") == b"R"
        assert conn.reader_name_size == 100  # its tables use 156-byte entries from now on
    else:
        with pytest.raises(ProtocolViolation, match="body size 124"):
            parse(conn, short)


def test_a_connection_without_version_exchange_is_served_as_44_with_old_bodies() -> None:
    # SCardCancel's throw-away socket of any client version: no CMD_VERSION at all.
    conn = ServerConnection()
    [cancel] = parse(conn, encode_request(Command.SCARD_CANCEL, CancelBody(0x1234, 0)))
    assert cancel.body == CancelBody(0x1234, 0)
    assert conn.effective_dialect is dialects.DEFAULT
    for body in (Empty(), WaitBody(5, 0)):
        [wait] = parse(conn, encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, body))
        assert wait.body == body
    with pytest.raises(ProtocolViolation):
        parse(conn, encode_request(Command.CMD_GET_READERS_STATE_SIZE, Empty()))


def test_entry_and_table_sizes_per_name_size() -> None:
    # §7.1 / §11.2: 184-byte entries (2944-byte table); 156 (2496) with 100-byte names.
    assert entry_size(128) == 184 and entry_size(100) == 156
    reader = ReaderEntry("Reader 00 00", 3, 0x34, 1, b"\x3b\x00", 2)
    assert len(encode_table([reader], 16)) == 2944
    short = encode_table([reader], 16, name_size=100)
    assert len(short) == 2496
    assert decode_table(short, name_size=100)[0] == reader
    # 4.6 size N with N entries; pcscd's empty slot has cardAtrLength 34 (READER_NOT_INITIALIZED).
    table = encode_table([reader, None], 20)
    assert len(table) == 20 * 184
    assert table[184 + 176 : 184 + 180] == (34).to_bytes(4, "little")


# --- which readers a fixed-size table shows -----------------------------------------------


def entries(*names: str | None) -> list[ReaderEntry | None]:
    return [ReaderEntry(name) if name else None for name in names]


def names_of(view: list[ReaderEntry | None]) -> list[str | None]:
    return [entry.name if entry else None for entry in view]


def test_legacy_view_is_the_table_itself_when_every_reader_fits() -> None:
    slots = entries("A", None, "C", *[None] * 13)
    assert legacy_view(slots, 16, ["C*"]) == slots  # patterns only matter when readers overflow
    assert legacy_view(slots, 3) == slots[:3]  # gaps stay where they are
    assert names_of(legacy_view(slots, 2)) == ["A", "C"]  # C overflows a 2-entry view


def test_legacy_view_keeps_slots_and_fills_gaps_with_readers_from_beyond() -> None:
    slots = entries("A", None, "C", "D", "E", "F")  # 5 readers, 4 slots
    assert names_of(legacy_view(slots, 4)) == ["A", "E", "C", "D"]
    slots = entries(None, None, None, None, "E", "F")  # readers only beyond the view
    assert names_of(legacy_view(slots, 4)) == ["E", "F", None, None]


def test_legacy_view_patterns_choose_by_rank_then_slot_order() -> None:
    slots = entries("a1", "b1", "a2", "b2", "c1", "b3")
    view = legacy_view(slots, 4, ["b*", "c?"])
    # Chosen: b1, b2, b3 (first pattern), c1 (second); a1 and a2 lose their slots, and the
    # chosen readers beyond slot 3 take the freed positions in slot order.
    assert names_of(view) == ["c1", "b1", "b3", "b2"]
    # Case-sensitive, whole-name fnmatch: "B*" matches nothing, so slot order decides.
    assert names_of(legacy_view(slots, 4, ["B*"])) == ["a1", "b1", "a2", "b2"]


# --- the guest server, per dialect, with a real host agent over simulated readers ------------

R0, R1 = "Sim Reader 00 00", "Sim Reader 01 00"


@pytest.fixture
def sim() -> Iterator[SimulatedBackend]:
    backend = SimulatedBackend([R0, R1])
    backend.insert_card(R0)
    yield backend
    backend.close()


@pytest.fixture
async def bridge(sim: SimulatedBackend, tmp_path: Path) -> AsyncIterator[InProcessBridge]:
    async with inprocess_bridge(
        sim, str(tmp_path / "pcscd.comm"), handle_misuse_delay=0.2
    ) as running:
        await until(running.server, lambda: running.server.mirror.reader_names == [R0, R1])
        yield running


class _Change:
    def __init__(self) -> None:
        self.event = trio.Event()

    def signal(self, rv: int) -> None:
        self.event.set()


async def until(server: GuestServer, condition: Callable[[], bool], timeout: float = 5) -> None:
    """Wait for the mirror to satisfy `condition`, woken by its own change signals."""
    with trio.fail_after(timeout):
        while not condition():
            change = _Change()
            server.mirror.register(change)
            await change.event.wait()


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(function, *args)


class DialectClient(RawClient):
    """A raw client keeping to one dialect's flows (spec §7.4, §11.2)."""

    def __init__(self, path: str, name: str, slots: int = 16) -> None:
        super().__init__(path)
        self.spec = SPECS[name]
        self.slots = slots
        assert self.version(4, self.spec.minor) == VersionBody(4, self.spec.minor, 0)
        assert self.establish().rv == 0

    def table(self) -> list[ReaderEntry | None]:
        """The client's view of the readers, the way its library reads it."""
        if self.spec.variable_table:
            return self.readers_state_array(self.readers_state_size())
        return self.readers_state(self.slots)

    def names(self) -> list[str]:
        return [entry.name for entry in self.table() if entry is not None]

    def register(self) -> None:
        """WAIT (0x13); returns once the guest has registered this connection."""
        body = WaitBody(60000, 0) if self.spec.wait_body else None
        self.send(encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, body or Empty()))
        if self.spec.wait_returns_table:
            table = decode_table(self.receive(self.slots * entry_size()))
            assert len(table) == self.slots
        elif self.spec.variable_table:
            self.table()  # what libpcsclite 2.5 does next, registered: 0x16, 0x17
        else:
            # ≤4.3 WAIT sends nothing back; a request answered after it proves it was served.
            self.readers_state(self.slots)

    def stop(self) -> None:
        body = WaitBody(0, 0) if self.spec.wait_body else None
        self.stop_waiting(body)

    def nothing_pending(self) -> bool:
        """No byte is waiting after the last reply (a stray signal or STOP answer would be)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable


@pytest.mark.parametrize("name", ALL)
async def test_signal_rules_of_each_dialect(
    name: str, bridge: InProcessBridge, sim: SimulatedBackend
) -> None:
    def run() -> None:
        with DialectClient(bridge.socket_path, name) as c:
            assert c.names() == [R0, R1]
            # Registered: a card inserted on the host is one 8-byte signal {0, 0}, and nothing
            # else (≤4.3 and 4.6 WAIT send nothing of their own; 4.4/4.5 sent the table).
            c.register()
            sim.insert_card(R1)
            assert c.read_signal() == WaitBody(0, 0)
            # The signal unregistered the client: STOP now gets no answer, so the next reply
            # on the socket is the table, and it shows the card.
            c.stop()
            table = c.table()
            assert table[1] is not None and table[1].state & ReaderStatus.SCARD_PRESENT
            assert c.nothing_pending()
            # Still registered: STOP is answered {0, 0}.
            c.register()
            c.stop()
            assert c.read_signal() == WaitBody(0, 0)
            assert c.names() == [R0, R1] and c.nothing_pending()

    await in_thread(run)


@pytest.mark.parametrize("name", ALL)
async def test_cancel_from_a_connection_without_version_ends_each_dialects_wait(
    name: str, bridge: InProcessBridge
) -> None:
    def run() -> None:
        with (
            DialectClient(bridge.socket_path, name) as waiter,
            RawClient(bridge.socket_path) as canceller,
        ):
            waiter.register()
            # SCardCancel's socket: no CMD_VERSION, whatever the waiter's dialect.
            reply = canceller.request(Command.SCARD_CANCEL, CancelBody(waiter.h_context, 0))
            assert reply.rv == 0
            assert waiter.read_signal() == WaitBody(0, ReturnCode.SCARD_E_CANCELLED)
            waiter.stop()  # no longer registered: no answer
            assert waiter.names() == [R0, R1] and waiter.nothing_pending()

    await in_thread(run)


async def test_46_signal_due_during_the_table_read_follows_the_array(
    bridge: InProcessBridge, sim: SimulatedBackend
) -> None:
    """A 4.6 client reads the table after WAIT with 0x16 then 0x17; a change in between must
    not put the 8-byte signal where it expects the size (libpcsclite 2.5 would read 0 and
    fail with SCARD_E_UNSUPPORTED_FEATURE), nor change the array's length from the size."""
    server = bridge.server
    c = await in_thread(DialectClient, bridge.socket_path, "4.6")
    with c:
        session = server.registry.context_owner(c.h_context)
        await in_thread(c.send, encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, Empty()))
        with trio.fail_after(5):
            while not server.mirror.is_registered(session):
                await trio.sleep(0.001)  # WAIT has no reply to wait for
        # The change lands now: a new reader in a full table makes it grow, too.
        extra = add_readers(sim, 2, 17)
        await until(server, lambda: len(server.mirror.reader_names) == 17)
        await trio.testing.wait_all_tasks_blocked()  # a signal sent now would be on the wire
        assert await in_thread(c.readers_state_size) == 18
        # Between 0x16 and 0x17 the table grows again: 0x17 still sends the 18 entries the
        # client was told of; the signal (already due) makes it read again.
        extra += add_readers(sim, 17, 20)
        await until(server, lambda: len(server.mirror.reader_names) == 20)
        await trio.testing.wait_all_tasks_blocked()

        def read() -> None:
            assert [e.name for e in c.readers_state_array(18) if e] == [R0, R1, *extra[:16]]
            assert c.read_signal() == WaitBody(0, 0)  # then the signal
            c.stop()  # no longer registered: no answer
            assert c.readers_state_size() == 20 and c.nothing_pending()

        await in_thread(read)


async def test_reader_events_count_arrivals_and_departures_for_45_and_46(
    bridge: InProcessBridge, sim: SimulatedBackend
) -> None:
    def run() -> None:
        with (
            DialectClient(bridge.socket_path, "4.5") as c45,
            DialectClient(bridge.socket_path, "4.6") as c46,
        ):
            start = c45.reader_events()
            assert start.rv == 0 and start.reader_events == 1 + 2  # from 1; two readers came
            assert c46.reader_events() == start
            for change, delta in [
                (lambda: sim.add_reader("Sim Reader 02 00"), 1),
                (lambda: sim.remove_reader("Sim Reader 02 00"), 2),
                (lambda: sim.insert_card(R1), 2),  # a card is not a reader event
            ]:
                c45.register()
                change()
                assert c45.read_signal() == WaitBody(0, 0)
                c45.stop()
                assert c45.reader_events().reader_events == start.reader_events + delta

    await in_thread(run)


def add_readers(sim: SimulatedBackend, first: int, last: int) -> list[str]:
    names = [f"Sim Reader {index:02X} 00" for index in range(first, last)]
    for reader in names:
        sim.add_reader(reader)
    return names


async def test_46_sees_every_reader_and_its_table_never_shrinks(
    bridge: InProcessBridge, sim: SimulatedBackend
) -> None:
    server = bridge.server
    extra = add_readers(sim, 2, 20)
    await until(server, lambda: len(server.mirror.reader_names) == 20)

    def run() -> None:
        with (
            DialectClient(bridge.socket_path, "4.6") as c46,
            DialectClient(bridge.socket_path, "4.4") as c44,
        ):
            assert c46.readers_state_size() == 20  # 16, grown two slots at a time
            assert c46.names() == [R0, R1, *extra]
            assert c44.names() == [R0, R1, *extra[:14]]  # the first 16
            # 0x12 on a 4.6 connection: 16 entries, as pcscd 2.5 answers it.
            assert [e.name for e in c46.readers_state(16) if e] == c44.names()
            assert c46.nothing_pending()

    await in_thread(run)
    for reader in extra:
        sim.remove_reader(reader)
    await until(server, lambda: server.mirror.reader_names == [R0, R1])

    def after() -> None:
        with DialectClient(bridge.socket_path, "4.6") as c46:
            # libpcsclite 2.5 refuses a size smaller than one it saw (SCARD_E_UNSUPPORTED_FEATURE).
            assert c46.readers_state_size() == 20
            table = c46.readers_state_array(20)
            assert [e.name for e in table if e] == [R0, R1]

    await in_thread(after)


async def test_legacy_readers_choose_what_fixed_size_clients_see(
    bridge: InProcessBridge, sim: SimulatedBackend
) -> None:
    server = bridge.server
    server.options = replace(
        server.options, legacy_readers=("Sim Reader 1? 00", "Sim Reader 0F 00")
    )
    extra = add_readers(sim, 2, 20)
    await until(server, lambda: len(server.mirror.reader_names) == 20)
    # 16 fit: the four 1x readers (first pattern), 0F (second), then 00-0A in slot order.
    # 00-0A and 0F keep their slots; the 1x readers take the freed slots 11-14.
    chosen = [R0, R1, *extra[:9], "Sim Reader 10 00", "Sim Reader 11 00", "Sim Reader 12 00"]
    chosen += ["Sim Reader 13 00", "Sim Reader 0F 00"]

    def run() -> None:
        for name in ("4.2", "4.3", "4.4", "4.5"):
            with DialectClient(bridge.socket_path, name) as c:
                assert c.names() == chosen, name
        with DialectClient(bridge.socket_path, "4.6") as c46:
            assert len(c46.names()) == 20

    await in_thread(run)


async def test_reader_slots_sizes_every_fixed_size_table(
    bridge: InProcessBridge, sim: SimulatedBackend
) -> None:
    server = bridge.server
    # clients built with PCSCLITE_MAX_READERS_CONTEXTS 48 (Fedora)
    server.options = replace(server.options, reader_slots=48)
    extra = add_readers(sim, 2, 20)
    await until(server, lambda: len(server.mirror.reader_names) == 20)

    def run() -> None:
        for name in ("4.2", "4.3", "4.4", "4.5"):
            with DialectClient(bridge.socket_path, name, slots=48) as c:
                assert c.names() == [R0, R1, *extra]  # 0x12: 48 entries
                c.register()  # 4.4/4.5: the 48-entry table (checked by register)
                c.stop()
                assert c.read_signal() == WaitBody(0, 0)
                assert c.nothing_pending()
        with DialectClient(bridge.socket_path, "4.6") as c46:
            assert c46.readers_state_size() == 20  # the variable table is not affected
            table = c46.readers_state(48)  # 0x12 of a 4.6 client: 48 entries too
            assert [e.name for e in table if e] == [R0, R1, *extra]
            assert c46.nothing_pending()

    await in_thread(run)


async def test_42_client_with_100_byte_names_gets_short_entries_after_its_connect(
    bridge: InProcessBridge,
) -> None:
    def run() -> None:
        with DialectClient(bridge.socket_path, "4.2") as c:
            body = ConnectBody(c.h_context, R0.encode().ljust(100, b"\0"), 2, 3, 0, 0, 0)
            c.send(encode_request(Command.SCARD_CONNECT, body))
            reply = c.receive(124)
            assert reply[:4] == c.h_context.to_bytes(4, "little")
            assert int.from_bytes(reply[-4:], "little") == 0  # rv
            c.send(encode_request(Command.CMD_GET_READERS_STATE, Empty()))
            table = decode_table(c.receive(16 * 156), name_size=100)
            assert [e.name for e in table if e] == [R0, R1]
            assert table[0] is not None and table[0].protocol == 2  # T=1, negotiated
            assert c.nothing_pending()

    await in_thread(run)


@pytest.mark.parametrize("major, minor", [(4, 1), (4, 7), (5, 0)])
async def test_unknown_version_is_refused_with_a_log_line_naming_it(
    major: int, minor: int, bridge: InProcessBridge, caplog: pytest.LogCaptureFixture
) -> None:
    def run() -> None:
        with RawClient(bridge.socket_path) as c:
            assert c.version(major, minor) == VersionBody(4, 6, SERVICE_STOPPED)
            assert c.version(4, 6) == VersionBody(4, 6, 0)  # the same socket, retried

    with caplog.at_level(logging.WARNING, logger="pcscbridge.guest.session"):
        await in_thread(run)
    assert f"speaks pcsc-lite protocol {major}.{minor}, which is not served" in caplog.text


# --- the host's watcher with more readers than one SCardGetStatusChange carries -------------


async def next_table(
    tables: trio.MemoryReceiveChannel[list[Any]], condition: Callable[[list[Any]], bool]
) -> list[Any]:
    with trio.fail_after(5):
        async for rows in tables:
            if condition(rows):
                return rows
    raise AssertionError("the watcher stopped")


async def test_watcher_reports_more_than_16_readers_and_their_changes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Slices long enough that only the event path can report a change within the timeouts:
    # a design that polls the readers beyond the first 16 states would be seen failing.
    monkeypatch.setattr(watcher, "WAIT_SLICE_MS", 60_000)
    sim = SimulatedBackend([f"R {index:02d}" for index in range(20)])  # refuses > 16 states
    published, tables = trio.open_memory_channel[list[Any]](1000)

    def publish(readers: tuple[HostReader, ...]) -> None:
        published.send_nowait([list(astuple(table_entry(reader))) for reader in readers])

    present = int(ReaderStatus.SCARD_PRESENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.watch_readers, sim, publish)
        rows = await next_table(tables, lambda rows: len(rows) == 20)
        assert [row[0] for row in rows] == [f"R {index:02d}" for index in range(20)]
        for reader in ("R 19", "R 00", "R 15"):  # second group, first group, second group
            sim.insert_card(reader)
            rows = await next_table(
                tables, lambda rows, r=reader: any(x[0] == r and x[2] & present for x in rows)
            )
        sim.add_reader("R 20")
        await next_table(tables, lambda rows: len(rows) == 21 and rows[-1][0] == "R 20")
        sim.remove_reader("R 03")
        rows = await next_table(tables, lambda rows: len(rows) == 20)
        assert "R 03" not in [row[0] for row in rows]
        stopping = trio.current_time()
        nursery.cancel_scope.cancel()
    # Shutdown ended every wait at once (it did not sit out a 60 s slice), and released every
    # context it opened.
    assert trio.current_time() - stopping < 2
    assert sim._contexts == {}
    sim.close()
