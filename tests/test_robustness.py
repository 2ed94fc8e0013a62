"""Hard to break: what a client or a link peer can do to the bridge, on the real rig.

Each test reproduces a way the bridge broke before (issue "hard to break", findings 1-8): the
guest server killed by running out of file descriptors, memory without bound from peers that
never read, a deadlock pcscd does not have, the host's own use of a card invisible in the guest.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pcscbridge.link.calls import Ping
from pcscbridge.link.protocol import Hello, Request, encode
from pcscbridge.pcsc import State
from pcscbridge.pcsclite.messages import CancelBody, Command, WaitBody, encode_request
from pcscbridge.testing.rawclient import RawClient
from rig.bridge_processes import Bridge, BridgeProcess
from rig.pcscd_rig import PcscdRig, pcsc_client_env, run_pyscard
from rig.service import wait_until

READER = "Virtual PCD 00 00"


def healthy(socket_path: str) -> bool:
    """A client can still talk to the guest server."""
    with RawClient(socket_path, timeout=5) as client:
        return client.version().rv == 0 and client.establish().rv == 0


# --- finding 1: file descriptors and the number of clients ----------------------------------


def test_the_guest_survives_running_out_of_file_descriptors(tmp_path: Path) -> None:
    bridge = Bridge(tmp_path, None, backend="sim")
    guest = bridge.start_guest(prefix=["prlimit", "--nofile=64:64", "--"])
    sockets = []
    try:
        for _ in range(300):  # far beyond 64: accept() fails with EMFILE for a while
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(bridge.socket_path)
            except OSError:
                sock.close()
                break  # the listen backlog is full too
            sockets.append(sock)
        wait_until(lambda: "cannot accept" in guest.log, 10, "the accept failure's log line")
        assert guest.alive(), guest.log
    finally:
        for sock in sockets:
            sock.close()
    wait_until(lambda: healthy(bridge.socket_path), 10, "a client served again")
    assert guest.alive()
    bridge.stop()
    assert "Traceback" not in guest.log


def test_clients_beyond_max_clients_are_closed_and_others_served(tmp_path: Path) -> None:
    bridge = Bridge(tmp_path, None, backend="sim")
    guest = bridge.start_guest(["--max-clients", "5"])
    clients = [RawClient(bridge.socket_path) for _ in range(5)]
    try:
        for client in clients:
            assert client.version().rv == 0
        with RawClient(bridge.socket_path) as refused:
            assert refused.closed_by_peer()
        clients.pop().close()
        wait_until(lambda: healthy(bridge.socket_path), 10, "room for one more client")
        assert "closing new ones" in guest.log
    finally:
        for client in clients:
            client.close()
        bridge.stop()


# --- finding 3: peers that never read ---------------------------------------------------------


def test_a_client_that_never_reads_its_event_signals_is_closed(tmp_path: Path) -> None:
    """One connection registers for events in the 4.2 form (no reply) again and again and never
    reads; another cancels its wait each time. Every cancel is an 8-byte signal for the first:
    once more than --max-unread waits, it is disconnected, and memory stays bounded."""
    bridge = Bridge(tmp_path, None, backend="sim")
    guest = bridge.start_guest(["--max-unread", "65536"])
    rss_before = guest.rss_kib()
    deaf = RawClient(bridge.socket_path)
    deaf.version(4, 2)
    h_context = deaf.establish().h_context
    wait = encode_request(Command.CMD_WAIT_READER_STATE_CHANGE, WaitBody(0, 0))
    cancel = encode_request(Command.SCARD_CANCEL, CancelBody(h_context, 0))
    stop = threading.Event()

    def register_forever() -> None:
        with pytest.raises(OSError):  # the guest hangs up on it
            while not stop.is_set():
                deaf.send(wait * 64)

    registering = threading.Thread(target=register_forever, daemon=True)
    registering.start()
    try:
        with RawClient(bridge.socket_path) as canceller:
            deadline = time.monotonic() + 60
            while "wait to be read" not in guest.log:
                assert time.monotonic() < deadline, "the deaf client was never closed"
                for _ in range(200):
                    canceller.send(cancel)
                    canceller.receive(8)
        stop.set()
        registering.join(10)
        assert not registering.is_alive()
        assert healthy(bridge.socket_path)
        assert guest.alive()
        # Bounded: the unread signals were dropped with the connection (before the fix, one
        # task per signal piled up: hundreds of MB within a minute).
        assert guest.rss_kib() - rss_before < 64 * 1024
    finally:
        stop.set()
        deaf.close()
        bridge.stop()
    assert "Traceback" not in guest.log


def test_a_link_peer_that_floods_pings_and_never_reads_is_dropped(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    link_path = str(tmp_path / "link.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(link_path)
    listener.listen(4)
    listener.settimeout(15)
    host = BridgeProcess(
        "host",
        ["host", "--connect", f"unix:{link_path}", "--link-write-timeout", "2"],
        tmp_path / "host.log",
        {**os.environ, "PCSCLITE_CSOCK_NAME": pcscd_rig.socket_path},
    )
    try:
        flooder, _ = listener.accept()
        flooder.sendall(encode(Hello("guest")))
        flooder.settimeout(30)
        pings = b"".join(encode(Request(n, Ping())) for n in range(1, 2001))
        rss_before = host.rss_kib()
        with pytest.raises(OSError):  # the host hangs up: EPIPE or ECONNRESET
            for _ in range(10_000):
                flooder.sendall(pings)
        flooder.close()
        assert "nothing read for 2 s" in host.log
        assert host.rss_kib() - rss_before < 64 * 1024
        # The host lives on and dials again.
        again, _ = listener.accept()
        again.close()
        assert host.alive()
    finally:
        listener.close()
        host.stop()
    assert "Traceback" not in host.log


# --- finding 4: two threads of one context, one holding a transaction -------------------------

RECONNECT_BEHIND_OWN_TRANSACTION = """
import sys, threading, time
from smartcard import scard
reader = sys.argv[1]
_, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
_, h1, _ = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1)
_, h2, _ = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1)
assert scard.SCardBeginTransaction(h1) == 0
results = {}
def second(name, call):
    results[name] = call()
calls = {
    "reconnect": lambda: scard.SCardReconnect(
        h2, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1, scard.SCARD_LEAVE_CARD)[0],
    "begin": lambda: scard.SCardBeginTransaction(h2),
}
threads = [threading.Thread(target=second, args=item, daemon=True) for item in calls.items()]
for thread in threads:
    thread.start()
time.sleep(0.5)  # both wait behind h1's transaction
print("end", scard.SCardEndTransaction(h1, scard.SCARD_LEAVE_CARD), flush=True)
for thread in threads:
    thread.join(20)
print("second", sorted(results.items()), flush=True)
"""


def test_a_second_thread_waiting_behind_its_own_contexts_transaction_does_not_deadlock(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    direct = run_pyscard(RECONNECT_BEHIND_OWN_TRANSACTION, pcscd_rig.socket_path, READER)
    assert direct.stdout.splitlines()[-1] == "second [('begin', 0), ('reconnect', 0)]", direct
    with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
        bridge.start(expected_readers=pcscd_rig.reader_names)
        bridged = run_pyscard(
            RECONNECT_BEHIND_OWN_TRANSACTION, bridge.socket_path, READER, timeout=40
        )
        assert bridged.stdout == direct.stdout, (bridged, bridge.logs())


HOLD_AND_WAIT = """
import sys, threading
from smartcard import scard
reader = sys.argv[1]
_, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
_, h1, _ = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1)
_, h2, _ = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1)
assert scard.SCardBeginTransaction(h1) == 0
waiter = threading.Thread(target=scard.SCardBeginTransaction, args=(h2,), daemon=True)
waiter.start()
print("HOLDING", flush=True)
sys.stdin.readline()
"""

HOST_APP_TAKES_THE_CARD = """
import sys, time
from smartcard import scard
reader = sys.argv[1]
_, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
started = time.monotonic()
_, card, _ = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1)
rv = scard.SCardBeginTransaction(card)
print(rv, round(time.monotonic() - started, 2), flush=True)
"""


def test_a_guest_app_killed_while_holding_a_transaction_frees_the_card_for_the_host(
    pcscd_rig: PcscdRig, tmp_path: Path
) -> None:
    with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
        bridge.start(expected_readers=pcscd_rig.reader_names)
        app = subprocess.Popen(
            [sys.executable, "-c", HOLD_AND_WAIT, READER],
            env=pcsc_client_env(bridge.socket_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "HOLDING"
        time.sleep(0.3)  # its second thread now waits behind its own transaction
        app.kill()
        app.wait()
        taken = run_pyscard(HOST_APP_TAKES_THE_CARD, pcscd_rig.socket_path, READER, timeout=20)
        rv, seconds = taken.stdout.split()
        assert int(rv) == 0, (taken, bridge.logs())
        assert float(seconds) < 2.0, (taken, bridge.logs())
        # Nothing of the dead app is left on either side.
        wait_until(lambda: nothing_held(bridge), 10, "the guest's resources gone")


def nothing_held(bridge: Bridge) -> bool:
    guest, host = bridge.status("guest")["guest"], bridge.status("host")["service"]
    return (guest["contexts"], guest["card_handles"]) == (0, 0) and (
        host["host_contexts"],
        host["card_handles"],
        host["transactions_held"],
        host["context_threads"],
    ) == (0, 0, 0, 0)


# --- finding 7: the host's own use of a card ---------------------------------------------------

HOLD_CARD = """
import sys
from smartcard import scard
reader, mode = sys.argv[1], int(sys.argv[2])
_, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
rv, card, _ = scard.SCardConnect(ctx, reader, mode, scard.SCARD_PROTOCOL_T1)
print("CONNECTED", rv, flush=True)
sys.stdin.readline()
"""

EVENT_STATE = """
import sys
from smartcard import scard
_, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
rv, states = scard.SCardGetStatusChange(ctx, 0, [(sys.argv[1], scard.SCARD_STATE_UNAWARE)])
print(states[0][1])
"""


@pytest.mark.parametrize(("mode", "bit"), [(2, State.INUSE), (1, State.EXCLUSIVE)])
def test_the_host_applications_use_of_a_card_shows_in_the_guest(
    pcscd_rig: PcscdRig, tmp_path: Path, mode: int, bit: State
) -> None:
    def event_state(socket_path: str) -> int:
        return int(run_pyscard(EVENT_STATE, socket_path, READER).stdout)

    with Bridge(tmp_path, pcscd_rig.socket_path) as bridge:
        bridge.start(expected_readers=pcscd_rig.reader_names)
        assert not event_state(bridge.socket_path) & bit
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_CARD, READER, str(mode)],
            env=pcsc_client_env(pcscd_rig.socket_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().split() == ["CONNECTED", "0"]
            direct = event_state(pcscd_rig.socket_path)
            assert direct & bit
            wait_until(
                lambda: event_state(bridge.socket_path) == direct, 10, "the host's use shown"
            )
        finally:
            holder.kill()
            holder.wait()
        wait_until(lambda: not event_state(bridge.socket_path) & bit, 10, "the reader free again")
