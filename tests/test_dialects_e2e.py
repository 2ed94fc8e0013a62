"""Every pcsc-lite dialect through the bridge, with real client libraries and real programs.

The guest's clients use the real libpcsclite of Debian 12 (1.9.9, protocol 4.4), trixie (2.3.3,
4.5) and sid (2.5.3, 4.6); `pcscbridge guest` and `pcscbridge host` run as processes; the host
side is the real pcscd 1.9.9 with vpcd readers, or simulated readers for more than pcscd 1.9.9
can have. What each program prints through the bridge is compared with what the same program
prints with Debian 12's own library talking to pcscd directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pcscbridge.host.backends.sim import SimulatedBackend
from pcscbridge.pcsc import ReturnCode
from pcscbridge.pcsclite.messages import (
    CONNECT_SHORT_NAME,
    Command,
    ConnectBody,
    DispositionBody,
    Empty,
    TransmitBody,
    VersionBody,
    WaitBody,
    encode_request,
    unpack_body,
)
from pcscbridge.pcsclite.readers import decode_table, entry_size
from pcscbridge.testing.inprocess import InProcessBridge, inprocess_bridge
from pcscbridge.testing.rawclient import RawClient
from rig.bridge_processes import Bridge, BridgeProcess, _wait_for
from rig.clientlibs import ClientLib, ClientLibs, ensure_client_libs
from rig.pcscd_rig import PcscdRig

pytestmark = pytest.mark.rig

READER = "Virtual PCD 00 00"
DIALECTS = ["4.4", "4.5", "4.6"]
PROGRAMS = [sys.executable, "-m", "rig.pcsc_programs"]
SCRIPT = (
    "00 A4 04 0C 0B F0 70 63 73 63 62 72 69 64 67 65\n00 A4 02 0C 02 01 01\n"
    "00 B0 00 00 20\n80 10 00 00 03 01 02 03\n00 FF 00 00\n"
)
SELECT_APP = bytes.fromhex("00A4040C0BF0") + b"pcscbridge"


@pytest.fixture(scope="module")
def libs() -> ClientLibs:
    return ensure_client_libs()


@pytest.fixture(scope="module")
def rig(rig_prerequisites: None) -> Iterator[PcscdRig]:
    """One pcscd with 4 vpcd readers for the module; a card in reader 0 between tests."""
    with PcscdRig(2) as running:  # started by `with`
        running.insert_card(0)
        yield running


@pytest.fixture(scope="module")
def bridge(rig: PcscdRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    with Bridge(tmp_path_factory.mktemp("dialects"), rig.socket_path) as running:
        running.start(expected_readers=rig.reader_names)
        yield running
    assert "Traceback" not in running.logs(), running.logs()


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)  # set by conftest's report hook
    return report is not None and report.failed


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """The module's bridge and pcscd logs when a test using them failed."""
    yield
    if _failed(request):
        if "bridge" in request.fixturenames:
            print(request.getfixturevalue("bridge").logs())
        if "rig" in request.fixturenames:
            print(f"--- pcscd log ---\n{request.getfixturevalue('rig').read_log()}")


@pytest.fixture
def card_in_reader_0(rig: PcscdRig, bridge: Bridge) -> Iterator[None]:
    """The card is in reader 0 and the guest shows it (the host pushes it a moment after
    pcscd sees it); it is put back after the test."""
    if 0 not in rig.cards:
        rig.insert_card(0)
    rig.wait_for_card_state(READER, present=True, socket_path=bridge.socket_path)
    yield
    if 0 not in rig.cards:
        rig.insert_card(0)


def run(
    lib: ClientLib, argv: list[str], socket_path: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lib.command(argv),
        env=lib.env({**os.environ, "PCSCLITE_CSOCK_NAME": socket_path}),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def direct(libs: ClientLibs, rig: PcscdRig) -> Callable[..., subprocess.CompletedProcess[str]]:
    """What Debian 12's own library gets from pcscd for a program (each run once)."""
    results: dict[tuple[str, ...], subprocess.CompletedProcess[str]] = {}

    def get(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        key = (*argv, stdin or "")
        if key not in results:
            results[key] = run(libs["4.4"], argv, rig.socket_path, stdin)
            assert results[key].returncode == 0, results[key].stdout + results[key].stderr
        return results[key]

    return get


# --- the real programs, each dialect ----------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_pcsc_scan_lists_the_readers(
    dialect: str, libs: ClientLibs, bridge: Bridge, direct: Callable[..., Any]
) -> None:
    bridged = run(libs[dialect], ["pcsc_scan", "-r"], bridge.socket_path)
    assert bridged.returncode == 0, bridged.stderr
    assert bridged.stdout == direct(["pcsc_scan", "-r"]).stdout
    assert f"0: {READER}" in bridged.stdout


@pytest.mark.parametrize("dialect", DIALECTS)
def test_opensc_tool_reads_the_atr(
    dialect: str, libs: ClientLibs, bridge: Bridge, direct: Callable[..., Any]
) -> None:
    argv = ["opensc-tool", "-r", "0", "-a"]
    bridged = run(libs[dialect], argv, bridge.socket_path)
    assert bridged.returncode == 0, bridged.stderr
    assert bridged.stdout == direct(argv).stdout
    assert "3b:85:81:31" in bridged.stdout.lower()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_scriptor_exchanges_apdus(
    dialect: str, libs: ClientLibs, bridge: Bridge, direct: Callable[..., Any]
) -> None:
    argv = ["scriptor", "-r", READER]
    bridged = run(libs[dialect], argv, bridge.socket_path, SCRIPT)
    assert bridged.returncode == 0, bridged.stdout + bridged.stderr
    assert bridged.stdout == direct(argv, SCRIPT).stdout
    assert "01 02 03 90 00" in bridged.stdout


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def comparable(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for result in results:
        if result["call"] == "SCardGetStatusChange":
            # The host's other handles are not the guest's: compare all but SCARD_STATE_INUSE.
            result["states"] = [[n, s & ~0x100, a] for n, s, a in result["states"]]
    return results


@pytest.mark.parametrize("dialect", DIALECTS)
def test_pyscard_every_call(
    dialect: str, libs: ClientLibs, bridge: Bridge, direct: Callable[..., Any]
) -> None:
    argv = [*PROGRAMS, "full", READER]
    bridged = run(libs[dialect], argv, bridge.socket_path)
    assert bridged.returncode == 0, bridged.stderr
    expected = comparable(json_lines(direct(argv).stdout))
    got = comparable(json_lines(bridged.stdout))
    assert len(expected) > 15
    assert got == expected


def test_45_client_cannot_use_pcscd_199_directly_but_works_through_the_bridge(
    libs: ClientLibs, rig: PcscdRig, bridge: Bridge
) -> None:
    lib = libs["4.5"]
    # 2.3.3 announces 4.5 only; pcscd 1.9.9 accepts exactly 4.4 (spec §6).
    scan = run(lib, ["pcsc_scan", "-r"], rig.socket_path)
    assert scan.returncode != 0 and "Service was stopped" in scan.stdout + scan.stderr
    full = run(lib, [*PROGRAMS, "full", READER], rig.socket_path)
    assert full.returncode != 0 and "0x8010001E" in full.stderr
    assert run(lib, ["pcsc_scan", "-r"], bridge.socket_path).returncode == 0
    # (the bridged programs are checked one by one above)


def test_46_client_waiting_first_is_served_as_46_observation_b(
    libs: ClientLibs, rig: PcscdRig, bridge: Bridge
) -> None:
    """Spec §11.2, observation (b): a 2.5 client that negotiated ≤4.5 fails
    SCardGetStatusChange with SCARD_E_NO_SERVICE when it did not list readers first. pcscd
    1.9.9 makes sid's 2.5.3 fall back to 4.4, so it fails there; the guest speaks 4.6 to it."""
    argv = [sys.executable, "-m", "rig.pcscd_rig", "wait-card", READER]
    argv += ["present", "5"]
    lib = libs["4.6"]
    fallen_back = run(lib, argv, rig.socket_path)
    assert fallen_back.returncode != 0
    assert "Service not available" in fallen_back.stderr  # SCARD_E_NO_SERVICE
    served = run(lib, argv, bridge.socket_path)
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip().startswith("3b858131")


# --- pcsc_scan watching a card come and go ----------------------------------------------------


class Streamed:
    """A long-running program whose output is read as it comes (pcsc_scan flushes its lines)."""

    def __init__(self, lib: ClientLib, argv: list[str], socket_path: str) -> None:
        self.process = subprocess.Popen(
            ["timeout", "60", *lib.command(argv)],
            env=lib.env({**os.environ, "PCSCLITE_CSOCK_NAME": socket_path}),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: `timeout` and the program
        )
        self.output = ""

    def expect(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait for `pattern` (a regex) in the output since the previous match."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match is not None:
                self.output = self.output[match.end() :]
                return match
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(0, remaining))
            if not ready:
                raise AssertionError(f"no {pattern!r} within {timeout} s; got:\n{self.output}")
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"exited before {pattern!r}; got:\n{self.output}")
            self.output += chunk.decode(errors="replace")

    def send_line(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"\n")
        self.process.stdin.flush()

    def close(self) -> None:
        # SIGKILL to `timeout` alone would leave the program running: end the whole group.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
                break
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def card_state(reader: str, state: str) -> str:
    return rf"Reader \d+: {re.escape(reader)}\s+Event number: (\d+)\s+Card state: {state}"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_pcsc_scan_sees_the_card_removed_and_inserted(
    dialect: str, libs: ClientLibs, rig: PcscdRig, bridge: Bridge, card_in_reader_0: None
) -> None:
    scan = Streamed(libs[dialect], ["pcsc_scan", "-n"], bridge.socket_path)
    try:
        first = int(scan.expect(card_state(READER, "Card inserted")).group(1))
        scan.expect(card_state(rig.reader_names[-1], "Card removed"))  # the initial scan ended
        rig.remove_card(0)
        removed = int(scan.expect(card_state(READER, "Card removed")).group(1))
        rig.insert_card(0)
        inserted = int(scan.expect(card_state(READER, "Card inserted")).group(1))
        assert (removed, inserted) == (first + 1, first + 2)
    finally:
        scan.close()


# --- 4.2 and 4.3 on the wire, against a real reader -------------------------------------------


@pytest.mark.parametrize("minor", [2, 3])
def test_old_dialects_wait_with_bodies_and_get_a_signal_on_a_real_change(
    minor: int, rig: PcscdRig, bridge: Bridge, card_in_reader_0: None
) -> None:
    with RawClient(bridge.socket_path, timeout=10) as c:
        assert c.version(4, minor) == VersionBody(4, minor, 0)
        assert c.establish().rv == 0
        # §11.2: 0x12, compare, then WAIT with {timeout, 0}: registered, nothing sent back.
        assert c.readers_state()[0].state & 0x04  # type: ignore[union-attr]
        c.wait(with_array=False, body=WaitBody(60000, 0))
        rig.remove_card(0)
        assert c.read_signal() == WaitBody(0, 0)  # the signal is the only answer
        assert c.readers_state()[0].state == 0x02  # type: ignore[union-attr]
        # Registered again, then a timeout: STOP with its body is answered {0, 0}.
        c.wait(with_array=False, body=WaitBody(100, 0))
        c.stop_waiting(WaitBody(0, 0))
        assert c.read_signal() == WaitBody(0, 0)
        c.wait(with_array=False, body=WaitBody(60000, 0))
        rig.insert_card(0)
        assert c.read_signal() == WaitBody(0, 0)
        entry = c.readers_state()[0]
        assert entry is not None and entry.atr.hex().startswith("3b858131")
        assert c.release().rv == 0


def test_42_client_with_100_byte_names_uses_a_real_card(
    rig: PcscdRig, bridge: Bridge, card_in_reader_0: None
) -> None:
    with RawClient(bridge.socket_path, timeout=10) as c:
        assert c.version(4, 2) == VersionBody(4, 2, 0)
        c.establish()
        body = ConnectBody(c.h_context, READER.encode().ljust(100, b"\0"), 2, 3, 0, 0, 0)
        c.send(encode_request(Command.SCARD_CONNECT, body))  # 124-byte body: pcsc-lite < 1.8.4
        reply: Any = unpack_body(ConnectBody, c.receive(124), CONNECT_SHORT_NAME)
        assert reply.rv == 0 and reply.active_protocol == 2
        request = TransmitBody(reply.h_card, 2, 16, len(SELECT_APP), 3, 16, 258, 0)
        c.send(encode_request(Command.SCARD_TRANSMIT, request, SELECT_APP))
        answer: Any = unpack_body(TransmitBody, c.receive(32))
        assert answer.rv == 0 and c.receive(answer.recv_length) == b"\x90\x00"
        # From its CONNECT on, the guest gives it 156-byte entries (100-byte names).
        c.send(encode_request(Command.CMD_GET_READERS_STATE, Empty()))
        table = decode_table(c.receive(16 * entry_size(100)), name_size=100)
        assert [e.name for e in table if e] == rig.reader_names
        assert table[0] is not None and table[0].protocol == 2
        disconnect: Any = c.request(Command.SCARD_DISCONNECT, DispositionBody(reply.h_card, 0, 0))
        assert disconnect.rv == 0


def test_host_with_16_readers_is_watched_beyond_one_status_call(
    make_pcscd_rig: Callable[..., PcscdRig], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """16 readers, pcscd 1.9.9's maximum: with the PnP pseudo-reader that is 17 states, one
    more than libpcsclite 1.9.9 takes in one SCardGetStatusChange. The host's watcher waits on
    two groups, and a card in the 16th reader (the second group) reaches the guest."""
    rig = make_pcscd_rig(8)
    with Bridge(tmp_path / "bridge", rig.socket_path) as running:
        running.start()
        seen = wait_for_reader_count(running.socket_path, 16)
        assert sorted(seen) == sorted(rig.reader_names)
        last = rig.reader_names[15]
        rig.insert_card(15)
        atr = rig.wait_for_card_state(last, present=True, socket_path=running.socket_path)
        assert atr.hex().startswith("3b858131")
        if _failed(request):
            print(running.logs())
    assert running.host is not None
    assert "watching the host's readers failed" not in running.host.log, running.logs()
    assert "Traceback" not in running.logs(), running.logs()


# --- more readers than pcscd 1.9.9 can have: the simulated backend ---------------------------

SIM_NAMES = [f"Sim Reader {index:02X} 00" for index in range(20)]


class OptionsBridge(Bridge):
    """The bridge's processes with extra options for the guest and the host."""

    def __init__(self, folder: Path, guest_options: list[str], host_options: list[str]) -> None:
        super().__init__(folder, None, backend="sim")
        self.guest_options = guest_options
        self.host_options = host_options

    def start_guest(self) -> BridgeProcess:
        argv = ["guest", "-v", "--listen", self.socket_path, "--link", self.link]
        self.guest = BridgeProcess(
            "guest", [*argv, *self.guest_options], self.folder / "guest.log", dict(os.environ)
        )
        _wait_for(lambda: os.path.exists(self.socket_path), 10, "guest socket", self.guest)
        return self.guest

    def start_with(self, readers: int) -> OptionsBridge:
        self.start_guest()
        self.start_host(self.host_options)
        wait_for_reader_count(self.socket_path, readers)
        return self


def variable_table_names(client: RawClient) -> list[str]:
    return [e.name for e in client.readers_state_array(client.readers_state_size()) if e]


def wait_for_reader_count(socket_path: str, count: int, timeout: float = 15) -> list[str]:
    """Until a 4.6 client of the guest sees `count` readers, woken by the guest's signals."""
    with RawClient(socket_path, timeout) as client:
        assert client.version(4, 6).rv == 0
        client.establish()
        while True:
            client.wait(with_array=False)  # registered; read as libpcsclite 2.5 does
            names = variable_table_names(client)
            if len(names) == count:
                client.stop_waiting()
                client.read_signal()  # the STOP answer, or the signal that raced it
                return names
            assert client.read_signal() == WaitBody(0, 0)


@pytest.fixture
def sim_bridge(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OptionsBridge]:
    options = ["--legacy-readers", "Sim Reader 1? 00"]
    with OptionsBridge(tmp_path, options, ["--sim-readers", "20"]) as running:
        yield running.start_with(20)
        if _failed(request):
            print(running.logs())
    assert "Traceback" not in running.logs(), running.logs()


def test_46_clients_see_more_than_16_readers_older_ones_the_chosen_16(
    libs: ClientLibs, sim_bridge: OptionsBridge
) -> None:
    # The sid library lists all 20 readers of the host.
    assert listed(libs["4.6"], sim_bridge.socket_path) == SIM_NAMES
    # 1.9.9 and 2.3.3 see 16: the four matching --legacy-readers 'Sim Reader 1? 00' first,
    # then the others in table order; each reader that fits keeps its slot.
    legacy = [*SIM_NAMES[:12], *SIM_NAMES[16:]]
    for dialect in ("4.4", "4.5"):
        assert listed(libs[dialect], sim_bridge.socket_path) == legacy, dialect


def listed(lib: ClientLib, socket_path: str) -> list[str]:
    """The readers `pcsc_scan -r` lists, in its order ("N: name" lines)."""
    listing = run(lib, ["pcsc_scan", "-r"], socket_path)
    assert listing.returncode == 0, listing.stderr
    lines = re.findall(r"^(\d+): (.+)$", listing.stdout, re.MULTILINE)
    assert [int(number) for number, _ in lines] == list(range(len(lines)))
    return [name for _, name in lines]


def test_reader_slots_option_sizes_fixed_tables(tmp_path: Path) -> None:
    with OptionsBridge(tmp_path, ["--reader-slots", "24"], ["--sim-readers", "20"]) as running:
        running.start_with(20)
        with RawClient(running.socket_path) as c:
            assert c.version(4, 4).rv == 0
            c.establish()
            # A 4.4 client built with PCSCLITE_MAX_READERS_CONTEXTS 24: 24-entry tables.
            assert [e.name for e in c.readers_state(24) if e] == SIM_NAMES
            c.send(encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, Empty()))
            assert len(decode_table(c.receive(24 * entry_size()))) == 24
            c.stop_waiting()
            assert c.read_signal() == WaitBody(0, 0)
    assert "Traceback" not in running.logs(), running.logs()


# --- the guest and host in this process, the clients real: readers come and go --------------


@pytest.fixture
async def sim_inprocess(tmp_path: Path) -> AsyncIterator[tuple[InProcessBridge, SimulatedBackend]]:
    sim = SimulatedBackend(SIM_NAMES[:2])
    sim.insert_card(SIM_NAMES[0])
    async with inprocess_bridge(sim, str(tmp_path / "pcscd.comm")) as running:
        yield running, sim
    sim.close()


async def until_waiting(bridge: InProcessBridge) -> None:
    """Until a client waits for the next event signal."""
    with trio.fail_after(10):
        while not bridge.server.mirror.waiter_count:
            await trio.sleep(0.005)


async def until_readers(bridge: InProcessBridge, count: int) -> None:
    await trio.to_thread.run_sync(wait_for_reader_count, bridge.socket_path, count)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_pcsc_scan_sees_readers_plugged_and_unplugged(
    dialect: str, libs: ClientLibs, sim_inprocess: tuple[InProcessBridge, SimulatedBackend]
) -> None:
    """Hot-plug through the PnP pseudo-reader: 1.9.9 notices the reader count, 2.3.3 and 2.5.3
    also read the reader-events counter (0x15)."""
    bridge, sim = sim_inprocess
    scan = Streamed(libs[dialect], ["pcsc_scan", "-n"], bridge.socket_path)

    def scanned(*names: str) -> str:
        listing = "".join(f"{index}: {re.escape(name)}\n" for index, name in enumerate(names))
        return r"Scanning present readers\.\.\.\n" + listing

    try:
        await trio.to_thread.run_sync(scan.expect, scanned(*SIM_NAMES[:2]))
        await trio.to_thread.run_sync(scan.expect, card_state(SIM_NAMES[1], "Card removed"))
        # pcsc_scan passes the PnP reader as UNAWARE after listing readers, so libpcsclite
        # ignores the reader-events counter and only notices a reader count that changes while
        # it waits; a reader added just before its wait begins goes unseen (with any pcscd).
        await until_waiting(bridge)
        sim.add_reader(SIM_NAMES[2])
        await trio.to_thread.run_sync(scan.expect, scanned(*SIM_NAMES[:3]))
        await until_waiting(bridge)
        sim.remove_reader(SIM_NAMES[0])
        await trio.to_thread.run_sync(scan.expect, scanned(*SIM_NAMES[1:3]))
    finally:
        scan.close()


async def test_46_pcsc_scan_sees_a_card_in_reader_20(
    libs: ClientLibs, sim_inprocess: tuple[InProcessBridge, SimulatedBackend]
) -> None:
    bridge, sim = sim_inprocess
    for name in SIM_NAMES[2:]:
        sim.add_reader(name)
    await until_readers(bridge, 20)
    scan = Streamed(libs["4.6"], ["pcsc_scan", "-n"], bridge.socket_path)
    try:
        # 21 reader states in one SCardGetStatusChange (2.5 has no limit of 16), and the host's
        # watcher waits on the 20th reader in its second group of states.
        await trio.to_thread.run_sync(scan.expect, card_state(SIM_NAMES[19], "Card removed"))
        sim.insert_card(SIM_NAMES[19])
        await trio.to_thread.run_sync(scan.expect, card_state(SIM_NAMES[19], "Card inserted"))
    finally:
        scan.close()


async def test_46_client_survives_the_table_growing_and_readers_leaving(
    libs: ClientLibs, sim_inprocess: tuple[InProcessBridge, SimulatedBackend]
) -> None:
    """libpcsclite 2.5 keeps the largest table size it saw for the life of the process and
    refuses a smaller one (SCARD_E_UNSUPPORTED_FEATURE): the guest's table never shrinks, not
    even when the host link is lost and comes back."""
    bridge, sim = sim_inprocess
    app = Streamed(libs["4.6"], [*PROGRAMS, "long-lived", SIM_NAMES[0]], bridge.socket_path)

    def ask() -> dict[str, Any]:
        app.send_line()  # the program lists the readers, connects and transmits
        return json.loads(app.expect(r"(\{.*\})\n").group(1))

    try:
        await trio.to_thread.run_sync(app.expect, "READY\n")
        first = await trio.to_thread.run_sync(ask)
        assert first["readers"] == SIM_NAMES[:2] and first["response"] == "9000"
        for name in SIM_NAMES[2:]:
            sim.add_reader(name)
        await until_readers(bridge, 20)
        grown = await trio.to_thread.run_sync(ask)
        assert grown["list_rv"] == 0 and grown["readers"] == SIM_NAMES
        for name in SIM_NAMES[2:]:
            sim.remove_reader(name)
        await until_readers(bridge, 2)
        assert await trio.to_thread.run_sync(ask) == first
        # The link goes and comes back: the table empties, and keeps its size.
        link = bridge.server.host.endpoint
        assert link is not None
        await link.aclose()
        await until_readers(bridge, 0)
        gone = await trio.to_thread.run_sync(ask)
        assert gone == {"list_rv": ReturnCode.SCARD_E_NO_READERS_AVAILABLE, "readers": []}
        await bridge.attach_host()
        await until_readers(bridge, 2)
        assert await trio.to_thread.run_sync(ask) == first
    finally:
        app.close()
