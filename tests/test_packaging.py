"""What an install needs (a guest runs with trio and msgpack alone), and what packaging makes:
the wheel and sdist, the version, the man page and shell completions."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

from pcscbridge import cli, config
from pcscbridge.testing.rawclient import RawClient
from rig.bridge_processes import PCSCBRIDGE

# Importing either of them fails in the child, as on a guest installed without the [host] extra.
WITHOUT_HOST_EXTRA = (
    "import sys, runpy\n"
    "sys.modules['smartcard'] = None\n"
    "sys.modules['paramiko'] = None\n"
    "sys.argv = ['pcscbridge', *sys.argv[1:]]\n"
    "runpy.run_module('pcscbridge', run_name='__main__')\n"
)


def test_the_guest_runs_without_pyscard_and_paramiko(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "pcscd.comm")
    guest = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WITHOUT_HOST_EXTRA,
            "guest",
            "--listen",
            socket_path,
            "--link",
            f"unix:{tmp_path / 'link.sock'}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(socket_path).exists():
            assert guest.poll() is None, guest.communicate()[1]
            assert time.monotonic() < deadline, "the guest never listened"
            time.sleep(0.02)
        with RawClient(socket_path) as client:
            assert client.version().rv == 0
            assert client.establish().rv == 0
            assert client.readers_state() == [None] * 16  # no host attached: no readers
    finally:
        guest.terminate()
        _, errors = guest.communicate(timeout=10)
    assert guest.returncode == 0, errors
    assert "Traceback" not in errors


# ------------------------------------------------------------------ packaging (make targets)

REPO = Path(__file__).parents[1]


def make(*args: str) -> subprocess.CompletedProcess[str]:
    """A target of the project's Makefile, with this test's venv."""
    venv = Path(sys.executable).parents[1]
    result = subprocess.run(
        ["make", "-s", "-C", str(REPO), f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_version_is_the_package_metadata() -> None:
    result = subprocess.run(
        [*PCSCBRIDGE, "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout == f"pcscbridge {metadata.version('pcscbridge')}\n"


def test_build_makes_a_wheel_and_an_sdist_without_deprecation_warnings(tmp_path: Path) -> None:
    result = make("dist", f"DIST_DIR={tmp_path}")
    said = result.stdout + result.stderr
    assert "Deprecat" not in said and "deprecat" not in said, said
    version = metadata.version("pcscbridge")
    wheel = tmp_path / f"pcscbridge-{version}-py3-none-any.whl"
    sdist = tmp_path / f"pcscbridge-{version}.tar.gz"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = archive.read(f"pcscbridge-{version}.dist-info/METADATA").decode()
        entry_points = archive.read(f"pcscbridge-{version}.dist-info/entry_points.txt").decode()
    assert "pcscbridge/doctor/checks.py" in names and "pcscbridge/serve.py" in names
    assert not [name for name in names if name.startswith(("rig/", "tests/", "bench/"))]
    assert "License-Expression: MIT" in info
    assert "pcscbridge = pcscbridge.cli:main" in entry_points
    with tarfile.open(sdist) as archive:
        files = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for wanted in (
        "contrib/systemd/pcscbridge-guest.socket",
        "contrib/systemd/user/pcscbridge-guest.socket",
        "contrib/qubes/pcscbridge.Link",
        "contrib/pcscbridge.toml",
        "protocol/link.md",
        "pcscbridge/cli/commands.py",
    ):
        assert wanted in files, wanted


def test_man_page_and_completions_come_from_the_parser(tmp_path: Path) -> None:
    make("man", "completions", f"MAN_DIR={tmp_path}", f"COMPLETIONS_DIR={tmp_path}")
    parser = cli.build_parser()
    commands = config._subparsers(parser)
    assert {"guest", "host", "attach", "serve", "doctor"} <= commands.keys()
    page = (tmp_path / "pcscbridge.1").read_text()
    bash = (tmp_path / "pcscbridge.bash").read_text()
    zsh = (tmp_path / "_pcscbridge").read_text()
    assert page.startswith(".TH PCSCBRIDGE") and "EXIT STATUS" in page
    for name, sub in commands.items():
        assert f"pcscbridge {name}" in page, name
        assert name in bash and f"{name}:" in zsh, name
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option.replace("-", "\\-") in page or option in page, (name, option)
    # The machine's own runtime directory is not baked into the page.
    assert "$XDG_RUNTIME_DIR/pcscbridge/link.sock" in page
    # The bash completion completes, in bash.
    completed = subprocess.run(
        [
            "bash",
            "-c",
            f'source "{tmp_path / "pcscbridge.bash"}"; COMP_WORDS=(pcscbridge host --ssh-c); '
            'COMP_CWORD=2; _shtab_pcscbridge; echo "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert completed.stdout.split() == ["--ssh-client", "--ssh-config"]


def test_keygen_without_cryptography_says_what_to_install(tmp_path: Path) -> None:
    without = WITHOUT_HOST_EXTRA.replace(
        "sys.modules['paramiko'] = None\n",
        "sys.modules['paramiko'] = None\nsys.modules['cryptography'] = None\n",
    )
    result = subprocess.run(
        [sys.executable, "-c", without, "keygen", str(tmp_path / "key.pem")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "pip install 'pcscbridge[tls]'" in result.stderr
    assert not (tmp_path / "key.pem").exists()
