"""One libpcsclite client library: how to run any program with it, and how to measure which
protocol it speaks.

A :class:`ClientLib` is the system's own library or one extracted by :mod:`rig.clientlibs`;
``command()`` + ``env()`` run a bookworm program (ELF or ``#!`` script) with it, through
another glibc's dynamic loader when the library needs that glibc. :func:`probe_protocol`
lets the library connect to a UNIX socket of ours and reads the ``CMD_VERSION`` it sends
(spec §6); :func:`check_loaded` checks, through ``/proc/PID/maps``, that the expected files
were loaded.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pcscbridge.doctor.probe import ProbeError, probe_client

PACKAGE = "libpcsclite1"
LIBRARY = "libpcsclite.so.1"
# 2.3.0+ split the library: libpcsclite.so.1 is a small front that dlopen()s this one by name.
REAL_LIBRARY = "libpcsclite_real.so.1"

PROBE_TIMEOUT = 20.0


class ClientLibError(RuntimeError):
    """Fetching, extracting or checking a client library failed; the message says what."""


@dataclass(frozen=True)
class ClientLib:
    """One libpcsclite client library, and how to run a program with it.

    ``command(argv)`` and ``env(base)`` always go together::

        subprocess.run(lib.command(argv), env=lib.env(base_env))
    """

    version: str  # upstream version, "2.3.3"
    protocol: str  # what it announces in CMD_VERSION, "4.5" (measured, not assumed)
    deb_version: str  # Debian package version, "2.3.3-1"
    suite: str  # "system", "trixie" or "sid"
    lib_dir: Path | None = None  # folder with libpcsclite.so.1 (+ _real); None: the system's
    loader: Path | None = None  # another glibc's ld-linux, when the library needs that glibc
    library_path: tuple[Path, ...] = ()  # the loader's --library-path
    libc_version: str | None = None  # Debian version of that glibc
    system_lib_dir: Path = field(default=Path("/usr/lib/x86_64-linux-gnu"), compare=False)

    @property
    def library_file(self) -> Path:
        """The libpcsclite.so.1 a program run through command()/env() must load."""
        return (self.lib_dir or self.system_lib_dir) / LIBRARY

    def command(self, argv: list[str]) -> list[str]:
        """The argv that runs ``argv`` (as execvp would) with this library.

        Through another glibc's loader the program is not exec()ed by the kernel, so two things
        exec() would do are done here: the PATH search (ld.so only takes a path), and ``#!``
        scripts (ld.so only takes ELF files; scriptor is a Perl script): their interpreter is
        run through the loader instead. ``--argv0`` keeps argv[0] what exec() would give; that
        matters for python: it finds its venv (pyvenv.cfg next to argv[0]'s folder) from
        argv[0], not from /proc/self/exe (which is the loader here). So run the venv's python
        by its venv path (sys.executable), not by its realpath, exactly as without the loader.
        """
        if not argv:
            raise ValueError("empty argv")
        if self.loader is None:
            # The system's library needs nothing; LD_LIBRARY_PATH (see env()) does the rest.
            return list(argv)
        argv0, path, rest = _resolve_exec(argv)
        return [
            str(self.loader),
            "--library-path",
            ":".join(str(p) for p in self.library_path),
            "--argv0",
            argv0,
            path,
            *rest,
        ]

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The environment for command(): ``base`` plus what selects this library."""
        env = dict(base)
        # 2.3+'s front library loads $LIBPCSCLITE_DELEGATE instead of libpcsclite_real.so.1:
        # an inherited value would silently replace the library under test.
        env.pop("LIBPCSCLITE_DELEGATE", None)
        if self.lib_dir is not None and self.loader is None:
            old = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = f"{self.lib_dir}:{old}" if old else str(self.lib_dir)
        # With a loader, --library-path takes precedence over LD_LIBRARY_PATH, and is
        # deliberately not put in the environment: children the program starts (python's
        # subprocess, opensc's helpers) run on the system glibc, which sid's libraries
        # would break.
        return env

    def shell(self, argv: list[str]) -> str:
        """A copy-pasteable shell line equivalent to command()/env() (for humans and logs)."""
        prefix = ""
        if self.lib_dir is not None and self.loader is None:
            prefix = f"LD_LIBRARY_PATH={shlex.quote(str(self.lib_dir))} "
        return prefix + shlex.join(self.command(argv))

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "protocol": self.protocol,
            "deb_version": self.deb_version,
            "suite": self.suite,
            "lib_dir": str(self.lib_dir) if self.lib_dir else None,
            "loader": str(self.loader) if self.loader else None,
            "library_path": [str(p) for p in self.library_path],
            "libc_version": self.libc_version,
            "system_lib_dir": str(self.system_lib_dir),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> ClientLib:
        def opt_path(v: object) -> Path | None:
            return Path(str(v)) if v else None

        return cls(
            version=str(d["version"]),
            protocol=str(d["protocol"]),
            deb_version=str(d["deb_version"]),
            suite=str(d["suite"]),
            lib_dir=opt_path(d.get("lib_dir")),
            loader=opt_path(d.get("loader")),
            library_path=tuple(Path(str(p)) for p in _as_list(d.get("library_path"))),
            libc_version=str(d["libc_version"]) if d.get("libc_version") else None,
            system_lib_dir=Path(str(d["system_lib_dir"])),
        )


def _as_list(v: object) -> list[object]:
    return list(v) if isinstance(v, list | tuple) else []


class ClientLibs(dict[str, ClientLib]):
    """What ensure_client_libs() returns: keyed by upstream version and by protocol."""

    def __missing__(self, key: str) -> ClientLib:
        # A plain KeyError("4.6") would not say that the archive may have moved on.
        have = ", ".join(f"{k} ({v.suite} {v.deb_version})" for k, v in self.items())
        raise KeyError(f"no libpcsclite client library {key!r}; have: {have}")

    def by_protocol(self) -> dict[str, ClientLib]:
        return {k: v for k, v in self.items() if k == v.protocol}


def _resolve_exec(argv: list[str]) -> tuple[str, str, list[str]]:
    """(argv0, ELF file to hand to ld.so, remaining args), following #! like execve does."""
    argv0 = argv[0]
    path = argv0 if "/" in argv0 else shutil.which(argv0)
    if path is None:
        raise FileNotFoundError(f"{argv0}: not found in PATH")
    with open(path, "rb") as f:
        head = f.read(256)
    if not head.startswith(b"#!"):
        return argv0, path, list(argv[1:])
    # execve(2): "#!interp [one optional arg]" runs interp [arg] path args...
    line = head[2:].split(b"\n", 1)[0].decode().strip()
    interp, _, opt = line.partition(" ")
    opt = opt.strip()
    script_args = [*([opt] if opt else []), path, *argv[1:]]
    if Path(interp).name == "env" and opt and not opt.startswith("-"):
        # "#!/usr/bin/env perl": env would exec perl on the system's glibc; run perl itself.
        return _resolve_exec([opt, path, *argv[1:]])
    return _resolve_exec([interp, *script_args])


# --- probing -------------------------------------------------------------------------------

# Run in the child: load libpcsclite.so.1 as any client would, connect (to our socket), then
# report which files the dynamic loader actually mapped.
_PROBE_SCRIPT = r"""
import ctypes, json
lib = ctypes.CDLL("libpcsclite.so.1")
ctx = ctypes.c_long()  # SCARDCONTEXT is a C long in pcsc-lite on Linux
rv = lib.SCardEstablishContext(2, None, None, ctypes.byref(ctx))  # SCARD_SCOPE_SYSTEM
maps = []
with open("/proc/self/maps") as f:
    for line in f:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].strip() not in maps:
            maps.append(fields[5].strip())
print(json.dumps({"rv": rv & 0xFFFFFFFF, "maps": maps}))
"""


@dataclass(frozen=True)
class ProbeResult:
    major: int
    minor: int
    maps: list[str]  # every file the probe process had mapped (/proc/self/maps)

    @property
    def protocol(self) -> str:
        return f"{self.major}.{self.minor}"


def probe_protocol(lib: ClientLib, python: str | None = None) -> ProbeResult:
    """Run a ctypes client with ``lib`` against a socket of ours; read its CMD_VERSION
    (pcscbridge.doctor.probe), and which files it had mapped."""
    python = python or sys.executable
    try:
        probe = probe_client(
            lib.command([python, "-I", "-c", _PROBE_SCRIPT]),
            lib.env(os.environ),
            PROBE_TIMEOUT,
        )
    except ProbeError as exc:
        raise ClientLibError(f"{lib.suite} {PACKAGE} {lib.deb_version}: {exc}") from None
    try:
        maps = json.loads(probe.stdout.strip().splitlines()[-1])["maps"]
    except (ValueError, IndexError, KeyError) as e:
        raise ClientLibError(f"{lib.suite} probe printed {probe.stdout!r}") from e
    return ProbeResult(probe.major, probe.minor, maps)


def check_loaded(lib: ClientLib, mapped: list[str]) -> str | None:
    """Why the files a process mapped (/proc/PID/maps) are not ``lib``'s; None if they are."""
    resolved = [Path(p).resolve() for p in mapped if p.startswith("/")]
    pcsc = [p for p in resolved if p.name.startswith("libpcsclite")]
    if lib.library_file.resolve() not in pcsc:
        return f"{lib.library_file} was not loaded (pcsc-lite files loaded: {pcsc})"
    # Nothing of another libpcsclite may be mixed in (e.g. the system's, via ld.so.cache).
    stray = [p for p in pcsc if p.parent != lib.library_file.resolve().parent]
    if stray:
        return f"loaded libpcsclite files from elsewhere: {stray}"
    if lib.lib_dir is not None and not any(p.name == REAL_LIBRARY for p in pcsc):
        # 2.3+: the front library must have found its _real sibling (not loaded lazily
        # before the first call; the probe did call SCardEstablishContext).
        return f"{REAL_LIBRARY} was not loaded"
    if lib.loader is not None:
        libc = [p for p in resolved if p.name.startswith("libc.so")]
        if [p.parent for p in libc] != [lib.loader.resolve().parent]:
            return f"ran on libc {libc}, not on the one next to {lib.loader}"
    return None
