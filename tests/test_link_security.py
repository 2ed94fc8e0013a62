"""Who may attach and who may connect: TLS links pinned both ways (every refusal told on both
sides), no impostor taking an attached link, the guest socket's mode, group and uid/gid
allow-list. Guest and host run as processes, as users run them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pcscbridge.link.endpoint import LinkEndpoint
from pcscbridge.link.protocol import readers_push
from pcscbridge.pcsclite.readers import ReaderEntry
from pcscbridge.transports.tls import TLSSettings
from rig.bridge_processes import PCSCBRIDGE, Bridge
from rig.pcscd_rig import PcscdRig, run_pcsc_client
from rig.service import wait_until
from rig.sshd import free_port

SIM_READERS = ["Sim Reader 00 00", "Sim Reader 01 00"]
NOBODY = 65534


def keygen(path: Path) -> str:
    result = subprocess.run(
        [*PCSCBRIDGE, "keygen", str(path)], capture_output=True, text=True, check=True
    )
    fingerprint = result.stdout.splitlines()[-1]
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return fingerprint


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Keys and fingerprints: the guest's, the host's, and a stranger's."""
    return {name: (tmp_path / f"{name}.pem", keygen(tmp_path / f"{name}.pem"))
            for name in ("guest", "host", "stranger")}  # fmt: skip


def tls_bridge(tmp_path: Path, keys: dict[str, tuple[Path, str]], pcscd: str | None) -> Bridge:
    """A guest listening on a TLS link, pinned to the host's key (not yet started)."""
    link = f"tls:127.0.0.1:{free_port()}"
    bridge = Bridge(tmp_path / "bridge", pcscd, link=link, backend="pyscard" if pcscd else "sim")
    bridge.guest_extra = ["--tls-key", str(keys["guest"][0]), "--tls-peer", keys["host"][1]]
    return bridge


def host_tls(keys: dict[str, tuple[Path, str]], own: str = "host", peer: str = "guest") -> list:
    return ["--tls-key", str(keys[own][0]), "--tls-peer", keys[peer][1]]


@pytest.mark.rig
def test_a_tls_link_pinned_both_ways_serves_real_clients(
    pcscd_rig: PcscdRig, tmp_path: Path, keys: dict[str, tuple[Path, str]]
) -> None:
    with tls_bridge(tmp_path, keys, pcscd_rig.socket_path) as bridge:
        bridge.start_guest()
        bridge.start_host(host_tls(keys))
        bridge.wait_for_readers(pcscd_rig.reader_names)
        result = run_pcsc_client(["opensc-tool", "-r", "0", "-a"], bridge.socket_path)
        assert result.returncode == 0 and "3b:85:81:31" in result.stdout, bridge.logs()


@pytest.mark.parametrize(
    ("host_args", "guest_says", "host_says"),
    [
        # The host's key is not the one the guest pins.
        ("stranger", "not the pinned", "does not accept our certificate"),
        # The host pins another guest.
        ("wrong pin", "closed the connection during the TLS handshake", "not the pinned"),
        # Plaintext to the TLS port.
        ("plaintext", "TLS handshake (outer) failed", "closed the link before its hello"),
    ],
)
def test_every_tls_refusal_is_told_on_both_sides(
    tmp_path: Path,
    keys: dict[str, tuple[Path, str]],
    host_args: str,
    guest_says: str,
    host_says: str,
) -> None:
    with tls_bridge(tmp_path, keys, None) as bridge:
        bridge.start_guest()
        if host_args == "plaintext":
            bridge.link = bridge.link.replace("tls:", "tcp:")
            bridge.start_host()
        elif host_args == "stranger":
            bridge.start_host(host_tls(keys, own="stranger"))
        else:
            bridge.start_host(host_tls(keys, peer="stranger"))
        assert bridge.guest is not None and bridge.host is not None
        try:
            wait_until(lambda: host_says in bridge.host.log, 15, f"host: {host_says}")  # type: ignore[union-attr]
            wait_until(lambda: guest_says in bridge.guest.log, 15, f"guest: {guest_says}")  # type: ignore[union-attr]
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{bridge.logs()}") from None
        assert bridge.guest_readers() == []  # nothing attached
    if host_args == "wrong pin":
        assert "the peer's certificate is " + keys["guest"][1] in bridge.host.log  # type: ignore[union-attr]


def test_a_tls_peer_without_a_certificate_is_refused(
    tmp_path: Path, keys: dict[str, tuple[Path, str]]
) -> None:
    """A TLS client that presents nothing after the outer handshake (a plain TLS client with
    no key of ours) is refused by the guest."""
    with tls_bridge(tmp_path, keys, None) as bridge:
        guest = bridge.start_guest()
        port = int(bridge.link.rsplit(":", 1)[1])
        context = TLSSettings.client_context()
        wait_until(lambda: _can_connect(port), 10, "the TLS port")
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"\x00\x00\x00\x05hello")  # a link frame where TLS should be
            wait_until(lambda: "TLS handshake (inner) failed" in guest.log, 15, "refusal")
        assert bridge.guest_readers() == []


def _can_connect(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_tls_needs_a_key_and_a_pin(tmp_path: Path, keys: dict[str, tuple[Path, str]]) -> None:
    result = subprocess.run(
        [*PCSCBRIDGE, "guest", "--listen", str(tmp_path / "s"), "--link", "tls:127.0.0.1:7"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "needs --tls-key PATH" in result.stderr
    bad = [*PCSCBRIDGE, "host", "--backend", "sim", "--connect", "tls:127.0.0.1:7"]
    result = subprocess.run(
        [*bad, "--tls-key", str(keys["host"][0]), "--tls-peer", "sha256:12"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "bad fingerprint" in result.stderr


async def test_an_impostor_cannot_take_an_attached_tcp_link(tmp_path: Path) -> None:
    """Measured before: any local user attached over TCP as "host", pushed a fake table and,
    newer link winning, took over from the real host (and got the guest's APDUs)."""
    port = free_port()
    with Bridge(tmp_path, None, link=f"tcp:127.0.0.1:{port}", backend="sim") as bridge:
        await trio.to_thread.run_sync(lambda: bridge.start(expected_readers=SIM_READERS))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        impostor = LinkEndpoint(stream, "host", peer_name="guest")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(impostor.run)
            await impostor.wait_established()
            await impostor.send(readers_push([ReaderEntry("Fake Reader 00 00")]))
            with trio.fail_after(10):
                while not impostor.closed:
                    await trio.sleep(0.05)
        assert sorted(await trio.to_thread.run_sync(bridge.guest_readers)) == SIM_READERS
        assert "does not authenticate as the same host" in bridge.guest.log  # type: ignore[union-attr]
        # The real host's link was never dropped.
        assert "link with host link #1 closed" not in bridge.guest.log  # type: ignore[union-attr]
        assert "reconnecting" not in bridge.host.log  # type: ignore[union-attr]


def test_the_same_tls_host_may_replace_its_link_a_stranger_may_not(
    tmp_path: Path, keys: dict[str, tuple[Path, str]]
) -> None:
    with tls_bridge(tmp_path, keys, None) as bridge:
        bridge.start_guest()
        first = bridge.start_host(host_tls(keys))
        bridge.wait_for_readers(SIM_READERS)
        assert bridge.guest is not None
        stranger = bridge.start_host(host_tls(keys, own="stranger"))
        wait_until(lambda: "does not accept our certificate" in stranger.log, 15, "refusal")
        stranger.stop()
        again = bridge.start_host(host_tls(keys))  # the real host, a second link
        wait_until(lambda: "the host attached again" in bridge.guest.log, 15, "replacement")  # type: ignore[union-attr]
        bridge.wait_for_readers(SIM_READERS)
        first.stop()
        again.stop()


def test_the_unix_link_socket_is_0600(tmp_path: Path) -> None:
    with Bridge(tmp_path, None, backend="sim") as bridge:
        bridge.start(expected_readers=SIM_READERS)
        mode = os.stat(bridge.link.removeprefix("unix:")).st_mode
        assert stat.S_IMODE(mode) == 0o600


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder other users can reach (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="pcscbridge-socket-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_nobody(args: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args]


def test_guest_socket_mode_group_and_allow_list(shared_folder: Path) -> None:
    with Bridge(shared_folder, None, backend="sim") as bridge:
        bridge.guest_extra = ["--socket-mode", "660", "--socket-group", str(NOBODY)]
        bridge.guest_extra += ["--allow-uid", "root", "--allow-gid", "12345"]
        bridge.start(expected_readers=SIM_READERS)
        info = os.stat(bridge.socket_path)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOBODY)
        allowed = run_pcsc_client(["pcsc_scan", "-r"], bridge.socket_path)
        assert "Sim Reader 00 00" in allowed.stdout
        # nobody reaches the socket through its group, and is refused as pcscd refuses a
        # client polkit does not allow: the connection is closed before anything is read, and
        # libpcsclite says SCARD_W_SECURITY_VIOLATION.
        refused = run_pcsc_client(as_nobody(["pcsc_scan", "-r"]), bridge.socket_path)
        assert refused.stdout == ""
        assert refused.stderr == "SCardEstablishContext: Access denied.\n"
        rejected = rf"rejected client #\d+ \(uid {NOBODY}, gid {NOBODY}, pid \d+\)"
        assert re.search(rejected, bridge.guest.log)  # type: ignore[union-attr]
