"""A tiny Linux guest in real QEMU that sees QEMU's emulated CCID reader, for the QEMU tests.

The guest is built here at test time, from Debian's own parts (/work/shared/qemu-ccid.md has
the recipe it follows): the kernel of bookworm's linux-image-amd64, fetched with
``apt-get download`` into ``.cache/qemu-guest/`` (only the kernel and four USB modules are
kept), and an initramfs of this machine's busybox-static, pcscd, libccid and opensc-tool with
their libraries. Both are cached; the initramfs is rebuilt when its /init changes.

The guest's /init loads the USB host controller modules, waits for the CCID interface (no
udevd: pcscd only sees readers present when it starts), starts pcscd and then runs the
commands the test sends on the second serial port, one line each, printing their output on
the console between markers. QEMU runs with ``-accel tcg`` (KVM does not work on these
machines) and stops when the guest powers off.

    image = ensure_guest_image()
    with QemuGuest(image, workdir, ccid_socket) as guest:   # QEMU listens on ccid_socket
        guest.wait_booted()
        rc, output = guest.sh("opensc-tool -a")
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rig.service import Service, wait_until

CACHE_ENV = "PCSCBRIDGE_QEMU_GUEST_CACHE"
STAMP_FORMAT = 1  # bump when the layout of the cache changes
KERNEL_META_PACKAGE = "linux-image-amd64"
MODULES = ("usb-common", "usbcore", "xhci-hcd", "xhci-pci")  # insmod order, for qemu-xhci
PROGRAMS = ("/usr/sbin/pcscd", "/usr/bin/opensc-tool")
# Loaded with dlopen, so ldd does not list them: the CCID driver (pcscd), the PC/SC client
# library (opensc), libgcc_s (glibc's thread cancellation).
DLOPENED = (
    "/usr/lib/pcsc/drivers/ifd-ccid.bundle/Contents/Linux/libccid.so",
    "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1",
    "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
)
CCID_BUNDLE = "/usr/lib/pcsc/drivers/ifd-ccid.bundle"
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
APT_TIMEOUT = 900.0

GUEST_INIT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /var; ln -s /run /var/run
for m in usb-common usbcore xhci-hcd xhci-pci; do insmod /lib/modules/$m.ko; done
# No udevd: pcscd sees only the readers present when it starts. Wait for the CCID interface.
i=0
until grep -qx 0b /sys/bus/usb/devices/*:*/bInterfaceClass 2>/dev/null || [ $i -ge 300 ]; do
  sleep 0.1; i=$((i+1))
done
pcscd --foreground >/tmp/pcscd.log 2>&1 &
# Each line on ttyS1 is "ID COMMAND"; its output goes to the console between markers. The
# port stays open from here on: bytes that arrive while it is closed are lost.
exec 3</dev/ttyS1
stty raw -echo <&3
echo "@@BOOTED $(cut -d' ' -f1 /proc/uptime)"
while read -r id cmd <&3; do
  out=$(sh -c "$cmd" 2>&1 3<&-); rc=$?
  printf '@@BEGIN %s\n%s\n@@END %s %s\n' "$id" "$out" "$id" "$rc"
done
poweroff -f
"""


class GuestError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_package: str


def default_cache_dir() -> Path:
    """$PCSCBRIDGE_QEMU_GUEST_CACHE, else ``<repo>/.cache/qemu-guest`` (git-ignored)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".cache" / "qemu-guest"


def ensure_guest_image(cache_dir: Path | None = None) -> GuestImage:
    """The guest's kernel and initramfs, built once and cached (safe from parallel processes)."""
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp_path = cache / "stamp.json"
        wanted = {"format": STAMP_FORMAT, "init": hashlib.sha256(GUEST_INIT.encode()).hexdigest()}
        stamp = _read_stamp(stamp_path)
        kernel_dir = cache / "kernel"
        if stamp.get("format") != STAMP_FORMAT or not (kernel_dir / "vmlinuz").exists():
            stamp = {"kernel_package": _fetch_kernel(kernel_dir)}
        initrd = cache / "initrd.gz"
        if stamp.get("init") != wanted["init"] or not initrd.exists():
            _build_initrd(kernel_dir, initrd)
        stamp.update(wanted)
        stamp_path.write_text(json.dumps(stamp))
        return GuestImage(kernel_dir / "vmlinuz", initrd, str(stamp["kernel_package"]))


def _read_stamp(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


# --- the kernel ------------------------------------------------------------------------------
def _fetch_kernel(kernel_dir: Path) -> str:
    """bookworm's current kernel package: vmlinuz and the USB modules, nothing else kept."""
    package = _kernel_package()
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=kernel_dir.parent) as tmp:
        _apt(["apt-get", "download", package], cwd=tmp)
        (deb,) = Path(tmp).glob("*.deb")
        patterns = ["./boot/vmlinuz-*"] + [f"./lib/modules/*/{name}.ko" for name in MODULES]
        tar = subprocess.run(
            f"dpkg-deb --fsys-tarfile {deb} | tar -x -C {tmp} --wildcards "
            + " ".join(f"'{p}'" for p in patterns),
            shell=True,
            capture_output=True,
            text=True,
        )
        if tar.returncode != 0:
            raise GuestError(f"cannot extract {deb.name}: {tar.stderr.strip()}")
        shutil.rmtree(kernel_dir, ignore_errors=True)
        kernel_dir.mkdir()
        (vmlinuz,) = Path(tmp, "boot").glob("vmlinuz-*")
        shutil.copy(vmlinuz, kernel_dir / "vmlinuz")
        for name in MODULES:
            (module,) = Path(tmp, "lib", "modules").glob(f"*/**/{name}.ko")
            shutil.copy(module, kernel_dir / f"{name}.ko")
    return package


def _kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on today (linux-image-6.1.0-NN-amd64)."""
    for attempt in range(2):
        result = subprocess.run(
            ["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True
        )
        found = re.search(r"Depends:\s*(linux-image-\S+)", result.stdout)
        if found:
            return found.group(1)
        if attempt == 0:
            _apt(["apt-get", "update", "-qq"])  # a machine whose package lists were cleaned
    raise GuestError(f"apt-cache knows no {KERNEL_META_PACKAGE}: {result.stderr.strip()}")


def _apt(argv: list[str], cwd: str | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT)
    if result.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


# --- the initramfs ---------------------------------------------------------------------------
def _build_initrd(kernel_dir: Path, initrd: Path) -> None:
    missing = [p for p in (BUSYBOX, *PROGRAMS, *DLOPENED) if not os.path.exists(p)]
    if missing:
        raise GuestError(f"missing {', '.join(missing)}: run `make deps`")
    with tempfile.TemporaryDirectory(prefix="initrd-", dir=initrd.parent) as tmp:
        root = Path(tmp, "root")
        for folder in ("usr/bin", "usr/sbin", "usr/lib/modules", "usr/lib64", "etc"):
            (root / folder).mkdir(parents=True)
        for folder in ("proc", "sys", "dev", "run", "tmp"):
            (root / folder).mkdir()
        for link in ("bin", "sbin", "lib", "lib64"):  # merged /usr: ldd's paths work as they are
            (root / link).symlink_to(f"usr/{link}")
        _copy(BUSYBOX, root / "usr/bin/busybox")
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout
        for applet in applets.split():
            target = root / "usr/bin" / applet
            if not target.exists():
                target.symlink_to("busybox")
        for path in (*PROGRAMS, *DLOPENED, *_shared_libraries([*PROGRAMS, *DLOPENED])):
            _copy(path, root / _merged_usr(path).lstrip("/"))
        # Info.plist is a symlink to /etc/libccid_Info.plist: copy what it points at.
        shutil.copytree(
            CCID_BUNDLE, root / CCID_BUNDLE.lstrip("/"), symlinks=False, dirs_exist_ok=True
        )
        for name in MODULES:
            _copy(str(kernel_dir / f"{name}.ko"), root / "usr/lib/modules" / f"{name}.ko")
        (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        init = root / "init"
        init.write_text(GUEST_INIT)
        init.chmod(0o755)
        partial = initrd.with_suffix(".partial")
        packed = subprocess.run(
            f"find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > {partial}",
            shell=True,
            cwd=root,
            capture_output=True,
            text=True,
        )
        if packed.returncode != 0:
            raise GuestError(f"cannot pack the initramfs: {packed.stderr.strip()}")
        partial.replace(initrd)


def _shared_libraries(paths: list[str]) -> set[str]:
    libraries: set[str] = set()
    for path in paths:
        listing = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            found = re.search(r"=>\s*(/\S+)|^\s*(/\S+)\s*\(", line)
            if found:
                libraries.add(found.group(1) or found.group(2))
    return libraries


def _merged_usr(path: str) -> str:
    return "/usr" + path if path.startswith(("/lib/", "/lib64/", "/bin/", "/sbin/")) else path


def _copy(source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)  # follows symlinks: the file itself


# --- running it ------------------------------------------------------------------------------
class QemuGuest(Service):
    """QEMU (TCG) booting the guest with one usb-ccid reader fed over ``ccid_socket``
    (QEMU listens there, ``server=on,wait=off``; pcscbridge qemu connects)."""

    def __init__(self, image: GuestImage, workdir: Path, ccid_socket: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.ccid_socket = ccid_socket
        self.console_path = workdir / "console.log"
        self.control_path = workdir / "control.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._next_id = 0
        self._seen = 0  # console bytes already searched for a command's end

    def start(self) -> QemuGuest:
        if shutil.which(QEMU) is None:
            raise GuestError(f"{QEMU} is missing: run `make deps`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            QEMU,
            *("-accel", "tcg", "-m", "512", "-smp", "1", "-no-reboot", "-nodefaults"),
            *("-display", "none", "-monitor", "none", "-nic", "none"),
            *("-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd)),
            *("-append", "console=ttyS0 loglevel=1 panic=-1"),
            *("-serial", f"file:{self.console_path}"),
            *("-serial", f"unix:{self.control_path},server=on,wait=off"),
            *("-chardev", f"socket,id=ccid,path={self.ccid_socket},server=on,wait=off"),
            *("-device", "qemu-xhci,id=xhci", "-device", "usb-ccid,id=ccid0,bus=xhci.0"),
            *("-device", "ccid-card-passthru,chardev=ccid,bus=ccid0.0"),
        ]
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "qemu.log", "wb"),  # noqa: SIM115 - the child keeps it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def connected() -> bool:
            # The path exists a moment before QEMU listens on it.
            assert self._control is not None
            self._control.connect(str(self.control_path))
            return True

        wait_until(connected, 20, "QEMU's control socket", ignore=(OSError,), give_up=self._check)
        return self

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @property
    def console(self) -> str:
        try:
            # The guest's tty turns each newline into CR LF.
            return self.console_path.read_text(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def wait_booted(self, timeout: float = 90) -> float:
        """Seconds from QEMU's start until the guest's /init runs commands."""
        started = time.monotonic()
        wait_until(
            lambda: "@@BOOTED" in self.console, timeout, "the guest to boot", give_up=self._check
        )
        return time.monotonic() - started

    def sh(self, command: str, timeout: float = 30) -> tuple[int, str]:
        """Run one line of shell in the guest: its exit status and output."""
        if self._control is None or "\n" in command:
            raise GuestError("the guest runs one line at a time, once started")
        self._next_id += 1
        ident = self._next_id
        self._control.sendall(f"{ident} {command}\n".encode())
        end = re.compile(rf"^@@BEGIN {ident}\n(.*?)\n?@@END {ident} (\d+)$", re.M | re.S)
        found: list[re.Match[str]] = []

        def finished() -> bool:
            match = end.search(self.console, self._seen)
            if match:
                found.append(match)
            return bool(match)

        wait_until(finished, timeout, f"the guest to run {command!r}", give_up=self._check)
        self._seen = found[0].end()
        return int(found[0].group(2)), found[0].group(1)

    def _check(self) -> None:
        process = self._process
        if process is not None and process.poll() is not None:
            raise GuestError(f"QEMU exited with {process.returncode}")
