"""Shared fixtures: the real pcscd + vpcd rig, the simulated test card, a loopback sshd.

Rig fixtures need root, ``unshare`` and the Debian packages (pcscd, vsmartcard-vpcd). Where
they are missing the fixtures *fail* with the reason: a suite that silently skipped its
end-to-end tests would report a pass it did not earn.

pyscard in the test process: libpcsclite reads PCSCLITE_CSOCK_NAME once per process, and every
test gets a rig (socket) of its own, so tests talk PC/SC through child processes with
``rig.env`` (see ``run_pyscard`` / ``run_pcsc_client`` in rig.pcscd_rig).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pcscbridge.host.backends.simcard import SimulatedCard
from rig.pcscd_rig import PcscdRig, RigError, check_rig_prerequisites
from rig.sshd import LoopbackSshd


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # Remember each phase's report on the item, so rig fixtures can show pcscd's log on failure.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is not None and report.failed


@pytest.fixture(scope="session")
def rig_prerequisites() -> None:
    try:
        check_rig_prerequisites()
    except RigError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def make_pcscd_rig(
    rig_prerequisites: None, request: pytest.FixtureRequest
) -> Iterator[Callable[..., PcscdRig]]:
    """Factory: ``make_pcscd_rig(vpcd_entries=2, **kwargs)`` -> a started rig, stopped later."""
    rigs: list[PcscdRig] = []

    def make(vpcd_entries: int = 2, **kwargs: object) -> PcscdRig:
        rig = PcscdRig(vpcd_entries, **kwargs)  # type: ignore[arg-type]
        rigs.append(rig)
        return rig.start()

    yield make
    for rig in rigs:
        rig.stop()
        if _failed(request):
            print(f"--- pcscd log ({rig.reader_names}) ---\n{rig.last_log}")


@pytest.fixture
def pcscd_rig(make_pcscd_rig: Callable[..., PcscdRig]) -> PcscdRig:
    """A private pcscd with 4 vpcd readers; a SimulatedCard labelled "slot0" sits in reader 0
    ("Virtual PCD 00 00") and pcscd already reports it present. Readers 1-3 are empty."""
    rig = make_pcscd_rig(2)
    rig.insert_card(0)
    return rig


@pytest.fixture
def sim_card() -> SimulatedCard:
    """A powered SimulatedCard (pure model, no rig)."""
    card = SimulatedCard(label="unit")
    card.power_on()
    return card


# ------------------------------------------------------------------ SSH (rig.sshd, loopback)


@pytest.fixture(scope="module")
def sshd() -> Iterator[LoopbackSshd]:
    """One sshd per module, for the tests that leave it as it is (kill/freeze tests start their
    own)."""
    with LoopbackSshd() as server:
        yield server


@pytest.fixture
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the real user's ~/.ssh and ssh-agent out of the test, and out of the processes it
    starts (they inherit this). SSH test modules use it on every test (pytestmark)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture
def client_config(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``client_config(server, *, trusted=True, **extra)`` -> an ssh config file
    (tmp_path/ssh_config) with ``Host vm`` pointing at `server`; its known_hosts file is
    tmp_path/known_hosts, holding the server's key if `trusted`, else empty. `extra`: more
    ssh_config options (``ServerAliveInterval="1"``)."""

    def write(server: LoopbackSshd, *, trusted: bool = True, **extra: str) -> Path:
        return server.write_client_config(
            tmp_path / "ssh_config",
            alias="vm",
            trusted=trusted,
            known_hosts=tmp_path / "known_hosts",
            extra=extra,
        )

    return write
