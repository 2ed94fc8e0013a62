"""A private instance of the Debian pcscd with vpcd virtual readers, for tests and benchmarks.

pcscd ignores ``PCSCLITE_CSOCK_NAME`` and always binds ``/run/pcscd/pcscd.comm``. Each rig
therefore runs pcscd in a private mount namespace in which a per-rig temp folder is
bind-mounted on ``/run/pcscd``; clients reach it with ``PCSCLITE_CSOCK_NAME=<dir>/run/pcscd.comm``
(:attr:`PcscdRig.socket_path`, :attr:`PcscdRig.env`). The real ``/run/pcscd`` is only created
if missing (the bind target must exist); nothing is ever mounted there outside the namespace.

Readers: ``vpcd_entries`` reader.conf entries, each giving two vpcd slots (``<name> 00 00`` on
port P, ``<name> 00 01`` on P+1). Entry 0 is named "Virtual PCD", entry k "Virtual PCD B", "C",
…, because pcscd gives identical friendly names identical reader names. vpcd 3.3 keeps its
slots in a per-library static array indexed by slot number only, so two entries sharing one
loaded ``libifdvpcd.so`` would overwrite each other's slots: entries after the first get a
private copy of the driver (pcscd loads each distinct path separately).

vpcd listens on 0.0.0.0 (hard-coded), so ports are picked at random below the ephemeral range,
probed, and checked again after start (a reader whose port was taken in between never
appears; the rig then retries with other ports).

Waiting for card events, two ways:

* :meth:`PcscdRig.insert_card` / :meth:`PcscdRig.remove_card` (``wait=True``) and
  :meth:`PcscdRig.wait_for_reader_state` talk the pcsc-lite 4.4 protocol to the rig's own
  pcscd from this process (register for events, wait for the signal): fast, no pyscard.
* :meth:`PcscdRig.wait_for_card_state` runs pyscard's ``SCardGetStatusChange`` in a child
  process. libpcsclite reads ``PCSCLITE_CSOCK_NAME`` once per process, so pyscard in the test
  process could only ever reach the first rig; a child process sees each rig (or any other
  socket, e.g. the bridge's guest socket, via ``socket_path``) afresh. Costs ~0.1 s of start-up.

Command line: ``python -m rig.pcscd_rig serve [--entries N] [--card SLOT ...]``
runs a rig until Ctrl-C (prints the environment to use); ``wait-card`` is the child-process
helper behind :meth:`PcscdRig.wait_for_card_state`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pcscbridge.host.backends.simcard import SimulatedCard
from pcscbridge.pcsclite.readers import ReaderEntry
from pcscbridge.testing.rawclient import RawClient, card_present
from rig.service import Service
from rig.vpcd_card import VpcdCard

VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
PCSCD = "/usr/sbin/pcscd"
SYSTEM_IPC_DIR = "/run/pcscd"
MAX_VPCD_ENTRIES = 8  # pcscd 1.9.9 serves at most 16 readers
# vpcd 3.3 can lose a card connected right after a removal: its presence poll accepts the new
# connection while a transmit that failed on the old card drops the slot's socket number
# without closing it (no lock covers either). pcscd then shows the slot empty for ever, the
# card's connection open (seen in make test's soak). A card not shown within this many
# seconds is plugged in again; pcscd polls every 400 ms.
VPCD_REPLUG_AFTER = 3.0

log = logging.getLogger("rig")


class RigError(RuntimeError):
    pass


@dataclass(frozen=True)
class VpcdSlot:
    reader: str
    port: int


class PcscdRig(Service):
    """pcscd 1.9.9 in a private mount namespace with ``2 * vpcd_entries`` vpcd readers."""

    def __init__(
        self,
        vpcd_entries: int = 2,
        *,
        debug: bool = False,
        keep_dir: bool = False,
        base_dir: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if not 1 <= vpcd_entries <= MAX_VPCD_ENTRIES:
            raise ValueError(f"vpcd_entries must be 1..{MAX_VPCD_ENTRIES}")
        self.vpcd_entries = vpcd_entries
        self.debug = debug
        self.keep_dir = keep_dir
        self.start_timeout = start_timeout
        self._base_dir = base_dir
        self.dir: Path | None = None
        self.slots: list[VpcdSlot] = []
        self.cards: dict[int, VpcdCard] = {}
        self.last_log = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths and names

    def _require_dir(self) -> Path:
        if self.dir is None:
            raise RigError("rig not started")
        return self.dir

    @property
    def socket_path(self) -> str:
        """The client-side PCSCLITE_CSOCK_NAME for this rig."""
        return str(self._require_dir() / "run" / "pcscd.comm")

    @property
    def log_path(self) -> Path:
        return self._require_dir() / "pcscd.log"

    @property
    def reader_names(self) -> list[str]:
        return [slot.reader for slot in self.slots]

    @property
    def env(self) -> dict[str, str]:
        """os.environ with PCSCLITE_CSOCK_NAME pointing at this rig (for child processes)."""
        return pcsc_client_env(self.socket_path)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, RigError):
            return self.last_log

    # -- life cycle

    def start(self) -> PcscdRig:
        check_rig_prerequisites()
        self.dir = Path(tempfile.mkdtemp(prefix="pcscd-rig-", dir=self._base_dir))
        try:
            # Non-root clients (tests dropping privileges) must be able to reach the socket.
            self.dir.chmod(0o755)
            for attempt in range(4):
                self.slots = _pick_slots(self.vpcd_entries)
                self._write_config()
                self._spawn()
                if self._wait_ready():
                    return self
                # A reader is missing: most likely a port was taken between probe and bind.
                self._terminate()
                if attempt == 3:
                    raise RigError(f"pcscd readers did not come up:\n{self.read_log()}")
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self) -> None:
        """Stop pcscd and start it again on the same socket and readers, cards put back: what
        the host sees when its PC/SC service restarts."""
        with_cards = sorted(self.cards)
        for index in with_cards:
            self.remove_card(index, wait=False)
        self._terminate()
        self._spawn()
        if not self._wait_ready():
            raise RigError(f"pcscd did not come back:\n{self.read_log()}")
        for index in with_cards:
            self.insert_card(index)

    def stop(self) -> None:
        """Remove cards, stop pcscd (SIGTERM, then SIGKILL of its process group), clean up."""
        for index in list(self.cards):
            with contextlib.suppress(Exception):
                self.remove_card(index, wait=False)
        self._terminate()
        if self.dir is not None:
            self.last_log = self.read_log()
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def _write_config(self) -> None:
        rig_dir = self._require_dir()
        conf_dir = rig_dir / "reader.conf.d"
        shutil.rmtree(conf_dir, ignore_errors=True)
        conf_dir.mkdir()
        (rig_dir / "run").mkdir(mode=0o755, exist_ok=True)
        for entry in range(self.vpcd_entries):
            port = self.slots[2 * entry].port
            driver = VPCD_DRIVER
            if entry > 0:
                # A separate copy = a separate dlopen = vpcd slot array of its own.
                driver = str(rig_dir / f"libifdvpcd-{entry}.so")
                if not os.path.exists(driver):
                    shutil.copyfile(VPCD_DRIVER, driver)
            (conf_dir / f"vpcd-{entry}").write_text(
                f'FRIENDLYNAME "{_friendly_name(entry)}"\n'
                f"DEVICENAME /dev/null:{port}\n"
                f"LIBPATH {driver}\n"
                f"CHANNELID {port}\n"
            )

    def _spawn(self) -> None:
        rig_dir = self._require_dir()
        socket_file = rig_dir / "run" / "pcscd.comm"
        with contextlib.suppress(FileNotFoundError):
            socket_file.unlink()
        # The bind target must exist; creating an empty directory is all we do to the system.
        os.makedirs(SYSTEM_IPC_DIR, exist_ok=True)
        extra = " -d" if self.debug else ""
        script = f'mount --bind "$1" {SYSTEM_IPC_DIR} && exec {PCSCD} --foreground{extra} -c "$2"'
        with open(rig_dir / "pcscd.log", "ab") as log:
            # unshare and sh exec into pcscd, so the pid is pcscd's; a new session makes it the
            # leader of a process group we can kill as a whole.
            self._proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                    "sh",
                    str(rig_dir / "run"),
                    str(rig_dir / "reader.conf.d"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self) -> bool:
        """True once pcscd answers and lists every configured reader; False if one is missing."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        expected = set(self.reader_names)
        seen: set[str] = set()
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RigError(f"pcscd exited with {self._proc.returncode}:\n{self.read_log()}")
            if os.path.exists(self.socket_path):
                try:
                    seen = {entry.name for entry in read_reader_states(self.socket_path)}
                except OSError:
                    seen = set()
                else:
                    # pcscd adds all configured readers before it starts serving clients,
                    # so the first answer is complete: a missing one will not come later.
                    return seen == expected
            time.sleep(0.01)  # socket not bound yet: pcscd is still starting
        raise RigError(
            f"pcscd not ready after {self.start_timeout}s (readers seen: {sorted(seen)}):\n"
            f"{self.read_log()}"
        )

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # Anything left in the group (there should be nothing) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # -- cards

    def _slot_index(self, slot: int | str) -> int:
        if isinstance(slot, str):
            return self.reader_names.index(slot)
        if not 0 <= slot < len(self.slots):
            raise IndexError(f"no slot {slot}: the rig has {len(self.slots)} readers")
        return slot

    def insert_card(
        self,
        slot: int | str,
        card: SimulatedCard | None = None,
        *,
        wait: bool = True,
        timeout: float = 5.0,
    ) -> VpcdCard:
        """Insert ``card`` (default: a SimulatedCard labelled "slot<N>") into a reader.

        With ``wait``, returns once pcscd reports the card present (it polls every 400 ms).
        """
        index = self._slot_index(slot)
        if index in self.cards:
            raise RigError(f"slot {index} already holds a card")
        vpcd_card = VpcdCard(self.slots[index].port, card or SimulatedCard(label=f"slot{index}"))
        vpcd_card.insert()
        self.cards[index] = vpcd_card
        deadline = time.monotonic() + timeout
        while wait:
            remaining = deadline - time.monotonic()
            try:
                self.wait_for_reader_state(
                    self.slots[index].reader,
                    present=True,
                    timeout=max(min(VPCD_REPLUG_AFTER, remaining), 0),
                )
                break
            except TimeoutError:
                if remaining <= VPCD_REPLUG_AFTER:
                    raise
                log.warning("%s: vpcd lost the card; plugging it in again", vpcd_card)
                vpcd_card.remove()  # see VPCD_REPLUG_AFTER
                vpcd_card.insert()
        return vpcd_card

    def remove_card(self, slot: int | str, *, wait: bool = True, timeout: float = 5.0) -> None:
        index = self._slot_index(slot)
        vpcd_card = self.cards.pop(index, None)
        if vpcd_card is None:
            raise RigError(f"slot {index} holds no card")
        vpcd_card.remove()
        if wait:
            self.wait_for_reader_state(self.slots[index].reader, present=False, timeout=timeout)

    # -- observing pcscd

    def reader_states(self) -> dict[str, ReaderEntry]:
        """A snapshot of pcscd's readers-state array, read over the raw protocol."""
        return {entry.name: entry for entry in read_reader_states(self.socket_path)}

    def wait_for_reader_state(
        self, reader: str, present: bool, timeout: float = 5.0
    ) -> ReaderEntry:
        """Wait (event-driven, in this process) until pcscd shows the card present/absent."""
        return wait_for_reader_state(self.socket_path, reader, present, timeout)

    def wait_for_card_state(
        self,
        reader: str,
        present: bool,
        timeout: float = 5.0,
        *,
        socket_path: str | None = None,
    ) -> bytes:
        """Wait with pyscard's SCardGetStatusChange in a child process; returns the ATR.

        ``socket_path`` defaults to the rig's socket; pass another (e.g. the bridge's guest
        socket) to wait for what a client of that socket sees. Raises TimeoutError.
        """
        return wait_for_card_state(socket_path or self.socket_path, reader, present, timeout)


def _friendly_name(entry: int) -> str:
    return "Virtual PCD" if entry == 0 else f"Virtual PCD {chr(ord('A') + entry)}"


def _port_is_free(port: int) -> bool:
    # vpcd binds 0.0.0.0 without SO_REUSEADDR semantics that would let two listeners share.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _pick_slots(entries: int) -> list[VpcdSlot]:
    # Below the kernel's ephemeral range, so outgoing connections do not grab the port between
    # the probe and pcscd's bind.
    try:
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low_ephemeral = 32768
    high = max(low_ephemeral, 12000) - 2
    chosen: set[int] = set()
    slots: list[VpcdSlot] = []
    for entry in range(entries):
        for _ in range(1000):
            port = random.randrange(10000, high, 2)
            if {port, port + 1} & chosen:
                continue
            if _port_is_free(port) and _port_is_free(port + 1):
                break
        else:
            raise RigError("no free TCP port pair for vpcd")
        chosen |= {port, port + 1}
        name = _friendly_name(entry)
        slots += [VpcdSlot(f"{name} 00 00", port), VpcdSlot(f"{name} 00 01", port + 1)]
    return slots


def check_rig_prerequisites() -> None:
    """Raise RigError (never skip) when this machine cannot run the rig."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (mount namespaces and bind mounts)")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (util-linux / mount)")
    if not os.access(PCSCD, os.X_OK):
        problems.append(f"{PCSCD} not found (apt-get install pcscd)")
    if not os.path.exists(VPCD_DRIVER):
        problems.append(f"{VPCD_DRIVER} not found (apt-get install vsmartcard-vpcd)")
    if problems:
        raise RigError("pcscd rig unavailable: " + "; ".join(problems))


# ----------------------------------------------------------------------------- raw 4.4 client


def _open_context(socket_path: str, timeout: float) -> RawClient:
    client = RawClient(socket_path, timeout)
    try:
        version = client.version()
        if version.rv:
            raise OSError(f"pcscd refused protocol 4.4: rv=0x{version.rv:08X}")
        established = client.establish()
        if established.rv:
            raise OSError(f"SCARD_ESTABLISH_CONTEXT failed: rv=0x{established.rv:08X}")
    except BaseException:
        client.close()
        raise
    return client


def read_reader_states(socket_path: str, timeout: float = 5.0) -> list[ReaderEntry]:
    """The non-empty entries of a pcscd's readers-state array (raw protocol 4.4)."""
    with _open_context(socket_path, timeout) as client:
        return [entry for entry in client.readers_state() if entry is not None]


def wait_for_reader_state(
    socket_path: str, reader: str, present: bool, timeout: float = 5.0
) -> ReaderEntry:
    """Event-driven wait over the raw protocol until ``reader`` shows a card (or none).

    "Present" also requires the ATR to be known, as clients see it only then.
    """
    deadline = time.monotonic() + timeout
    with _open_context(socket_path, timeout) as client:
        while True:
            states = {entry.name: entry for entry in client.wait() if entry is not None}
            entry = states.get(reader)
            if entry is None:
                client.unregister()
                raise RigError(f"no reader {reader!r}; pcscd has {sorted(states)}")
            done = (card_present(entry) and bool(entry.atr)) if present else not card_present(entry)
            remaining = deadline - time.monotonic()
            if done or remaining <= 0:
                client.unregister()
                if done:
                    return entry
                raise TimeoutError(
                    f"{reader!r}: card still {'absent' if present else 'present'} "
                    f"after {timeout}s (state 0x{entry.state:X})"
                )
            if not client.wait_signal(remaining):
                client.unregister()
                # One last look: the change may have landed just as the wait ended.
                continue


# ----------------------------------------------------------------------------- pyscard child


def pcsc_client_env(socket_path: str) -> dict[str, str]:
    """os.environ with PCSCLITE_CSOCK_NAME = ``socket_path``: a child process's libpcsclite
    then talks to that socket."""
    return {**os.environ, "PCSCLITE_CSOCK_NAME": socket_path}


def run_pcsc_client(
    args: list[str], socket_path: str, timeout: float = 10.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PC/SC client program against ``socket_path`` (killed after ``timeout``)."""
    return subprocess.run(
        args,
        env=pcsc_client_env(socket_path),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_pyscard(
    code: str, socket_path: str, *args: str, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` (typically using pyscard) in a child process against a socket."""
    return run_pcsc_client([sys.executable, "-c", code, *args], socket_path, timeout)


def wait_for_card_state(
    socket_path: str, reader: str, present: bool, timeout: float = 5.0
) -> bytes:
    """SCardGetStatusChange (pyscard, child process) until a card is present/absent; the ATR."""
    proc = run_pcsc_client(
        [
            sys.executable,
            "-m",
            "rig.pcscd_rig",
            "wait-card",
            reader,
            "present" if present else "absent",
            str(timeout),
        ],
        socket_path,
        timeout=timeout + 10,  # the child enforces the real timeout; this one catches hangs
    )
    if proc.returncode == 0:
        return bytes.fromhex(proc.stdout.strip())
    if proc.returncode == _EXIT_TIMEOUT:
        raise TimeoutError(
            f"{reader!r}: card not {'present' if present else 'absent'} "
            f"after {timeout}s: {proc.stderr.strip()}"
        )
    raise RigError(f"wait-card failed ({proc.returncode}): {proc.stderr.strip()}")


_EXIT_TIMEOUT = 2


def _wait_card_main(reader: str, want_present: bool, timeout: float) -> int:
    from smartcard import scard  # imported here: the environment is already set

    hr, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != scard.SCARD_S_SUCCESS:
        print(f"SCardEstablishContext: {scard.SCardGetErrorMessage(hr)}", file=sys.stderr)
        return 3
    try:
        deadline = time.monotonic() + timeout
        current = scard.SCARD_STATE_UNAWARE
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            hr, states = scard.SCardGetStatusChange(context, remaining_ms, [(reader, current)])
            if hr == scard.SCARD_E_TIMEOUT:
                print(f"timeout; last state 0x{current:X}", file=sys.stderr)
                return _EXIT_TIMEOUT
            if hr != scard.SCARD_S_SUCCESS:
                print(f"SCardGetStatusChange: {scard.SCardGetErrorMessage(hr)}", file=sys.stderr)
                return 3
            _, event_state, atr = states[0]
            present = bool(event_state & scard.SCARD_STATE_PRESENT)
            if present == want_present and (atr or not present):
                print(bytes(atr).hex() if present else "")
                return 0
            if remaining_ms == 0:
                print(f"timeout; state 0x{event_state:X}", file=sys.stderr)
                return _EXIT_TIMEOUT
            current = event_state & ~scard.SCARD_STATE_CHANGED
    finally:
        scard.SCardReleaseContext(context)


def _serve_main(entries: int, card_slots: list[int], debug: bool) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with PcscdRig(entries, debug=debug) as rig:
        for slot in card_slots:
            rig.insert_card(slot)
        print(f"export PCSCLITE_CSOCK_NAME={rig.socket_path}")
        for index, slot_info in enumerate(rig.slots):
            card = "card" if index in rig.cards else "empty"
            print(f"# reader {index}: {slot_info.reader!r} port {slot_info.port} ({card})")
        print(f"# pcscd pid {rig.pid}, log {rig.log_path}; Ctrl-C stops", flush=True)
        stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Private pcscd + vpcd test rig.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a rig until interrupted")
    serve.add_argument("--entries", type=int, default=2, help="vpcd entries (2 readers each)")
    serve.add_argument("--card", type=int, action="append", default=[], help="slot with a card")
    serve.add_argument("--debug", action="store_true", help="pcscd -d")
    wait = sub.add_parser("wait-card", help="SCardGetStatusChange until present/absent")
    wait.add_argument("reader")
    wait.add_argument("state", choices=["present", "absent"])
    wait.add_argument("timeout", type=float)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve_main(args.entries, args.card, args.debug)
    return _wait_card_main(args.reader, args.state == "present", args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())


SCAN_AND_ATR = (["pcsc_scan", "-r"], ["opensc-tool", "-r", "0", "-a"])


def assert_clients_see_the_same(direct_socket: str, bridged_socket: str) -> str:
    """pcsc_scan and opensc-tool print through the bridge what they print against pcscd; the
    last output (opensc-tool's, with reader 0's ATR)."""
    for args in SCAN_AND_ATR:
        direct = run_pcsc_client(args, direct_socket, timeout=30)
        bridged = run_pcsc_client(args, bridged_socket, timeout=30)
        assert direct.returncode == 0, direct.stdout + direct.stderr
        assert bridged.returncode == 0, bridged.stdout + bridged.stderr
        assert bridged.stdout == direct.stdout
    return bridged.stdout
