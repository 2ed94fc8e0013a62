"""The root-only test rig: a private pcscd with vpcd readers and the project's test card, a
loopback sshd, newer client libraries, a logging relay, the pyscard test programs.

Not installed: tests and benchmarks import it from the checkout. Child processes started with
``python -m rig.…`` or ``python -m bench.…`` find it because importing the rig puts the
checkout on PYTHONPATH.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = str(Path(__file__).resolve().parent.parent)
if CHECKOUT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        part for part in (CHECKOUT, os.environ.get("PYTHONPATH")) if part
    )
