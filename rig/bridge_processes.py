"""The bridge as users run it: `pcscbridge guest` and `pcscbridge host` as real processes.

Tests and benchmarks start them on paths of their own; the host agent reaches a rig's pcscd
through PCSCLITE_CSOCK_NAME, exactly as it would reach the host's own pcscd.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pcscbridge.status import read_status
from pcscbridge.testing.rawclient import RawClient
from rig.pcscd_rig import pcsc_client_env
from rig.service import wait_until

PCSCBRIDGE = [sys.executable, "-m", "pcscbridge"]


class BridgeError(RuntimeError):
    pass


class BridgeProcess:
    """One `pcscbridge ...` process with its log in a file (`program`: what runs pcscbridge,
    when not the test's python, e.g. systemd-socket-activate)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str],
        prefix: list[str] | None = None,
        program: list[str] | None = None,
    ) -> None:
        """`prefix`: a command the process runs under (e.g. `prlimit --nofile=64 --`);
        `program`: what runs instead of `python -m pcscbridge`."""
        self.name = name
        self.ended_on_purpose = False  # stopped or killed by the test, not crashed
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [*(prefix or []), *(program or PCSCBRIDGE), *argv],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        """Resident memory now (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BridgeError(f"{self.name} has no VmRSS (exited?)")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 5.0) -> int:
        self.ended_on_purpose = True
        if self.alive():
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """Die abruptly (SIGKILL), as a crashed or cut-off process would."""
        self.ended_on_purpose = True
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Bridge:
    """A guest server and a host agent joined by a link endpoint, each its own process."""

    def __init__(
        self,
        folder: Path,
        host_pcscd_socket: str | None,
        *,
        link: str | None = None,
        backend: str = "pyscard",
        verbose: bool = True,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.socket_path = str(folder / "pcscd.comm")
        self.link = link or f"unix:{folder / 'link.sock'}"
        self.host_pcscd_socket = host_pcscd_socket
        self.backend = backend
        self.verbose = verbose
        self.guest_extra: list[str] = []  # more `pcscbridge guest` options
        self.guest: BridgeProcess | None = None
        self.host: BridgeProcess | None = None

    def status_socket(self, role: str) -> str:
        return str(self.folder / f"{role}.status")

    def status(self, role: str) -> dict[str, Any]:
        """What `pcscbridge status` shows for the guest or the host process."""
        return read_status(self.status_socket(role))

    @property
    def client_env(self) -> dict[str, str]:
        return pcsc_client_env(self.socket_path)

    def _flags(self) -> list[str]:
        return ["-v"] if self.verbose else []

    def start_guest(
        self, extra: list[str] | None = None, prefix: list[str] | None = None
    ) -> BridgeProcess:
        self.guest = BridgeProcess(
            "guest",
            [
                "guest",
                *self._flags(),
                "--listen",
                self.socket_path,
                "--link",
                self.link,
                "--status-socket",
                self.status_socket("guest"),
                *self.guest_extra,
                *(extra or []),
            ],
            self.folder / "guest.log",
            dict(os.environ),
            prefix,
        )
        _wait_for(lambda: os.path.exists(self.socket_path), 10, "guest socket", self.guest)
        return self.guest

    def start_host(self, extra: list[str] | None = None) -> BridgeProcess:
        env = dict(os.environ)
        if self.host_pcscd_socket:
            env["PCSCLITE_CSOCK_NAME"] = self.host_pcscd_socket
        self.host = BridgeProcess(
            "host",
            [
                "host",
                *self._flags(),
                "--connect",
                self.link,
                "--backend",
                self.backend,
                "--status-socket",
                self.status_socket("host"),
                *(extra or []),
            ],
            self.folder / "host.log",
            env,
        )
        return self.host

    def start(self, expected_readers: list[str] | None = None, timeout: float = 15) -> Bridge:
        self.start_guest()
        self.start_host()
        if expected_readers is not None:
            self.wait_for_readers(expected_readers, timeout)
        return self

    def guest_readers(self) -> list[str]:
        with RawClient(self.socket_path) as client:
            client.version()
            return [entry.name for entry in client.readers_state() if entry is not None]

    def wait_for_readers(self, expected: list[str], timeout: float = 15) -> None:
        """Until the guest serves exactly these readers (polled: the host pushes them); fails
        early if the guest, or a host the test did not end itself, dies meanwhile."""
        _wait_for(
            lambda: sorted(self.guest_readers()) == sorted(expected),
            timeout,
            f"guest readers {expected}",
            self.guest,
            self.host,
        )

    def stop(self) -> None:
        for process in (self.host, self.guest):
            if process is not None:
                process.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} log ---\n{p.log}" for p in (self.guest, self.host) if p is not None
        )

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_for(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    *processes: BridgeProcess | None,
) -> None:
    """Poll ``condition`` (OSError counts as false) while ``processes`` live (one the test
    ended itself excepted); BridgeError with the logs when one dies or the time is up."""
    watched = [p for p in processes if p is not None]

    def check_alive() -> None:
        for process in watched:
            if not process.alive() and not process.ended_on_purpose:
                raise BridgeError(f"{process.name} exited while waiting for {what}:\n{process.log}")

    try:
        wait_until(
            condition,
            timeout,
            what,
            interval=0.01,
            max_interval=0.2,
            ignore=(OSError,),
            give_up=check_alive,
        )
    except TimeoutError:
        log = "\n".join(process.log for process in watched)
        raise BridgeError(f"timed out after {timeout}s waiting for {what}\n{log}") from None


def stop_bridges(bridges: list[Bridge], request: Any) -> None:
    """At a test's end: stop them, show their logs if the test failed; none may have crashed."""
    failed = getattr(request.node, "rep_call", None)
    for bridge in bridges:
        bridge.stop()
        if failed is not None and failed.failed:
            print(bridge.logs())
    for bridge in bridges:
        assert "Traceback" not in bridge.logs(), bridge.logs()


def have(program: str) -> bool:
    return shutil.which(program) is not None
