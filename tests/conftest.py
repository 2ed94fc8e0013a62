"""Shared fixtures: the real pcscd + vpcd rig and the simulated test card.

Rig fixtures need root, ``unshare`` and the Debian packages (pcscd, vsmartcard-vpcd). Where
they are missing the fixtures *fail* with the reason: a suite that silently skipped its
end-to-end tests would report a pass it did not earn.

pyscard in the test process: libpcsclite reads PCSCLITE_CSOCK_NAME once per process, and every
test gets a rig (socket) of its own, so tests talk PC/SC through child processes with
``rig.env`` (see ``run_pyscard`` / ``run_pcsc_client`` in rig.pcscd_rig).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pcscbridge.host.backends.simcard import SimulatedCard
from rig.pcscd_rig import PcscdRig, RigError, check_rig_prerequisites


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
