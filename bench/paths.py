"""The paths a PC/SC client can take to the host's pcscd, each set up and torn down on loopback.

Every path ends at the same pcscd (the rig's, with vpcd readers and the fast test card) and
gives the measuring clients one UNIX socket to point PCSCLITE_CSOCK_NAME at. Paths with a
network link (the ssh forwards, the bridge over TCP and over SSH) can have the userspace delay
proxy (:mod:`.delay`) put into that link; paths made only of UNIX sockets have no link to
delay. Each path gets socket paths and ports of its own; the SSH paths share one loopback sshd
(:class:`rig.sshd.LoopbackSshd`) and reach it with ``ssh -F <own config>``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rig.bridge_processes import Bridge, BridgeProcess
from rig.pcscd_rig import PcscdRig, read_reader_states
from rig.service import wait_until
from rig.sshd import LoopbackSshd, free_port

from .delay import DelayProxyProcess
from .procs import cmdline, die_with_parent, stop_process

START_TIMEOUT = 20.0
READERS_TIMEOUT = 10.0  # the guest shows the rig's readers within ~1 s of the host starting
# The default policy allows 32 host contexts per guest; the throughput runs use 64 clients.
BENCH_POLICY = Path(__file__).with_name("policy.toml")


@dataclass(frozen=True)
class PathInfo:
    name: str
    label: str  # short, for table headers
    link: str  # "none" (UNIX sockets only: nothing to delay), "tcp" or "ssh"
    bridge: bool
    description: str

    @property
    def delayable(self) -> bool:
        return self.link != "none"


PATHS: dict[str, PathInfo] = {
    info.name: info
    for info in (
        PathInfo(
            "direct",
            "direct",
            "none",
            False,
            "The client uses pcscd's own socket, as an application on the host does. The floor.",
        ),
        PathInfo(
            "socat",
            "socat",
            "none",
            False,
            "socat UNIX-LISTEN:<guest socket>,fork UNIX-CONNECT:<pcscd socket>: a plain local "
            "socket forward (a container bind-mount or a VM socket relay looks like this). "
            "No network, so no delay.",
        ),
        PathInfo(
            "ssh-N-R",
            "ssh -N -R",
            "ssh",
            False,
            "`ssh -N -R <guest socket>:<pcscd socket> vm` run on the host, exactly as the "
            "well-known recipe writes it; the guest's sshd listens on the guest socket. With "
            "-N no session is opened, so sshd never sets TCP_NODELAY (Nagle + delayed ACK).",
        ),
        PathInfo(
            "ssh-T-R",
            "ssh -T -R",
            "ssh",
            False,
            "`ssh -T -R <guest socket>:<pcscd socket> vm 'exec cat >/dev/null'`: the same "
            "forward with a session open, which makes sshd set TCP_NODELAY (Nagle fixed). "
            "The reference a socket forward can reach.",
        ),
        PathInfo(
            "bridge-unix",
            "bridge unix",
            "none",
            True,
            "pcscbridge guest --listen <guest socket> --link unix:<link>; pcscbridge host "
            "--connect unix:<link> (the host's pcscd through pyscard). Both on one machine, "
            "as for a container: no network, so no delay.",
        ),
        PathInfo(
            "bridge-tcp",
            "bridge tcp",
            "tcp",
            True,
            "The bridge with the link over TCP on 127.0.0.1 (guest --link tcp:, host "
            "--connect tcp:); the delay proxy sits between host and guest.",
        ),
        PathInfo(
            "bridge-ssh",
            "bridge ssh",
            "ssh",
            True,
            "pcscbridge host --ssh vm: paramiko dials the guest's sshd and runs `pcscbridge "
            "attach` there, which joins the channel to the guest server's link socket; the "
            "delay proxy sits between paramiko and sshd.",
        ),
    )
}

ORDER = list(PATHS)


@dataclass
class BenchEnv:
    """What every path shares: the work folder, the rig, the loopback sshd (if needed)."""

    workdir: Path
    rig: PcscdRig
    sshd: LoopbackSshd | None

    def require_sshd(self) -> LoopbackSshd:
        if self.sshd is None:
            raise RuntimeError("this path needs the loopback sshd")
        return self.sshd


@dataclass
class RunningPath:
    info: PathInfo
    delay_ms: float
    socket_path: str
    folder: Path
    # role -> pid of the processes whose peak RSS is reported (guest server, host agent, ...)
    processes: dict[str, int] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    sshd: LoopbackSshd | None = None
    setup_retries: list[str] = field(default_factory=list)

    def extra_processes(self) -> dict[str, int]:
        """Processes found at measuring time: `pcscbridge attach` under sshd, sshd sessions."""
        found: dict[str, int] = {}
        if self.sshd is not None:
            sessions = 0
            for pid in self.sshd.session_pids():
                args = cmdline(pid)
                if "attach" in args and any("pcscbridge" in a for a in args):
                    found["guest attach (under sshd)"] = pid
                elif args and args[0].startswith("sshd:"):
                    sessions += 1
                    found[f"sshd session {sessions}"] = pid
        return found


def _client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)  # keys come from the path's own config only
    env.update(extra or {})
    return env


def _wait_pcscd_socket(path: str, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    """Until a readers-state read through ``path`` works (it goes all the way to pcscd)."""

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        return bool(read_reader_states(path, timeout=5))

    wait_until(ready, START_TIMEOUT, f"{what} to forward {path}")


def _ssh_config(env: BenchEnv, folder: Path, port: int) -> Path:
    """A client config for `vm` at 127.0.0.1:port (the sshd, or the delay proxy before it)."""
    sshd = env.require_sshd()
    known_hosts = folder / "known_hosts"
    config = sshd.write_client_config(
        folder / "ssh_config",
        alias="vm",
        known_hosts=known_hosts,
        extra={
            "Port": str(port),
            "BatchMode": "yes",
            "ExitOnForwardFailure": "yes",
            "LogLevel": "ERROR",
        },
    )
    # Through the proxy the server is known as [127.0.0.1]:<proxy port>.
    known_hosts.write_text(sshd.known_hosts_line() + f"[127.0.0.1]:{port} {sshd.host_public_key}\n")
    return config


@contextlib.contextmanager
def _delayed_port(target_port: int, delay_ms: float) -> Iterator[int]:
    """The port to dial for ``target_port``: itself, or a delay proxy in front of it."""
    if delay_ms <= 0:
        yield target_port
        return
    with DelayProxyProcess(target_port, delay_ms) as proxy:
        yield proxy.port


@contextlib.contextmanager
def _process(
    argv: list[str], log: Path, *, stdin: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_client_env(),
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def _bridge(
    env: BenchEnv, running: RunningPath, guest_link: str, host_argv: list[str]
) -> Iterator[RunningPath]:
    """The guest server and the host agent, up once the guest serves the rig's readers;
    ``running`` gets the guest's socket, both logs and both pids.

    A bridge whose guest does not show the readers in time is started once more, and the
    retry is recorded: the benchmark measures a working bridge, and says it needed two tries.
    """
    folder = running.folder
    for attempt in (1, 2):
        # verbose=False: per-call debug logging would be measured too.
        bridge = Bridge(folder, env.rig.socket_path, link=guest_link, verbose=False)
        try:
            guest = bridge.start_guest()
            host_env = _client_env({"PCSCLITE_CSOCK_NAME": env.rig.socket_path})
            host_args = ["host", *host_argv, "--policy", str(BENCH_POLICY)]
            host = BridgeProcess("host", host_args, folder / "host.log", host_env)
            bridge.host = host
            bridge.wait_for_readers(env.rig.reader_names, timeout=READERS_TIMEOUT)
        except Exception as exc:
            logs = bridge.logs()[-4000:]
            bridge.stop()
            if attempt == 1:
                running.setup_retries.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            raise RuntimeError(f"{exc}\n{logs}") from exc
        try:
            running.socket_path = bridge.socket_path
            running.logs += [guest.log_path, host.log_path]
            running.processes.update(guest=guest.process.pid, host=host.process.pid)
            yield running
        finally:
            bridge.stop()
        return


@contextlib.contextmanager
def _ssh_config_for(env: BenchEnv, running: RunningPath) -> Iterator[Path]:
    """A client config that reaches the loopback sshd, through a delay proxy when the path
    has a delay; the path's sessions are then found under that sshd."""
    sshd = env.require_sshd()
    running.sshd = sshd
    with _delayed_port(sshd.port, running.delay_ms) as port:
        yield _ssh_config(env, running.folder, port)


@contextlib.contextmanager
def open_path(name: str, env: BenchEnv, delay_ms: float) -> Iterator[RunningPath]:
    """Set up path ``name`` with ``delay_ms`` of one-way delay on its link; tear it down."""
    info = PATHS[name]
    if delay_ms and not info.delayable:
        raise ValueError(f"{name} has no link to delay")
    folder = env.workdir / f"{name}-{delay_ms:g}ms"
    folder.mkdir(parents=True, exist_ok=True)
    guest_socket = str(folder / "pcscd.comm")
    rig_socket = env.rig.socket_path
    running = RunningPath(info, delay_ms, guest_socket, folder)
    log = folder / f"{name}.log"
    running.logs.append(log)

    if name == "direct":
        running.socket_path = rig_socket
        yield running

    elif name == "socat":
        argv = [
            "socat",
            f"UNIX-LISTEN:{guest_socket},fork,mode=666,unlink-early",
            f"UNIX-CONNECT:{rig_socket}",
        ]
        with _process(argv, log) as proc:
            _wait_pcscd_socket(guest_socket, proc, "socat")
            yield running

    elif name in ("ssh-N-R", "ssh-T-R"):
        with _ssh_config_for(env, running) as config:
            forward = ["-R", f"{guest_socket}:{rig_socket}"]
            if name == "ssh-N-R":
                argv = ["ssh", "-F", str(config), "-N", *forward, "vm"]
                stdin = None
            else:
                # stdin stays open (a pipe we never write), so `cat` and the session live on.
                argv = ["ssh", "-F", str(config), "-T", *forward, "vm", "exec cat >/dev/null"]
                stdin = subprocess.PIPE
            with _process(argv, log, stdin=stdin) as proc:
                try:
                    _wait_pcscd_socket(guest_socket, proc, "ssh")
                except Exception as exc:
                    raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')}") from exc
                running.processes["ssh client (host)"] = proc.pid
                try:
                    yield running
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(guest_socket)  # sshd leaves the forwarded socket behind

    elif name == "bridge-unix":
        link = f"unix:{folder / 'link.sock'}"
        with _bridge(env, running, link, ["--connect", link]):
            yield running

    elif name == "bridge-tcp":
        guest_port = free_port()
        with _delayed_port(guest_port, delay_ms) as port:
            link = f"tcp:127.0.0.1:{guest_port}"
            with _bridge(env, running, link, ["--connect", f"tcp:127.0.0.1:{port}"]):
                yield running

    elif name == "bridge-ssh":
        with _ssh_config_for(env, running) as config:
            link = f"unix:{folder / 'link.sock'}"
            remote = str(Path(sys.executable).parent / "pcscbridge")
            host_argv = [
                "--ssh",
                "vm",
                "--ssh-config",
                str(config),
                "--remote-pcscbridge",
                remote,
                "--guest-link",
                link,
            ]
            with _bridge(env, running, link, host_argv):
                yield running
    else:
        raise ValueError(f"unknown path {name!r}")
