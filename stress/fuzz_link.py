"""Fuzz the host agent's link: a real `pcscbridge host` serving the rig's pcscd, dialling a link
this program accepts and answers as a hostile guest (stress/link_cases.py).

A batch is one link: a healthy call through the host first, then many virtual guest contexts
at once, ping floods, calls of the wrong shape; the link then ends abruptly, cleanly, with a
frame that must close it, or with a flood that is never read (the host must hang up). After
each link, with the host redialling: alive, no internal error logged, nothing held (status),
and a raw client and pyscard on the host's pcscd get the card exclusively and right answers.
Each link lives STABLE seconds at least, so the host's redial backoff stays at its first step.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time

import trio

from pcscbridge.link.calls import (
    BeginTransaction,
    Connect,
    Disconnect,
    EndTransaction,
    Ping,
    ReleaseContext,
    Transmit,
)
from pcscbridge.link.protocol import Hello, LinkConnection, LinkProtocolError, Request, encode
from pcscbridge.transports.endpoints import unix_listener
from rig.bridge_processes import Bridge
from rig.pcscd_rig import PcscdRig

from .fuzz_guest import SETTLE_TIMEOUT, FuzzOptions, rig_and_bridge
from .link_cases import (
    Handles,
    Hang,
    LinkClosedByHost,
    LinkDriver,
    VirtualContext,
    WrongAnswer,
    echo_apdu,
    fatal_frame,
    frame,
)
from .watch import (
    Figures,
    Watched,
    check_processes,
    healthy,
    host_leftovers,
    pyscard_echo,
    raw_echo,
    settle,
)

STABLE = 10.5  # runner.STABLE_AFTER: a link that lived longer resets the redial backoff
SHARE_EXCLUSIVE = 1


def run(options: FuzzOptions) -> Figures:
    figures = Figures("host link", options.seed)
    with rig_and_bridge(options) as (rig, bridge):
        listener_path = bridge.link.removeprefix("unix:")
        try:
            trio.run(_serve, options, figures, bridge, rig, listener_path)
        finally:
            bridge.stop()
    return figures


async def _serve(
    options: FuzzOptions, figures: Figures, bridge: Bridge, rig: PcscdRig, path: str
) -> None:
    listener = await unix_listener(path, 0o600)
    host = bridge.start_host(["--link-write-timeout", "5"])
    watched = [Watched.of(host)]
    deadline = time.monotonic() + options.duration if options.duration else None
    async with listener:
        for batch in itertools.count(options.first_batch):
            if figures.cases >= options.cases or (deadline and time.monotonic() > deadline):
                break
            if options.batches is not None and figures.batches >= options.batches:
                break
            rng = random.Random(f"{options.seed}:{batch}")
            with trio.move_on_after(30) as waited:
                stream = await listener.accept()
            if waited.cancelled_caught:
                figures.note("hangs", "the host did not dial again within 30 s", batch)
                break
            budget = min(options.batch_cases, options.cases - figures.cases)
            started = time.monotonic()
            try:
                await _link(options, figures, rig, stream, rng, batch, budget)
            except LinkClosedByHost:
                continue  # a dial from while the last link was checked, given up: not a case
            figures.batches += 1
            if not await trio.to_thread.run_sync(_after_link, figures, watched, bridge, rig, batch):
                break
            print(
                f"batch {batch}: {figures.cases:,} cases ({time.monotonic() - started:.1f} s), "
                f"RSS host {figures.rss.get('host', [0])[-1] // 1024} MiB, crashes "
                f"{len(figures.crashes)} hangs {len(figures.hangs)} failures "
                f"{len(figures.failures)}",
                flush=True,
            )


def _after_link(
    figures: Figures, watched: list[Watched], bridge: Bridge, rig: PcscdRig, batch: int
) -> bool:
    if not check_processes(figures, watched, batch):
        return False
    held = settle(lambda: bridge.status("host"), host_leftovers, SETTLE_TIMEOUT)
    if held:
        figures.note("failures", f"host still holds {held} after the link ended", batch)
    reader = rig.reader_names[0]
    healthy(
        figures,
        batch,
        [
            (
                "raw client, exclusive, on the host's pcscd",
                raw_echo(rig.socket_path, reader, f"host app {batch}", SHARE_EXCLUSIVE),
            ),
            ("pyscard on the host's pcscd", pyscard_echo(rig.socket_path, reader, f"h{batch}")),
        ],
    )
    return True


async def _link(
    options: FuzzOptions,
    figures: Figures,
    rig: PcscdRig,
    stream: trio.SocketStream,
    rng: random.Random,
    batch: int,
    budget: int,
) -> None:
    driver = LinkDriver(stream)

    def note(kind: str, what: str) -> None:
        figures.note(kind, what, batch)
        if options.verbose:
            print(f"{kind}: {what}", flush=True)

    try:
        if rng.random() < 0.03:
            await _bad_opening(driver, rng, note)
            return
        await driver.send(encode(Hello("guest", software="stress")))
        await _session(driver, rng, rig, budget, note)
    finally:
        figures.cases += driver.kinds.total()
        figures.kinds.update(driver.kinds)
        await trio.aclose_forcefully(stream)


async def _bad_opening(driver: LinkDriver, rng: random.Random, note) -> None:  # type: ignore[no-untyped-def]
    """Garbage or a wrong hello first: the host must close the link."""
    data = rng.choice(
        (
            rng.randbytes(64),
            encode(Hello("host")),
            encode(Hello("guest", protocol=9)),
            encode(Hello("guest", max_message_size=10)),
            frame([1, 1, "ping", []]),
        )
    )
    driver.kinds["bad_opening"] += 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.read_loop)
        with contextlib.suppress(LinkClosedByHost):
            await driver.send(data)
        with trio.move_on_after(15):
            await driver.closed.wait()
        if not driver.closed.is_set():
            note("hangs", f"the host kept a link that opened with {data[:40]!r}")
        nursery.cancel_scope.cancel()


async def _session(driver: LinkDriver, rng: random.Random, rig: PcscdRig, budget: int, note) -> str:  # type: ignore[no-untyped-def]
    readers = rig.reader_names
    handles = Handles()
    ending = "close"
    started = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def reading() -> None:
            try:
                await driver.read_loop()
            except WrongAnswer as exc:
                note("failures", str(exc))

        nursery.start_soon(reading)
        try:
            await _through_the_host(driver, readers[0])
        except (WrongAnswer, Hang, LinkClosedByHost) as exc:
            note("failures", f"healthy call through the host: {exc}")
            nursery.cancel_scope.cancel()
            return ending

        async def context_task(number: int) -> None:
            context = VirtualContext(
                random.Random(f"{rng.random()}:{number}"), driver, handles, readers
            )
            while driver.kinds.total() < budget or trio.current_time() - started < STABLE:
                try:
                    await context.run(rng.randint(1, 20))
                except (WrongAnswer, Hang) as exc:
                    note("hangs" if isinstance(exc, Hang) else "failures", f"context: {exc}")
                    return
                except LinkClosedByHost:
                    return

        async def ping_floods() -> None:
            while driver.kinds.total() < budget:
                await trio.sleep(rng.random() * 2)
                count = rng.choice((100, 1000, 3000))
                data = b"".join(encode(Request(driver.new_id(), Ping())) for _ in range(count))
                driver.kinds["flood"] += count
                try:
                    await driver.send(data)  # answered on the side: ids nobody waits for
                except LinkClosedByHost:
                    return

        async with trio.open_nursery() as workers:
            for number in range(rng.choice((4, 16, 32))):
                workers.start_soon(context_task, number)
            workers.start_soon(ping_floods)
        ending = await _ending(driver, rng, note)
        nursery.cancel_scope.cancel()
    return ending


async def _through_the_host(driver: LinkDriver, reader: str) -> None:
    """The host serves a well-behaved guest: connect, ECHO, disconnect, release."""
    h_context, h_card = 0x7000_0001, 0x7000_0002
    rv, _ = await driver.call(Connect(h_context, h_card, reader, 2, 3))
    if rv:
        raise WrongAnswer(f"connect through the host: 0x{rv:08X}")
    data = b"healthy through the host"
    rv, answer = await driver.call(Transmit(h_card, 2, echo_apdu(data)))
    if rv or answer != data + b"\x90\x00":
        raise WrongAnswer(f"echo through the host: 0x{rv:08X} {answer!r}")
    for call in (
        BeginTransaction(h_card),
        EndTransaction(h_card, 0),
        Disconnect(h_card, 0),
        ReleaseContext(h_context),
    ):
        rv, _ = await driver.call(call)
        if rv:
            raise WrongAnswer(f"{call.method} through the host: 0x{rv:08X}")


async def _ending(driver: LinkDriver, rng: random.Random, note) -> str:  # type: ignore[no-untyped-def]
    """How the link ends; the host must close it itself after a fatal frame or a flood it
    cannot deliver."""
    roll = rng.random()
    if roll < 0.3:
        kind = "close"  # abrupt: whatever the contexts hold is released by the host
        with contextlib.suppress(WrongAnswer, Hang, LinkClosedByHost):
            # and a transaction held at the end (the exclusive healthy check shows it freed)
            await driver.call(Connect(0x7000_0005, 0x7000_0006, "Virtual PCD 00 00", 2, 3))
            await driver.call(BeginTransaction(0x7000_0006), timeout=60)
    elif roll < 0.8:
        kind, data = fatal_frame(rng)
        expect_close = kind != "fatal_mutated" or _is_fatal(data)
        await _expect_close(driver, data, expect_close, kind, note)
    else:
        kind = "flood_unread"
        await _flood_unread(driver, note)
    driver.kinds[kind] += 1
    return kind


async def _flood_unread(driver: LinkDriver, note) -> None:  # type: ignore[no-untyped-def]
    """Pings and 4 KiB answers asked for, nothing read: the host must hang up (its outbox
    limit or write timeout), which shows as a failed send here."""
    driver.reading.set()  # the read loop stops reading
    opened = encode(Request(1, Connect(0x7000_0004, 0x7000_0003, "Virtual PCD 00 00", 2, 3)))
    big = encode(Request(0, Transmit(0x7000_0003, 2, bytes.fromhex("80121000"))))
    chunk = (big + encode(Request(0, Ping()))) * 200
    with trio.move_on_after(90):
        try:
            await driver.send(opened)
            while True:
                await driver.send(chunk)
                driver.kinds["flood"] += 400
        except LinkClosedByHost:
            return
    note("hangs", "the host kept a link that never read for 90 s")


def _is_fatal(data: bytes) -> bool:
    connection = LinkConnection()
    connection.receive_data(data)
    try:
        message = connection.next_message()
    except LinkProtocolError:
        return True
    return not isinstance(message, Request)


async def _expect_close(  # type: ignore[no-untyped-def]
    driver: LinkDriver, data: bytes, expect_close: bool, kind: str, note
) -> None:
    try:
        await driver.send(data)
    except LinkClosedByHost:
        return
    if not expect_close:
        return
    with trio.move_on_after(30):
        await driver.closed.wait()
    if not driver.closed.is_set():
        note("hangs", f"the host kept the link open after {kind}")
