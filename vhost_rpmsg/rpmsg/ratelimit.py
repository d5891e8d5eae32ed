"""Rate-limited error logging: a hostile guest must not be able to flood the log."""

from __future__ import annotations

import logging
import time
from collections import Counter


class RateLimitedLog:
    """Log a recurring error at most once a second per key, with a count of the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        suffix = f" ({n} similar suppressed)" if n else ""
        self.logger.error(msg + suffix, *args, exc_info=exc_info)
