"""Long adversarial runs against the real processes on the real rig (root; not installed).

    python -m stress fuzz-guest   # make fuzz: the guest socket, structured + mutation fuzz
    python -m stress fuzz-link    # make fuzz: the host agent's link, a hostile link peer
    python -m stress soak         # make soak: 64 clients while links are cut and cards move

Every run reports its seeds, so a failure can be replayed (--seed, --first-batch).
"""
