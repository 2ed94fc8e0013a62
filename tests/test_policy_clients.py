"""Real applications through a guest and a host process under a policy: the documented
defaults let pcsc_scan, OpenSC (opensc-tool, the PKCS#11 module browsers load, through
pkcs11-tool) and GnuPG's scdaemon work as they do on the host; and a PIN sent every way an
application can send one never shows in any log, audit or trace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.bridge_processes import Bridge
from rig.pcsc_programs import json_lines
from rig.pcscd_rig import PcscdRig, pcsc_client_env, run_pcsc_client
from rig.processes import PROGRAMS

pytestmark = pytest.mark.rig

READER = "Virtual PCD 00 00"
OPENSC_PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
PIN, NEW_PIN, PUK = "735194", "246813", "84120637"  # the test card's PIN and PUK


@pytest.fixture
def defaults_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text('[guests."*"]\n# every key at its documented default\n')
    return path


@pytest.fixture
def bridge(
    pcscd_rig: PcscdRig, tmp_path: Path, defaults_policy: Path, request: pytest.FixtureRequest
) -> Iterator[Bridge]:
    with Bridge(tmp_path / "bridge", pcscd_rig.socket_path) as running:
        running.start_guest()
        audit = ["--audit", str(running.folder / "audit.jsonl")]
        running.start_host(["--policy", str(defaults_policy), *audit])
        running.wait_for_readers(pcscd_rig.reader_names)
        yield running
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(running.logs())
    assert "Traceback" not in running.logs(), running.logs()


@pytest.mark.parametrize(
    "args",
    [
        ["pcsc_scan", "-r"],
        ["opensc-tool", "-l"],
        ["opensc-tool", "-r", "0", "-a"],
        ["opensc-tool", "-r", "0", "-n"],  # card detection: every driver's probing APDUs
        ["pkcs11-tool", "--module", OPENSC_PKCS11, "-L"],
        ["pkcs11-tool", "--module", OPENSC_PKCS11, "-I"],
    ],
    ids=lambda args: " ".join(a for a in args if a != OPENSC_PKCS11),
)
def test_common_clients_work_through_the_default_policy(
    pcscd_rig: PcscdRig, bridge: Bridge, args: list[str]
) -> None:
    direct = run_pcsc_client(args, pcscd_rig.socket_path, timeout=30)
    bridged = run_pcsc_client(args, bridge.socket_path, timeout=30)
    assert direct.returncode == 0, direct.stderr
    assert (bridged.returncode, bridged.stdout, bridged.stderr) == (
        direct.returncode,
        direct.stdout,
        direct.stderr,
    )
    # OpenSC asks for DIRECT connects (looking for PIN pads); the default policy answers as a
    # busy reader would, and OpenSC asks SHARED instead where there is a card. Nothing else is
    # refused, and OpenSC still asks the reader with the card for its features.
    audit = [json.loads(line) for line in (bridge.folder / "audit.jsonl").read_text().splitlines()]
    refused = [line for line in audit if line["rv"] != "SCARD_S_SUCCESS" and "note" in line]
    assert all(line["share_mode"] == "DIRECT" for line in refused), refused
    if args[0] == "opensc-tool":
        feature_queries = [line for line in audit if line.get("code") == "0x42000D48"]
        assert [line["reader"] for line in feature_queries] == [READER], audit


def test_gnupg_scdaemon_works_through_the_default_policy(
    pcscd_rig: PcscdRig, bridge: Bridge
) -> None:
    """scdaemon connects EXCLUSIVE and probes every card application it knows; the test card
    is none of them, so it ends with "no supported card application", as on the host."""
    direct = _scdaemon_serialno(pcscd_rig.socket_path)
    bridged = _scdaemon_serialno(bridge.socket_path)
    assert bridged[0] == direct[0]
    assert "ERR 100696144 No such device" in bridged[0]
    for log in (direct[1], bridged[1]):
        assert f"detected reader '{READER}'" in log
        assert "no supported card application found" in log
        assert "pcsc_connect failed" not in log


def _scdaemon_serialno(socket_path: str) -> tuple[str, str]:
    """`SCD SERIALNO` through a gpg-agent and scdaemon of their own: (answer, scdaemon log)."""
    home = tempfile.mkdtemp(prefix="gnupg-")  # short: gpg-agent's socket lives in it
    try:
        os.chmod(home, 0o700)
        log = Path(home) / "scd.log"
        (Path(home) / "scdaemon.conf").write_text(f"disable-ccid\nlog-file {log}\n")
        env = pcsc_client_env(socket_path)
        answer = subprocess.run(
            ["gpg-connect-agent", "--homedir", home, "SCD SERIALNO", "/bye"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], env=env, timeout=30)
        return answer.stdout, log.read_text(errors="replace")
    finally:
        shutil.rmtree(home, ignore_errors=True)


PIN_PAD_CODE = 0x42330006  # listed below, so it reaches the reader; 0x42330007 does not


def test_a_pin_never_shows_in_any_log(pcscd_rig: PcscdRig, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[guests."*"]\ncontrol_codes = [{PIN_PAD_CODE}]\n')
    audit = tmp_path / "audit.jsonl"
    outputs = []
    with Bridge(tmp_path / "bridge", pcscd_rig.socket_path) as bridge:  # -v: debug logs
        bridge.start_guest()
        bridge.start_host(["--policy", str(policy), "--audit", str(audit), "--trace"])
        bridge.wait_for_readers(pcscd_rig.reader_names)
        for code in (PIN_PAD_CODE, PIN_PAD_CODE + 1):
            result = run_pcsc_client(
                [*PROGRAMS, "pin-paths", READER, PIN, NEW_PIN, PUK, hex(code)],
                bridge.socket_path,
                timeout=30,
            )
            assert result.returncode == 0, result.stderr
            outputs.extend(json_lines(result.stdout))
        logs = {"guest": bridge.guest.log, "host": bridge.host.log}  # type: ignore[union-attr]
    logs["audit"] = audit.read_text()
    # Every path carried the PIN to the card (or the reader), so the test is not vacuous.
    steps = {(o["step"], o.get("sw")) for o in outputs}
    for step in ("verify", "change", "change back", "reset retry counter"):
        assert (step, "9000") in steps, outputs
    lines = [json.loads(line) for line in logs["audit"].splitlines()]
    controls = [line for line in lines if line["call"] == "control"]
    assert [c["rv"] != "SCARD_W_SECURITY_VIOLATION" for c in controls] == [True, True, False, False]
    assert sum(line["call"] == "transmit" for line in lines) >= 8
    for secret in (PIN, NEW_PIN, PUK):
        for name, text in logs.items():
            for form in _forms(secret.encode()):
                assert form not in text.lower(), f"{secret} as {form!r} in the {name} log"


def _forms(secret: bytes) -> list[str]:
    hex_digits = secret.hex()
    return [
        secret.decode(),
        hex_digits,
        " ".join(hex_digits[i : i + 2] for i in range(0, len(hex_digits), 2)),
        "".join(f"\\x{b:02x}" for b in secret),
        str(list(secret))[1:-1],  # a list of ints, as pyscard passes APDUs
    ]
