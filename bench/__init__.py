"""`make bench`: pcscbridge against the alternatives (direct pcscd, socat, ssh forwards), side
by side, in one run. Entry point: ``python -m bench``; see docs/bench.md."""
