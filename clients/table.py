"""The one table printer: the CLI's status view and the benchmarks' side-by-side tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def cell(value: Any, digits: int = 4) -> str:
    """One value as text: floats to ``digits`` significant digits, None as ``-``, a map as
    ``k=v`` pairs."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={cell(x, digits)}" for k, x in value.items()) or "-"
    return str(value)


def render(rows: Iterable[Mapping[str, Any]], cols: list[str] | None = None, *, digits: int = 4) -> str:
    """``rows`` as a left-aligned text table with a header and a rule.  ``cols``: the columns in
    order (default: every key, in order of first appearance); a missing key is an empty cell."""
    rows = list(rows)
    if cols is None:
        cols = []
        for r in rows:
            cols += [c for c in r if c not in cols]
    if not cols:
        return ""
    cells = [[cell(r[c], digits) if c in r else "" for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(rows: Iterable[Mapping[str, Any]], cols: list[str] | None = None, *, digits: int = 4) -> None:
    """Print :func:`render`'s table (nothing for no rows)."""
    text = render(rows, cols, digits=digits)
    if text:
        print(text)
