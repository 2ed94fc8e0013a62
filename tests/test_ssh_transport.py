"""The SSH transport against a real OpenSSH server on loopback (rig.sshd)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import paramiko
import pytest
import trio
import trio.testing

from pcscbridge.transports.ssh import (
    SSHLink,
    SSHLinkError,
    SSHTarget,
    open_ssh_link,
    parse_destination,
)
from rig.sshd import LoopbackSshd, fingerprint, free_port, generate_key

pytestmark = [
    pytest.mark.skipif(
        shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
        reason="needs OpenSSH's sshd",
    ),
    # Keep the real user's ~/.ssh and ssh-agent out of every test.
    pytest.mark.usefixtures("private_home"),
]

# Every wait in these tests is bounded by this (the tests themselves finish far sooner).
TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def open_link(
    config: Path, command: str = "cat", **options: object
) -> AsyncIterator[SSHLink]:
    """`async with open_link(config) as link`: the link to vm, closed however the block ends."""
    options.setdefault("first_data_timeout", 0)
    options.setdefault("connect_timeout", 5)
    with trio.fail_after(TIMEOUT):
        link = await open_ssh_link(
            SSHTarget("vm", remote_command=command, ssh_config=config, **options)  # type: ignore[arg-type]
        )
    try:
        yield link
    finally:
        await link.aclose()


async def open_error(
    config: Path | None, destination: str = "vm", **options: object
) -> SSHLinkError:
    options.setdefault("remote_command", "cat")
    options.setdefault("connect_timeout", 5)
    with pytest.raises(SSHLinkError) as info, trio.fail_after(TIMEOUT):
        await open_ssh_link(SSHTarget(destination, ssh_config=config, **options))  # type: ignore[arg-type]
    return info.value


async def receive_exactly(link: SSHLink, size: int) -> bytes:
    chunks = bytearray()
    with trio.fail_after(TIMEOUT):
        while len(chunks) < size:
            chunk = await link.receive_some()
            assert chunk, f"EOF after {len(chunks)} of {size} bytes"
            chunks += chunk
    return bytes(chunks)


async def echo(link: SSHLink, payload: bytes) -> bytes:
    """Send and receive concurrently, as a big payload needs (cat echoes while we still send)."""
    result = b""

    async def receiver() -> None:
        nonlocal result
        result = await receive_exactly(link, len(payload))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await link.send_all(payload)
    return result


# ----------------------------------------------------------------------------- data path


async def test_round_trip_through_cat(
    sshd: LoopbackSshd, client_config: Callable[..., Path]
) -> None:
    async with open_link(client_config(sshd)) as link:
        for size in (1, 40, 4096, 32 * 1024, 65536 + 3, 256 * 1024):
            payload = os.urandom(size)
            assert await echo(link, payload) == payload, size


async def test_concurrent_send_and_receive_keeps_order(
    sshd: LoopbackSshd, client_config: Callable[..., Path]
) -> None:
    messages = [os.urandom(n) for n in (7, 300, 33000, 1, 5000, 128 * 1024, 64) * 8]
    expected = b"".join(messages)
    received = bytearray()

    async def sender(link: SSHLink) -> None:
        for message in messages:
            await link.send_all(message)
        await link.send_eof()

    async def receiver(link: SSHLink) -> None:
        while chunk := await link.receive_some(10_000):
            received.extend(chunk)

    async with open_link(client_config(sshd)) as link:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender, link)
                nursery.start_soon(receiver, link)
            assert bytes(received) == expected
            # cat saw our EOF, closed its stdout and exited 0.
            assert await link.wait_exit_status() == 0
            assert link.remote_error() is None


async def test_small_round_trips_are_fast_and_socket_is_nodelay(
    sshd: LoopbackSshd, client_config: Callable[..., Path]
) -> None:
    async with open_link(client_config(sshd)) as link:
        sock = link.transport.sock
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        timings = []
        for _ in range(100):
            start = time.perf_counter()
            assert await echo(link, b"x" * 40) == b"x" * 40
            timings.append(time.perf_counter() - start)
        timings.sort()
        # A Nagle / delayed-ACK stall costs ~40 ms; loopback round trips take well under 2 ms.
        assert timings[len(timings) // 2] < 0.02, timings[len(timings) // 2]


async def test_first_bytes_are_awaited_and_kept(
    sshd: LoopbackSshd, caplog: pytest.LogCaptureFixture, client_config: Callable[..., Path]
) -> None:
    caplog.set_level(logging.WARNING, logger="pcscbridge.ssh")
    command = "echo 'attach: a note on stderr' >&2; printf HELLO; exec cat"
    start = time.monotonic()
    async with open_link(client_config(sshd), command, first_data_timeout=TIMEOUT) as link:
        # open_ssh_link returned on the hello, not at the end of first_data_timeout.
        assert time.monotonic() - start < TIMEOUT / 2
        assert await receive_exactly(link, 5) == b"HELLO"
        assert await echo(link, b"ping") == b"ping"
        assert "attach: a note on stderr" in caplog.text


async def test_receive_after_aclose_and_aclose_wakes_a_receiver(
    sshd: LoopbackSshd, client_config: Callable[..., Path]
) -> None:
    outcome: list[BaseException] = []

    async def blocked_receiver(link: SSHLink) -> None:
        try:
            await link.receive_some()
        except trio.ClosedResourceError as e:
            outcome.append(e)

    async with open_link(client_config(sshd)) as link:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked_receiver, link)
                await trio.testing.wait_all_tasks_blocked()
                await link.aclose()
        assert len(outcome) == 1
        with pytest.raises(trio.ClosedResourceError):
            await link.send_all(b"x")
        await link.aclose()  # idempotent


async def test_interleaved_stderr_neither_loses_nor_stalls_stdout(
    sshd: LoopbackSshd, caplog: pytest.LogCaptureFixture, client_config: Callable[..., Path]
) -> None:
    # stdout and stderr share one wake-up pipe in paramiko; a lost wake-up would hang here.
    caplog.set_level(logging.WARNING, logger="pcscbridge.ssh")
    command = "i=0; while [ $i -lt 500 ]; do i=$((i+1)); echo err$i >&2; echo out$i; done"
    received = bytearray()
    async with open_link(client_config(sshd), command) as link:
        with trio.fail_after(TIMEOUT):
            while chunk := await link.receive_some():
                received += chunk
    assert received.decode().split() == [f"out{i}" for i in range(1, 501)]
    assert "err500" in caplog.text


async def wait_for_sessions(server: LoopbackSshd, present: bool) -> None:
    # No event to await for another process's start or exit: poll, bounded.
    with trio.fail_after(TIMEOUT):
        while bool(server.session_pids()) != present:
            await trio.sleep(0.02)


@pytest.mark.parametrize("stage", ["connecting", "awaiting first data"])
async def test_cancelled_open_leaves_no_session_behind(
    stage: str, client_config: Callable[..., Path]
) -> None:
    with LoopbackSshd() as server:
        target = SSHTarget("vm", remote_command="sleep 60", ssh_config=client_config(server))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_ssh_link, target)
            if stage == "connecting":
                await trio.sleep(0.01)  # the connect thread is running (it takes ~50 ms)
            else:
                await wait_for_sessions(server, present=True)  # `sleep 60` runs, no data comes
            nursery.cancel_scope.cancel()
        # What the cancelled open had opened is closed: sshd's session processes go away.
        await wait_for_sessions(server, present=False)


# ------------------------------------------------------------------------------- routing


def write_config(sshd: LoopbackSshd, tmp_path: Path, text: str) -> Path:
    """`text` as tmp_path/ssh_config, with tmp_path/known_hosts (for `text` to name) trusting
    `sshd`: for configs that client_config cannot write (ProxyJump hops, no IdentityFile)."""
    (tmp_path / "known_hosts").write_text(sshd.known_hosts_line())
    config = tmp_path / "ssh_config"
    config.write_text(text)
    return config


async def test_proxy_jump_through_the_same_sshd(sshd: LoopbackSshd, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    common = (
        f"    HostName 127.0.0.1\n    Port {sshd.port}\n    User root\n"
        f"    IdentityFile {sshd.client_key_path}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts}\n    GlobalKnownHostsFile /dev/null\n"
    )
    config = write_config(
        sshd, tmp_path, f"Host vm\n    ProxyJump jump\n{common}Host jump\n{common}"
    )
    async with open_link(config) as link:
        name = f"root@[127.0.0.1]:{sshd.port}"
        assert link.route == (name, name)  # logged in to the jump host, then to the target
        # The target's transport runs over a direct-tcpip channel of the jump host's.
        assert isinstance(link.transport.sock, paramiko.Channel)
        first_hop = link._session.clients[0].get_transport()
        assert first_hop is not None
        assert first_hop.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        payload = os.urandom(100_000)
        assert await echo(link, payload) == payload


async def test_proxy_command(sshd: LoopbackSshd, tmp_path: Path) -> None:
    # HostName cannot be resolved: only the ProxyCommand, which ignores it, can get there.
    hostname = "vm.invalid"
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{hostname}]:{sshd.port} {sshd.host_public_key}\n")
    config = sshd.write_client_config(
        tmp_path / "ssh_config",
        alias="vm",
        known_hosts=tmp_path / "unused_known_hosts",
        extra={
            "HostName": hostname,
            "UserKnownHostsFile": str(known_hosts),
            "ProxyCommand": "socat - TCP:127.0.0.1:%p",
        },
    )
    async with open_link(config) as link:
        assert isinstance(link.transport.sock, paramiko.ProxyCommand)
        payload = os.urandom(50_000)
        assert await echo(link, payload) == payload


async def test_proxy_jump_to_a_closed_port(sshd: LoopbackSshd, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    config = write_config(
        sshd,
        tmp_path,
        f"Host vm\n    HostName 127.0.0.1\n    Port {free_port()}\n    ProxyJump jump\n"
        f"Host jump\n    HostName 127.0.0.1\n    Port {sshd.port}\n    User root\n"
        f"    IdentityFile {sshd.client_key_path}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts}\n",
    )
    error = await open_error(config)
    assert (error.kind, error.exit_code) == ("connect", 4)
    assert f"jump host root@[127.0.0.1]:{sshd.port}" in str(error)


async def test_proxy_command_to_a_closed_port(
    sshd: LoopbackSshd, client_config: Callable[..., Path]
) -> None:
    config = client_config(sshd, ProxyCommand=f"socat - TCP:127.0.0.1:{free_port()}")
    start = time.monotonic()
    error = await open_error(config)
    assert (error.kind, error.exit_code) == ("connect", 4)
    assert "Connection refused" in str(error)  # socat's own words, from its stderr
    assert time.monotonic() - start < 3  # noticed at the proxy's exit, not at a timeout


# ------------------------------------------------------------------------------ identities


def minimal_config(sshd: LoopbackSshd, tmp_path: Path) -> Path:
    """No IdentityFile: keys must come from the agent or the default ~/.ssh/id_* files."""
    return write_config(
        sshd,
        tmp_path,
        f"Host vm\n    HostName 127.0.0.1\n    Port {sshd.port}\n    User root\n"
        f"    UserKnownHostsFile {tmp_path / 'known_hosts'}\n",
    )


async def test_key_from_ssh_agent(
    sshd: LoopbackSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = minimal_config(sshd, tmp_path)
    assert (await open_error(config)).kind == "auth"  # no agent, no default key files
    agent_socket = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(agent_socket)], stdout=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(TIMEOUT):
            while not agent_socket.exists():  # ssh-agent -D has no readiness signal but this
                await trio.sleep(0.01)
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_socket)}
        subprocess.run(
            ["ssh-add", str(sshd.client_key_path)], env=env, check=True, capture_output=True
        )
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent_socket))
        async with open_link(config) as link:
            assert await echo(link, b"agent") == b"agent"
        # IdentitiesOnly yes without an IdentityFile: the agent must not be used.
        config.write_text(config.read_text() + "    IdentitiesOnly yes\n")
        assert (await open_error(config)).kind == "auth"
    finally:
        agent.terminate()
        agent.wait(timeout=5)


async def test_key_from_default_identity_file(
    sshd: LoopbackSshd, tmp_path: Path, private_home: Path
) -> None:
    config = minimal_config(sshd, tmp_path)
    ssh_dir = private_home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    shutil.copy(sshd.client_key_path, ssh_dir / "id_ed25519")
    async with open_link(config) as link:
        assert await echo(link, b"default key") == b"default key"


# ----------------------------------------------------------------------------- host keys


async def test_unknown_host_key_is_refused(
    sshd: LoopbackSshd, tmp_path: Path, client_config: Callable[..., Path]
) -> None:
    config = client_config(sshd, trusted=False)
    error = await open_error(config)
    assert (error.kind, error.exit_code) == ("hostkey", 6)
    message = str(error)
    assert "\n" not in message
    assert f"[127.0.0.1]:{sshd.port}" in message
    assert "ssh-ed25519" in message
    assert fingerprint(sshd.host_key_path.with_suffix(".pub")) in message
    assert str(tmp_path / "known_hosts") in message
    assert "--accept-new" in message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1" in message
    assert (tmp_path / "known_hosts").read_text() == ""


@pytest.mark.parametrize("hashed", [False, True])
async def test_accept_new_records_the_key_and_it_is_used_next_time(
    sshd: LoopbackSshd, tmp_path: Path, hashed: bool, client_config: Callable[..., Path]
) -> None:
    config = client_config(sshd, trusted=False, HashKnownHosts="yes" if hashed else "no")
    async with open_link(config, accept_new=True):
        pass
    line = (tmp_path / "known_hosts").read_text()
    assert sshd.host_public_key in line
    assert line.startswith("|1|") if hashed else line.startswith(f"[127.0.0.1]:{sshd.port} ")
    # Now known: a plain connect (no accept_new) works and the file is left as it was.
    async with open_link(config) as link:
        assert await echo(link, b"ok") == b"ok"
    assert (tmp_path / "known_hosts").read_text() == line


@pytest.mark.parametrize("accept_new", [False, True])
async def test_changed_host_key_is_refused(
    sshd: LoopbackSshd, tmp_path: Path, accept_new: bool, client_config: Callable[..., Path]
) -> None:
    config = client_config(sshd)
    other = tmp_path / "other_host_key"
    old_key = generate_key(other, "impostor").split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {old_key[0]} {old_key[1]}\n")
    error = await open_error(config, accept_new=accept_new)
    assert (error.kind, error.exit_code) == ("hostkey", 6)
    assert "CHANGED" in str(error)
    assert fingerprint(sshd.host_key_path.with_suffix(".pub")) in str(error)
    assert fingerprint(other.with_suffix(".pub")) in str(error)
    assert str(known_hosts) in str(error)
    assert known_hosts.read_text().count("\n") == 1  # nothing was added


# ------------------------------------------------------------------------- other failures


async def test_wrong_key_is_an_authentication_failure(
    sshd: LoopbackSshd, tmp_path: Path, client_config: Callable[..., Path]
) -> None:
    stranger = tmp_path / "stranger_key"
    generate_key(stranger, "not authorized")
    config = client_config(sshd, IdentityFile=str(stranger))
    error = await open_error(config)
    assert (error.kind, error.exit_code) == ("auth", 5)
    assert str(stranger) in str(error)


async def test_closed_port_is_a_connection_failure(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(f"Host vm\n    HostName 127.0.0.1\n    Port {free_port()}\n")
    error = await open_error(config)
    assert (error.kind, error.exit_code) == ("connect", 4)
    assert "refused" in str(error).lower()


async def test_unresolvable_name() -> None:
    error = await open_error(Path("/dev/null"), "root@no-such-host.invalid:2222")
    assert (error.kind, error.exit_code) == ("resolve", 3)
    assert "no-such-host.invalid" in str(error)


async def test_missing_remote_program(
    sshd: LoopbackSshd, caplog: pytest.LogCaptureFixture, client_config: Callable[..., Path]
) -> None:
    caplog.set_level(logging.WARNING, logger="pcscbridge.ssh")
    config = client_config(sshd)
    error = await open_error(config, remote_command="pcscbridge-no-such-program attach")
    assert (error.kind, error.exit_code) == ("remote_missing", 7)
    assert "127" in str(error)
    assert "not found" in str(error)
    assert "pcscbridge-no-such-program" in caplog.text  # the remote stderr went to the log


async def test_guest_server_not_running(
    sshd: LoopbackSshd, client_config: Callable[..., Path]
) -> None:
    config = client_config(sshd)
    command = "echo 'pcscbridge attach: no guest server at unix:/x' >&2; exit 69"
    error = await open_error(config, remote_command=command)
    assert (error.kind, error.exit_code) == ("no_guest_server", 8)
    assert "no guest server at unix:/x" in str(error)
    assert error.retryable


async def test_other_early_exit(sshd: LoopbackSshd, client_config: Callable[..., Path]) -> None:
    error = await open_error(client_config(sshd), remote_command="exit 3")
    assert (error.kind, error.exit_code) == ("remote_failed", 1)
    assert "status 3" in str(error)


# ---------------------------------------------------------------------------- dead peers


async def test_killed_connection_ends_the_stream(client_config: Callable[..., Path]) -> None:
    with LoopbackSshd() as server:
        async with open_link(client_config(server, ServerAliveInterval="1")) as link:
            assert await echo(link, b"alive") == b"alive"
            assert server.kill_connections() > 0
            # EOF or BrokenResourceError: both are "the stream ended"; a hang is the failure.
            with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
                assert await link.receive_some() == b""


async def test_unresponsive_server_is_noticed_by_keepalives(
    client_config: Callable[..., Path],
) -> None:
    # Frozen, not killed: the TCP connection stays up and nothing is ever closed, so only the
    # keepalive watchdog can notice (ServerAliveInterval 1 x ServerAliveCountMax 2 -> 2-3 s).
    with LoopbackSshd() as server:
        config = client_config(server, ServerAliveInterval="1", ServerAliveCountMax="2")
        async with open_link(config) as link:
            try:
                assert await echo(link, b"alive") == b"alive"
                assert server.freeze_connections() > 0
                start = time.monotonic()
                with pytest.raises(trio.BrokenResourceError, match="keepalive"), trio.fail_after(6):
                    await link.receive_some()
                assert time.monotonic() - start >= 1.5
                with pytest.raises(trio.BrokenResourceError):
                    await link.send_all(b"more")
            finally:
                server.thaw_connections()


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("vm", (None, "vm", None)),
        ("root@vm", ("root", "vm", None)),
        ("user@host.example:2222", ("user", "host.example", 2222)),
        ("[::1]:2200", (None, "::1", 2200)),
        ("fe80::1", (None, "fe80::1", None)),
        ("ssh://u@h:22", ("u", "h", 22)),
    ],
)
def test_parse_destination(destination: str, expected: tuple[object, ...]) -> None:
    assert parse_destination(destination) == expected


@pytest.mark.parametrize("destination", ["", "@host", "host:0", "host:99999", "host:abc"])
def test_parse_destination_rejects(destination: str) -> None:
    with pytest.raises(SSHLinkError) as info:
        parse_destination(destination)
    assert info.value.exit_code == 2
