"""Every refusal counted, and logged once: not one line per attempt of a flood.

The first refusal for a (reason, source) pair is logged; the same pair again within
``REPEAT_WINDOW_S`` is only counted, and the next line that pair earns says how many were not
logged in between. The counts by reason feed the ``refusals`` metric.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import Any

from tunnel_agent.logs import EventLogger

REPEAT_WINDOW_S = 60.0
MAX_REMEMBERED = 4096


class RefusalLog:
    def __init__(self, log: EventLogger, window_s: float = REPEAT_WINDOW_S) -> None:
        self.log = log
        self.window_s = window_s
        self.counts: Counter[str] = Counter()
        self._last: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def refused(self, reason: str, source: str, **fields: Any) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        key = (reason, source)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.window_s:
            self._last[key] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > MAX_REMEMBERED:
            self._last.popitem(last=False)
        extra = {"not_logged_since": suppressed} if suppressed else {}
        self.log.warning("relay.refused", reason=reason, source=source, **fields, **extra)
