"""How long to wait before trying again: doubling delays, reset after a success that lasted."""

from __future__ import annotations

FIRST_DELAY = 0.5
MAX_DELAY = 10.0
STABLE_AFTER = 10.0  # a link that lived this long resets the backoff


class Backoff:
    def __init__(self, first: float = FIRST_DELAY, maximum: float = MAX_DELAY) -> None:
        self.first, self.maximum, self.delay = first, maximum, first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.delay = self.first

    def lived(self, seconds: float) -> None:
        """A link ended after `seconds`: one that lived long enough starts the delays anew."""
        if seconds > STABLE_AFTER:
            self.reset()
