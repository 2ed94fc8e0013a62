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
from typing import TYPE_CHECKING

import trio

from . import __version__
from .errors import SetupError, first_leaf
from .transports.endpoints import (
    Endpoint,
    EndpointError,
    default_link_endpoint,
    parse_endpoint,
)

if TYPE_CHECKING:
    from .host.backend import Backend
    from .host.service import Service
    from .transports.tls import TLSSettings

log = logging.getLogger("pcscbridge")

EXIT_USAGE = 2
EXIT_GUEST_UNREACHABLE = 69  # attach: no guest server (EX_UNAVAILABLE); --ssh maps it


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
        return sub

    guest = command("guest", "In the guest: impersonate pcscd and wait for the host's link.")
    guest.add_argument(
        "--listen",
        metavar="PATH",
        help="UNIX socket for pcsc-lite clients (point PCSCLITE_CSOCK_NAME at it); "
        "optional under systemd socket activation",
    )
    guest.add_argument(
        "--link",
        type=_endpoint,
        default=default_link,
        metavar="ENDPOINT",
        help=f"where the host's link arrives: unix:PATH, tcp:HOST:PORT (loopback only), "
        f"tls:HOST:PORT (with --tls-key and --tls-peer) or stdio (default {default_link})",
    )
    guest.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o666,
        metavar="MODE",
        help="permissions of the --listen socket, octal (default 666, as pcscd's)",
    )
    guest.add_argument(
        "--socket-group",
        type=_gid,
        metavar="GROUP",
        help="group of the --listen socket (name or number)",
    )
    guest.add_argument(
        "--allow-uid",
        type=_uid,
        action="append",
        default=[],
        metavar="USER",
        help="serve only clients of this uid (name or number) or of an --allow-gid; "
        "repeatable; others are refused as pcscd refuses a client polkit does not allow",
    )
    guest.add_argument(
        "--allow-gid",
        type=_gid,
        action="append",
        default=[],
        metavar="GROUP",
        help="serve only clients in this group (primary or supplementary), or of an "
        "--allow-uid; repeatable",
    )
    add_tls_options(guest)
    guest.add_argument(
        "--legacy-readers",
        action="append",
        default=[],
        metavar="PATTERN",
        help="when the host has more readers than clients of protocol 4.5 or older can see "
        "(--reader-slots), show the readers whose name matches PATTERN (fnmatch, "
        "case-sensitive) first; repeatable, earlier patterns first, then the other readers "
        "in table order. 4.6 clients always see every reader",
    )
    guest.add_argument(
        "--reader-slots",
        type=_reader_slots,
        default=16,
        metavar="N",
        help="the readers table size of clients of protocol 4.5 or older, and of every "
        "client's CMD_GET_READERS_STATE: PCSCLITE_MAX_READERS_CONTEXTS of the guest's "
        "libpcsclite build (default 16, as Debian and upstream; Fedora builds 48)",
    )

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
    host.add_argument(
        "--backend",
        choices=("pyscard", "sim"),
        default="pyscard",
        help="the host's PC/SC through pyscard (default), or simulated readers",
    )
    host.add_argument(
        "--sim-readers",
        type=_sim_readers,
        default=2,
        metavar="N",
        help="with --backend sim: N simulated readers named 'Sim Reader XX 00' (XX = 00, 01, "
        "... in hex), a card in the first (default 2)",
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


def configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.INFO
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.command == "guest":
            return trio.run(_until_stopped, _guest, args)
        if args.command == "host":
            return trio.run(_until_stopped, _host, args)
        if args.command == "attach":
            return trio.run(_attach, args)
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
    from .guest.access import ClientGate
    from .guest.server import GuestServer
    from .guest.session import SessionOptions
    from .transports.endpoints import connect, open_listener, systemd_listeners, unix_listener

    activated = systemd_listeners()
    if activated:
        client_listener = activated[0]
    elif args.listen:
        client_listener = await unix_listener(args.listen, args.socket_mode, args.socket_group)
    else:
        print("pcscbridge guest: --listen PATH is required (or socket activation)", file=sys.stderr)
        return EXIT_USAGE
    link: Endpoint = args.link
    tls = _tls(args, link)
    server = GuestServer(
        SessionOptions(reader_slots=args.reader_slots, legacy_readers=tuple(args.legacy_readers)),
        gate=ClientGate(frozenset(args.allow_uid), frozenset(args.allow_gid)),
    )
    created = [] if activated else [args.listen]
    log.info(
        "serving pcsc-lite clients on %s; host link on %s",
        args.listen or "the activated socket",
        link,
    )
    try:
        if link.kind == "stdio":
            await server.serve(client_listener, link_stream=await connect(link))
        elif len(activated) > 1:
            await server.serve(client_listener, link_listener=activated[1])
        else:
            link_listener = await open_listener(link, tls=tls)
            if link.kind == "unix":
                created.append(link.path)
            await server.serve(client_listener, link_listener=link_listener)
    finally:
        # pcscd removes its socket on exit; so do we, for both our sockets.
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return 0


def _backend(name: str, sim_readers: int = 2) -> Backend:
    if name == "sim":
        from .host.backends.sim import SimulatedBackend
        from .host.backends.simcard import SimulatedCard

        backend = SimulatedBackend([f"Sim Reader {index:02X} 00" for index in range(sim_readers)])
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
    async with open_host_service(backend) as core:
        service = _checked(core, args)
        if args.ssh:
            return await _host_over_ssh(args, service)
        return await _host_over_link(args, service)


async def _host_over_link(args: argparse.Namespace, service: Service) -> int:
    from .host.runner import keep_attached
    from .transports.endpoints import connect
    from .transports.tls import TLSLinkError

    endpoint: Endpoint = args.connect
    tls = _tls(args, endpoint)

    async def open_link() -> trio.abc.Stream:
        return await connect(endpoint, tls)

    guest = _guest_name(args, str(endpoint))
    log.info("serving the host's readers (%s) to guest %r at %s", args.backend, guest, endpoint)
    await keep_attached(
        open_link,
        service,
        guest=guest,
        is_transient=lambda exc: isinstance(exc, OSError | TLSLinkError),
    )
    return 0


async def _host_over_ssh(args: argparse.Namespace, service: Service) -> int:
    from .host.runner import keep_attached
    from .transports.ssh import SSHLinkError, SSHTarget, open_ssh_link

    command = f"{shlex.quote(args.remote_pcscbridge)} attach"
    if args.guest_link is not None:
        command += f" --link {shlex.quote(str(args.guest_link))}"
    target = SSHTarget(
        args.ssh, remote_command=command, ssh_config=args.ssh_config, accept_new=args.accept_new
    )
    attached_once = False

    async def open_link() -> trio.abc.Stream:
        nonlocal attached_once
        link = await open_ssh_link(target)
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
    try:
        await keep_attached(
            open_link, service, guest=_guest_name(args, args.ssh), is_transient=transient
        )
    except SSHLinkError as exc:
        print(f"pcscbridge host: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


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
