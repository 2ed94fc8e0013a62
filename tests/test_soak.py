"""The chaos soak, 30 seconds of it (make soak runs minutes): 64 pyscard clients on the guest
socket while the host process is killed and restarted and cards come and go."""

from __future__ import annotations

from stress.soak import SoakOptions, run


def test_64_clients_get_only_right_answers_while_links_are_cut_and_cards_move(
    rig_prerequisites: None,
) -> None:
    result = run(SoakOptions(duration=30, clients=64, processes=8, seed=11, chaos_every=2.0))
    print(result.report())
    assert result.figures.ok, result.report()
    assert result.operations > 1000, result.report()
    assert result.faults.get("link", 0) >= 1 and result.faults.get("card", 0) >= 1
