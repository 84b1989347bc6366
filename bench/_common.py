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
    A benchmark module may set ``RUNS`` (how many runs a full ``--json`` run aggregates; default
    3), ``HEADLINE`` (metric -> the strongest peer it is measured against, in words: the report's
    headline table) and ``DETERMINISTIC = True`` (its figures do not change between runs: the
    report says "deterministic", not "median of N").
    """

    metrics: dict[str, float]
    targets: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
    table: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: metric -> number of samples its percentile was computed from
    samples: dict[str, int] = dataclasses.field(default_factory=dict)
    #: plot records (:func:`line_plot`, :func:`cdf_plot`); ``python -m bench report`` draws them
    plots: list[dict[str, Any]] = dataclasses.field(default_factory=list)

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

# --- the result file (``reca.bench/1``) ------------------------------------------------------
#
# ``python -m bench NAME --json PATH`` writes one JSON object; ``python -m bench report DIR``
# reads every ``*.json`` in DIR.  Keys (only ``bench``, ``metrics`` are required; a benchmark
# without rows, targets, samples or plots simply has none):
#
#   schema   "reca.bench/1"
#   bench    the benchmark's name;  quick: bool;  runs: how many runs the figures aggregate
#   env      {"commit", "dirty", "date", "machine", "cpus", "python", "load_start", "load_end"}
#   metrics  name -> median over the runs          spread   name -> [min, max] over the runs
#   samples  name -> how many samples a percentile metric was computed from (per run)
#   targets  name -> [">=" | "<=", value]          met      name -> bool (on the median)
#   rows     the side-by-side table (list of flat dicts; numeric cells are medians over runs)
#   notes    list of strings
#   plots    list of {"name", "title", "kind": "line" | "cdf" | "bar", "xlabel", "ylabel",
#            "logx", "logy", "series": [{"label", "x": [...], "y": [...]}]}
#   error    present instead of the figures when the benchmark failed

SCHEMA = "reca.bench/1"


def line_plot(name: str, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
              *, logx: bool = False, logy: bool = False, style: str = "line") -> dict[str, Any]:
    """A plot record: ``series`` maps a label to its (x, y) points."""
    return {"name": name, "title": title, "kind": style, "xlabel": xlabel, "ylabel": ylabel,
            "logx": logx, "logy": logy,
            "series": [{"label": k, "x": [v if isinstance(v, str) else float(v) for v in x], "y": [float(v) for v in y]}
                       for k, (x, y) in series.items()]}


def cdf_plot(name: str, title: str, xlabel: str, samples: dict[str, list[float]], *,
             points: int = 400, logx: bool = True) -> dict[str, Any]:
    """A latency CDF record; each series is reduced to ``points`` quantiles (the tail kept)."""
    series = {}
    for label, xs in samples.items():
        xs = sorted(xs)
        if not xs:
            continue
        n = len(xs)
        idx = sorted({min(n - 1, round(i * (n - 1) / (points - 1))) for i in range(points)})
        series[label] = ([xs[i] for i in idx], [(i + 1) / n for i in idx])
    return line_plot(name, title, xlabel, "fraction of samples <= x", series, logx=logx, style="cdf")


def progress(bench: str, message: str) -> None:
    """A progress line on stderr (``bench all`` sends it to the benchmark's log)."""
    import sys

    print(f"[{bench}] {message}", file=sys.stderr, flush=True)
