"""The guest server's pcscd behaviour, driven by a raw client: no host, readers, waits, cancel,
dialects and bad input. Runs in-process; the host side is covered by the bridge tests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from pcscbridge.pcsc import ReturnCode
from pcscbridge.pcsclite.messages import Command, VersionBody, WaitBody, encode_request
from pcscbridge.testing.inprocess import InProcessBridge, inprocess_bridge
from pcscbridge.testing.rawclient import RawClient


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[InProcessBridge]:
    async with inprocess_bridge(
        None, str(tmp_path / "pcscd.comm"), attach=False, handle_misuse_delay=0.2
    ) as bridge:
        yield bridge


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(function, *args)


def client(bridge: InProcessBridge, timeout: float = 5.0) -> RawClient:
    return RawClient(bridge.socket_path, timeout)


async def test_contexts_without_a_host_see_no_readers(guest: InProcessBridge) -> None:
    def run() -> None:
        with client(guest) as c:
            assert c.version() == VersionBody(4, 4, 0)
            reply = c.establish()
            assert reply.rv == 0 and 0 < reply.h_context < 2**31
            assert c.readers_state() == [None] * 16
            connect = c.connect("Virtual PCD 00 00")
            assert connect.rv == ReturnCode.SCARD_E_UNKNOWN_READER
            assert c.release().rv == 0

    await in_thread(run)


async def test_bad_scope_and_release_rules(guest: InProcessBridge) -> None:
    def run() -> None:
        with client(guest) as c:
            c.version()
            assert c.release().rv == ReturnCode.SCARD_E_INVALID_HANDLE  # no context yet
            bad = c.establish(scope=7)
            assert (bad.rv, bad.h_context) == (ReturnCode.SCARD_E_INVALID_VALUE, 0)
            c.establish()
            c.h_context ^= 1
            assert c.release().rv == ReturnCode.SCARD_E_INVALID_VALUE
            c.h_context ^= 1
            assert c.release().rv == 0

    await in_thread(run)


async def test_context_ids_are_unique_across_connections(guest: InProcessBridge) -> None:
    def run() -> set[int]:
        clients = [client(guest) for _ in range(20)]
        try:
            return {c.establish().h_context for c in clients}
        finally:
            for c in clients:
                c.close()

    assert len(await in_thread(run)) == 20


async def test_cancel_from_another_connection_ends_the_wait(guest: InProcessBridge) -> None:
    def run() -> None:
        with client(guest) as waiter, client(guest) as canceller:
            waiter.version()
            waiter.establish()
            assert waiter.wait() == [None] * 16  # registered, table returned (4.4)
            # SCardCancel's throw-away connection sends no CMD_VERSION.
            reply = canceller.request(Command.SCARD_CANCEL, _cancel(waiter.h_context))
            assert reply.rv == 0
            assert waiter.read_signal() == WaitBody(0, ReturnCode.SCARD_E_CANCELLED)
            # No longer registered: STOP gets no answer, the next request is answered in order.
            waiter.stop_waiting()
            assert waiter.readers_state() == [None] * 16
            unknown = canceller.request(Command.SCARD_CANCEL, _cancel(12345))
            assert unknown.rv == ReturnCode.SCARD_E_INVALID_HANDLE

    await in_thread(run)


async def test_cancel_of_a_context_that_does_not_wait_looks_like_an_unknown_one(
    guest: InProcessBridge,
) -> None:
    """pcscd 1.9.9 (checked on the rig): INVALID_HANDLE unless the context waits, from any
    connection, its own included; so guessing context numbers tells nothing."""

    def run() -> None:
        with client(guest) as owner, client(guest) as prober:
            owner.version()
            owner.establish()
            for asking in (prober, owner):
                reply = asking.request(Command.SCARD_CANCEL, _cancel(owner.h_context))
                assert reply.rv == ReturnCode.SCARD_E_INVALID_HANDLE
            assert owner.readers_state() == [None] * 16  # no signal was sent to it

    await in_thread(run)


def _cancel(h_context: int):  # type: ignore[no-untyped-def]
    from pcscbridge.pcsclite.messages import CancelBody

    return CancelBody(h_context, 0)


async def test_stop_while_registered_is_answered(guest: InProcessBridge) -> None:
    def run() -> None:
        with client(guest) as c:
            c.version()
            c.establish()
            c.wait()
            c.stop_waiting()
            assert c.read_signal() == WaitBody(0, 0)

    await in_thread(run)


async def test_dialect_43_waits_with_a_body_and_no_table(guest: InProcessBridge) -> None:
    with client(guest) as c, client(guest) as canceller:

        def register() -> None:
            assert c.version(4, 3) == VersionBody(4, 3, 0)
            c.establish()
            c.wait(with_array=False, body=WaitBody(60000, 0))  # ≤4.3: nothing comes back

        await in_thread(register)
        session = guest.server.registry.context_owner(c.h_context)
        with trio.fail_after(5):
            while not guest.server.mirror.is_registered(session):
                await trio.sleep(0.01)

        def cancel() -> None:
            assert canceller.request(Command.SCARD_CANCEL, _cancel(c.h_context)).rv == 0
            assert c.read_signal() == WaitBody(0, ReturnCode.SCARD_E_CANCELLED)

        await in_thread(cancel)


async def test_dialect_45_reader_events_and_46_variable_table(guest: InProcessBridge) -> None:
    def run() -> None:
        with client(guest) as c45, client(guest) as c46:
            assert c45.version(4, 5) == VersionBody(4, 5, 0)
            assert c45.reader_events().rv == 0
            assert c46.version(4, 6) == VersionBody(4, 6, 0)
            size = c46.readers_state_size()
            assert size >= 16 and size % 2 == 0
            assert c46.readers_state_array(size) == [None] * size
            c46.establish()
            c46.wait(with_array=False)  # 4.6: WAIT only registers
            c46.stop_waiting()
            assert c46.read_signal() == WaitBody(0, 0)

    await in_thread(run)


async def test_unknown_version_gets_pcscd_refusal_and_retry_works(
    guest: InProcessBridge, caplog: pytest.LogCaptureFixture
) -> None:
    def run() -> None:
        with client(guest) as c:
            assert c.version(4, 9) == VersionBody(4, 6, ReturnCode.SCARD_E_SERVICE_STOPPED)
            assert c.version(5, 0) == VersionBody(4, 6, ReturnCode.SCARD_E_SERVICE_STOPPED)
            assert c.version(4, 6) == VersionBody(4, 6, 0)

    with caplog.at_level(logging.WARNING):
        await in_thread(run)
    assert "protocol 4.9" in caplog.text


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 64,
        bytes.fromhex("05000000 01000000") + bytes(5),  # wrong size for ESTABLISH
        bytes.fromhex("00000000 03000000"),  # SCARD_LIST_READERS: never served
        bytes.fromhex("00000000 15000000"),  # 4.5 command on a 4.4 connection
        encode_request(
            Command.SCARD_TRANSMIT,
            __import__("pcscbridge.pcsclite.messages", fromlist=["TransmitBody"]).TransmitBody(
                1, 2, 16, 0xFFFFFFFF, 3, 16, 10, 0
            ),
        ),
    ],
)
async def test_bad_input_closes_only_that_connection(
    guest: InProcessBridge, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    def run() -> None:
        with client(guest) as bystander, client(guest) as bad:
            bystander.version()
            bystander.establish()
            bad.version()
            bad.send(garbage)
            assert bad.closed_by_peer()
            assert bystander.readers_state() == [None] * 16
            with client(guest) as fresh:
                assert fresh.version().rv == 0

    with caplog.at_level(logging.WARNING):
        await in_thread(run)
    assert "closing the connection" in caplog.text


async def test_foreign_card_handle_closes_the_connection_after_a_delay(
    guest: InProcessBridge, caplog: pytest.LogCaptureFixture
) -> None:
    def run() -> None:
        with client(guest) as bystander, client(guest) as misuser:
            bystander.version()
            bystander.establish()
            misuser.version()
            misuser.establish()
            misuser.send(
                encode_request(
                    Command.SCARD_BEGIN_TRANSACTION,
                    __import__("pcscbridge.pcsclite.messages", fromlist=["CardBody"]).CardBody(
                        0x1234, 0
                    ),
                )
            )
            # While the misuser waits out its delay, the other client is served at once.
            assert bystander.readers_state() == [None] * 16
            assert misuser.closed_by_peer()

    with caplog.at_level(logging.WARNING):
        await in_thread(run)
    assert "not owned by this connection" in caplog.text


async def test_many_clients_at_once(guest: InProcessBridge) -> None:
    async def one() -> None:
        def run() -> None:
            with client(guest) as c:
                c.version()
                c.establish()
                for _ in range(20):
                    assert c.readers_state() == [None] * 16
                assert c.release().rv == 0

        await in_thread(run)

    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(one)
