"""The real libpcsclite client libraries of protocols 4.4, 4.5 and 4.6 (testing/clientlibs.py).

What is proven, per library:

* on the wire, with no pcscd at all: whatever program runs through ``command()``/``env()``
  (pcsc_scan, opensc-tool, the Perl script scriptor, the venv's python with pyscard) connects
  to a UNIX socket of the test and announces that library's protocol in its first message
  (CMD_VERSION, spec §5.1/§6): only the intended library can produce that number;
* in the process: the venv's python stays in its venv (pyscard importable) and has mapped
  exactly that library's files, and sid's glibc for 4.6;
* against the rig's pcscd 1.9.9 (protocol 4.4): the behaviour rig.md records, plus the version
  exchange as a logging relay sees it (4.5 refused; 4.6 refused, then retried as 4.4).

These tests need the Debian archive once (ensure_client_libs caches), and root for the rig.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig import clientlibs
from rig.clientlibs import ClientLib, ClientLibError, ClientLibs, ensure_client_libs
from rig.pcscd_rig import PcscdRig
from rig.relay import C2S, S2C, LoggingRelay

PROTOCOLS = ["4.4", "4.5", "4.6"]
SUITE_OF = {"4.4": "system", "4.5": "trixie", "4.6": "sid"}
# Upstream release ranges of each dialect (spec §11.1).
VERSION_PREFIXES = {"4.4": ("1.8.", "1.9.", "2.0.", "2.1.", "2.2."), "4.5": ("2.3.", "2.4."),
                    "4.6": ("2.5.",)}  # fmt: skip
CMD_VERSION = 0x11
SCARD_E_SERVICE_STOPPED = 0x8010001E
MULTIARCH_LIBC = "libc.so.6"

PYSCARD_CONTEXT = (
    "from smartcard import scard\n"
    "hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)\n"
    "print(hex(hr & 0xFFFFFFFF))\n"
)
# Which programs to run with each library: ELF binaries, a #! script (scriptor is Perl: the
# loader cannot run it directly), and the venv's python with pyscard.
PROGRAMS = {
    "pcsc_scan": ["pcsc_scan", "-r"],
    "opensc-tool": ["opensc-tool", "-l"],
    "scriptor": ["scriptor", "-r", "Virtual PCD 00 00"],
    "pyscard": [sys.executable, "-c", PYSCARD_CONTEXT],
}


@pytest.fixture(scope="session")
def client_libs() -> ClientLibs:
    return ensure_client_libs()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path with long test ids can exceed it.
    d = Path(tempfile.mkdtemp(prefix="clientlibs-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_with(
    lib: ClientLib, argv: list[str], sock: str | Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lib.command(argv),
        env=lib.env({**os.environ, "PCSCLITE_CSOCK_NAME": str(sock)}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def first_client_message(lib: ClientLib, argv: list[str], sock_dir: Path) -> tuple[int, ...]:
    """Run ``argv`` with ``lib`` against a bare listening socket; the first 20 bytes it sends.

    Nobody answers: the connection is closed after those bytes, so the client gives up.
    """
    path = sock_dir / "pcscd.comm"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)
        proc = subprocess.Popen(
            lib.command(argv),
            env=lib.env({**os.environ, "PCSCLITE_CSOCK_NAME": str(path)}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            conn = _accept_while_alive(srv, proc)
            if conn is None:
                out = proc.communicate(timeout=30)[0]
                pytest.fail(f"{argv[0]} never connected (exit {proc.returncode}): {out}")
            with conn:
                conn.settimeout(30)
                data = b""
                while len(data) < 20:
                    chunk = conn.recv(20 - len(data))
                    if not chunk:
                        break
                    data += chunk
            out = proc.communicate(timeout=30)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert len(data) == 20, f"{argv[0]} sent {data!r}; output: {out}"
    return struct.unpack("<IIiiI", data)


def _accept_while_alive(
    srv: socket.socket, proc: subprocess.Popen[str], timeout: float = 30.0
) -> socket.socket | None:
    """Accept one connection; None as soon as the client died (or after ``timeout``)."""
    srv.settimeout(0.05)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            return srv.accept()[0]
        if proc.poll() is not None:
            return None
    proc.kill()
    return None


# --- the set of libraries -----------------------------------------------------------------


def test_every_dialect_is_there(client_libs: ClientLibs) -> None:
    for protocol in PROTOCOLS:
        lib = client_libs[protocol]
        assert lib.protocol == protocol
        assert lib.suite == SUITE_OF[protocol]
        assert lib.version.startswith(VERSION_PREFIXES[protocol]), lib
        assert client_libs[lib.version] is lib
        assert lib.library_file.resolve().is_file()
    assert client_libs["4.4"].lib_dir is None  # the system's own: nothing downloaded
    assert client_libs["4.5"].loader is None  # bookworm's glibc suffices for 2.3/2.4
    sid = client_libs["4.6"]
    assert sid.loader is not None and sid.loader.is_file() and sid.libc_version
    with pytest.raises(KeyError, match=re.escape("no libpcsclite client library '4.7'; have: ")):
        client_libs["4.7"]


def test_commands_and_environments(client_libs: ClientLibs) -> None:
    base = {"PATH": os.environ["PATH"], "LIBPCSCLITE_DELEGATE": "/tmp/other.so"}
    system, trixie, sid = (client_libs[p] for p in PROTOCOLS)

    assert system.command(["pcsc_scan", "-r"]) == ["pcsc_scan", "-r"]
    assert system.env(base) == {"PATH": os.environ["PATH"]}  # a delegate would replace _real

    assert trixie.command(["pcsc_scan", "-r"]) == ["pcsc_scan", "-r"]
    assert trixie.env(base)["LD_LIBRARY_PATH"] == str(trixie.lib_dir)
    assert trixie.env({**base, "LD_LIBRARY_PATH": "/x"})["LD_LIBRARY_PATH"] == (
        f"{trixie.lib_dir}:/x"
    )
    assert "LIBPCSCLITE_DELEGATE" not in trixie.env(base)

    assert sid.loader is not None and sid.lib_dir is not None
    multiarch = sid.lib_dir.name
    library_path = ":".join(
        [str(sid.lib_dir), str(sid.loader.parent), f"/usr/lib/{multiarch}", f"/lib/{multiarch}"]
    )
    pcsc_scan = shutil.which("pcsc_scan")
    assert pcsc_scan is not None
    prefix = [str(sid.loader), "--library-path", library_path, "--argv0"]
    assert sid.command(["pcsc_scan", "-r"]) == [*prefix, "pcsc_scan", pcsc_scan, "-r"]
    # A #! script: its interpreter goes through the loader, as execve would run it.
    assert sid.command(["/usr/bin/scriptor", "-r", "R"]) == [
        *prefix, "/usr/bin/perl", "/usr/bin/perl", "/usr/bin/scriptor", "-r", "R"
    ]  # fmt: skip
    # The venv's python keeps its venv path as argv[0] (that is how it finds the venv).
    assert sid.command([sys.executable, "-V"]) == [*prefix, sys.executable, sys.executable, "-V"]
    # --library-path, not LD_LIBRARY_PATH: children of the program must not get sid's glibc.
    assert sid.env(base) == {"PATH": os.environ["PATH"]}
    with pytest.raises(FileNotFoundError):
        sid.command(["no-such-program-pcscbridge"])


# --- on the wire, no pcscd ----------------------------------------------------------------


@pytest.mark.parametrize("program", list(PROGRAMS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_announces_its_protocol(
    client_libs: ClientLibs, protocol: str, program: str, short_dir: Path
) -> None:
    lib = client_libs[protocol]
    major, minor = (int(x) for x in protocol.split("."))
    message = first_client_message(lib, PROGRAMS[program], short_dir)
    # header {size 12, CMD_VERSION} + body {major, minor, rv 0}
    assert message == (12, CMD_VERSION, major, minor, 0)


_MAPS_SCRIPT = (
    "import json, sys\n"
    "from smartcard import scard\n"
    # The 2.3+ front library loads libpcsclite_real.so.1 at the first call: make one.
    "hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)\n"
    "maps = sorted({l.split(None, 5)[5].strip() for l in open('/proc/self/maps')\n"
    "               if len(l.split(None, 5)) == 6})\n"
    "print(json.dumps({'prefix': sys.prefix, 'hr': hr & 0xFFFFFFFF, 'maps': maps}))\n"
)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_venv_python_loads_exactly_that_library(
    client_libs: ClientLibs, protocol: str, short_dir: Path
) -> None:
    lib = client_libs[protocol]
    # No socket there: SCardEstablishContext fails with NO_SERVICE, after loading everything.
    proc = run_with(lib, [sys.executable, "-c", _MAPS_SCRIPT], short_dir / "absent.comm")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["prefix"] == sys.prefix  # still in the venv: pyscard was importable
    assert info["hr"] == 0x8010001D  # SCARD_E_NO_SERVICE
    mapped = [Path(p).resolve() for p in info["maps"] if p.startswith("/")]
    pcsc = {p for p in mapped if p.name.startswith("libpcsclite")}
    expected = {lib.library_file.resolve()}
    if lib.lib_dir is not None:
        expected.add((lib.lib_dir / "libpcsclite_real.so.1").resolve())
    assert pcsc == expected
    libc = [p for p in mapped if p.name == MULTIARCH_LIBC]
    assert len(libc) == 1
    if lib.loader is not None:
        assert libc[0].parent == lib.loader.resolve().parent  # sid's glibc, not bookworm's
        assert any(p == lib.loader.resolve() for p in mapped)
    else:
        assert libc[0].parent == Path(f"/usr/lib/{lib.library_file.parent.name}")


# --- against pcscd 1.9.9 (protocol 4.4) -------------------------------------------------------


def _streams(relay: LoggingRelay) -> list[tuple[bytes, bytes]]:
    """(client->pcscd bytes, pcscd->client bytes) per connection seen by the relay."""
    relay.wait_idle()
    chunks, _ = relay.take()
    by_conn: dict[int, dict[str, bytes]] = {}
    for chunk in chunks:
        d = by_conn.setdefault(chunk.conn, {C2S: b"", S2C: b""})
        d[chunk.direction] += chunk.data
    return [(d[C2S], d[S2C]) for _, d in sorted(by_conn.items())]


def _version_request(major: int, minor: int) -> bytes:
    return struct.pack("<IIiiI", 12, CMD_VERSION, major, minor, 0)


def _version_reply(major: int, minor: int, rv: int) -> bytes:
    return struct.pack("<iiI", major, minor, rv)


RelayedRig = tuple[PcscdRig, LoggingRelay, Path]


@pytest.fixture
def relayed_rig(pcscd_rig: PcscdRig, short_dir: Path) -> Iterator[RelayedRig]:
    """The rig (a card in reader 0), seen by clients through a logging relay."""
    path = short_dir / "relay.comm"
    with LoggingRelay(str(path), pcscd_rig.socket_path) as relay:
        yield pcscd_rig, relay, path


@pytest.mark.rig
def test_44_client_against_pcscd_199(client_libs: ClientLibs, relayed_rig: RelayedRig) -> None:
    rig, relay, sock = relayed_rig
    proc = run_with(client_libs["4.4"], ["pcsc_scan", "-r"], sock)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in rig.reader_names:
        assert name in proc.stdout
    (c2s, s2c), *_ = _streams(relay)
    assert c2s.startswith(_version_request(4, 4))
    assert s2c.startswith(_version_reply(4, 4, 0))


@pytest.mark.rig
def test_45_client_is_refused_by_pcscd_199(
    client_libs: ClientLibs, relayed_rig: RelayedRig
) -> None:
    _, relay, sock = relayed_rig
    proc = run_with(client_libs["4.5"], ["pcsc_scan", "-r"], sock)
    assert proc.returncode != 0
    assert "Service was stopped" in proc.stdout + proc.stderr
    # 2.3/2.4.0 clients have no fallback: one refused CMD_VERSION, then they hang up.
    assert _streams(relay) == [
        (_version_request(4, 5), _version_reply(4, 4, SCARD_E_SERVICE_STOPPED))
    ]


@pytest.mark.rig
def test_46_client_falls_back_to_44_with_pcscd_199(
    client_libs: ClientLibs, relayed_rig: RelayedRig
) -> None:
    rig, relay, sock = relayed_rig
    lib = client_libs["4.6"]
    proc = run_with(lib, ["opensc-tool", "-l"], sock)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in rig.reader_names:
        assert name in proc.stdout
    # 2.5 clients retry on the same socket with the daemon's version (spec §6).
    (c2s, s2c), *_ = _streams(relay)
    assert c2s.startswith(_version_request(4, 6) + _version_request(4, 4))
    assert s2c.startswith(_version_reply(4, 4, SCARD_E_SERVICE_STOPPED) + _version_reply(4, 4, 0))
    # ... and yet pcsc_scan sees no reader (what a plain socket forward gives such a guest).
    proc = run_with(lib, ["pcsc_scan", "-r"], sock)
    assert "No reader found" in proc.stdout + proc.stderr
    _streams(relay)


# --- fetching, caching, errors ----------------------------------------------------------------


def test_second_call_uses_the_cache_without_apt(
    client_libs: ClientLibs, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_apt(*args: object, **kwargs: object) -> str:
        raise AssertionError("apt was run although everything is cached")

    monkeypatch.setattr(clientlibs, "_apt", no_apt)
    started = time.monotonic()
    again = ensure_client_libs()
    assert time.monotonic() - started < 2
    assert {k: v.to_json() for k, v in again.items()} == {
        k: v.to_json() for k, v in client_libs.items()
    }


def test_fresh_cache_fetches_everything(client_libs: ClientLibs, tmp_path: Path) -> None:
    # What a fresh clone on a fresh machine does (the session's cache may already be warm).
    started = time.monotonic()
    libs = ensure_client_libs(tmp_path / "cache")
    took = time.monotonic() - started
    assert took < 180, f"fetching took {took:.0f} s"
    assert {p: libs[p].deb_version for p in PROTOCOLS} == {
        p: client_libs[p].deb_version for p in PROTOCOLS
    }
    assert (tmp_path / "cache" / clientlibs.STAMP_NAME).is_file()
    assert not (tmp_path / "cache" / "apt").exists()  # the 45 MB of package lists are gone
    for p in ("4.5", "4.6"):
        assert libs[p].lib_dir is not None
        assert libs[p].lib_dir.is_relative_to(tmp_path / "cache")
    # Broken extraction (a file gone) invalidates the stamp: the next call fetches again.
    sid_lib_dir = libs["4.6"].lib_dir
    assert sid_lib_dir is not None
    (sid_lib_dir / "libpcsclite_real.so.1").unlink()
    assert clientlibs._read_stamp(tmp_path / "cache") is None


def test_unreachable_mirror_is_a_clear_error(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: connection refused, like a machine without network.
    with pytest.raises(ClientLibError, match=r"apt-get update of \w+ from http://127\.0\.0\.1:9"):
        ensure_client_libs(tmp_path, mirror="http://127.0.0.1:9/debian")
    assert not (tmp_path / clientlibs.STAMP_NAME).exists()


def test_missing_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clientlibs, "LIBC_PACKAGE", "libc6-pcscbridge-no-such-package")
    with pytest.raises(
        ClientLibError, match=r"(?s)from sid .*Unable to locate package libc6-pcscbridge-no-such"
    ):
        ensure_client_libs(tmp_path)
    assert not (tmp_path / clientlibs.STAMP_NAME).exists()


def test_cli_prints_and_runs(client_libs: ClientLibs, short_dir: Path) -> None:
    cli = [sys.executable, "-m", "rig.clientlibs"]
    proc = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60, check=True)
    shown = json.loads(proc.stdout)
    assert {p: shown[p]["deb_version"] for p in PROTOCOLS} == {
        p: client_libs[p].deb_version for p in PROTOCOLS
    }
    # --run: the same as command()/env(); proven by the protocol the client announces.
    sock = short_dir / "pcscd.comm"
    data = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(sock))
        srv.listen(1)
        with subprocess.Popen(
            [*cli, "--run", "4.6", "--", "pcsc_scan", "-r"],
            env={**os.environ, "PCSCLITE_CSOCK_NAME": str(sock)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            try:
                conn = _accept_while_alive(srv, proc)
                assert conn is not None, proc.communicate(timeout=30)[0]
                with conn:
                    conn.settimeout(30)
                    while len(data) < 20 and (chunk := conn.recv(20 - len(data))):
                        data += chunk
                proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
    assert data == _version_request(4, 6)
