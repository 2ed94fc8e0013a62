"""Under concurrency the bridge sends a libpcsclite client nothing but the replies it asked for.

Ten threads of one client, each on its own context, connect, transmit, wait for events, cancel
each other's waits and release their contexts; every connection is recorded by a relay in front
of the server and checked byte by byte (rig/conformance.py): no reply to another request, none
after the release, no signal outside a wait. The same run against pcscd itself validates the
checker.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from rig.bridge_processes import Bridge
from rig.conformance import check_connection
from rig.pcscd_rig import PcscdRig, pcsc_client_env
from rig.relay import C2S, LoggingRelay

READER = "Virtual PCD 00 00"

CONCURRENT_CLIENT = """
import random, sys, threading, time
from smartcard import scard
reader, rounds = sys.argv[1], int(sys.argv[2])
waiting = {}
failures = []
cancelled = []
SELECT = [0x00, 0xA4, 0x00, 0x0C, 0x02, 0x3F, 0x00]

def worker(n):
    rnd = random.Random(n)
    for _ in range(rounds):
        rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if rv:
            failures.append(("establish", hex(rv)))
            continue
        for _ in range(rnd.randint(0, 3)):
            rv, card, _ = scard.SCardConnect(
                ctx, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1)
            if rv == 0:
                rv, response = scard.SCardTransmit(card, scard.SCARD_PCI_T1, SELECT)
                if rv == 0 and response[-2:] != [0x90, 0x00]:
                    failures.append(("transmit", response))
                scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
        if rnd.random() < 0.5:
            waiting[n] = ctx
            rv, _ = scard.SCardGetStatusChange(ctx, rnd.choice([0, 100, 300]), [(reader, 0x20)])
            waiting.pop(n, None)
            if rv == scard.SCARD_E_CANCELLED:
                cancelled.append(n)
        rv = scard.SCardReleaseContext(ctx)
        if rv:
            failures.append(("release", hex(rv)))

def canceller():
    rnd = random.Random(99)
    while any(thread.is_alive() for thread in workers):
        contexts = list(waiting.values())
        if contexts:
            scard.SCardCancel(rnd.choice(contexts))  # its wait may be over: any rv
        time.sleep(0.01)

workers = [threading.Thread(target=worker, args=(n,)) for n in range(10)]
for thread in workers:
    thread.start()
canceller()
for thread in workers:
    thread.join()
print("failures", failures)
print("cancelled", len(cancelled))
"""


def run_recorded(server_socket: str, folder: Path) -> dict[int, dict[str, bytes]]:
    relay = LoggingRelay(str(folder / "relay.comm"), server_socket)
    with relay:
        client = subprocess.run(
            [sys.executable, "-c", CONCURRENT_CLIENT, READER, "20"],
            env=pcsc_client_env(relay.listen_path),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert client.returncode == 0, client
        failures, cancelled = client.stdout.splitlines()
        assert failures == "failures []", client
        assert int(cancelled.split()[1]) > 0, client  # waits were cancelled, too
        relay.wait_idle()
        chunks, _ = relay.take()
    streams: dict[int, dict[str, bytes]] = defaultdict(lambda: defaultdict(bytes))
    for chunk in chunks:
        streams[chunk.conn][chunk.direction] += chunk.data
    return streams


def problems(streams: dict[int, dict[str, bytes]]) -> list[str]:
    found = []
    for conn, stream in sorted(streams.items()):
        for problem in check_connection(stream[C2S], stream["s2c"]):
            found.append(f"connection {conn}: {problem}")
    return found


@pytest.mark.parametrize("target", ["pcscd", "bridge"])
def test_concurrent_clients_get_exactly_their_replies(
    pcscd_rig: PcscdRig, tmp_path: Path, target: str
) -> None:
    if target == "pcscd":
        streams = run_recorded(pcscd_rig.socket_path, tmp_path)
    else:
        with Bridge(tmp_path / "bridge", pcscd_rig.socket_path) as bridge:
            bridge.start(expected_readers=pcscd_rig.reader_names)
            streams = run_recorded(bridge.socket_path, tmp_path)
    assert len(streams) > 200  # one connection per context, and SCardCancel's own
    assert problems(streams) == []


def test_the_checker_finds_a_reply_to_another_request() -> None:
    from pcscbridge.pcsclite.messages import (
        CardBody,
        Command,
        EstablishBody,
        VersionBody,
        encode_reply,
        encode_request,
    )

    c2s = (
        encode_request(Command.CMD_VERSION, VersionBody(4, 4, 0))
        + encode_request(Command.SCARD_ESTABLISH_CONTEXT, EstablishBody(2, 0, 0))
        + encode_request(Command.SCARD_STATUS, CardBody(7, 0))
    )
    good = (
        encode_reply(VersionBody(4, 4, 0))
        + encode_reply(EstablishBody(2, 5, 0))
        + encode_reply(CardBody(7, 0))
    )
    assert check_connection(c2s, good) == []
    wrong_handle = good[:-8] + encode_reply(CardBody(8, 0))
    assert "a reply to another request" in check_connection(c2s, wrong_handle)[0]
    assert "sent after the last reply" in check_connection(c2s, good + bytes(8))[0]
