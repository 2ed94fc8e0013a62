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
from .qemu import DEFAULT_IDLE_RELEASE
from .transports.endpoints import (
    Endpoint,
    EndpointError,
    default_link_endpoint,
    parse_endpoint,
)

if TYPE_CHECKING:
    from .host.backend import Backend
    from .host.service import Service

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


def _add_backend_options(sub: argparse.ArgumentParser) -> None:
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
        help=f"where the host's link arrives: unix:PATH, tcp:HOST:PORT or stdio "
        f"(default {default_link})",
    )
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
        help="dial the guest server's link: unix:PATH, tcp:HOST:PORT or stdio",
    )
    target.add_argument(
        "--ssh",
        metavar="DESTINATION",
        help="run `pcscbridge attach` in the guest over SSH (an ~/.ssh/config alias or "
        "[user@]host[:port])",
    )
    _add_backend_options(host)
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
    _add_backend_options(qemu)

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
        if args.command == "qemu":
            return trio.run(_until_stopped, _qemu, args)
        if args.command == "attach":
            return trio.run(_attach, args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
    except EndpointError as exc:
        print(f"pcscbridge {args.command}: {exc}", file=sys.stderr)
        return 1
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
    from .guest.session import SessionOptions
    from .transports.endpoints import connect, open_listener, systemd_listeners, unix_listener

    activated = systemd_listeners()
    if activated:
        client_listener = activated[0]
    elif args.listen:
        client_listener = await unix_listener(args.listen, 0o666)  # as pcscd's socket
    else:
        print("pcscbridge guest: --listen PATH is required (or socket activation)", file=sys.stderr)
        return EXIT_USAGE
    server = GuestServer(
        SessionOptions(reader_slots=args.reader_slots, legacy_readers=tuple(args.legacy_readers))
    )
    link: Endpoint = args.link
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
            link_listener = await open_listener(link)
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
    ask for (policy inside, audit outside, so the audit sees the policy's refusals)."""
    return core


async def _host(args: argparse.Namespace) -> int:
    from .host.service import open_host_service

    backend = _backend(args.backend, args.sim_readers)
    # Every front-end reaches the backend through this one service; policy and audit wrap it.
    async with open_host_service(backend) as core:
        service = _checked(core, args)
        if args.ssh:
            return await _host_over_ssh(args, service)
        return await _host_over_link(args, service)


async def _qemu(args: argparse.Namespace) -> int:
    from .host.service import open_host_service
    from .qemu.frontend import VirtualReader, VirtualReaderConfig

    if len(args.reader) != len(args.chardev):
        print("pcscbridge qemu: give one --reader per --chardev, in order", file=sys.stderr)
        return EXIT_USAGE
    configs = [
        VirtualReaderConfig(chardev, pattern, args.vm_name or str(chardev), args.idle_release)
        for chardev, pattern in zip(args.chardev, args.reader, strict=True)
    ]
    backend = _backend(args.backend, args.sim_readers)
    async with open_host_service(backend) as core:
        service = _checked(core, args)
        async with trio.open_nursery() as nursery:
            for config in configs:
                log.info("feeding %s with host reader %r", config.chardev, config.reader_pattern)
                nursery.start_soon(VirtualReader(service, config).run)
    return 0


async def _host_over_link(args: argparse.Namespace, service: Service) -> int:
    from .host.runner import keep_attached
    from .transports.endpoints import connect

    endpoint: Endpoint = args.connect

    async def open_link() -> trio.abc.Stream:
        return await connect(endpoint)

    log.info("serving the host's readers (%s) to the guest at %s", args.backend, endpoint)
    await keep_attached(
        open_link, service, guest=str(endpoint), is_transient=lambda exc: isinstance(exc, OSError)
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
        await keep_attached(open_link, service, guest=args.ssh, is_transient=transient)
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
