"""Each command, run: the guest server, the host's front-ends (link, SSH, stdio, QEMU), serve,
and the short ones."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from ..errors import SetupError, first_leaf
from ..transports.endpoints import (
    Endpoint,
)
from .compose import (
    EXIT_USAGE,
    checked_service,
    client_gate,
    core_service,
    guest_name,
    host_limits,
    link_limits,
    make_backend,
    pcscd_socket,
    serve_status_socket,
    session_options,
    tls_settings,
)
from .parser import build_parser

if TYPE_CHECKING:
    from ..guest.server import GuestServer
    from ..host.runner import LinkKeeper
    from ..host.service import Service
    from ..transports.process import ProcessStream

log = logging.getLogger("pcscbridge")

EXIT_GUEST_UNREACHABLE = 69  # attach: no guest server (EX_UNAVAILABLE); --ssh maps it


def configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.INFO
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    from ..config import ConfigError, parse_arguments

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
            from ..doctor import run_doctor

            return run_doctor(args, build_parser)
        if args.command == "demo":
            from ..demo import run_demo

            return run_demo()
        if args.command == "policy":
            return _policy_check(args.file)
        if args.command == "keygen":
            from ..transports.tls import keygen

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
    from ..guest.server import GuestServer
    from ..transports.endpoints import connect, open_listener

    activated, created = await pcscd_socket(args)
    client_listener = activated.pop(0)
    link: Endpoint = args.link
    tls = tls_settings(args, link)
    server = GuestServer(
        session_options(args),
        max_clients=args.max_clients,
        link_limits=link_limits(args),
        gate=client_gate(args),
    )
    log.info(
        "serving pcsc-lite clients on %s; host link on %s",
        args.listen or "the activated socket",
        link,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_status_socket, args, "guest", {"guest": server.statistics})
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
    from ..host.service import open_host_service
    from ..serve import serve_locally

    backend = make_backend(args.backend, args.sim_readers)
    activated, created = await pcscd_socket(args)
    where = args.listen or "the activated socket"
    log.info("serving the host's readers (%s) to pcsc-lite clients on %s", args.backend, where)
    try:
        async with open_host_service(backend, host_limits(args)) as core:
            await serve_locally(
                activated[0],
                checked_service(core, args),
                session_options(args),
                guest=guest_name(args, f"local:{where}"),
                max_clients=args.max_clients,
                gate=client_gate(args),
                status=lambda server: serve_status_socket(
                    args, "serve", {"guest": server.statistics, "service": core.statistics}
                ),
            )
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return 0


async def _guest_with_link_on_demand(
    server: GuestServer, client_listener: trio.SocketListener, link: Endpoint
) -> None:
    from ..guest.ondemand import LinkOnDemand
    from ..transports.process import open_process_stream

    async def open_link() -> ProcessStream:
        return await open_process_stream(link.command, what=str(link))

    demand = LinkOnDemand(server.host, open_link, name=str(link))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(demand.run)
        await server.serve(demand.listener(client_listener))


def _policy_check(path: str) -> int:
    from ..host.policy_file import load_policy, summary

    print(summary(load_policy(path)))  # PolicyError (with the line) is reported by main
    return 0


async def _host(args: argparse.Namespace) -> int:
    from ..host.service import open_host_service

    backend = make_backend(args.backend, args.sim_readers)
    # Every front-end reaches the backend through this one service; policy and audit wrap it.
    async with open_host_service(backend, host_limits(args)) as core:
        service = checked_service(core, args)
        if args.ssh:
            return await _host_over_ssh(args, service)
        if args.link:
            return await _host_over_stdio(args, service)
        return await _host_over_link(args, service)


async def _keep_attached(args: argparse.Namespace, service: Service, keeper: LinkKeeper) -> None:
    """The host's link front-end and its status socket, until the keeper gives up (its
    SetupError is raised as it is, not in a group)."""
    failure: SetupError | None = None
    async with trio.open_nursery() as nursery:
        providers = {"link": keeper.statistics, "service": core_service(service).statistics}
        nursery.start_soon(serve_status_socket, args, "host", providers)
        try:
            await keeper.run()
        except SetupError as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _host_over_stdio(args: argparse.Namespace, service: Service) -> int:
    from ..host.agent import HostAgent
    from ..transports.stdio import StdioStream

    # Under qrexec the calling qube's name is the guest's identity (policy, audit, logs).
    guest = os.environ.get("QREXEC_REMOTE_DOMAIN") or "stdio"
    log.info("serving the host's readers (%s) to %s over stdio", args.backend, guest)
    agent = HostAgent(service, guest=guest, link_limits=link_limits(args))
    async with trio.open_nursery() as nursery:
        providers = {"link": agent.statistics, "service": core_service(service).statistics}
        nursery.start_soon(serve_status_socket, args, "host", providers)
        await agent.serve(StdioStream())
        nursery.cancel_scope.cancel()
    log.info("the link to %s ended", guest)
    return 0


async def _qemu(args: argparse.Namespace) -> int:
    from ..host.service import open_host_service
    from ..qemu.frontend import VirtualReader, VirtualReaderConfig

    if len(args.reader) != len(args.chardev):
        print("pcscbridge qemu: give one --reader per --chardev, in order", file=sys.stderr)
        return EXIT_USAGE
    configs = [
        VirtualReaderConfig(
            chardev, pattern, guest_name(args, args.vm_name or str(chardev)), args.idle_release
        )
        for chardev, pattern in zip(args.chardev, args.reader, strict=True)
    ]
    backend = make_backend(args.backend, args.sim_readers)
    async with open_host_service(backend, host_limits(args)) as core:
        service = checked_service(core, args)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_status_socket, args, "qemu", {"service": core.statistics})
            for config in configs:
                log.info("feeding %s with host reader %r", config.chardev, config.reader_pattern)
                nursery.start_soon(VirtualReader(service, config).run)
    return 0


async def _host_over_link(args: argparse.Namespace, service: Service) -> int:
    from ..host.runner import LinkKeeper
    from ..transports.endpoints import connect
    from ..transports.tls import TLSLinkError

    endpoint: Endpoint = args.connect
    tls = tls_settings(args, endpoint)

    async def open_link() -> trio.abc.Stream:
        return await connect(endpoint, tls)

    guest = guest_name(args, str(endpoint))
    log.info("serving the host's readers (%s) to guest %r at %s", args.backend, guest, endpoint)
    keeper = LinkKeeper(
        open_link,
        service,
        guest=guest,
        is_transient=lambda exc: isinstance(exc, OSError | TLSLinkError),
        link_limits=link_limits(args),
    )
    await _keep_attached(args, service, keeper)
    return 0


async def _host_over_ssh(args: argparse.Namespace, service: Service) -> int:
    from ..host.runner import LinkKeeper
    from ..transports.ssh import SSHLinkError, SSHTarget, open_ssh_link
    from ..transports.ssh.openssh import open_openssh_link

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
        link_limits=link_limits(args),
    )
    try:
        await _keep_attached(args, service, keeper)
    except SSHLinkError as exc:
        print(f"pcscbridge host: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from ..status import default_status_path, read_status

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
    from ..transports.endpoints import connect
    from ..transports.stdio import StdioStream

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
