"""`python -m stress`: the long adversarial runs (make fuzz, make soak)."""

from __future__ import annotations

import argparse
import random
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from .watch import Figures


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, help="replay a run (default: a new random seed)")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the processes' logs here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each finding as found")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, target in (("fuzz-guest", "the guest socket"), ("fuzz-link", "the host's link")):
        fuzz = commands.add_parser(name, help=f"fuzz {target}")
        _common(fuzz)
        fuzz.add_argument("--cases", type=int, default=1_000_000, help="cases to try")
        fuzz.add_argument("--batch", type=int, default=20_000, help="cases between checks")
        fuzz.add_argument("--workers", type=int, default=48, help="concurrent connections")
        fuzz.add_argument("--first-batch", type=int, default=0, help="replay from this batch")
        fuzz.add_argument("--batches", type=int, help="stop after this many batches")
    soak = commands.add_parser("soak", help="64 clients while links are cut and cards move")
    _common(soak)
    soak.add_argument("--clients", type=int, default=64)
    soak.add_argument("--processes", type=int, default=8, help="client processes")
    soak.add_argument("--chaos-every", type=float, default=3.0, help="mean seconds per fault")
    return parser


def _fuzz_options(args: argparse.Namespace, seed: int) -> Any:
    from .fuzz_guest import FuzzOptions

    return FuzzOptions(
        cases=args.cases,
        duration=args.duration,
        batch_cases=args.batch,
        workers=args.workers,
        seed=seed,
        first_batch=args.first_batch,
        batches=args.batches,
        folder=args.keep,
        verbose=args.verbose,
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM too stops the processes and the rig it started


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    figures: Figures
    if args.command == "fuzz-guest":
        from . import fuzz_guest

        print(f"fuzzing the guest socket: seed {seed}", flush=True)
        figures = fuzz_guest.run(_fuzz_options(args, seed))
    elif args.command == "fuzz-link":
        from . import fuzz_link

        print(f"fuzzing the host's link: seed {seed}", flush=True)
        figures = fuzz_link.run(_fuzz_options(args, seed))
    else:
        from . import soak

        print(f"chaos soak: seed {seed}", flush=True)
        result = soak.run(
            soak.SoakOptions(
                duration=args.duration or 300,
                clients=args.clients,
                processes=args.processes,
                seed=seed,
                chaos_every=args.chaos_every,
                folder=args.keep,
            )
        )
        print(result.report(), flush=True)
        return 0 if result.figures.ok else 1
    print(figures.report(), flush=True)
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
