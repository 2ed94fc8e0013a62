"""Fuzz the live guest socket: a real `pcscbridge guest` with a real `pcscbridge host` attached,
serving the rig's pcscd (vpcd readers, the project's test card in two of them).

A batch runs many client connections at once (pcscbridge/pcsclite_cases.py: every command and
dialect, checked answers, then a hostile ending). After each batch, with every connection
closed: both processes alive, no internal error in their logs, guest and host hold nothing
(status counters back to zero), a healthy raw client and a pyscard client get right answers
from the test card, and memory is sampled. The card in the third reader comes and goes
between batches.
"""

from __future__ import annotations

import itertools
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from rig.bridge_processes import Bridge
from rig.pcscd_rig import PcscdRig

from .pcsclite_cases import Closed, FuzzConnection, Hang, Shared, Wire, WrongAnswer
from .watch import (
    Figures,
    Watched,
    check_processes,
    guest_leftovers,
    healthy,
    host_leftovers,
    pyscard_echo,
    raw_echo,
    settle,
)

CARD_SLOTS = (0, 2)  # readers with the test card; the one in slot 2 comes and goes
TOGGLED_SLOT = 2
DETACHED = 400  # connections waiting for the guest to hang up on a misused handle
SETTLE_TIMEOUT = 30.0


@dataclass
class FuzzOptions:
    cases: int
    duration: float | None
    batch_cases: int
    workers: int
    seed: int
    first_batch: int = 0
    batches: int | None = None
    folder: Path | None = None
    verbose: bool = False


@contextmanager
def rig_and_bridge(options: FuzzOptions) -> Iterator[tuple[PcscdRig, Bridge]]:
    """The rig (the test card in CARD_SLOTS) and a Bridge not started yet; with --keep, the
    logs (pcscd's with -d when verbose) stay in that folder."""
    keep = options.folder
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    rig_options = (
        {"debug": options.verbose, "keep_dir": True, "base_dir": str(keep)} if keep else {}
    )
    with (
        tempfile.TemporaryDirectory(prefix="stress-") as scratch,
        PcscdRig(2, **rig_options) as rig,  # type: ignore[arg-type]
    ):
        for slot in CARD_SLOTS:
            rig.insert_card(slot)
        yield rig, Bridge(Path(keep or scratch), rig.socket_path, verbose=False)


def run(options: FuzzOptions) -> Figures:
    figures = Figures("guest socket", options.seed)
    with rig_and_bridge(options) as (rig, bridge):
        try:
            bridge.start_guest(
                ["--max-clients", "2000"], prefix=["prlimit", "--nofile=8192:8192", "--"]
            )
            bridge.start_host()
            bridge.wait_for_readers(rig.reader_names)
            _batches(options, figures, rig, bridge)
        finally:
            bridge.stop()
            print(f"logs: {bridge.folder}" if options.folder else "", end="")
    return figures


def _batches(options: FuzzOptions, figures: Figures, rig: PcscdRig, bridge: Bridge) -> None:
    assert bridge.guest is not None and bridge.host is not None
    watched = [Watched.of(bridge.guest), Watched.of(bridge.host)]
    deadline = time.monotonic() + options.duration if options.duration else None
    for batch in itertools.count(options.first_batch):
        if figures.cases >= options.cases or (deadline and time.monotonic() > deadline):
            break
        if options.batches is not None and figures.batches >= options.batches:
            break
        budget = min(options.batch_cases, options.cases - figures.cases)
        shared = Shared(
            readers_with_card=[rig.reader_names[slot] for slot in sorted(rig.cards)],
            empty_readers=[n for i, n in enumerate(rig.reader_names) if i not in rig.cards],
        )
        started = time.monotonic()
        trio.run(_batch, options, figures, bridge.socket_path, shared, batch, budget)
        figures.batches += 1
        if not check_processes(figures, watched, batch):
            break
        _after_batch(figures, bridge, rig, batch)
        rss = {item.name: figures.rss.get(item.name, [0])[-1] // 1024 for item in watched}
        print(
            f"batch {batch}: {figures.cases:,} cases ({time.monotonic() - started:.1f} s), "
            f"RSS guest {rss['guest']} MiB host {rss['host']} MiB, crashes "
            f"{len(figures.crashes)} hangs {len(figures.hangs)} failures {len(figures.failures)}",
            flush=True,
        )


def _after_batch(figures: Figures, bridge: Bridge, rig: PcscdRig, batch: int) -> None:
    for role, leftovers in (("guest", guest_leftovers), ("host", host_leftovers)):
        held = settle(lambda role=role: bridge.status(role), leftovers, SETTLE_TIMEOUT)
        if held:
            figures.note("failures", f"{role} still holds {held} after the batch", batch)
    reader = rig.reader_names[0]
    healthy(
        figures,
        batch,
        [
            ("raw client", raw_echo(bridge.socket_path, reader, f"healthy {batch}")),
            ("pyscard", pyscard_echo(bridge.socket_path, reader, f"healthy-{batch}")),
        ],
    )
    if TOGGLED_SLOT in rig.cards:
        rig.remove_card(TOGGLED_SLOT)
    else:
        rig.insert_card(TOGGLED_SLOT)


async def _batch(
    options: FuzzOptions,
    figures: Figures,
    socket_path: str,
    shared: Shared,
    batch: int,
    budget: int,
) -> None:
    numbers = itertools.count()
    spent = 0
    detached = trio.Semaphore(DETACHED)

    def note(kind: str, what: str) -> None:
        figures.note(kind, what, batch)
        if options.verbose:
            print(f"{kind}: {what}", flush=True)

    async def hung_up(wait: Callable[[], Awaitable[None]], wire: Wire, label: str) -> None:
        try:
            await wait()
        except Hang as exc:
            note("hangs", f"connection {label}: {exc}")
        except WrongAnswer as exc:
            note("failures", f"connection {label}: {exc}")
        finally:
            await wire.aclose()
            detached.release()

    async def worker(nursery: trio.Nursery) -> None:
        nonlocal spent
        while spent < budget:
            number = next(numbers)
            label = f"{batch}.{number}"
            rng = random.Random(f"{options.seed}:{label}")
            wire = Wire(await trio.open_unix_socket(socket_path))
            connection = FuzzConnection(rng, shared, wire, label)
            shared.active[label] = connection
            follow_up = None
            try:
                _, follow_up = await connection.run(rng.choice((0, 1, 2, 4, 8, 16, 32)))
            except Closed as exc:
                note("failures", f"connection {label}: closed after {connection.last}: {exc}")
            except Hang as exc:
                note(
                    "hangs",
                    f"connection {label}: no answer to {connection.last}: {exc}\n"
                    + connection.holders(),
                )
            except WrongAnswer as exc:
                note("failures", f"connection {label}: {exc}")
            finally:
                del shared.active[label]
                spent += connection.cases
                figures.cases += connection.cases
                figures.kinds.update(connection.kinds)
            if follow_up is not None:
                await detached.acquire()
                nursery.start_soon(hung_up, follow_up, wire, label)
            else:
                await wire.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(options.workers):
            nursery.start_soon(worker, nursery)
