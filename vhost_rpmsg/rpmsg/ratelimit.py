"""Rate-limited logging: a hostile guest must not be able to flood the log.

Anything a guest can make happen once per message (an error, an announcement) is
logged through here, never straight to the logger."""

from __future__ import annotations

import logging
import time
from collections import Counter


class RateLimitedLog:
    """Per key, up to ``burst`` lines at once, then one per ``interval`` seconds (a token
    bucket); the lines held back are counted and the count said with the next line."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0, burst: int = 1) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        #: key -> (tokens left, when they were counted)
        self._bucket: dict[str, tuple[float, float]] = {}
        self._suppressed: Counter[str] = Counter()

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)

    def info(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.INFO, key, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: object,
            exc_info: bool = False) -> None:
        """Log under ``key`` if its bucket has a token; otherwise count the line."""
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        tokens, then = self._bucket.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) / self.interval)
        if tokens < 1.0:
            self._bucket[key] = (tokens, now)
            self._suppressed[key] += 1
            return
        self._bucket[key] = (tokens - 1.0, now)
        n = self._suppressed.pop(key, 0)
        suffix = f" ({n} similar suppressed)" if n else ""
        self.logger.log(level, msg + suffix, *args, exc_info=exc_info)
