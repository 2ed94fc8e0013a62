"""`python -m bench --quick` runs end to end and reports every figure.

A smoke test of the benchmark, not a benchmark: it checks that every path could be set up and
measured, that the JSON holds every figure, and that every response of the concurrent-client
runs was right. It asserts no timing at all.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure import KINDS
from bench.run import SESSION_KINDS

pytestmark = pytest.mark.rig

PATHS = ["direct", "socat", "ssh-T-R", "bridge-unix", "bridge-ssh"]
DELAYS = [0.0, 5.0]
DELAYABLE = {"ssh-T-R", "bridge-ssh"}
BRIDGES = {"bridge-unix", "bridge-ssh"}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_bench_quick_runs_and_reports_every_figure(rig_prerequisites: None, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--paths",
            ",".join(PATHS),
            "--delays",
            ",".join(f"{d:g}" for d in DELAYS),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "vs ssh -T -R" in done.stdout  # the ratio table was printed

    results = json.loads((out / "results.json").read_text())
    samples = json.loads((out / "samples.json").read_text())
    assert (out / "summary.md").read_text().startswith("# pcscbridge bench results")
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("latency.png", "sessions.png", "throughput.png"):
            assert (out / name).stat().st_size > 0

    meta = results["meta"]
    assert meta["quick"] is True and meta["pinned_to_cpu0"] is False
    expected = {
        (path, delay) for path in PATHS for delay in DELAYS if delay == 0 or path in DELAYABLE
    }
    runs = {(r["path"], r["delay_ms"]): r for r in results["runs"]}
    assert set(runs) == expected
    assert {(r["path"], r["delay_ms"]) for r in samples["runs"]} == expected

    for (path, delay), run in runs.items():
        where = f"{path} at {delay:g} ms"
        assert run["error"] is None, where
        for kind in KINDS:
            stats = run["latency"][kind]
            assert stats["n"] > 0 and _number(stats["median"]) and _number(stats["p99"]), where
            assert stats["errors"] == 0 and stats["wrong"] == 0, (where, kind, stats)
        for kind in SESSION_KINDS:
            stats = run["sessions"][kind]
            assert stats["failures"] == 0, (where, kind, stats["failure_messages"])
            assert stats["n"] > 0 and _number(stats["median"]), (where, kind)
        events = run["events"]
        assert events["timeouts"] == 0, where
        assert _number(events["seen_ms"]["median"]) and _number(events["added_ms"]["median"])
        for level in ("1", "8", "64"):
            figures = run["throughput"][level]
            assert figures["clients"] == int(level), where
            assert figures["clients_reporting"] == int(level), (where, level, figures)
            assert figures["calls"] > 0 and _number(figures["calls_per_s"]), (where, level)
            # Every response right, none lost: what the card answered is what clients got.
            assert figures["wrong"] == 0 and figures["errors"] == 0, (where, level, figures)
            assert figures["lost"] == 0, (where, level, figures)
            assert figures["card_apdus"] == figures["calls"], (where, level, figures)
        if path in BRIDGES:
            for role in ("guest", "host"):
                assert run["rss"][role]["peak_rss_kib"] > 0, (where, role)

    targets = {target["id"]: target for target in results["targets"]}
    assert set(targets) == {
        "loopback-calls",
        "ssh-transmit",
        "local-state",
        "concurrency-correct",
        "concurrency-throughput",
        "delay-5ms",
        "memory",
        "event",
    }
    for target in targets.values():
        assert target["met"] in (True, False), target  # judged, whatever the verdict
