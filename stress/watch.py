"""What every stress run watches: the processes under test, their logs, memory and counters, and a
healthy client after every batch; and the figures it reports."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcscbridge.pcsc import ReturnCode
from pcscbridge.testing.rawclient import RawClient
from rig.bridge_processes import BridgeProcess
from rig.pcscd_rig import pcsc_client_env

KNOWN_RV = frozenset(int(rv) for rv in ReturnCode)
ECHO = bytes.fromhex("80100000")
# Log lines that mean the process itself failed, not just a connection it closed.
PROBLEM_MARKS = ("Traceback", " ERROR: ", " CRITICAL: ", "internal error")


def echo_apdu(data: bytes) -> bytes:
    return ECHO + bytes([len(data)]) + data


def random_apdu(rng: random.Random) -> bytes:
    """Random bytes to transmit, of 2 bytes or more: vpcd passes a 1-byte APDU to the card as
    a control code (power, reset, ATR), which leaves the reader waiting for an answer for ever,
    with pcscd as without the bridge. The test card's DELAY instruction is left out too."""
    apdu = bytearray(rng.randbytes(rng.choice((2, 4, 5, 7, rng.randint(2, 300)))))
    if apdu[0] == 0x80 and apdu[1] == 0x16:
        apdu[1] = 0x10
    return bytes(apdu)


class LogWatch:
    """New problem lines in a process's log since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def problems(self) -> list[str]:
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return []
        # Only whole lines: a line still being written is looked at next time.
        complete = text[: text.rfind("\n") + 1]
        self._offset += len(complete.encode(errors="replace"))
        lines = complete.splitlines()
        found = []
        for index, line in enumerate(lines):
            if any(mark in line for mark in PROBLEM_MARKS):
                found.append("\n".join(lines[index : index + 12]))
        return found


@dataclass
class Watched:
    """A process under test: it must stay alive, log no problem and keep its memory flat."""

    process: BridgeProcess
    log: LogWatch
    rss_kib: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, process: BridgeProcess) -> Watched:
        return cls(process, LogWatch(process.log_path))

    @property
    def name(self) -> str:
        return self.process.name


@dataclass
class Figures:
    """What a run found. `crashes`: a process died or logged an internal error; `hangs`: an
    answer, a close or a settled counter that never came; `failures`: wrong or mismatched
    answers, leaks, a healthy client that failed."""

    target: str
    seed: int
    cases: int = 0
    batches: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    healthy_checks: int = 0
    rss: dict[str, list[int]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.hangs or self.failures)

    def note(self, kind: str, what: str, batch: int) -> None:
        getattr(self, kind).append(f"batch {batch} (seed {self.seed}): {what}")

    def record_rss(self, watched: Watched) -> None:
        try:
            value = watched.process.rss_kib()
        except Exception:
            return
        self.rss.setdefault(watched.name, []).append(value)

    def report(self) -> str:
        seconds = time.monotonic() - self.started
        lines = [
            f"== {self.target}: seed {self.seed}, {self.batches} batches, {seconds:.0f} s",
            f"cases tried: {self.cases:,} ({self.cases / max(seconds, 1e-9):,.0f}/s)",
            "  by kind: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.kinds.items())),
            f"crashes: {len(self.crashes)}",
            f"hangs: {len(self.hangs)}",
            f"failures: {len(self.failures)}",
            f"healthy client checks passed: {self.healthy_checks}",
        ]
        for name, samples in sorted(self.rss.items()):
            if samples:
                lines.append(
                    f"RSS {name}: first batch {samples[0] / 1024:.1f} MiB, peak "
                    f"{max(samples) / 1024:.1f} MiB, last {samples[-1] / 1024:.1f} MiB"
                )
        for title, items in (
            ("crash", self.crashes),
            ("hang", self.hangs),
            ("failure", self.failures),
        ):
            for item in items[:20]:
                lines.append(f"--- {title}: {item}")
        lines.append("RESULT: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


def check_processes(figures: Figures, watched: list[Watched], batch: int) -> bool:
    """Alive, no problem in the logs; memory sampled. False when one died."""
    alive = True
    for item in watched:
        for problem in item.log.problems():
            figures.note("crashes", f"{item.name} logged:\n{problem}", batch)
        if not item.process.alive():
            figures.note(
                "crashes", f"{item.name} exited ({item.process.process.returncode})", batch
            )
            alive = False
        else:
            figures.record_rss(item)
    return alive


def settle(
    read: Callable[[], dict[str, Any]],
    leftovers: Callable[[dict[str, Any]], dict[str, Any]],
    timeout: float,
) -> dict[str, Any]:
    """Poll a status document until `leftovers` finds nothing held; what is still held then."""
    deadline = time.monotonic() + timeout
    held: dict[str, Any] = {"status": "never answered"}
    while time.monotonic() < deadline:
        try:
            held = leftovers(read())
        except (OSError, ValueError) as exc:
            held = {"status": f"unreadable: {exc}"}
        if not held:
            return {}
        time.sleep(0.1)
    return held


def guest_leftovers(document: dict[str, Any]) -> dict[str, Any]:
    guest = document["guest"]
    link = guest["host_link"]
    values = {
        "clients": guest["clients"]["active"],
        "contexts": guest["contexts"],
        "card_handles": guest["card_handles"],
        "waiting_for_events": guest["waiting_for_events"],
        "calls_in_flight": guest["calls"]["in_flight"],
        "contexts_on_link": link.get("contexts_on_link", 0),
        "awaiting_responses": link.get("awaiting_responses", 0),
    }
    return {name: value for name, value in values.items() if value}


def host_leftovers(document: dict[str, Any]) -> dict[str, Any]:
    service = document["service"]
    values = {
        "host_contexts": service["host_contexts"],
        "card_handles": service["card_handles"],
        "transactions_held": service["transactions_held"],
        "context_threads": service["context_threads"],
        "wait_enders": service["wait_enders"],
        "calls_in_flight": service["calls"]["in_flight"],
    }
    return {name: value for name, value in values.items() if value}


# --- healthy clients --------------------------------------------------------------------------


def raw_echo(socket_path: str, reader: str, tag: str, share_mode: int = 2) -> str | None:
    """A full SCardEstablishContext/Connect/Transmit(ECHO)/Disconnect/Release over the raw
    protocol; None when every answer is right, else what went wrong."""
    try:
        with RawClient(socket_path, timeout=20) as client:
            if client.version().rv or client.establish().rv:
                return "version or establish failed"
            connected = client.connect(reader, share_mode=share_mode)
            if connected.rv:
                return f"connect: 0x{connected.rv:08X}"
            data = tag.encode()[:200]
            reply, answer = client.transmit(connected.h_card, echo_apdu(data))
            if reply.rv or answer != data + b"\x90\x00":
                return f"echo: rv 0x{reply.rv:08X}, {answer.hex()}"
            for step, rv in (
                ("begin", client.begin_transaction(connected.h_card).rv),
                ("disconnect", client.disconnect(connected.h_card).rv),
                ("release", client.release().rv),
            ):
                if rv:
                    return f"{step}: 0x{rv:08X}"
    except (OSError, ConnectionError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def pyscard_echo(socket_path: str, reader: str, tag: str, count: int = 3) -> str | None:
    """The real client library (pyscard in a child process) doing checked ECHOs."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "rig.pcsc_programs", "echo-loop", reader, tag, str(count)],
            env=pcsc_client_env(socket_path),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "pyscard echo-loop timed out"
    if done.returncode:
        return f"pyscard echo-loop exited {done.returncode}: {done.stderr.strip()[-300:]}"
    return None


def healthy(figures: Figures, batch: int, checks: list[tuple[str, str | None]]) -> bool:
    """Record the healthy client checks `(what, error or None)`."""
    ok = True
    for what, error in checks:
        if error is None:
            figures.healthy_checks += 1
        else:
            ok = False
            figures.note("failures", f"healthy client ({what}) failed: {error}", batch)
    return ok
