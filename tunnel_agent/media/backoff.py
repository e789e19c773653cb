"""Reconnect delays: capped exponential backoff with jitter, reset after a stable period."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    initial_s: float = 1.0
    max_s: float = 60.0
    stable_after_s: float = 60.0
    failures: int = 0
    _rng: random.Random | None = None

    def next_delay(self) -> float:
        """The wait before the next attempt; grows with each failure."""
        cap = min(self.max_s, self.initial_s * (2**self.failures))
        self.failures += 1
        rng = self._rng or random
        return rng.uniform(cap / 2, cap)

    def ran_for(self, seconds: float) -> None:
        """Report how long the last connection lasted; a stable one resets the backoff."""
        if seconds >= self.stable_after_s:
            self.failures = 0
