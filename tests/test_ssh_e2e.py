"""End to end over SSH, as a user runs it: `pcscbridge guest` in the guest, and on the host
`pcscbridge host --ssh vm` with an ssh config file, through a real OpenSSH sshd on loopback (its
own config, host key and client key) to a real pcscd with vpcd readers, used by real clients.

What the SSH link must do (issue 3): carry every client's calls as a plain UNIX link does; fail
with one clear line and a distinct exit status when it cannot start; when the SSH connection is
lost, make the guest's readers disappear (apps see removal, not a hang), reconnect by itself and
bring the readers back to the contexts the apps already hold.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pcscbridge.pcsc import ReturnCode
from rig.bridge_processes import PCSCBRIDGE, Bridge, BridgeProcess, stop_bridges
from rig.pcsc_programs import assert_full_results_match
from rig.pcscd_rig import PcscdRig, assert_clients_see_the_same, run_pcsc_client
from rig.processes import PROGRAMS, finish, read_line, spawn_program
from rig.service import wait_until
from rig.sshd import LoopbackSshd, fingerprint, free_port, generate_key

# The real ~/.ssh and ssh-agent stay away from the host processes too (they inherit HOME).
pytestmark = [pytest.mark.rig, pytest.mark.usefixtures("private_home")]

READER = "Virtual PCD 00 00"
# sshd gives sessions a PATH without the venv: the guest side runs the venv's script by path.
REMOTE_PCSCBRIDGE = str(Path(sys.executable).parent / "pcscbridge")
# Every wait is bounded; these are the bounds the "within a few seconds" stands for.
# (Measured on a busy 2-vCPU machine: readers gone at once after a kill, back after 1-2 s; a
# call stuck on a frozen server fails after ~4 s with ServerAliveInterval 1 x CountMax 2.)
VANISH_WITHIN = 5.0
RETURN_WITHIN = 10.0
FROZEN_NOTICED_WITHIN = 10.0


# ----------------------------------------------------------------------------- fixtures


# Both SSH clients pass the same tests; where what they say differs, the test says how.
SSH_CLIENTS = ["paramiko", "openssh"]


@pytest.fixture(params=SSH_CLIENTS)
def ssh_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def host_ssh_args(
    config: Path | None, link: str, destination: str = "vm", client: str = "paramiko"
) -> list[str]:
    """`host --ssh vm ...`; config None: none given, ssh's own ~/.ssh/config is used."""
    return [
        "host",
        "--ssh",
        destination,
        "--ssh-client",
        client,
        *(["--ssh-config", str(config)] if config is not None else []),
        "--remote-pcscbridge",
        REMOTE_PCSCBRIDGE,
        "--guest-link",
        link,
    ]


class SshBridge(Bridge):
    """The guest server, and `pcscbridge host --ssh vm` running `pcscbridge attach` in it."""

    def __init__(
        self, folder: Path, host_pcscd_socket: str, config: Path | None, client: str
    ) -> None:
        super().__init__(folder, host_pcscd_socket)
        self.config = config
        self.client = client

    def start_host(self, extra: list[str] | None = None) -> BridgeProcess:
        # The host's pyscard reaches the rig's pcscd, never the system's /run/pcscd.
        env = {**os.environ, "PCSCLITE_CSOCK_NAME": str(self.host_pcscd_socket)}
        self.host = BridgeProcess(
            "host",
            [
                *host_ssh_args(self.config, self.link, client=self.client),
                *self._flags(),
                *(extra or []),
            ],
            self.folder / "host.log",
            env,
        )
        return self.host


@pytest.fixture
def start_bridge(
    pcscd_rig: PcscdRig, tmp_path: Path, request: pytest.FixtureRequest, ssh_client: str
) -> Iterator[Any]:
    """Factory: start_bridge(ssh_config, extra_host_args=()) -> a running SshBridge."""
    bridges: list[SshBridge] = []

    def start(config: Path | None, extra: list[str] | None = None) -> SshBridge:
        bridge = SshBridge(
            tmp_path / f"bridge{len(bridges)}", pcscd_rig.socket_path, config, ssh_client
        )
        bridges.append(bridge)
        bridge.start_guest()
        bridge.start_host(extra)
        bridge.wait_for_readers(pcscd_rig.reader_names, timeout=15)
        return bridge

    yield start
    stop_bridges(bridges, request)  # whatever happened, neither side may have crashed


def readers_are(bridge: Bridge, expected: list[str]) -> Any:
    def check() -> bool:
        try:
            return sorted(bridge.guest_readers()) == sorted(expected)
        except OSError:
            return False

    return check


# ------------------------------------------------------------------- real clients over SSH


def test_pcsc_scan_and_opensc_tool_see_the_hosts_readers(
    pcscd_rig: PcscdRig,
    sshd: LoopbackSshd,
    start_bridge: Any,
    client_config: Callable[..., Path],
    ssh_client: str,
) -> None:
    bridge = start_bridge(client_config(sshd))
    shown = assert_clients_see_the_same(pcscd_rig.socket_path, bridge.socket_path)
    assert "Virtual PCD B 00 01" in run_pcsc_client(["pcsc_scan", "-r"], bridge.socket_path).stdout
    assert "3b:85:81:31" in shown.lower()  # the ATR of the card in reader 0
    assert bridge.host is not None
    assert f"SSH link to root@[127.0.0.1]:{sshd.port} open" in bridge.host.log
    if ssh_client == "openssh":
        assert "(ssh -T, command: " in bridge.host.log


def test_pyscard_every_call_gives_pcscds_results(
    pcscd_rig: PcscdRig, sshd: LoopbackSshd, start_bridge: Any, client_config: Callable[..., Path]
) -> None:
    bridge = start_bridge(client_config(sshd))
    program = [*PROGRAMS, "full", READER]
    direct = run_pcsc_client(program, pcscd_rig.socket_path, timeout=30)
    bridged = run_pcsc_client(program, bridge.socket_path, timeout=30)
    assert direct.returncode == 0, direct.stderr
    assert bridged.returncode == 0, bridged.stderr
    assert_full_results_match(direct.stdout, bridged.stdout)


# Times SCardTransmit of an ECHO APDU carrying SIZE bytes, COUNT times; prints the median.
TIMED_ECHO = """
import json, sys, time
from smartcard import scard
reader, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hr, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
hr, card, _ = scard.SCardConnect(context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1)
assert hr == 0, hex(hr)
data = bytes(i & 0xFF for i in range(size))
apdu = list(bytes.fromhex("8010000000") + size.to_bytes(2, "big") + data)
times = []
for _ in range(count):
    start = time.perf_counter()
    hr, response = scard.SCardTransmit(card, scard.SCARD_PCI_T1, apdu)
    times.append(time.perf_counter() - start)
    assert hr == 0 and bytes(response) == data + b"\\x90\\x00", hex(hr)
print(json.dumps({"median": sorted(times)[count // 2]}))
"""


def median_transmit(socket_path: str, size: int, count: int) -> float:
    result = run_pcsc_client(
        [sys.executable, "-c", TIMED_ECHO, READER, str(size), str(count)], socket_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return float(json.loads(result.stdout)["median"])


def test_no_nagle_stalls_on_the_path(
    pcscd_rig: PcscdRig, sshd: LoopbackSshd, start_bridge: Any, client_config: Callable[..., Path]
) -> None:
    # A response larger than one SSH packet (32 KiB) leaves in two writes; with Nagle on a
    # socket of the path, the second waits for the ACK of the first, which the peer delays.
    # Measured: the median 60000-byte echo takes ~8-18 ms, and 50-70 ms without TCP_NODELAY on
    # the host's socket. Small calls would stall the same way if a side wrote one message in
    # more than one send.
    bridge = start_bridge(client_config(sshd))
    timings = {size: median_transmit(bridge.socket_path, size, 30) for size in (16, 60000)}
    print(
        "median transmit through SSH: "
        + ", ".join(f"{size} bytes {seconds * 1000:.2f} ms" for size, seconds in timings.items())
    )
    for size, seconds in timings.items():
        assert seconds < 0.035, f"{size} bytes: {seconds * 1000:.1f} ms, a Nagle stall?"


# ------------------------------------------------------------------- failures to start


def run_host(args: list[str], tmp_path: Path, timeout: float = 40) -> tuple[int, str]:
    """Run `pcscbridge host ...` to its end; returns (exit status, the one error line)."""
    env = {**os.environ, "PCSCLITE_CSOCK_NAME": str(tmp_path / "no-pcscd.comm")}
    result = subprocess.run(
        [*PCSCBRIDGE, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr
    assert "paramiko" not in stderr, stderr  # its own logs repeat ours, with tracebacks (-v)
    errors = [line for line in stderr.splitlines() if line.startswith("pcscbridge host: ")]
    assert len(errors) == 1, stderr
    # The error is the last line; anything before it is a time-stamped log line.
    assert stderr.splitlines()[-1] == errors[0], stderr
    return result.returncode, errors[0].removeprefix("pcscbridge host: ")


def test_unknown_host_key_is_refused_then_accept_new_records_it(
    pcscd_rig: PcscdRig,
    sshd: LoopbackSshd,
    tmp_path: Path,
    start_bridge: Any,
    private_home: Path,
    client_config: Callable[..., Path],
    ssh_client: str,
) -> None:
    config = client_config(sshd, trusted=False)
    known_hosts = tmp_path / "known_hosts"
    status, message = run_host(
        host_ssh_args(config, f"unix:{tmp_path}/link.sock", client=ssh_client), tmp_path
    )
    assert status == 6, message
    if ssh_client == "paramiko":  # ssh in batch mode does not print the unknown key
        assert fingerprint(sshd.host_key_path.with_suffix(".pub")) in message
    assert f"[127.0.0.1]:{sshd.port}" in message and "--accept-new" in message
    assert known_hosts.read_text() == ""
    # --accept-new: the key is written, the link starts and the readers arrive in the guest.
    bridge = start_bridge(config, ["--accept-new"])
    assert known_hosts.read_text() == sshd.known_hosts_line()
    bridge.stop()
    if ssh_client == "openssh":
        # From now on the key is known: no --accept-new needed. (ssh's ~ is the home in the
        # password database, not $HOME: the ~/.ssh/config step below is paramiko's.)
        start_bridge(config)
        assert known_hosts.read_text() == sshd.known_hosts_line()
        return
    # From now on the key is known: no --accept-new needed. And `--ssh vm` alone finds vm in
    # ~/.ssh/config, as ssh does.
    (private_home / ".ssh").mkdir(mode=0o700)
    (private_home / ".ssh" / "config").write_text(config.read_text())
    start_bridge(None)
    assert known_hosts.read_text() == sshd.known_hosts_line()


def test_changed_host_key_is_refused(
    sshd: LoopbackSshd, tmp_path: Path, client_config: Callable[..., Path], ssh_client: str
) -> None:
    config = client_config(sshd)
    impostor = tmp_path / "impostor_key"
    algorithm, key, *_ = generate_key(impostor, "impostor").split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {algorithm} {key}\n")
    for extra in ([], ["--accept-new"]):  # accept-new never overrides a changed key
        status, message = run_host(
            [*host_ssh_args(config, f"unix:{tmp_path}/link.sock", client=ssh_client), *extra],
            tmp_path,
        )
        assert status == 6, message
        assert "CHANGED" in message
        assert fingerprint(sshd.host_key_path.with_suffix(".pub")) in message
        assert fingerprint(impostor.with_suffix(".pub")) in message
        assert known_hosts.read_text() == f"[127.0.0.1]:{sshd.port} {algorithm} {key}\n"


def test_wrong_client_key_is_an_authentication_failure(
    sshd: LoopbackSshd, tmp_path: Path, client_config: Callable[..., Path], ssh_client: str
) -> None:
    stranger = tmp_path / "stranger_key"
    generate_key(stranger, "not authorized")
    config = client_config(sshd, IdentityFile=str(stranger))
    status, message = run_host(
        host_ssh_args(config, f"unix:{tmp_path}/link.sock", client=ssh_client), tmp_path
    )
    assert status == 5, message
    assert "authentication" in message and str(stranger) in message


def test_closed_port_is_a_connection_failure(tmp_path: Path, ssh_client: str) -> None:
    config = tmp_path / "ssh_config"
    port = free_port()
    config.write_text(f"Host vm\n    HostName 127.0.0.1\n    Port {port}\n")
    status, message = run_host(
        host_ssh_args(config, f"unix:{tmp_path}/link.sock", client=ssh_client), tmp_path
    )
    assert status == 4, message
    assert "refused" in message.lower() and str(port) in message


def test_silent_server_is_a_connection_failure(tmp_path: Path, ssh_client: str) -> None:
    # Accepts (the kernel completes the handshake) but never says a word, as a booting VM or a
    # hung sshd does: the message must say so, not paramiko's "No existing session".
    with socket.create_server(("127.0.0.1", 0)) as silent:
        config = tmp_path / "ssh_config"
        port = silent.getsockname()[1]
        config.write_text(
            f"Host vm\n    HostName 127.0.0.1\n    Port {port}\n    ConnectTimeout 1\n"
        )
        status, message = run_host(
            host_ssh_args(config, f"unix:{tmp_path}/link.sock", client=ssh_client), tmp_path
        )
    assert status == 4, message
    assert "banner" in message or "no SSH handshake within 1s" in message, message


def test_unresolvable_name(tmp_path: Path, ssh_client: str) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host vm\n    HostName no-such-guest.invalid\n")
    status, message = run_host(
        host_ssh_args(config, f"unix:{tmp_path}/link.sock", client=ssh_client), tmp_path
    )
    assert status == 3, message
    assert "no-such-guest.invalid" in message


def test_pcscbridge_missing_in_the_guest(
    sshd: LoopbackSshd, tmp_path: Path, client_config: Callable[..., Path], ssh_client: str
) -> None:
    args = host_ssh_args(client_config(sshd), f"unix:{tmp_path}/link.sock", client=ssh_client)
    args[args.index("--remote-pcscbridge") + 1] = "/nonexistent/pcscbridge"
    status, message = run_host(args, tmp_path)
    assert status == 7, message
    assert "/nonexistent/pcscbridge" in message and "installed" in message


def test_guest_server_not_running(
    sshd: LoopbackSshd, tmp_path: Path, client_config: Callable[..., Path], ssh_client: str
) -> None:
    link = f"unix:{tmp_path}/link.sock"
    status, message = run_host(
        host_ssh_args(client_config(sshd), link, client=ssh_client), tmp_path
    )
    assert status == 8, message
    assert "guest server is not running" in message and link in message


# ------------------------------------------------------------------- losing the connection


def ask(app: subprocess.Popen[str], timeout: float = 15) -> dict[str, Any]:
    """One round of the long-lived program: list readers, connect, transmit SELECT."""
    assert app.stdin is not None
    app.stdin.write("\n")
    app.stdin.flush()
    return json.loads(read_line(app, timeout))  # type: ignore[no-any-return]


def test_killed_connection_readers_vanish_and_come_back(
    pcscd_rig: PcscdRig, start_bridge: Any, client_config: Callable[..., Path]
) -> None:
    # No ServerAliveInterval in the config (the default is 15 s): a connection that is cut
    # must be noticed from the stream itself, not from keepalives.
    with LoopbackSshd() as own_sshd:
        bridge = start_bridge(client_config(own_sshd))
        app = spawn_program(["long-lived", READER], bridge.socket_path)
        try:
            assert read_line(app, 10) == "READY"
            assert ask(app)["response"] == "9000"
            killed_at = time.monotonic()
            assert own_sshd.kill_connections() > 0
            vanished = wait_until(readers_are(bridge, []), VANISH_WITHIN, "readers to vanish")
            returned = wait_until(
                readers_are(bridge, pcscd_rig.reader_names), RETURN_WITHIN, "readers to return"
            )
            print(
                f"killed SSH connection: readers gone after {vanished:.2f}s, "
                f"back after {time.monotonic() - killed_at:.2f}s"
            )
            assert returned > 0  # they were away
            # The context the app held all along connects and transmits again.
            result = ask(app)
            assert result["list_rv"] == 0 and result["connect_rv"] == 0, result
            assert result["transmit_rv"] == 0 and result["response"] == "9000", result
            assert bridge.host is not None and bridge.host.alive()
            assert "reconnecting" in bridge.host.log
        finally:
            finish(app)


def test_frozen_server_is_dropped_by_keepalives(
    pcscd_rig: PcscdRig, start_bridge: Any, client_config: Callable[..., Path], ssh_client: str
) -> None:
    # Frozen, not killed: TCP stays up and nothing is ever closed; only the host's keepalives
    # (1 s x 2) can tell. The host then drops the connection and attaches again, and the guest
    # drops the frozen link: calls stuck on it fail instead of hanging, the readers come back.
    with LoopbackSshd() as own_sshd:
        config = client_config(own_sshd, ServerAliveInterval="1", ServerAliveCountMax="2")
        bridge = start_bridge(config)
        app = spawn_program(["long-lived", READER], bridge.socket_path)
        try:
            assert read_line(app, 10) == "READY"
            assert ask(app)["response"] == "9000"
            assert own_sshd.freeze_connections() > 0
            frozen_at = time.monotonic()
            # SCardConnect goes to the frozen link: it must come back with the reader gone.
            stuck = ask(app, timeout=FROZEN_NOTICED_WITHIN + 5)
            failed_after = time.monotonic() - frozen_at
            assert stuck["connect_rv"] == ReturnCode.SCARD_E_READER_UNAVAILABLE, stuck
            assert failed_after < FROZEN_NOTICED_WITHIN
            wait_until(readers_are(bridge, pcscd_rig.reader_names), RETURN_WITHIN, "readers")
            print(
                f"frozen SSH server: the stuck call failed after {failed_after:.2f}s, "
                f"readers back after {time.monotonic() - frozen_at:.2f}s"
            )
            assert bridge.guest is not None
            assert "readers removed" in bridge.guest.log
            result = ask(app)
            assert result["connect_rv"] == 0 and result["response"] == "9000", result
            assert bridge.host is not None
            said = {"paramiko": "no answer to keepalives", "openssh": "not responding"}
            assert said[ssh_client] in bridge.host.log
        finally:
            own_sshd.thaw_connections()
            finish(app)


def stays_true(condition: Any, seconds: float) -> bool:
    """True if `condition` holds at every poll for `seconds` (awaiting a non-event)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.1)
    return True


def test_host_gone_silent_is_dropped_by_the_guests_sshd(
    pcscd_rig: PcscdRig, start_bridge: Any, client_config: Callable[..., Path], ssh_client: str
) -> None:
    # The other direction: the host (or the network to it) goes silent without closing
    # anything. Only the guest's side can tell, and the guest server cannot see past
    # `pcscbridge attach`: sshd's ClientAliveInterval ends the session, attach's stdin ends and
    # the guest drops the link. This also proves the host answers sshd's keepalives: a healthy
    # link outlives several ClientAliveInterval x ClientAliveCountMax periods.
    with LoopbackSshd(
        extra_config={"ClientAliveInterval": "1", "ClientAliveCountMax": "2"}
    ) as own_sshd:
        bridge = start_bridge(client_config(own_sshd))
        assert stays_true(readers_are(bridge, pcscd_rig.reader_names), 3.5)
        assert bridge.host is not None
        host_pid = bridge.host.process.pid
        os.killpg(host_pid, signal.SIGSTOP)  # the host and its ssh, if any
        try:
            vanished = wait_until(readers_are(bridge, []), 10, "readers to vanish")
        finally:
            os.killpg(host_pid, signal.SIGCONT)
        thawed_at = time.monotonic()
        wait_until(readers_are(bridge, pcscd_rig.reader_names), RETURN_WITHIN, "readers")
        print(
            f"silent host: readers gone after {vanished:.2f}s; "
            f"back {time.monotonic() - thawed_at:.2f}s after it resumed"
        )
        # The host says why its link ended (paramiko's bare EOFError used to say nothing).
        said = {"paramiko": r"SSH connection to \S+ lost: \S", "openssh": r"ssh vm: .*closed"}
        assert re.search(said[ssh_client], bridge.host.log), bridge.host.log


# ---------------------------------------------------------------------- pcscbridge attach


def test_attach_without_a_guest_server_exits_69(tmp_path: Path) -> None:
    link = f"unix:{tmp_path}/nobody.sock"
    result = subprocess.run(
        [*PCSCBRIDGE, "attach", "--link", link],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 69, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("pcscbridge attach: ") and link in line


def read_frame(stream: Any, timeout: float) -> list[Any]:
    """One link frame (u32 BE length + msgpack array) from a pipe, within `timeout`."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no complete frame within {timeout}s (got {data!r})"
        chunk = os.read(fd, 65536)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    (size,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + size  # nothing else is sent before the peer's hello
    return msgpack.unpackb(data[4:], raw=False)  # type: ignore[no-any-return]


def frame(message: list[Any]) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def test_attach_pumps_the_link_both_ways(tmp_path: Path) -> None:
    bridge = Bridge(tmp_path / "bridge", None)
    bridge.start_guest()
    attach = subprocess.Popen(
        [*PCSCBRIDGE, "attach", "--link", bridge.link],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert attach.stdin is not None and attach.stdout is not None
        # guest -> stdout: the guest server's hello.
        kind, hello = read_frame(attach.stdout, 10)
        assert kind == 0 and hello["role"] == "guest" and hello["protocol"] == 1
        # stdin -> guest: a host's hello and a readers push make a reader appear in the guest.
        host_hello = {
            "protocol": 1,
            "role": "host",
            "software": "test",
            "capabilities": [],
            "max_message_size": 1 << 20,
        }
        reader = ["Pumped Reader 00 00", 0, 0x0002, 0, b"", 0]  # SCARD_ABSENT: no card
        attach.stdin.write(frame([0, host_hello]) + frame([3, "readers", [reader]]))
        attach.stdin.flush()
        bridge.wait_for_readers(["Pumped Reader 00 00"], timeout=10)
        # The host side ending (EOF on stdin) ends the attachment: the readers go.
        attach.stdin.close()
        assert attach.wait(10) == 0
        bridge.wait_for_readers([], timeout=10)
    finally:
        if attach.poll() is None:
            attach.kill()
        attach.wait(5)
        bridge.stop()
    assert "Traceback" not in bridge.logs(), bridge.logs()
