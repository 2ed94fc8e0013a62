"""A private OpenSSH server on loopback, for tests and benchmarks of the SSH transport.

Everything lives in a temp dir of its own: config, host key, client key, authorized_keys, pid
file, log.
The system's sshd and the real user's ~/.ssh are never touched. The only shared path is /run/sshd,
OpenSSH's privilege-separation directory, which sshd refuses to start without.

    with LoopbackSshd() as sshd:
        config = sshd.write_client_config(alias="vm")   # then: --ssh vm --ssh-config {config}
        sshd.kill_connections()                         # drop live sessions, to test reconnect
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from rig.service import Service

__all__ = ["LoopbackSshd", "SshdError", "free_port"]

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
_PR_SET_PDEATHSIG = 1


class SshdError(RuntimeError):
    """The loopback sshd could not be set up or did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (sshd binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def generate_key(path: Path, comment: str) -> str:
    """Create an ed25519 key pair at `path` (+ .pub); returns the public key line."""
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def _die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs sshd when its parent dies (Linux PR_SET_PDEATHSIG).

    So a test run that is killed (timeout, Ctrl-C twice) leaves no sshd listening behind.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _children_of() -> dict[int, list[int]]:
    """Map ppid -> pids for every process, from /proc (no psutil in the venv)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """All processes below `pid`, parents before children."""
    tree = _children_of()
    found: list[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(tree.get(child, []))
    return found


def _pdeathsig_is_safe() -> bool:
    # The "parent" of PR_SET_PDEATHSIG is the forking *thread*: started from a worker thread
    # (trio.to_thread's idle threads exit after a while) sshd would die with that thread.
    return sys.platform == "linux" and threading.current_thread() is threading.main_thread()


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class LoopbackSshd(Service):
    """An `sshd -D` on 127.0.0.1:<free port> accepting one generated client key for `user`."""

    def __init__(
        self,
        *,
        user: str = "root",
        extra_config: Mapping[str, str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.user = user
        self.extra_config = dict(extra_config or {})
        self.start_timeout = start_timeout
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- paths

    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise SshdError("LoopbackSshd is not started")
        return self.dir / name

    @property
    def config_path(self) -> Path:
        return self._path("sshd_config")

    @property
    def host_key_path(self) -> Path:
        return self._path("ssh_host_ed25519_key")

    @property
    def client_key_path(self) -> Path:
        """The private key that authorized_keys accepts (IdentityFile for clients)."""
        return self._path("client_ed25519")

    @property
    def log_path(self) -> Path:
        return self._path("sshd.log")

    @property
    def host_public_key(self) -> str:
        """`ssh-ed25519 AAAA...` (no comment), as a known_hosts entry wants it."""
        fields = self.host_key_path.with_name(self.host_key_path.name + ".pub").read_text().split()
        return f"{fields[0]} {fields[1]}"

    @property
    def known_hosts_name(self) -> str:
        """The host as OpenSSH writes it in known_hosts for a non-22 port."""
        return f"[127.0.0.1]:{self.port}"

    # ------------------------------------------------------------- lifecycle

    def start(self) -> LoopbackSshd:
        if self.proc is not None:
            raise SshdError("already started")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="pcscbridge-sshd-"))
        try:
            generate_key(self.host_key_path, "loopback-sshd-host")
            client_pub = generate_key(self.client_key_path, "loopback-sshd-client")
            self._path("authorized_keys").write_text(client_pub + "\n")
            # A free port can be taken between our probe and sshd's bind: retry a few times.
            for _attempt in range(5):
                self.port = free_port()
                self._write_config()
                self._check_config()
                if self._launch():
                    return self
            raise SshdError(f"sshd did not start; log:\n{self.log_text()}")
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        settings = {
            "Port": str(self.port),
            "ListenAddress": "127.0.0.1",
            "HostKey": str(self.host_key_path),
            "PidFile": str(self._path("sshd.pid")),
            "AuthorizedKeysFile": str(self._path("authorized_keys")),
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "UsePAM": "no",
            # Keys live under /tmp, whose permissions StrictModes would reject.
            "StrictModes": "no",
            "PermitRootLogin": "prohibit-password",
            "AllowStreamLocalForwarding": "yes",
            "AllowTcpForwarding": "yes",  # ProxyJump (direct-tcpip) tests go through this sshd
            "StreamLocalBindUnlink": "yes",
            "StreamLocalBindMask": "0111",
            "PrintMotd": "no",
            "PrintLastLog": "no",
            "LogLevel": "VERBOSE",
            # Tests open many connections in a burst; the default 10:30:100 drops some.
            "MaxStartups": "100",
        }
        settings.update(self.extra_config)
        text = "".join(f"{key} {value}\n" for key, value in settings.items())
        self.config_path.write_text(text)

    def _check_config(self) -> None:
        result = subprocess.run(
            [SSHD, "-t", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise SshdError(f"sshd -t rejected {self.config_path}: {result.stderr.strip()}")

    def _launch(self) -> bool:
        """Start sshd and wait until its port accepts; False if it exited (port taken)."""
        with self.log_path.open("ab") as log:
            # A new session: sshd is not in pytest's process group (Ctrl-C is ours; we stop it).
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent if _pdeathsig_is_safe() else None,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return True
            # sshd has no readiness notification we can await; poll briefly.
            time.sleep(0.02)
        self.stop()
        raise SshdError(f"sshd did not accept on port {self.port} within {self.start_timeout}s")

    def stop(self) -> None:
        """Kill sshd and every process below it (sessions, their commands); remove the temp dir."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                # Stop the listener first so it forks no new sessions while we clean up.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGSTOP)
                self._kill_tree(proc.pid)
                proc.kill()
            proc.wait(timeout=10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # ------------------------------------------------------------ sessions

    def session_pids(self) -> list[int]:
        """sshd's per-connection processes and everything they started."""
        if self.proc is None:
            return []
        return descendants(self.proc.pid)

    @staticmethod
    def _kill_tree(root: int) -> None:
        # Freeze first, so that no process forks or gets reparented (and lost) while we kill;
        # repeat until the frozen set is stable.
        frozen: set[int] = set()
        for _ in range(20):
            pids = set(descendants(root))
            if pids <= frozen:
                break
            _signal_all(pids - frozen, signal.SIGSTOP)
            frozen |= pids
        _signal_all(frozen, signal.SIGKILL)

    def kill_connections(self) -> int:
        """SIGKILL every live SSH session (the listener keeps running); returns how many pids."""
        if self.proc is None:
            return 0
        pids = self.session_pids()
        self._kill_tree(self.proc.pid)
        return len(pids)

    def freeze_connections(self) -> int:
        """SIGSTOP every live session: TCP stays up but the server stops answering."""
        pids = self.session_pids()
        _signal_all(pids, signal.SIGSTOP)
        return len(pids)

    def thaw_connections(self) -> None:
        _signal_all(self.session_pids(), signal.SIGCONT)

    # -------------------------------------------------------------- clients

    def known_hosts_line(self) -> str:
        return f"{self.known_hosts_name} {self.host_public_key}\n"

    def write_client_config(
        self,
        path: Path | None = None,
        *,
        alias: str = "vm",
        trusted: bool = True,
        known_hosts: Path | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> Path:
        """Write an ssh client config with `Host alias` pointing at this sshd; returns its path.

        `trusted` pre-fills the known_hosts file with this sshd's host key; otherwise the file is
        left empty (created), so a client must refuse or, when told to, accept the new key.
        """
        path = path or self._path(f"ssh_config.{alias}")
        known_hosts = known_hosts or self._path(f"known_hosts.{alias}")
        known_hosts.write_text(self.known_hosts_line() if trusted else "")
        settings = {
            "HostName": "127.0.0.1",
            "Port": str(self.port),
            "User": self.user,
            "IdentityFile": str(self.client_key_path),
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(known_hosts),
            # No system file: only the file above decides, whatever the machine's /etc holds.
            "GlobalKnownHostsFile": "/dev/null",
        }
        settings.update(extra or {})
        body = "".join(f"    {key} {value}\n" for key, value in settings.items())
        path.write_text(f"Host {alias}\n{body}")
        return path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, SshdError):
            return ""


def fingerprint(public_key_file: Path) -> str:
    """SHA256:... as OpenSSH prints it, from ssh-keygen (not from the code under test)."""
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]
