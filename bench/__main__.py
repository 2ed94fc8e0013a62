"""`python -m bench`: pcscbridge against the alternatives, side by side, in one run.

See docs/bench.md for what each path is and how to read the results.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from .paths import ORDER, PATHS
from .run import FULL, QUICK, plan, run


def _delays(text: str) -> list[float]:
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad delay list {text!r}") from None
    if not values or any(v < 0 or v > 1000 for v in values):
        raise argparse.ArgumentTypeError("delays are milliseconds between 0 and 1000")
    return values


def _paths(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in PATHS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown path(s) {unknown}; choose from {','.join(ORDER)}"
        )
    return [name for name in ORDER if name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure pcscbridge against direct pcscd, socat and ssh socket forwards on "
        "a real pcscd with virtual readers (needs root; see docs/bench.md).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="few calls and repetitions (smoke test)"
    )
    parser.add_argument(
        "--delays",
        type=_delays,
        default=[0.0, 1.0, 5.0],
        metavar="MS,MS,...",
        help="one-way link delays in ms (default 0,1,5); 0 = plain loopback, no proxy",
    )
    parser.add_argument(
        "--paths",
        type=_paths,
        default=list(ORDER),
        metavar="NAME,...",
        help=f"paths to measure (default all: {','.join(ORDER)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        metavar="DIR",
        help="results folder (default bench-results/)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the benchmark and everything it starts to CPU 0 (as in shared/rig.md)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C: every `with` block stops what it started.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pin:
        # Before anything starts: every child (pcscd, sshd, ssh, bridge, clients) inherits it.
        os.sched_setaffinity(0, {0})
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    signal.signal(signal.SIGHUP, _stop_on_sigterm)
    settings = QUICK if args.quick else FULL
    configs = plan(args.paths, args.delays)
    print(
        f"pcscbridge bench: {len(configs)} path/delay combinations, "
        f"{'quick' if args.quick else 'full'} settings, "
        f"{'pinned to CPU 0' if args.pin else 'not pinned (all CPUs)'}; results in {args.out}/",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        results, samples = run(
            args.paths,
            args.delays,
            settings,
            quick=args.quick,
            pinned=args.pin,
            keep_logs=args.out / "logs",
        )
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130

    from . import plots as plotting
    from . import report

    results["targets"] = report.evaluate_targets(results)
    text = report.text_report(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "samples.json").write_text(json.dumps(samples) + "\n")
    (args.out / "summary.md").write_text(report.markdown_report(results))
    plots = [] if args.no_plots else plotting.plots(results, args.out)
    print(text)
    files = ["results.json", "samples.json", "summary.md", *(p.name for p in plots), "logs/"]
    print(f"written to {args.out}/: {', '.join(files)}")
    if not plots and not args.no_plots:
        print("(no plots: matplotlib is missing; `pip install -e '.[bench]'`)")
    failed = [r for r in results["runs"] if r.get("error")]
    for record in failed:
        print(f"ERROR {record['path']} at {record['delay_ms']:g} ms: {record['error'][:300]}")
    # A benchmark never fails on a number; it fails when a path could not be measured.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
