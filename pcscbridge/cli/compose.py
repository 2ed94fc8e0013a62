"""What the options make: the backend, the host service wrapped in its checkpoints, the limits,
the sockets clients use; one place composes them, so every front-end gets the same."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

import trio

from ..errors import SetupError
from ..transports.endpoints import (
    Endpoint,
)

if TYPE_CHECKING:
    from ..guest.access import ClientGate
    from ..guest.session import SessionOptions
    from ..host.backend import Backend
    from ..host.service import HostLimits, Service
    from ..link.endpoint import LinkLimits
    from ..transports.tls import TLSSettings

log = logging.getLogger("pcscbridge")

EXIT_USAGE = 2


class UsageError(SetupError):
    exit_code = EXIT_USAGE


def tls_settings(args: argparse.Namespace, endpoint: Endpoint) -> TLSSettings | None:
    if endpoint.kind != "tls":
        return None
    from ..transports.tls import TLSSettings

    return TLSSettings.load(args.tls_key, args.tls_peer)


def link_limits(args: argparse.Namespace) -> LinkLimits:
    from ..link.endpoint import LinkLimits

    return LinkLimits(args.link_max_in_flight, args.link_max_unread, args.link_write_timeout)


def session_options(args: argparse.Namespace) -> SessionOptions:
    from ..guest.session import SessionOptions

    return SessionOptions(
        reader_slots=args.reader_slots,
        legacy_readers=tuple(args.legacy_readers),
        max_handles=args.max_handles,
        unread_limit=args.max_unread,
    )


def host_limits(args: argparse.Namespace) -> HostLimits:
    from ..host.service import HostLimits

    return HostLimits(args.max_guest_contexts, args.max_host_contexts)


def client_gate(args: argparse.Namespace) -> ClientGate:
    from ..guest.access import ClientGate

    return ClientGate(frozenset(args.allow_uid), frozenset(args.allow_gid))


def make_backend(name: str, sim_readers: int = 2) -> Backend:
    if name == "sim":
        from ..host.backends.sim import SimulatedBackend
        from ..host.backends.simcard import SimulatedCard

        names = [f"Sim Reader {index:02X} 00" for index in range(sim_readers)]
        backend = SimulatedBackend(names, no_blocking=True)  # as the pyscard backend
        if sim_readers:
            backend.insert_card("Sim Reader 00 00", SimulatedCard(label="demo card"))
        return backend
    from ..host.backends.pyscard import PyscardBackend

    return PyscardBackend()


def checked_service(core: Service, args: argparse.Namespace) -> Service:
    """The host service every front-end uses: the core wrapped in the checkpoints the arguments
    ask for (add_checkpoint_options): the policy (the built-in defaults without --policy)
    inside, the audit outside, so the audit sees the policy's refusals."""
    from ..host.audit import Audit
    from ..host.checkpoint import CheckedService
    from ..host.policy import Policy
    from ..host.policy_file import PolicyFile, load_policy

    settings = load_policy(args.policy) if args.policy else PolicyFile()
    service: Service = CheckedService(core, Policy(settings))
    if args.audit or args.trace:
        service = CheckedService(service, Audit.to_path(args.audit or "-", trace=args.trace))
    return service


def guest_name(args: argparse.Namespace, default: str) -> str:
    """--guest-name, or the front-end's own name for its guest."""
    return str(args.guest_name or default)


def core_service(service: Any) -> Any:
    """The HostService inside the checkpoints that wrap it."""
    while hasattr(service, "inner"):
        service = service.inner
    return service


async def serve_status_socket(
    args: argparse.Namespace, role: str, providers: dict[str, Any]
) -> None:
    from ..status import default_status_path, serve_status

    await serve_status(args.status_socket or default_status_path(role), role, providers)


async def pcscd_socket(args: argparse.Namespace) -> tuple[list[trio.SocketListener], list[str]]:
    """The socket pcsc-lite clients use, first, then any other socket systemd passed; and the
    paths this process created (to remove at exit). `--listen PATH` unless socket-activated."""
    from ..transports.endpoints import systemd_listeners, unix_listener

    activated = systemd_listeners()
    if activated:
        return activated, []
    if not args.listen:
        raise UsageError("--listen PATH is required (or socket activation)")
    listener = await unix_listener(args.listen, args.socket_mode, args.socket_group)
    return [listener], [args.listen]
