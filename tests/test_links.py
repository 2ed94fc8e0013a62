"""Link endpoints and the commands around them, run as a user runs them: TCP links, refusal of
non-loopback binds, the host waiting for a guest, bad input on the link, socket activation,
and the demo."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from pcscbridge.testing.rawclient import RawClient
from rig.bridge_processes import PCSCBRIDGE, Bridge, BridgeProcess
from rig.pcscd_rig import PcscdRig, run_pcsc_client
from rig.service import wait_until
from rig.sshd import free_port

SIM_READERS = ["Sim Reader 00 00", "Sim Reader 01 00"]


@pytest.mark.rig
def test_tcp_link_on_loopback(pcscd_rig: PcscdRig, tmp_path: Path) -> None:
    link = f"tcp:127.0.0.1:{free_port()}"
    with Bridge(tmp_path, pcscd_rig.socket_path, link=link) as bridge:
        bridge.start(expected_readers=pcscd_rig.reader_names)
        result = run_pcsc_client(["opensc-tool", "-r", "0", "-a"], bridge.socket_path)
        assert result.returncode == 0, bridge.logs()
        assert "3b:85:81:31" in result.stdout


@pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.1", "example.org"])
def test_non_loopback_tcp_link_is_refused(tmp_path: Path, address: str) -> None:
    result = subprocess.run(
        [
            *PCSCBRIDGE,
            "guest",
            "--listen",
            str(tmp_path / "pcscd.comm"),
            "--link",
            f"tcp:{address}:7788",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "refusing to listen" in result.stderr and "no authentication" in result.stderr
    assert not (tmp_path / "pcscd.comm").exists()


def test_host_waits_for_the_guest_then_attaches(tmp_path: Path) -> None:
    bridge = Bridge(tmp_path, None, backend="sim")
    try:
        bridge.start_host()  # no guest yet: the host retries with backoff
        wait_until(lambda: "retrying in" in bridge.host.log, 15, "a retry")  # type: ignore[union-attr]
        bridge.start_guest()
        bridge.wait_for_readers(SIM_READERS, timeout=20)
    finally:
        bridge.stop()
    assert "Traceback" not in bridge.logs()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff" + b"x" * 16,  # a frame longer than any allowed
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
        struct.pack(">I", 4) + msgpack.packb([7, 1, 2]),  # no such message kind
    ],
    ids=["oversize", "undecodable", "unknown-kind"],
)
def test_bad_input_on_the_link_closes_that_link_only(tmp_path: Path, garbage: bytes) -> None:
    with Bridge(tmp_path, None, backend="sim") as bridge:
        bridge.start(expected_readers=SIM_READERS)
        intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        intruder.settimeout(10)
        intruder.connect(bridge.link.removeprefix("unix:"))
        try:
            hello = intruder.recv(65536)  # the guest greets every link
            assert hello[4:5] == b"\x92"  # a msgpack array of two: [0, {...}]
            intruder.sendall(garbage)
            assert intruder.recv(65536) == b""  # closed on us
        finally:
            intruder.close()
        assert bridge.guest is not None
        wait_until(lambda: "closing it" in bridge.guest.log, 10, "the guest's log line")
        # The guest lives on; the genuine host attached before keeps serving.
        assert bridge.guest.alive()
        bridge.wait_for_readers(SIM_READERS, timeout=20)
    assert "Traceback" not in bridge.logs()


def test_guest_serves_a_socket_passed_by_systemd(tmp_path: Path) -> None:
    path = str(tmp_path / "activated.comm")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    link = f"unix:{tmp_path / 'link.sock'}"
    # As systemd does: the socket as fd 3, LISTEN_PID naming the process that execs the server.
    script = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, "
        f"[sys.executable, '-m', 'pcscbridge', 'guest', '--link', {link!r}])"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(listener.fileno())],
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    listener.close()
    try:
        with RawClient(path, timeout=10) as client:
            assert client.version().rv == 0
            assert client.establish().rv == 0
            assert client.readers_state() == [None] * 16
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert process.returncode == 0, output.decode()
    assert b"activated socket" in output


def test_attach_without_a_guest_server_says_so(tmp_path: Path) -> None:
    link = f"unix:{tmp_path / 'nobody.sock'}"
    result = subprocess.run(
        [*PCSCBRIDGE, "attach", "--link", link],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 69
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("pcscbridge attach: no guest server at " + link)


def test_host_and_guest_over_attach_and_stdio(tmp_path: Path) -> None:
    """The SSH shape without SSH: the host's link is the stdio of an `attach` process."""
    socket_path = str(tmp_path / "pcscd.comm")
    link = f"unix:{tmp_path / 'link.sock'}"
    guest = BridgeProcess(
        "guest",
        ["guest", "--listen", socket_path, "--link", link],
        tmp_path / "guest.log",
        dict(os.environ),
    )
    try:
        wait_until(lambda: os.path.exists(socket_path), 10, "the guest socket")
        # `host --connect stdio` talks on its own stdin/stdout; wire them to `attach`'s.
        attach = subprocess.Popen(
            [*PCSCBRIDGE, "attach", "--link", link], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        host = subprocess.Popen(
            [*PCSCBRIDGE, "host", "--connect", "stdio", "--backend", "sim"],
            stdin=attach.stdout,
            stdout=attach.stdin,
            stderr=subprocess.DEVNULL,
        )
        try:

            def readers() -> list[str]:
                with RawClient(socket_path) as client:
                    client.version()
                    return [e.name for e in client.readers_state() if e is not None]

            wait_until(lambda: readers() == SIM_READERS, 20, "the sim readers")
        finally:
            for process in (host, attach):
                process.terminate()
                process.wait(10)
    finally:
        guest.stop()
    assert "Traceback" not in guest.log


def test_demo_runs_and_shows_the_exchange() -> None:
    result = subprocess.run([*PCSCBRIDGE, "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "SCardListReaders -> ['Sim Reader 00 00', 'Sim Reader 01 00']" in out
    assert "SELECT the application by AID" in out and "-> 90 00" in out
    assert "reader empty" in out and "card present, ATR 3B 85 81 31" in out


async def test_pushes_are_applied_in_the_order_they_came() -> None:
    """A hello and two reader pushes arriving in one read: the later push must win, every time
    (they were once handled by concurrent tasks, in random order)."""
    import trio

    from pcscbridge.guest.server import GuestServer
    from pcscbridge.link.protocol import Hello, Push, encode

    reader = ["Host Reader 00 00", 1, 0x34, 0, b"\x3b\x00", 0]
    for _ in range(30):
        server = GuestServer()
        guest_side, host_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.host.attach, guest_side)
            await host_side.send_all(
                encode(Hello("host"))
                + encode(Push("readers", []))
                + encode(Push("readers", [reader]))
            )
            with trio.fail_after(5):
                while (
                    not server.host.readers_pushed.is_set() or len(server.mirror.reader_names) != 1
                ):
                    await trio.sleep(0)
                await trio.sleep(0.01)  # give a wrongly ordered second push time to land
            assert server.mirror.reader_names == ["Host Reader 00 00"]
            nursery.cancel_scope.cancel()


async def test_a_silent_peer_is_noticed_by_the_keepalive_and_a_live_one_is_kept() -> None:
    import trio

    from pcscbridge.host.agent import HostAgent
    from pcscbridge.host.backends.sim import SimulatedBackend
    from pcscbridge.host.service import open_host_service
    from pcscbridge.link.endpoint import LinkEndpoint
    from pcscbridge.link.protocol import Hello, encode

    # A peer that says hello and then nothing (a host gone behind a transport that stays open).
    guest_side, silent_side = trio.testing.memory_stream_pair()
    endpoint = LinkEndpoint(guest_side, "guest", keepalive=0.2)
    await silent_side.send_all(encode(Hello("host")))
    with trio.fail_after(3):
        await endpoint.run()  # ends by itself: no answer to the ping within 0.4 s
    assert endpoint.closed

    # A real host agent answers, so the link lives on for many intervals.
    async def ignore(push: object) -> None:
        pass

    guest_side, host_side = trio.testing.memory_stream_pair()
    endpoint = LinkEndpoint(guest_side, "guest", keepalive=0.05, on_push=ignore)
    backend = SimulatedBackend(["Sim Reader 00 00"])
    try:
        async with open_host_service(backend) as service, trio.open_nursery() as nursery:
            nursery.start_soon(endpoint.run)
            nursery.start_soon(HostAgent(service).serve, host_side)
            await trio.sleep(1.0)
            assert not endpoint.closed
            nursery.cancel_scope.cancel()
    finally:
        backend.close()
