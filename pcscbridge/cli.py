"""pcscbridge's command line: the only place that parses arguments."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import __version__
from .errors import SetupError, first_leaf
from .qemu import DEFAULT_IDLE_RELEASE
from .transports.endpoints import (
    Endpoint,
    EndpointError,
    default_link_endpoint,
    parse_endpoint,
)

if TYPE_CHECKING:
    from .guest.access import ClientGate
    from .guest.server import GuestServer
    from .guest.session import SessionOptions
    from .host.backend import Backend
    from .host.runner import LinkKeeper
    from .host.service import HostLimits, Service
    from .link.endpoint import LinkLimits
    from .transports.process import ProcessStream
    from .transports.tls import TLSSettings

log = logging.getLogger("pcscbridge")

EXIT_USAGE = 2
EXIT_GUEST_UNREACHABLE = 69  # attach: no guest server (EX_UNAVAILABLE); --ssh maps it


class UsageError(SetupError):
    exit_code = EXIT_USAGE


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


def _tls(args: argparse.Namespace, endpoint: Endpoint) -> TLSSettings | None:
    if endpoint.kind != "tls":
        return None
    from .transports.tls import TLSSettings

    return TLSSettings.load(args.tls_key, args.tls_peer)


def add_checkpoint_options(sub: argparse.ArgumentParser, guest_name_default: str) -> None:
    """The options of a command that serves the host's readers to guests: which policy and
    audit wrap the host service (see _checked), and the guest's name for both."""
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


def _add_guest_limits(parser: argparse.ArgumentParser) -> None:
    from .guest.server import MAX_CLIENTS
    from .guest.session import MAX_HANDLES_PER_CONNECTION, UNREAD_LIMIT

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
    from .link.endpoint import MAX_IN_FLIGHT, UNREAD_LIMIT, WRITE_TIMEOUT

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
    from .host.service import HostLimits

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
    from .status import default_status_path

    parser.add_argument(
        "--status-socket",
        metavar="PATH",
        help=f"where `pcscbridge status` asks this process (mode 0600; default "
        f"{default_status_path(role)})",
    )


def _link_limits(args: argparse.Namespace) -> LinkLimits:
    from .link.endpoint import LinkLimits

    return LinkLimits(args.link_max_in_flight, args.link_max_unread, args.link_write_timeout)


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


def configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.INFO
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError, parse_arguments

    try:
        args = parse_arguments(build_parser, argv)
    except ConfigError as exc:
        print(f"pcscbridge: {exc}", file=sys.stderr)
        return exc.exit_code
    configure_logging(args.verbose)
    try:
        if args.command == "guest":
            return trio.run(_until_stopped, _guest, args)
        if args.command == "host":
            return trio.run(_until_stopped, _host, args)
        if args.command == "qemu":
            return trio.run(_until_stopped, _qemu, args)
        if args.command == "attach":
            return trio.run(_attach, args)
        if args.command == "status":
            return _status(args)
        if args.command == "serve":
            return trio.run(_until_stopped, _serve, args)
        if args.command == "doctor":
            from .doctor import run_doctor

            return run_doctor(args, build_parser)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
        if args.command == "policy":
            return _policy_check(args.file)
        if args.command == "keygen":
            from .transports.tls import keygen

            fingerprint = keygen(args.path)
            print(f"wrote a private key and certificate to {args.path}; its fingerprint:")
            print(fingerprint)
            return 0
    except (SetupError, BaseExceptionGroup) as exc:
        leaf = first_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if not isinstance(leaf, SetupError):
            raise
        print(f"pcscbridge {args.command}: {leaf}", file=sys.stderr)
        return leaf.exit_code
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


async def _until_stopped(
    command: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """Run a long-lived command; SIGTERM, SIGINT or SIGHUP stop it cleanly (exit status 0)."""
    result = 0
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("stopping (%s)", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        async def run() -> None:
            nonlocal result
            result = await command(args)
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(run)
    return result


async def _guest(args: argparse.Namespace) -> int:
    from .guest.server import GuestServer
    from .transports.endpoints import connect, open_listener

    activated, created = await _pcscd_socket(args)
    client_listener = activated.pop(0)
    link: Endpoint = args.link
    tls = _tls(args, link)
    server = GuestServer(
        _session_options(args),
        max_clients=args.max_clients,
        link_limits=_link_limits(args),
        gate=_client_gate(args),
    )
    log.info(
        "serving pcsc-lite clients on %s; host link on %s",
        args.listen or "the activated socket",
        link,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_status, args, "guest", {"guest": server.statistics})
            if link.kind == "stdio":
                await server.serve(client_listener, link_stream=await connect(link))
            elif link.kind == "exec":
                await _guest_with_link_on_demand(server, client_listener, link)
            elif activated:
                await server.serve(client_listener, link_listener=activated[0])
            else:
                link_listener = await open_listener(link, tls=tls)
                if link.kind == "unix":
                    created.append(link.path)
                await server.serve(client_listener, link_listener=link_listener)
            nursery.cancel_scope.cancel()
    finally:
        # pcscd removes its socket on exit; so do we, for both our sockets.
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return 0


async def _serve(args: argparse.Namespace) -> int:
    from .host.service import open_host_service
    from .serve import serve_locally

    backend = _backend(args.backend, args.sim_readers)
    activated, created = await _pcscd_socket(args)
    where = args.listen or "the activated socket"
    log.info("serving the host's readers (%s) to pcsc-lite clients on %s", args.backend, where)
    try:
        async with open_host_service(backend, _host_limits(args)) as core:
            await serve_locally(
                activated[0],
                _checked(core, args),
                _session_options(args),
                guest=_guest_name(args, f"local:{where}"),
                max_clients=args.max_clients,
                gate=_client_gate(args),
                status=lambda server: _serve_status(
                    args, "serve", {"guest": server.statistics, "service": core.statistics}
                ),
            )
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return 0


def _session_options(args: argparse.Namespace) -> SessionOptions:
    from .guest.session import SessionOptions

    return SessionOptions(
        reader_slots=args.reader_slots,
        legacy_readers=tuple(args.legacy_readers),
        max_handles=args.max_handles,
        unread_limit=args.max_unread,
    )


def _host_limits(args: argparse.Namespace) -> HostLimits:
    from .host.service import HostLimits

    return HostLimits(args.max_guest_contexts, args.max_host_contexts)


async def _pcscd_socket(args: argparse.Namespace) -> tuple[list[trio.SocketListener], list[str]]:
    """The socket pcsc-lite clients use, first, then any other socket systemd passed; and the
    paths this process created (to remove at exit). `--listen PATH` unless socket-activated."""
    from .transports.endpoints import systemd_listeners, unix_listener

    activated = systemd_listeners()
    if activated:
        return activated, []
    if not args.listen:
        raise UsageError("--listen PATH is required (or socket activation)")
    listener = await unix_listener(args.listen, args.socket_mode, args.socket_group)
    return [listener], [args.listen]


def _client_gate(args: argparse.Namespace) -> ClientGate:
    from .guest.access import ClientGate

    return ClientGate(frozenset(args.allow_uid), frozenset(args.allow_gid))


async def _guest_with_link_on_demand(
    server: GuestServer, client_listener: trio.SocketListener, link: Endpoint
) -> None:
    from .guest.ondemand import LinkOnDemand
    from .transports.process import open_process_stream

    async def open_link() -> ProcessStream:
        return await open_process_stream(link.command, what=str(link))

    demand = LinkOnDemand(server.host, open_link, name=str(link))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(demand.run)
        await server.serve(demand.listener(client_listener))


def _backend(name: str, sim_readers: int = 2) -> Backend:
    if name == "sim":
        from .host.backends.sim import SimulatedBackend
        from .host.backends.simcard import SimulatedCard

        names = [f"Sim Reader {index:02X} 00" for index in range(sim_readers)]
        backend = SimulatedBackend(names, no_blocking=True)  # as the pyscard backend
        if sim_readers:
            backend.insert_card("Sim Reader 00 00", SimulatedCard(label="demo card"))
        return backend
    from .host.backends.pyscard import PyscardBackend

    return PyscardBackend()


def _checked(core: Service, args: argparse.Namespace) -> Service:
    """The host service every front-end uses: the core wrapped in the checkpoints the arguments
    ask for (add_checkpoint_options): the policy (the built-in defaults without --policy)
    inside, the audit outside, so the audit sees the policy's refusals."""
    from .host.audit import Audit
    from .host.checkpoint import CheckedService
    from .host.policy import Policy
    from .host.policy_file import PolicyFile, load_policy

    settings = load_policy(args.policy) if args.policy else PolicyFile()
    service: Service = CheckedService(core, Policy(settings))
    if args.audit or args.trace:
        service = CheckedService(service, Audit.to_path(args.audit or "-", trace=args.trace))
    return service


def _guest_name(args: argparse.Namespace, default: str) -> str:
    """--guest-name, or the front-end's own name for its guest."""
    return str(args.guest_name or default)


def _policy_check(path: str) -> int:
    from .host.policy_file import load_policy, summary

    print(summary(load_policy(path)))  # PolicyError (with the line) is reported by main
    return 0


async def _host(args: argparse.Namespace) -> int:
    from .host.service import open_host_service

    backend = _backend(args.backend, args.sim_readers)
    # Every front-end reaches the backend through this one service; policy and audit wrap it.
    async with open_host_service(backend, _host_limits(args)) as core:
        service = _checked(core, args)
        if args.ssh:
            return await _host_over_ssh(args, service)
        if args.link:
            return await _host_over_stdio(args, service)
        return await _host_over_link(args, service)


async def _serve_status(args: argparse.Namespace, role: str, providers: dict[str, Any]) -> None:
    from .status import default_status_path, serve_status

    await serve_status(args.status_socket or default_status_path(role), role, providers)


async def _keep_attached(args: argparse.Namespace, service: Service, keeper: LinkKeeper) -> None:
    """The host's link front-end and its status socket, until the keeper gives up (its
    SetupError is raised as it is, not in a group)."""
    failure: SetupError | None = None
    async with trio.open_nursery() as nursery:
        providers = {"link": keeper.statistics, "service": _core(service).statistics}
        nursery.start_soon(_serve_status, args, "host", providers)
        try:
            await keeper.run()
        except SetupError as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def _core(service: Any) -> Any:
    """The HostService inside the checkpoints that wrap it."""
    while hasattr(service, "inner"):
        service = service.inner
    return service


async def _host_over_stdio(args: argparse.Namespace, service: Service) -> int:
    from .host.agent import HostAgent
    from .transports.stdio import StdioStream

    # Under qrexec the calling qube's name is the guest's identity (policy, audit, logs).
    guest = os.environ.get("QREXEC_REMOTE_DOMAIN") or "stdio"
    log.info("serving the host's readers (%s) to %s over stdio", args.backend, guest)
    agent = HostAgent(service, guest=guest, link_limits=_link_limits(args))
    async with trio.open_nursery() as nursery:
        providers = {"link": agent.statistics, "service": _core(service).statistics}
        nursery.start_soon(_serve_status, args, "host", providers)
        await agent.serve(StdioStream())
        nursery.cancel_scope.cancel()
    log.info("the link to %s ended", guest)
    return 0


async def _qemu(args: argparse.Namespace) -> int:
    from .host.service import open_host_service
    from .qemu.frontend import VirtualReader, VirtualReaderConfig

    if len(args.reader) != len(args.chardev):
        print("pcscbridge qemu: give one --reader per --chardev, in order", file=sys.stderr)
        return EXIT_USAGE
    configs = [
        VirtualReaderConfig(
            chardev, pattern, _guest_name(args, args.vm_name or str(chardev)), args.idle_release
        )
        for chardev, pattern in zip(args.chardev, args.reader, strict=True)
    ]
    backend = _backend(args.backend, args.sim_readers)
    async with open_host_service(backend, _host_limits(args)) as core:
        service = _checked(core, args)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_status, args, "qemu", {"service": core.statistics})
            for config in configs:
                log.info("feeding %s with host reader %r", config.chardev, config.reader_pattern)
                nursery.start_soon(VirtualReader(service, config).run)
    return 0


async def _host_over_link(args: argparse.Namespace, service: Service) -> int:
    from .host.runner import LinkKeeper
    from .transports.endpoints import connect
    from .transports.tls import TLSLinkError

    endpoint: Endpoint = args.connect
    tls = _tls(args, endpoint)

    async def open_link() -> trio.abc.Stream:
        return await connect(endpoint, tls)

    guest = _guest_name(args, str(endpoint))
    log.info("serving the host's readers (%s) to guest %r at %s", args.backend, guest, endpoint)
    keeper = LinkKeeper(
        open_link,
        service,
        guest=guest,
        is_transient=lambda exc: isinstance(exc, OSError | TLSLinkError),
        link_limits=_link_limits(args),
    )
    await _keep_attached(args, service, keeper)
    return 0


async def _host_over_ssh(args: argparse.Namespace, service: Service) -> int:
    from .host.runner import LinkKeeper
    from .transports.ssh import SSHLinkError, SSHTarget, open_ssh_link
    from .transports.ssh.openssh import open_openssh_link

    command = f"{shlex.quote(args.remote_pcscbridge)} attach"
    if args.guest_link is not None:
        command += f" --link {shlex.quote(str(args.guest_link))}"
    target = SSHTarget(
        args.ssh, remote_command=command, ssh_config=args.ssh_config, accept_new=args.accept_new
    )
    attached_once = False
    opener = open_openssh_link if args.ssh_client == "openssh" else open_ssh_link

    async def open_link() -> trio.abc.Stream:
        nonlocal attached_once
        link: trio.abc.Stream = await opener(target)
        attached_once = True
        return link

    def transient(exc: Exception) -> bool:
        # The first attempt reports every failure; later, what can heal by itself is retried.
        return attached_once and isinstance(exc, SSHLinkError) and exc.retryable

    if not args.verbose:
        # paramiko logs each (re)connect at INFO, and every failure of its transport thread at
        # ERROR with a traceback: failures that SSHLinkError (or the lost link's reason) already
        # reports in one line. -v shows them.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    log.info("serving the host's readers (%s) to %s over SSH", args.backend, args.ssh)
    keeper = LinkKeeper(
        open_link,
        service,
        guest=args.ssh,
        is_transient=transient,
        link_limits=_link_limits(args),
    )
    try:
        await _keep_attached(args, service, keeper)
    except SSHLinkError as exc:
        print(f"pcscbridge host: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from .status import default_status_path, read_status

    explicit = bool(args.socket)
    paths = args.socket or [default_status_path("guest"), default_status_path("host")]
    answered = 0
    for path in paths:
        try:
            document = read_status(path)
        except (OSError, ValueError) as exc:
            if explicit:
                print(f"pcscbridge status: nothing answers at {path} ({exc})", file=sys.stderr)
            continue
        answered += 1
        if args.json:
            print(json.dumps(document))
        else:
            print(f"{document.get('role', '?')} at {path}")
            _print_tree(document, "  ")
    if not answered:
        if not explicit:
            print(
                f"pcscbridge status: no guest or host is running here (asked {', '.join(paths)})",
                file=sys.stderr,
            )
        return 1
    return 0


def _print_tree(value: object, indent: str) -> None:
    assert isinstance(value, dict)
    for key, item in value.items():
        if isinstance(item, dict) and item:
            print(f"{indent}{key}:")
            _print_tree(item, indent + "  ")
        else:
            print(f"{indent}{key}: {item}")


async def _attach(args: argparse.Namespace) -> int:
    from .transports.endpoints import connect
    from .transports.stdio import StdioStream

    try:
        link = await connect(args.link)
    except OSError as exc:
        print(
            f"pcscbridge attach: no guest server at {args.link} ({exc.strerror or exc}); "
            f"start it with `pcscbridge guest --listen PATH --link {args.link}`",
            file=sys.stderr,
        )
        return EXIT_GUEST_UNREACHABLE
    stdio = StdioStream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, stdio, link, nursery.cancel_scope)
        nursery.start_soon(_pump, link, stdio, nursery.cancel_scope)
    return 0


async def _pump(
    source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, scope: trio.CancelScope
) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        scope.cancel()  # either side ending ends the attachment


if __name__ == "__main__":
    sys.exit(main())
