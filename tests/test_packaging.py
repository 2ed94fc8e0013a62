"""What an install needs: a guest runs with trio and msgpack alone (no pyscard, no paramiko)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pcscbridge.testing.rawclient import RawClient

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
