"""A refused local client is closed as pcscd closes one polkit refuses, so libpcsclite says
"Access denied": only once its whole first request has arrived, never read."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
import trio
import trio.testing

from pcscbridge.guest.access import refuse

CMD_VERSION = 0x11
HEADER = struct.pack("=II", 12, CMD_VERSION)
VERSION_BODY = struct.pack("=iiI", 4, 4, 0)


async def _refuse_client_sending(pieces: list[bytes], pause: float) -> OSError | bytes:
    """What the client's read ends in after sending `pieces` `pause` seconds apart while
    the server refuses it."""
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(server))
    outcome: OSError | bytes = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse, stream)
        try:
            for piece in pieces:
                client.sendall(piece)
                await trio.sleep(pause)
            outcome = await trio.to_thread.run_sync(client.recv, 16)
        except OSError as error:
            outcome = error
        finally:
            client.close()
    return outcome


def test_closed_after_the_whole_first_request_so_the_client_reads_a_reset() -> None:
    # libpcsclite writes the header and the body apart: a close after the header alone fails
    # its second write (EPIPE: SCARD_E_NO_SERVICE); after both, its read gets ECONNRESET
    # (SCARD_W_SECURITY_VIOLATION), as with pcscd.
    outcome = trio.run(_refuse_client_sending, [HEADER, VERSION_BODY], 0.05)
    assert isinstance(outcome, ConnectionResetError), outcome


def test_a_client_that_hangs_up_first_is_closed_at_once() -> None:
    async def main() -> None:
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client.sendall(HEADER)
        client.close()
        with trio.fail_after(1):  # not REFUSAL_WAIT
            await refuse(trio.SocketStream(trio.socket.from_stdlib_socket(server)))

    trio.run(main)


@pytest.mark.parametrize("sent", [b"", HEADER])
def test_a_silent_or_stalled_client_is_closed_after_the_wait(sent: bytes) -> None:
    async def main() -> None:
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client.sendall(sent)
        clock_started = trio.current_time()
        await refuse(trio.SocketStream(trio.socket.from_stdlib_socket(server)))
        assert trio.current_time() - clock_started >= 5.0
        try:
            assert client.recv(16) == b""
        except OSError as error:
            assert error.errno == errno.ECONNRESET
        client.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
