"""What `make fuzz` and `make soak` found, each reproduced small on the real rig."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from pcscbridge.link.calls import (
    BeginTransaction,
    Connect,
    EndTransaction,
    ReleaseContext,
    Transmit,
)
from pcscbridge.link.protocol import Response
from pcscbridge.pcsc import ReturnCode
from pcscbridge.pcsclite.messages import Command, DispositionBody, encode_request, unpack_body
from pcscbridge.status import read_status
from pcscbridge.testing.rawclient import RawClient
from rig.bridge_processes import Bridge
from rig.host_peer import host_process_peer
from rig.pcscd_rig import PcscdRig
from rig.processes import expect_line, finish, spawn_program
from rig.service import wait_until
from stress.watch import echo_apdu, raw_echo

READER = "Virtual PCD 00 00"


async def assert_a_host_app_gets_the_card(rig: PcscdRig, tag: str, share_mode: int) -> None:
    """A host application, straight on pcscd, connects, transmits and begins a transaction:
    nothing a guest did is left holding the reader."""
    taken = await trio.to_thread.run_sync(
        lambda: raw_echo(rig.socket_path, READER, tag, share_mode)
    )
    assert taken is None, taken


def test_a_client_gone_during_a_connect_leaves_no_card_handle_in_the_guest(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """pcscd holds an SCardConnect while another application holds a transaction on the
    reader. A guest client that gives up meanwhile (closes its socket) must take its card handle
    number with it: the guest's registry kept it for ever (status card_handles never 0)."""
    host_app = spawn_program(["hold-transaction", READER], pcscd_rig.socket_path)
    try:
        expect_line(host_app, "LOCKED")
        with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
            bridge.start(expected_readers=pcscd_rig.reader_names)
            client = RawClient(bridge.socket_path)
            client.version()
            client.establish()
            client.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):  # pcscd holds the connect
                client.connect(READER)
            client.close()
            wait_until(
                lambda: bridge.status("guest")["guest"]["card_handles"] == 0,
                10,
                "the guest to forget the abandoned connect's card handle",
            )
            assert bridge.status("guest")["guest"]["contexts"] == 0
            host_app.stdin.write("\n")  # type: ignore[union-attr]
            host_app.stdin.flush()  # type: ignore[union-attr]
            expect_line(host_app, "UNLOCKED")
            wait_until(
                lambda: bridge.status("host")["service"]["host_contexts"] == 0,
                10,
                "the host to release the context once the connect returned",
            )
            time.sleep(0.2)
            assert "Traceback" not in bridge.logs()
    finally:
        finish(host_app)


def disconnect_with_a_bad_disposition(socket_path: str) -> list[int]:
    """Connect, begin a transaction, SCardDisconnect with disposition 7 (not a disposition),
    then end the transaction and disconnect properly: the return codes."""
    with RawClient(socket_path) as client:
        client.version()
        client.establish()
        h_card = client.connect(READER).h_card
        codes = [client.begin_transaction(h_card).rv, client.disconnect(h_card, 7).rv]
        end = encode_request(Command.SCARD_END_TRANSACTION, DispositionBody(h_card, 0, 0))
        client.sock.settimeout(5)
        client.send(end)
        codes.append(unpack_body(DispositionBody, client.receive(12)).rv)
        codes.append(client.disconnect(h_card).rv)
        codes.append(client.release().rv)
        return codes


def test_a_disconnect_pcscd_refuses_leaves_the_handle_and_its_transaction_usable(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """pcscd refuses SCardDisconnect with an unknown disposition (SCARD_E_INVALID_VALUE) and the
    handle stays valid, with its transaction. The bridge forgot the handle anyway: the client's
    next call on it was taken for another connection's handle (2 s, then closed), and the
    transaction stayed held on the host, where a later connect of the same context to that
    reader waited for ever (found by make fuzz: every client of the reader stalled)."""
    direct = disconnect_with_a_bad_disposition(pcscd_rig.socket_path)
    assert direct == [0, ReturnCode.SCARD_E_INVALID_VALUE, 0, 0, 0]
    with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
        bridge.start(expected_readers=pcscd_rig.reader_names)
        assert disconnect_with_a_bad_disposition(bridge.socket_path) == direct
        wait_until(
            lambda: bridge.status("host")["service"]["host_contexts"] == 0, 10, "nothing held"
        )


async def test_a_failed_end_of_transaction_does_not_leave_the_reader_locked_after_the_link(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """pcscd keeps a transaction whose SCardEndTransaction fails (here an unknown disposition:
    SCARD_E_INVALID_VALUE). The host service forgot it anyway, so its guard against a context
    connecting behind its own transaction let the next connect through: pcscd then waits for
    ever, the context can never be released (its release waits for that call), and after the
    link is gone the reader stays locked for every host application (found by make fuzz)."""
    async with host_process_peer(pcscd_rig.socket_path, tmp_path / "host") as (peer, host):
        await peer.ok(Connect(1, 11, READER, 2, 3))
        await peer.ok(BeginTransaction(11))
        refused = await peer.call(EndTransaction(11, 9))
        assert refused.rv == ReturnCode.SCARD_E_INVALID_VALUE
        with trio.move_on_after(5) as waited:
            again = await peer.call(Connect(1, 12, READER, 2, 3))
        assert not waited.cancelled_caught, "the connect waited behind its own transaction"
        assert again.rv == ReturnCode.SCARD_E_SHARING_VIOLATION
    # The link is gone: a host application gets the card.
    await assert_a_host_app_gets_the_card(pcscd_rig, "host app after the link", 1)
    assert "Traceback" not in host.log


async def test_a_context_released_with_calls_queued_on_it_leaves_the_host_working(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """libpcsclite's SCardReleaseContext unlocks the context, then frees it. The host released
    from a thread of its own while the context's thread went on with the calls queued there:
    that thread then used freed memory. The host died of SIGSEGV once in 522,000 fuzz cases;
    with transmits queued behind a release, as here, it hung in SCardTransmit within a few
    rounds. Every call of a context, its release included, now runs on the context's thread."""
    echo = echo_apdu(b"x" * 200)
    async with host_process_peer(pcscd_rig.socket_path, tmp_path / "host") as (peer, host):
        for round_ in range(200):
            h_context, h_card = 1000 + round_, 5000 + round_
            await peer.ok(Connect(h_context, h_card, READER, 2, 2))
            answers: list[Response] = []

            async def transmit(h_card: int = h_card, answers: list[Response] = answers) -> None:
                answers.append(await peer.call(Transmit(h_card, 2, echo)))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(transmit)
                    await trio.sleep(0.001 * (round_ % 7))  # released at any point of them
                    assert (await peer.call(ReleaseContext(h_context))).rv == 0
            for answer in answers:
                # Each transmit ran whole, before the release, or found its handle gone.
                assert answer.rv in (0, ReturnCode.SCARD_E_INVALID_HANDLE), answer
                assert answer.rv or answer.result == [b"x" * 200 + b"\x90\x00"], answer
            assert host.alive(), host.log
    assert "Fatal Python error" not in host.log and "Traceback" not in host.log
    await assert_a_host_app_gets_the_card(pcscd_rig, "host app after the releases", 2)


async def test_a_begin_transaction_waiting_for_another_application_ends_with_its_context(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """libpcsclite retries SCardBeginTransaction every 100 ms while another application holds
    the reader's transaction. When the guest lets the context go, the host ends that wait (it
    disconnects the card between two retries) and releases the context on its own thread,
    without waiting for the other application."""
    status = str(tmp_path / "host.status")
    extra = ["--status-socket", status]
    async with host_process_peer(pcscd_rig.socket_path, tmp_path / "host", extra) as (peer, host):
        await peer.ok(Connect(1, 11, READER, 2, 3))  # pcscd holds connects during a transaction
        host_app = spawn_program(["hold-transaction", READER], pcscd_rig.socket_path)
        try:
            await trio.to_thread.run_sync(expect_line, host_app, "LOCKED")
            async with trio.open_nursery() as nursery:
                begun: list[Response] = []

                async def begin() -> None:
                    begun.append(await peer.call(BeginTransaction(11)))

                nursery.start_soon(begin)
                await trio.sleep(0.5)
                assert not begun, "the begin did not wait for the other application"
                assert (await peer.call(ReleaseContext(1))).rv == 0
                with trio.fail_after(5):
                    while read_status(status)["service"]["context_threads"]:
                        await trio.sleep(0.05)
            assert begun[0].rv == ReturnCode.SCARD_E_INVALID_HANDLE, begun
        finally:
            finish(host_app)
        assert host.alive(), host.log
    await assert_a_host_app_gets_the_card(pcscd_rig, "host app after the wait", 2)


async def test_contexts_released_while_pcscd_holds_their_connect_still_count_against_the_cap(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    """pcscd holds an SCardConnect while another application holds the reader's transaction,
    and nothing ends it early: a context released meanwhile keeps its host thread, its host
    context and its pcscd connection until the connect returns. They were no longer counted,
    so a guest that connected and released in a loop opened pcscd connections without bound
    and could take all 200 from the host's own applications."""
    extra = ["--max-host-contexts", "4"]
    async with host_process_peer(pcscd_rig.socket_path, tmp_path / "host", extra) as (peer, host):
        host_app = spawn_program(["hold-transaction", READER], pcscd_rig.socket_path)
        try:
            await trio.to_thread.run_sync(expect_line, host_app, "LOCKED")
            async with trio.open_nursery() as nursery:
                held: list[Response] = []

                async def connect(h_context: int) -> None:
                    held.append(await peer.call(Connect(h_context, h_context + 100, READER, 2, 3)))

                for h_context in range(1, 5):
                    nursery.start_soon(connect, h_context)
                    await trio.sleep(0.2)  # now waiting in pcscd
                    assert (await peer.call(ReleaseContext(h_context))).rv == 0
                with trio.fail_after(5):  # not held in pcscd: refused at once
                    refused = await peer.call(Connect(5, 105, READER, 2, 3))
                assert refused.rv == ReturnCode.SCARD_E_NO_MEMORY, refused
                assert not held, "pcscd let a connect through during the transaction"
                host_app.stdin.write("\n")  # type: ignore[union-attr]
                host_app.stdin.flush()  # type: ignore[union-attr]
                await trio.to_thread.run_sync(expect_line, host_app, "UNLOCKED")
            # The held connects returned and their contexts were released: room again.
            with trio.fail_after(10):
                while (again := await peer.call(Connect(6, 106, READER, 2, 3))).rv:
                    assert again.rv == ReturnCode.SCARD_E_NO_MEMORY, again
                    await trio.sleep(0.1)
        finally:
            finish(host_app)
        assert host.alive(), host.log
