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
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rig.libpcsclite import (
    LIBRARY,
    PACKAGE,
    REAL_LIBRARY,
    ClientLib,
    ClientLibError,
    ClientLibs,
    ProbeResult,
    check_loaded,
    probe_protocol,
)

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

LIBC_PACKAGE = "libc6"

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

# Settings of the system's apt configuration that a private apt needs as well to reach the
# mirror the same way (proxies), or to accept the same Release files (this machine's mirror is
# a snapshot older than the clock says, so the system turns off Valid-Until checks).
_INHERITED_APT = re.compile(
    r"^Acquire::(?:Check-Valid-Until|Check-Date|Retries|"
    r"(?:https?|ftp)::(?:Proxy|Timeout)(?:::\S+)?) "
)


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


def _read_stamp(cache: Path) -> dict[str, Any] | None:
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


def _write_stamp(cache: Path, stamp: dict[str, Any]) -> None:
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


# --- checking what was extracted -----------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
