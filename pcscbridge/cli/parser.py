"""The commands and their options: what a user can say (and, derived from it, what the
configuration file can say: config.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..qemu import DEFAULT_IDLE_RELEASE
from ..transports.endpoints import (
    Endpoint,
    EndpointError,
    default_link_endpoint,
    parse_endpoint,
)

if TYPE_CHECKING:
    pass


def _endpoint(text: str) -> Endpoint:
    try:
        return parse_endpoint(text)
    except EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded_int(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {low}..{high}")
    return value


def _reader_slots(text: str) -> int:
    return _bounded_int(text, 1, 1024)


def _sim_readers(text: str) -> int:
    return _bounded_int(text, 0, 255)


def _chardev(text: str) -> Endpoint:
    endpoint = _endpoint(text)
    if endpoint.kind not in ("unix", "tcp"):
        raise argparse.ArgumentTypeError("a chardev is unix:PATH or tcp:HOST:PORT")
    return endpoint


def _idle_release(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 60.0:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 60 seconds")
    return value


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError("must be 000..777")
    return mode


def _id(lookup: Callable[[str], int]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if text.isdigit():
            return int(text)
        try:
            return lookup(text)
        except KeyError:
            raise argparse.ArgumentTypeError(f"no such user or group: {text!r}") from None

    return parse


def _uid(text: str) -> int:
    import pwd

    return _id(lambda name: pwd.getpwnam(name).pw_uid)(text)


def _gid(text: str) -> int:
    import grp

    return _id(lambda name: grp.getgrnam(name).gr_gid)(text)


def _positive(text: str) -> int:
    return _bounded_int(text, 1, 1 << 40)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 86400 seconds")
    return value


def add_tls_options(sub: argparse.ArgumentParser) -> None:
    """--tls-key and --tls-peer, for a command with a tls: link endpoint."""
    sub.add_argument(
        "--tls-key",
        metavar="PATH",
        help="with a tls: endpoint: our private key and certificate (PEM, `pcscbridge keygen`)",
    )
    sub.add_argument(
        "--tls-peer",
        metavar="sha256:HEX",
        help="with a tls: endpoint: the other side's certificate fingerprint (from its keygen)",
    )


def add_checkpoint_options(sub: argparse.ArgumentParser, guest_name_default: str) -> None:
    """The options of a command that serves the host's readers to guests: which policy and
    audit wrap the host service (see compose.checked_service), and the guest's name for both."""
    sub.add_argument(
        "--policy",
        metavar="FILE",
        help="the policy file (TOML, see `pcscbridge policy check`); default: the built-in "
        "safe defaults for every guest",
    )
    sub.add_argument(
        "--guest-name",
        metavar="NAME",
        help=f"the guest's name in the policy and the audit (default: {guest_name_default})",
    )
    sub.add_argument(
        "--audit",
        metavar="FILE",
        help="write one JSON line per call to FILE (- for stderr); PIN data is masked",
    )
    sub.add_argument(
        "--trace",
        action="store_true",
        help="audit lines carry whole APDUs (PIN data still masked); implies --audit - "
        "unless --audit is given",
    )


def _add_guest_limits(parser: argparse.ArgumentParser) -> None:
    from ..guest.server import MAX_CLIENTS
    from ..guest.session import MAX_HANDLES_PER_CONNECTION, UNREAD_LIMIT

    limits = parser.add_argument_group("limits (what one local client may cost)")
    limits.add_argument(
        "--max-clients",
        type=_positive,
        default=MAX_CLIENTS,
        metavar="N",
        help=f"client connections served at once; more are closed at once "
        f"(default {MAX_CLIENTS}, as pcscd)",
    )
    limits.add_argument(
        "--max-handles",
        type=_positive,
        default=MAX_HANDLES_PER_CONNECTION,
        metavar="N",
        help=f"card handles per client connection; SCardConnect beyond answers "
        f"SCARD_E_NO_MEMORY (default {MAX_HANDLES_PER_CONNECTION}, as pcscd)",
    )
    limits.add_argument(
        "--max-unread",
        type=_positive,
        default=UNREAD_LIMIT,
        metavar="BYTES",
        help=f"replies and event signals a client may leave unread before it is "
        f"disconnected (default {UNREAD_LIMIT})",
    )


def _add_link_limits(parser: argparse.ArgumentParser) -> None:
    from ..link.endpoint import MAX_IN_FLIGHT, UNREAD_LIMIT, WRITE_TIMEOUT

    limits = parser.add_argument_group("link limits (what the other side may cost)")
    limits.add_argument(
        "--link-max-in-flight",
        type=_positive,
        default=MAX_IN_FLIGHT,
        metavar="N",
        help=f"requests served at once on the link; further ones wait unread "
        f"(default {MAX_IN_FLIGHT})",
    )
    limits.add_argument(
        "--link-max-unread",
        type=_positive,
        default=UNREAD_LIMIT,
        metavar="BYTES",
        help=f"bytes the peer may leave unread before the link is closed (default {UNREAD_LIMIT})",
    )
    limits.add_argument(
        "--link-write-timeout",
        type=_seconds,
        default=WRITE_TIMEOUT,
        metavar="SECONDS",
        help=f"how long one write may wait for the peer to read before the link is closed "
        f"(default {WRITE_TIMEOUT:.0f})",
    )


def _add_host_limits(parser: argparse.ArgumentParser) -> None:
    from ..host.service import HostLimits

    defaults = HostLimits()
    limits = parser.add_argument_group("host limits (what a guest may hold on the host)")
    limits.add_argument(
        "--max-guest-contexts",
        type=_positive,
        default=defaults.contexts_per_guest,
        metavar="N",
        help=f"host PC/SC contexts one guest may hold; a connect beyond answers "
        f"SCARD_E_NO_MEMORY (default {defaults.contexts_per_guest})",
    )
    limits.add_argument(
        "--max-host-contexts",
        type=_positive,
        default=defaults.contexts,
        metavar="N",
        help=f"host PC/SC contexts all guests of this process together may hold, so host "
        f"applications keep room in pcscd (200 clients) (default {defaults.contexts})",
    )


def _add_status_socket(parser: argparse.ArgumentParser, role: str) -> None:
    from ..status import default_status_path

    parser.add_argument(
        "--status-socket",
        metavar="PATH",
        help=f"where `pcscbridge status` asks this process (mode 0600; default "
        f"{default_status_path(role)})",
    )


def _add_client_options(sub: argparse.ArgumentParser) -> None:
    """The pcsc-lite clients' side: pcscd's socket, who may use it and what the clients see
    (guest, serve)."""
    _add_guest_limits(sub)
    sub.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o666,
        metavar="MODE",
        help="permissions of the --listen socket, octal (default 666, as pcscd's)",
    )
    sub.add_argument(
        "--socket-group",
        type=_gid,
        metavar="GROUP",
        help="group of the --listen socket (name or number)",
    )
    sub.add_argument(
        "--allow-uid",
        type=_uid,
        action="append",
        default=[],
        metavar="USER",
        help="serve only clients of this uid (name or number) or of an --allow-gid; "
        "repeatable; others are refused as pcscd refuses a client polkit does not allow",
    )
    sub.add_argument(
        "--allow-gid",
        type=_gid,
        action="append",
        default=[],
        metavar="GROUP",
        help="serve only clients in this group (primary or supplementary), or of an "
        "--allow-uid; repeatable",
    )
    sub.add_argument(
        "--listen",
        metavar="PATH",
        help="UNIX socket for pcsc-lite clients (point PCSCLITE_CSOCK_NAME at it); "
        "optional under systemd socket activation",
    )
    sub.add_argument(
        "--legacy-readers",
        action="append",
        default=[],
        metavar="PATTERN",
        help="when the host has more readers than clients of protocol 4.5 or older can see "
        "(--reader-slots), show the readers whose name matches PATTERN (fnmatch, "
        "case-sensitive) first; repeatable, earlier patterns first, then the other readers "
        "in table order. 4.6 clients always see every reader",
    )
    sub.add_argument(
        "--reader-slots",
        type=_reader_slots,
        default=16,
        metavar="N",
        help="the readers table size of clients of protocol 4.5 or older, and of every "
        "client's CMD_GET_READERS_STATE: PCSCLITE_MAX_READERS_CONTEXTS of the guest's "
        "libpcsclite build (default 16, as Debian and upstream; Fedora builds 48)",
    )


def _add_service_options(sub: argparse.ArgumentParser) -> None:
    """The host service: which PC/SC it serves (host, serve, qemu). Checkpoint options go here
    too."""
    _add_host_limits(sub)
    sub.add_argument(
        "--backend",
        choices=("pyscard", "sim"),
        default="pyscard",
        help="the host's PC/SC through pyscard (default), or simulated readers",
    )
    sub.add_argument(
        "--sim-readers",
        type=_sim_readers,
        default=2,
        metavar="N",
        help="with --backend sim: N simulated readers named 'Sim Reader XX 00' (XX = 00, 01, "
        "... in hex), a card in the first (default 2)",
    )


def build_parser() -> argparse.ArgumentParser:
    default_link = default_link_endpoint()
    parser = argparse.ArgumentParser(
        prog="pcscbridge",
        description="Share the host's smart card readers with VMs, containers and sandboxes.",
    )
    parser.add_argument("--version", action="version", version=f"pcscbridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-v", "--verbose", action="count", default=0, help="debug logs")
        sub.add_argument(
            "--config",
            metavar="FILE",
            help="read option defaults from FILE alone (default: /etc/pcscbridge/"
            "pcscbridge.toml, then $XDG_CONFIG_HOME/pcscbridge/pcscbridge.toml)",
        )
        return sub

    guest = command("guest", "In the guest: impersonate pcscd and wait for the host's link.")
    _add_client_options(guest)
    guest.add_argument(
        "--link",
        type=_endpoint,
        default=default_link,
        metavar="ENDPOINT",
        help=f"where the host's link arrives: unix:PATH, tcp:HOST:PORT (loopback only), "
        f"tls:HOST:PORT (with --tls-key and --tls-peer) or stdio; or exec:COMMAND, run when a "
        f"client needs the host, its stdin/stdout the link (default {default_link})",
    )
    add_tls_options(guest)

    _add_link_limits(guest)
    _add_status_socket(guest, "guest")

    host = command("host", "On the host: serve the host's readers to a guest.")
    target = host.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--connect",
        type=_endpoint,
        metavar="ENDPOINT",
        help="dial the guest server's link: unix:PATH, tcp:HOST:PORT, tls:HOST:PORT or stdio",
    )
    target.add_argument(
        "--ssh",
        metavar="DESTINATION",
        help="run `pcscbridge attach` in the guest over SSH (an ~/.ssh/config alias or "
        "[user@]host[:port])",
    )
    target.add_argument(
        "--link",
        choices=("stdio",),
        help="serve one link on stdin/stdout, then exit: what a guest's `--link exec:COMMAND` "
        "runs (the qrexec service; QREXEC_REMOTE_DOMAIN names the guest)",
    )
    _add_service_options(host)
    host.add_argument(
        "--ssh-client",
        choices=("paramiko", "openssh"),
        default="paramiko",
        help="with --ssh: dial with paramiko (default), or run the system's `ssh -T` (for "
        "what paramiko does not follow: Include, Match, certificates, FIDO and PKCS#11 keys, "
        "GSSAPI)",
    )
    host.add_argument(
        "--ssh-config", type=Path, metavar="FILE", help="ssh config file (default ~/.ssh/config)"
    )
    host.add_argument(
        "--accept-new",
        action="store_true",
        help="accept and remember an unknown host key (StrictHostKeyChecking=accept-new)",
    )
    host.add_argument(
        "--remote-pcscbridge",
        default="pcscbridge",
        metavar="PATH",
        help="the pcscbridge program in the guest (default: pcscbridge on the guest's PATH)",
    )
    host.add_argument(
        "--guest-link",
        type=_endpoint,
        metavar="ENDPOINT",
        help="the guest server's link endpoint, passed to attach (default: attach's default)",
    )

    add_tls_options(host)
    add_checkpoint_options(host, "the --connect endpoint, or the --ssh destination")
    _add_link_limits(host)
    _add_status_socket(host, "host")

    qemu = command(
        "qemu",
        "On the host: a host reader's card in a QEMU VM's emulated CCID reader "
        "(usb-ccid + ccid-card-passthru), still shared with the host.",
    )
    qemu.add_argument(
        "--chardev",
        action="append",
        required=True,
        type=_chardev,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="the VM's ccid-card-passthru chardev (QEMU listens: server=on,wait=off); "
        "repeatable, one per emulated reader, paired in order with --reader",
    )
    qemu.add_argument(
        "--reader",
        action="append",
        required=True,
        metavar="PATTERN",
        help="the host reader whose card the emulated reader holds: the first whose name "
        "matches PATTERN (fnmatch, case-sensitive: 'Gemalto*', or the exact name)",
    )
    qemu.add_argument(
        "--vm-name",
        metavar="NAME",
        help="the VM's name for the host's policy and audit (default: the chardev, "
        "e.g. unix:/run/vm.sock)",
    )
    qemu.add_argument(
        "--idle-release",
        type=_idle_release,
        default=DEFAULT_IDLE_RELEASE,
        metavar="SECONDS",
        help="end the host transaction that holds the card for the guest after this long "
        f"without a guest command (default {DEFAULT_IDLE_RELEASE})",
    )
    _add_service_options(qemu)
    add_checkpoint_options(qemu, "the --vm-name, else the chardev")
    _add_status_socket(qemu, "qemu")

    attach = command(
        "attach", "In the guest: join stdin/stdout to the guest server's link (run by SSH)."
    )
    attach.add_argument(
        "--link",
        type=_endpoint,
        default=default_link,
        metavar="ENDPOINT",
        help=f"the guest server's link endpoint (default {default_link})",
    )

    status = command("status", "Show what a running guest or host holds and has done.")
    status.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="PATH",
        help="a status socket to ask (repeatable; default: the guest's and the host's default "
        "sockets, whichever answer)",
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON documents")
    serve = command(
        "serve",
        "On one machine: serve the host's readers on a socket, no link (for a socket "
        "bind-mounted into a container or a Flatpak sandbox).",
    )
    _add_client_options(serve)
    _add_service_options(serve)
    add_checkpoint_options(serve, "local:PATH, PATH the --listen socket")
    _add_status_socket(serve, "serve")

    doctor = command(
        "doctor",
        "Check PC/SC, the guest server, its link and the units here; each finding with its "
        "fix. Exit status 1 when something is broken.",
    )
    doctor.add_argument(
        "--libpcsclite",
        action="append",
        default=[],
        metavar="PATH",
        help="also check which protocol this client library speaks and whether the PC/SC "
        "socket accepts it (e.g. a Flatpak runtime's libpcsclite.so.1); repeatable",
    )

    policy = command("policy", "Policy files.")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = policy_commands.add_parser(
        "check", help="validate a policy file and say what each guest may do"
    )
    check.add_argument("file", metavar="FILE")

    keygen = command(
        "keygen", "Write a TLS key and self-signed certificate; print its fingerprint."
    )
    keygen.add_argument("path", metavar="PATH", help="the file to create (PEM, mode 0600)")

    command("demo", "Run the whole bridge with simulated readers and show a client using it.")
    return parser
