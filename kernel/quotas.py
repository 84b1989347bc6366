"""Per-principal rate quotas whose excess becomes a counter (issue 24).

A :class:`RateQuota` is a token bucket per key (a principal's name): ``rate`` units per minute,
``burst`` at most.  :meth:`take` spends ``cost`` units when the bucket holds them; otherwise it
counts the attempt as suppressed and spends nothing.  The next take that succeeds returns how
many were suppressed since the last one, so a caller that records one decision per success
(a ``forbidden`` record, an ``audit`` batch) writes the excess as one number in the next record,
never as records of its own: the log grows at most ``rate`` units per minute per principal
whatever a principal sends.

Pure: time is passed in.  Keys are bounded (``max_keys``; the least recently used bucket is
dropped, which can only make that principal's next take succeed, never fail).
"""

from __future__ import annotations

from collections import OrderedDict


class RateQuota:
    def __init__(self, rate_per_min: float, burst: float | None = None, *, max_keys: int = 10_000) -> None:
        if rate_per_min < 0:
            raise ValueError(f"rate must be >= 0, got {rate_per_min}")
        self.rate = rate_per_min / 60.0  # units per second
        self.burst = float(burst if burst is not None else rate_per_min)
        self.max_keys = max_keys
        #: key -> [tokens, at, suppressed since the last success]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.suppressed_total = 0

    def take(self, key: str, now: float, cost: float = 1.0) -> tuple[bool, int]:
        """``(allowed, suppressed before this one)``; the count is returned (and reset) only with
        an allowed take."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [self.burst, now, 0.0]
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b[0] = min(self.burst, b[0] + max(0.0, now - b[1]) * self.rate)
            b[1] = now
        if b[0] >= cost:
            b[0] -= cost
            n, b[2] = int(b[2]), 0.0
            return True, n
        b[2] += 1
        self.suppressed_total += 1
        return False, 0

    def pending(self, key: str) -> int:
        """Attempts of ``key`` suppressed since its last allowed one."""
        b = self._buckets.get(key)
        return int(b[2]) if b is not None else 0
