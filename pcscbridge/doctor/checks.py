"""The doctor's checks. Each returns findings: what it saw, how bad, and the fix."""

from __future__ import annotations

import argparse
import ctypes.util
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check_files
from ..pcsc import ReaderStatus
from ..pcsclite.dialect import DIALECTS
from ..testing.rawclient import RawClient
from ..transports.endpoints import (
    Endpoint,
    EndpointError,
    default_link_endpoint,
    parse_endpoint,
)
from .probe import ProbeError, probe_library
from .sockets import Process, SocketState, inspect, pcscbridge_processes

DEFAULT_SOCKET = "/run/pcscd/pcscd.comm"
GUEST_UNITS = ("pcscbridge-guest.socket", "pcscbridge-guest.service")
PCSCD_UNITS = ("pcscd.socket", "pcscd.service")


@dataclass(frozen=True)
class Finding:
    level: str  # ok, info, warn (works, but look), fail (broken)
    what: str
    fix: str = ""


@dataclass
class Served:
    """The PC/SC socket the clients here use, and what answers on it."""

    state: SocketState
    protocols: list[str] = field(default_factory=list)  # client protocols it accepts

    @property
    def by_pcscbridge(self) -> bool:
        return any(p.name.startswith("pcscbridge") for p in self.state.servers)


# --- config -----------------------------------------------------------------------------------


def check_config(
    args: argparse.Namespace, build_parser: Callable[[], argparse.ArgumentParser]
) -> list[Finding]:
    files: list[Path] = args.config_files
    if not files:
        return [Finding("info", "no configuration file (flags and defaults only)")]
    problems = check_files(build_parser, files)
    if problems:
        return [Finding("fail", problem, "correct or remove that setting") for problem in problems]
    return [Finding("ok", f"configuration: {', '.join(map(str, files))}")]


# --- the PC/SC socket -------------------------------------------------------------------------


def check_pcsc_socket() -> tuple[Served | None, list[Finding]]:
    path = os.environ.get("PCSCLITE_CSOCK_NAME") or DEFAULT_SOCKET
    source = "PCSCLITE_CSOCK_NAME" if os.environ.get("PCSCLITE_CSOCK_NAME") else "the default"
    state = inspect(path)
    where = f"PC/SC socket {path} ({source})"
    if not state.exists:
        return None, [
            Finding(
                "fail",
                f"{where} does not exist: PC/SC clients here find no service",
                "on a host, start pcscd (systemctl enable --now pcscd.socket); in a guest, "
                "start `pcscbridge guest` (contrib/systemd/pcscbridge-guest.socket); or point "
                "PCSCLITE_CSOCK_NAME at the socket that is served",
            )
        ]
    if not state.is_socket:
        return None, [Finding("fail", f"{where} is not a socket", f"remove {path}")]
    if state.stale:
        return None, [
            Finding(
                "fail",
                f"{where} is stale: nothing listens on it (its server is gone)",
                f"start the server again (pcscd and pcscbridge replace a stale socket), or "
                f"remove it: rm {path}",
            )
        ]
    if state.error:
        return None, [
            Finding(
                "fail",
                f"{where} refuses this user: {os.strerror(state.error)} (mode 0{state.mode:o})",
                "give the socket mode 0666 as pcscd's (SocketMode=0666 in its socket unit)",
            )
        ]
    served = Served(state, _accepted_protocols(path))
    who = ", ".join(f"{p.name} (pid {p.pid})" for p in state.servers) or "a process not visible"
    findings = [
        Finding("ok", f"{where}: served by {who}; client protocols {', '.join(served.protocols)}")
    ]
    if state.mode & 0o006 != 0o006:
        findings.append(
            Finding(
                "warn",
                f"only the owner and group of {path} may use it (mode 0{state.mode:o})",
                "pcscd's socket is 0666: SocketMode=0666, or chmod 0666",
            )
        )
    findings.append(_readers(served))
    return served, findings


def _accepted_protocols(path: str) -> list[str]:
    accepted = []
    for major, minor in DIALECTS:
        try:
            with RawClient(path, timeout=3) as client:
                if client.version(major, minor).rv == 0:
                    accepted.append(f"{major}.{minor}")
        except OSError:
            continue
    return accepted


def _readers(served: Served) -> Finding:
    path = served.state.path
    if not served.protocols:
        return Finding("fail", f"{path} accepts no client protocol from 4.2 to 4.6")
    major, minor = map(int, served.protocols[-1].split("."))
    try:
        with RawClient(path, timeout=5) as client:
            client.version(major, minor)
            entries = [entry for entry in client.readers_state() if entry is not None]
    except OSError as exc:
        return Finding("fail", f"reading the readers of {path} failed: {exc}")
    if not entries:
        fix = (
            "no host is attached to this guest server: see the link finding below"
            if served.by_pcscbridge
            else "plug a reader in (or check the reader driver: `pcscd -f -d` logs why)"
        )
        return Finding("warn", "no readers", fix)
    shown = [
        f"{entry.name} (card {entry.atr.hex(':')})"
        if entry.state & ReaderStatus.SCARD_PRESENT
        else f"{entry.name} (empty)"
        for entry in entries
    ]
    return Finding("ok", f"{len(entries)} reader{'s' * (len(entries) != 1)}: {'; '.join(shown)}")


# --- client libraries -------------------------------------------------------------------------


def check_libraries(served: Served | None, extra: list[str]) -> list[Finding]:
    libraries = [*([name] if (name := ctypes.util.find_library("pcsclite")) else []), *extra]
    if not libraries:
        return [Finding("info", "no libpcsclite here (applications bring their own, or none)")]
    findings = []
    for library in libraries:
        try:
            probe = probe_library(library, sys.executable)
        except (ProbeError, OSError) as exc:
            findings.append(Finding("warn", f"client library {library} cannot be probed: {exc}"))
            continue
        speaks = f"client library {library} speaks protocol {probe.protocol}"
        if served is None:
            findings.append(Finding("info", speaks))
        elif probe.protocol in served.protocols:
            findings.append(Finding("ok", f"{speaks}: the server accepts it"))
        else:
            findings.append(
                Finding(
                    "fail",
                    f"{speaks}, the server at {served.state.path} only "
                    f'{", ".join(served.protocols)}: its clients fail ("Communication protocol '
                    f'mismatch")',
                    "serve these clients with `pcscbridge serve --listen PATH` (every protocol "
                    "4.2-4.6) and point them at PATH (PCSCLITE_CSOCK_NAME, or bind-mount it as "
                    "/run/pcscd/pcscd.comm in the sandbox)",
                )
            )
    return findings


# --- the guest's link -------------------------------------------------------------------------


def check_link(served: Served | None) -> list[Finding]:
    guests = [] if served is None else served.state.servers
    guests = [process for process in guests if process.name == "pcscbridge guest"]
    if not guests:
        return [Finding("info", "no guest server serves this PC/SC socket")]
    return [finding for guest in guests for finding in _guest_link(guest)]


def _guest_link(guest: Process) -> list[Finding]:
    who = f"pcscbridge guest (pid {guest.pid})"
    try:
        link = _link_of(guest)
    except EndpointError as exc:
        return [Finding("warn", f"{who}: cannot tell its link: {exc}")]
    if link.kind != "unix":
        how = "run when a client needs the host" if link.kind == "exec" else "its host's link"
        return [Finding("info", f"{who}: link {link} ({how})")]
    state = inspect(link.path, connect=False)
    if not state.exists or state.stale:
        return [
            Finding(
                "fail",
                f"{who}: its link socket {link.path} is gone: no host can attach",
                "restart the guest server",
            )
        ]
    if state.connections:
        return [Finding("ok", f"{who}: a host is attached over {link}")]
    return [
        Finding(
            "warn",
            f"{who}: no host attached over {link} (the guest shows no readers until one is)",
            "on the host: `pcscbridge host --ssh GUEST` (or enable pcscbridge-host@GUEST)",
        )
    ]


def _link_of(guest: Process) -> Endpoint:
    """The link on the guest's command line, else the default one of its environment."""
    argv = guest.argv[guest.argv.index("guest") :]
    for index, word in enumerate(argv):
        if word == "--link" and index + 1 < len(argv):
            return parse_endpoint(argv[index + 1])
        if word.startswith("--link="):
            return parse_endpoint(word.removeprefix("--link="))
    proc = Path(f"/proc/{guest.pid}")
    try:
        environ = dict(
            item.split("=", 1)
            for item in proc.joinpath("environ").read_bytes().decode().split("\0")
            if "=" in item
        )
        uid = proc.stat().st_uid
    except OSError:
        environ, uid = {}, os.getuid()
    return default_link_endpoint(environ, uid)


# --- the host's role --------------------------------------------------------------------------


def check_host_role() -> list[Finding]:
    findings = []
    if importlib.util.find_spec("smartcard") is None:
        findings.append(
            Finding(
                "info",
                "the host role is not installed here (no pyscard)",
                "on a host: pip install 'pcscbridge[host]'",
            )
        )
    for host in pcscbridge_processes():
        if host.name == "pcscbridge host":
            findings.append(Finding("info", f"running: {' '.join(host.argv)} (pid {host.pid})"))
    return findings


# --- systemd ----------------------------------------------------------------------------------


def check_systemd() -> list[Finding]:
    if not Path("/run/systemd/system").is_dir():
        return [Finding("info", "systemd is not running here: unit checks skipped")]
    units = [*PCSCD_UNITS, *GUEST_UNITS]
    result = subprocess.run(
        ["systemctl", "is-active", *units], capture_output=True, text=True, check=False
    )
    return unit_findings(dict(zip(units, result.stdout.split(), strict=False)))


def unit_findings(active: dict[str, str]) -> list[Finding]:
    """What the units' states (`systemctl is-active`) mean for the PC/SC socket."""
    guest = [unit for unit in GUEST_UNITS if active.get(unit) == "active"]
    pcscd = [unit for unit in PCSCD_UNITS if active.get(unit) == "active"]
    if guest and pcscd:
        return [
            Finding(
                "fail",
                f"{' and '.join(pcscd)} still active beside {' and '.join(guest)}: both "
                f"want /run/pcscd/pcscd.comm",
                "systemctl disable --now pcscd.socket pcscd.service (or, to switch back, "
                "systemctl disable --now pcscbridge-guest.socket pcscbridge-guest.service)",
            )
        ]
    if guest:
        return [Finding("ok", f"{', '.join(guest)} active; pcscd's units are not")]
    if pcscd:
        return [Finding("ok", f"{', '.join(pcscd)} active")]
    return [Finding("info", "neither pcscd's nor pcscbridge's guest units are active")]
