"""Shared helpers for benchmarks: the result record, percentiles and table printing."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from clients.table import print_table  # noqa: F401  (the one table printer, re-exported)


@dataclasses.dataclass
class Result:
    """What a benchmark returns.

    ``metrics``: name -> number.  ``targets``: name -> (">=" | "<=", value); every target names
    a metric.  ``table``: optional rows (list of dicts) printed as a side-by-side comparison.
    """

    metrics: dict[str, float]
    targets: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
    table: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def met(self) -> dict[str, bool]:
        out = {}
        for name, (op, value) in self.targets.items():
            got = self.metrics.get(name)
            if got is None:
                out[name] = False
            elif op == "<=":
                out[name] = got <= value
            elif op == ">=":
                out[name] = got >= value
            else:
                raise ValueError(f"bad target operator {op!r} for {name}")
        return out


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no samples."""
    if not samples:
        return float("nan")
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=1000, method="inclusive")[max(0, min(998, round(q * 10) - 1))]

