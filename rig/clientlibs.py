"""Real libpcsclite client libraries of every protocol dialect, for tests on Debian 12.

pcscbridge's guest server must satisfy unmodified libpcsclite clients of every dialect. Debian 12
ships only libpcsclite1 1.9.9 (protocol 4.4). This module fetches the newer client libraries
from the Debian archive, without touching the system (no install, no change to the system's apt
configuration or dpkg database):

* ``"4.4"``: the system's own libpcsclite1 (1.9.9), nothing to fetch;
* ``"4.5"``: trixie's libpcsclite1 (2.3.3), loaded with ``LD_LIBRARY_PATH``;
* ``"4.6"``: sid's libpcsclite1 (2.5.3). It needs GLIBC_2.38 (bookworm has 2.36), so sid's libc6
  is fetched too and programs are started through sid's dynamic loader with ``--library-path``.

The returned mapping is keyed by upstream version (``"1.9.9"``, ``"2.3.3"``, ``"2.5.3"``: whatever
the archive carries now) and by protocol (``"4.4"``, ``"4.5"``, ``"4.6"``). The protocol is not
looked up in a table: it is measured once after extraction, by letting the library connect to a
UNIX socket of ours and reading the ``CMD_VERSION`` it sends (spec §6). The same probe checks,
through ``/proc/self/maps``, that the expected files were loaded.

Use::

    libs = ensure_client_libs()
    lib = libs["4.6"]
    subprocess.run(lib.command(["pcsc_scan", "-r"]),
                   env=lib.env({**os.environ, "PCSCLITE_CSOCK_NAME": sock}))

``command()`` + ``env()`` run any bookworm program (ELF or ``#!`` script: pcsc_scan, opensc-tool,
scriptor, the venv's python with pyscard) with that library.

CLI: ``python -m rig.clientlibs`` fetches (if needed) and prints what it has;
``... --run 4.6 -- pcsc_scan -r`` runs a program with one of them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pcscbridge.testing.rawclient import recv_exactly

__all__ = [
    "ClientLib",
    "ClientLibError",
    "ClientLibs",
    "ProbeResult",
    "check_loaded",
    "default_cache_dir",
    "ensure_client_libs",
    "probe_protocol",
]

PACKAGE = "libpcsclite1"
LIBC_PACKAGE = "libc6"
LIBRARY = "libpcsclite.so.1"
# 2.3.0+ split the library: libpcsclite.so.1 is a small front that dlopen()s this one by name.
REAL_LIBRARY = "libpcsclite_real.so.1"

# Which suite provides which dialect, and whether it needs that suite's glibc as well.
# The protocol each one speaks is measured (probe_protocol); EXPECTED_PROTOCOL only turns an
# archive that moved on (e.g. sid going to a 4.7 library) into a clear error instead of a
# silently different test matrix.
SUITES: dict[str, bool] = {"trixie": False, "sid": True}
EXPECTED_PROTOCOL = {"system": "4.4", "trixie": "4.5", "sid": "4.6"}

STAMP_NAME = "clientlibs.json"
# Bump when the layout of the cache or the stamp changes: old caches are then re-fetched.
STAMP_FORMAT = 1
CACHE_ENV = "PCSCBRIDGE_CLIENTLIBS_CACHE"
MIRROR_ENV = "PCSCBRIDGE_DEBIAN_MIRROR"

APT_TIMEOUT = 900.0  # seconds for one apt-get call; a slow mirror is slow, a dead one errors
PROBE_TIMEOUT = 20.0

# Settings of the system's apt configuration that a private apt needs as well to reach the
# mirror the same way (proxies), or to accept the same Release files (this machine's mirror is
# a snapshot older than the clock says, so the system turns off Valid-Until checks).
_INHERITED_APT = re.compile(
    r"^Acquire::(?:Check-Valid-Until|Check-Date|Retries|"
    r"(?:https?|ftp)::(?:Proxy|Timeout)(?:::\S+)?) "
)

_CMD_VERSION = 0x11


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


def default_cache_dir() -> Path:
    """$PCSCBRIDGE_CLIENTLIBS_CACHE, else ``<repo>/.cache/clientlibs`` (git-ignored)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "clientlibs"


def ensure_client_libs(
    cache_dir: Path | None = None, *, refresh: bool = False, mirror: str | None = None
) -> ClientLibs:
    """Fetch and extract the client libraries if not done yet; return them all.

    Idempotent and cheap once done: a stamp file in ``cache_dir`` records what was extracted
    and checked, and the archive is not contacted again unless ``refresh`` is true (then the
    current trixie/sid versions are fetched anew). Safe to call from parallel test processes
    (a lock file serialises them). ``mirror`` overrides the Debian mirror URI, which is
    otherwise $PCSCBRIDGE_DEBIAN_MIRROR or the system's own bookworm source.

    Raises ClientLibError naming the step that failed (no network, package missing, ...).
    """
    cache = (cache_dir or default_cache_dir()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        system = _system_lib()
        stamp = None if refresh else _read_stamp(cache)
        changed = stamp is None
        if stamp is None:
            libs = _fetch(cache, mirror)
            stamp = {"format": STAMP_FORMAT, "libs": [lib.to_json() for lib in libs]}
        fetched = [ClientLib.from_json(d) for d in stamp["libs"]]
        # The system's library is re-checked every time (dpkg-query is cheap) and only
        # probed again when it changed, e.g. after an upgrade.
        cached = stamp.get("system")
        if isinstance(cached, dict) and cached.get("deb_version") == system.deb_version:
            system = ClientLib.from_json(cached)
        else:
            system = _with_probed_protocol(system)
            stamp["system"] = system.to_json()
            changed = True
        if changed:
            _write_stamp(cache, stamp)
    result = ClientLibs()
    for lib in [system, *fetched]:
        result[lib.version] = lib
        result[lib.protocol] = lib
    return result


# --- fetching -----------------------------------------------------------------------------


def _fetch(cache: Path, mirror: str | None) -> list[ClientLib]:
    system_lib_dir = _system_lib_dir()
    multiarch = system_lib_dir.name  # "x86_64-linux-gnu": the packages use the same layout
    apt_dir = cache / "apt"
    debs_dir = cache / "debs"
    # The old stamp would describe folders about to be replaced.
    (cache / STAMP_NAME).unlink(missing_ok=True)
    shutil.rmtree(apt_dir, ignore_errors=True)
    shutil.rmtree(debs_dir, ignore_errors=True)
    uri, keyring = _mirror(mirror)
    # One private apt per suite, run side by side: most of apt's time is parsing the ~60 MB
    # Packages list, and each apt then parses only its own suite's list.
    jobs = {
        suite: [PACKAGE, *([LIBC_PACKAGE] if needs_libc else [])]
        for suite, needs_libc in SUITES.items()
    }
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {
            suite: pool.submit(
                _download, suite, packages, apt_dir / suite, debs_dir / suite, uri, keyring
            )
            for suite, packages in jobs.items()
        }
        debs = {
            (suite, package): path
            for suite, future in futures.items()
            for package, path in future.result().items()
        }

    libs = []
    for suite, needs_libc in SUITES.items():
        root = cache / suite
        shutil.rmtree(root, ignore_errors=True)
        pcsc_root = _extract(debs[(suite, PACKAGE)], root / PACKAGE)
        lib_dir = pcsc_root / "usr" / "lib" / multiarch
        for name in (LIBRARY, REAL_LIBRARY):
            if not (lib_dir / name).is_file():
                raise ClientLibError(
                    f"{suite}'s {PACKAGE} has no {lib_dir.relative_to(root) / name}"
                )
        deb_version = _deb_field(debs[(suite, PACKAGE)], "Version")
        loader = None
        library_path: tuple[Path, ...] = ()
        libc_version = None
        if needs_libc:
            libc_root = _extract(debs[(suite, LIBC_PACKAGE)], root / LIBC_PACKAGE)
            libc_dir = libc_root / "usr" / "lib" / multiarch
            loaders = sorted(libc_dir.glob("ld-linux*.so.*"))
            if len(loaders) != 1:
                raise ClientLibError(f"{suite}'s {LIBC_PACKAGE}: no unique loader in {libc_dir}")
            loader = loaders[0]
            libc_version = _deb_field(debs[(suite, LIBC_PACKAGE)], "Version")
            # Order matters: the library under test, then its glibc (so that glibc, not the
            # system's, is found first), then the system's folders for everything else the
            # program links (bookworm's libs run fine on the newer glibc).
            library_path = (
                lib_dir,
                libc_dir,
                system_lib_dir,
                Path("/lib") / multiarch,
            )
        lib = ClientLib(
            version=_upstream(deb_version),
            protocol="?",
            deb_version=deb_version,
            suite=suite,
            lib_dir=lib_dir,
            loader=loader,
            library_path=library_path,
            libc_version=libc_version,
            system_lib_dir=system_lib_dir,
        )
        libs.append(_with_probed_protocol(lib))
    # The package lists are ~45 MB and only needed to find the .debs: drop them.
    shutil.rmtree(apt_dir, ignore_errors=True)
    return libs


def _download(
    suite: str, packages: list[str], apt_dir: Path, debs_dir: Path, uri: str, keyring: Path | None
) -> dict[str, Path]:
    """Fetch the current .debs of ``packages`` from ``suite`` with a private apt."""
    env = _private_apt(apt_dir, uri, keyring, [suite])
    _apt(
        ["apt-get", "update", "--error-on=any"],
        env,
        apt_dir,
        what=f"apt-get update of {suite} from {uri}",
    )
    debs_dir.mkdir(parents=True)
    _let_apt_sandbox_write(debs_dir)
    _apt(
        ["apt-get", "download", *packages],
        env,
        debs_dir,
        what=f"downloading {' '.join(packages)} from {suite} ({uri})",
    )
    found = {_deb_field(deb, "Package"): deb for deb in debs_dir.glob("*.deb")}
    if sorted(found) != sorted(packages):
        raise ClientLibError(f"apt-get download {packages} from {suite} gave {sorted(found)}")
    return found


def _private_apt(
    apt_dir: Path, uri: str, keyring: Path | None, suites: list[str]
) -> dict[str, str]:
    """Write a private apt configuration; return the environment that selects it.

    APT_CONFIG (not ``-o``) because it is read *before* /etc/apt/apt.conf.d, so it can point
    Dir::Etc::parts away from there: the system's snippets carry hooks (APT::Update::Post-Invoke,
    docker-clean's cache deletion, packagekit) that must not run for a private update.
    """
    empty = apt_dir / "empty"
    for d in (
        apt_dir / "state" / "lists" / "partial",
        apt_dir / "cache" / "archives" / "partial",
        apt_dir / "log",
        empty,
    ):
        d.mkdir(parents=True, exist_ok=True)
    (apt_dir / "state" / "status").touch()  # an empty dpkg status: nothing is "installed"
    signed = f" [signed-by={keyring}]" if keyring else ""
    (apt_dir / "sources.list").write_text(
        "".join(f"deb{signed} {uri} {suite} main\n" for suite in suites)
    )
    arch = _run(["dpkg", "--print-architecture"], what="dpkg --print-architecture").strip()
    inherited = [
        line
        for line in _run(["apt-config", "dump"], what="apt-config dump").splitlines()
        if _INHERITED_APT.match(line)
    ]
    conf = apt_dir / "apt.conf"
    conf.write_text(
        "\n".join(
            [
                f'Dir::State "{apt_dir}/state";',
                f'Dir::State::status "{apt_dir}/state/status";',
                f'Dir::Cache "{apt_dir}/cache";',
                # No binary caches: ~70 MB each, and nothing reuses them.
                'Dir::Cache::pkgcache "";',
                'Dir::Cache::srcpkgcache "";',
                f'Dir::Etc::sourcelist "{apt_dir}/sources.list";',
                f'Dir::Etc::sourceparts "{empty}";',
                f'Dir::Etc::parts "{empty}";',
                f'Dir::Etc::main "{conf}";',
                f'Dir::Etc::preferences "{empty}/preferences";',
                f'Dir::Etc::preferencesparts "{empty}";',
                f'Dir::Log "{apt_dir}/log";',
                # Only the native architecture's Packages, no translations: the smallest update.
                f'APT::Architecture "{arch}";',
                f'APT::Architectures {{ "{arch}"; }};',
                'Acquire::Languages "none";',
                # Keep the lists compressed on disk (45 MB instead of 120 MB; no slower).
                'Acquire::GzipIndexes "true";',
                *inherited,
                "",
            ]
        )
    )
    return {**os.environ, "APT_CONFIG": str(conf), "LC_ALL": "C"}


def _mirror(override: str | None) -> tuple[str, Path | None]:
    """The Debian archive URI (from the system's own apt sources) and the keyring to trust."""
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    key = keyring if keyring.is_file() else None  # else: the system's trusted.gpg.d
    uri = override or os.environ.get(MIRROR_ENV)
    if uri:
        return uri.rstrip("/"), key
    codename = _os_release().get("VERSION_CODENAME", "bookworm")
    # apt's own view of the configured sources (handles one-line and deb822 files alike).
    out = _run(
        [
            "apt-get",
            "indextargets",
            "--no-release-info",
            "Identifier: Packages",
            "--format",
            "$(TARGET_OF) $(RELEASE) $(COMPONENT) $(SITE)",
        ],
        what="apt-get indextargets (reading the system's apt sources)",
    )
    for wanted in (codename, "stable", "oldstable"):
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "deb" and parts[1] == wanted and parts[2] == "main":
                return parts[3].rstrip("/"), key
    raise ClientLibError(
        f"no Debian '{codename} main' source in the system's apt sources to take the mirror "
        f"from; set {MIRROR_ENV}=http://deb.debian.org/debian (or pass mirror=...)"
    )


def _let_apt_sandbox_write(folder: Path) -> None:
    # As root, apt downloads as the unprivileged _apt user; a folder _apt cannot write makes
    # it fall back to unsandboxed downloading (with a warning). Hand the folder to _apt.
    if os.geteuid() != 0:
        return
    with contextlib.suppress(KeyError, OSError):
        shutil.chown(folder, user=pwd.getpwnam("_apt").pw_uid)


def _extract(deb: Path, dest: Path) -> Path:
    # dpkg-deb -x only unpacks the data; it never touches the dpkg database.
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], what=f"extracting {deb.name}")
    return dest


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name], what=f"reading {deb.name}").strip()


def _upstream(deb_version: str) -> str:
    """Debian version -> upstream version: "1:2.5.3-1+b1" -> "2.5.3"."""
    v = deb_version.split(":", 1)[-1]
    return v.rsplit("-", 1)[0] if "-" in v else v


def _system_lib_dir() -> Path:
    out = _run(["dpkg-query", "-L", PACKAGE], what=f"listing the system's {PACKAGE}")
    for line in out.splitlines():
        if line.endswith("/" + LIBRARY):
            return Path(line).parent
    raise ClientLibError(f"the system's {PACKAGE} has no {LIBRARY} (apt-get install {PACKAGE})")


def _system_lib() -> ClientLib:
    deb_version = _run(
        ["dpkg-query", "-W", "-f", "${Version}", PACKAGE],
        what=f"the system's {PACKAGE} (apt-get install {PACKAGE})",
    ).strip()
    if not deb_version:
        raise ClientLibError(f"the system's {PACKAGE} is not installed")
    return ClientLib(
        version=_upstream(deb_version),
        protocol="?",
        deb_version=deb_version,
        suite="system",
        system_lib_dir=_system_lib_dir(),
    )


def _os_release() -> dict[str, str]:
    result = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep:
                result[k] = v.strip().strip('"')
    return result


def _run(
    argv: list[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> str:
    try:
        p = subprocess.run(
            argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClientLibError(f"{what}: {shlex.join(argv)}: {e}") from e
    if p.returncode != 0:
        detail = (p.stderr.strip() or p.stdout.strip())[-2000:]
        raise ClientLibError(f"{what} failed (exit {p.returncode}): {shlex.join(argv)}\n{detail}")
    return p.stdout


def _apt(argv: list[str], env: Mapping[str, str], cwd: Path, *, what: str) -> str:
    return _run(argv, what=what, env=env, cwd=cwd, timeout=APT_TIMEOUT)


# --- stamp ---------------------------------------------------------------------------------


def _read_stamp(cache: Path) -> dict | None:
    """The stamp, if it is of this format and everything it names is still there."""
    try:
        stamp = json.loads((cache / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
        return None
    try:
        libs = [ClientLib.from_json(d) for d in stamp["libs"]]
    except (KeyError, TypeError):
        return None
    if sorted(lib.suite for lib in libs) != sorted(SUITES):
        return None
    for lib in libs:
        assert lib.lib_dir is not None
        needed = [lib.lib_dir / LIBRARY, lib.lib_dir / REAL_LIBRARY]
        if lib.loader:
            needed.append(lib.loader)
        if not all(p.is_file() for p in needed):
            return None
    return stamp


def _write_stamp(cache: Path, stamp: dict) -> None:
    # Written last and atomically: a stamp only ever describes a complete, checked extraction.
    tmp = cache / (STAMP_NAME + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    tmp.replace(cache / STAMP_NAME)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    """Run a ctypes client with ``lib`` against a socket of ours; read its CMD_VERSION.

    No pcscd is involved: the 20 bytes a client sends first (header {12, 0x11} + {major,
    minor, 0}, spec §5.1/§6) are read, then the connection is closed, which makes
    SCardEstablishContext fail quickly in every version.
    """
    python = python or sys.executable
    with tempfile.TemporaryDirectory(prefix="pcscbridge-probe-") as tmp:
        sock_path = os.path.join(tmp, "pcscd.comm")
        env = lib.env({**os.environ, "PCSCLITE_CSOCK_NAME": sock_path})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
            srv.bind(sock_path)
            srv.listen(1)
            proc = subprocess.Popen(
                lib.command([python, "-I", "-c", _PROBE_SCRIPT]),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                data = _first_bytes(srv, proc, 20)
                out, err = proc.communicate(timeout=PROBE_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    if len(data) != 20:
        raise ClientLibError(
            f"{lib.suite} {PACKAGE} {lib.deb_version}: the probe client sent {data!r} instead "
            f"of a CMD_VERSION (exit {proc.returncode}): {err.strip()[-1000:]}"
        )
    size, cmd, major, minor, rv = struct.unpack("<IIiiI", data)
    if (size, cmd, rv) != (12, _CMD_VERSION, 0):
        raise ClientLibError(f"{lib.suite} {PACKAGE}: unexpected first message {data.hex()}")
    try:
        maps = json.loads(out.strip().splitlines()[-1])["maps"]
    except (ValueError, IndexError, KeyError) as e:
        raise ClientLibError(f"{lib.suite} probe printed {out!r}, stderr {err!r}") from e
    return ProbeResult(major, minor, maps)


def _first_bytes(srv: socket.socket, proc: subprocess.Popen[str], n: int) -> bytes:
    """Accept one connection and read n bytes, giving up if the client dies or times out."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    srv.settimeout(0.05)
    conn = None
    while conn is None:
        if time.monotonic() > deadline or proc.poll() is not None:
            return b""
        with contextlib.suppress(TimeoutError):
            conn, _ = srv.accept()
    with conn:
        # libpcsclite sends header and body with separate send()s: read until n bytes.
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        return recv_exactly(conn, n)


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


def _with_probed_protocol(lib: ClientLib) -> ClientLib:
    """Probe ``lib``: record its protocol, and check that the intended files were loaded."""
    result = probe_protocol(lib)
    problem = check_loaded(lib, result.maps)
    if problem:
        raise ClientLibError(f"{lib.suite} {PACKAGE} {lib.deb_version}: {problem}")
    expected = EXPECTED_PROTOCOL[lib.suite]
    if result.protocol != expected:
        raise ClientLibError(
            f"{lib.suite}'s {PACKAGE} {lib.deb_version} announces protocol {result.protocol}, "
            f"expected {expected}: the archive moved on; pcscbridge's dialect tests need "
            f"updating (SUITES/EXPECTED_PROTOCOL in {__name__})"
        )
    return dataclasses.replace(lib, protocol=result.protocol)


# --- CLI -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rig.clientlibs",
        description="Fetch libpcsclite client libraries of protocols 4.4-4.6; show or use them.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: %(default)s")
    parser.add_argument("--refresh", action="store_true", help="fetch anew from the archive")
    parser.add_argument("--mirror", default=None, help="Debian mirror URI (default: system's)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--run", metavar="KEY", help="run the command after -- with this library (4.6, 2.5.3, ...)"
    )
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        libs = ensure_client_libs(args.cache_dir, refresh=args.refresh, mirror=args.mirror)
    except ClientLibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    if args.run:
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("--run needs a command after --")
        try:
            lib = libs[args.run]
        except KeyError as e:
            parser.error(str(e))
        full = lib.command(cmd)
        os.execvpe(full[0], full, lib.env(os.environ))
    by_protocol = libs.by_protocol()
    if args.json:
        print(json.dumps({k: v.to_json() for k, v in sorted(by_protocol.items())}, indent=2))
        return 0
    print(f"cache: {(args.cache_dir or default_cache_dir()).resolve()} ({took:.1f} s)")
    for proto, lib in sorted(by_protocol.items()):
        extra = f", libc6 {lib.libc_version}" if lib.libc_version else ""
        print(f"protocol {proto}: {PACKAGE} {lib.deb_version} ({lib.suite}{extra})")
        print(f"  {lib.shell(['pcsc_scan', '-r'])}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
