"""Progress on long work (tqdm), quiet where nobody watches.

:func:`progress` wraps an iterable (or counts to ``total``) in a tqdm bar on stderr when stderr is
a terminal and ``$CI`` is not set; otherwise it yields the same items with no output at all, so
logs and CI output stay clean.  ``RECA_PROGRESS=1`` forces the bar, ``RECA_PROGRESS=0`` hides it.
Benchmarks, training loops and the demo use it for work that takes seconds or more.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: Environment variable: "1" always show progress, "0" never.
ENV_PROGRESS = "RECA_PROGRESS"


def enabled(stream: Any = None) -> bool:
    """Whether progress bars are shown: ``$RECA_PROGRESS`` if set, else a terminal and not CI."""
    forced = os.environ.get(ENV_PROGRESS)
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    return not os.environ.get("CI") and bool(getattr(stream, "isatty", lambda: False)())


def progress(
    items: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it", **kw: Any
) -> Iterator[T]:
    """``items`` (or ``range(total)``) with a progress bar when :func:`enabled`."""
    iterable: Iterable[Any] = items if items is not None else range(total or 0)
    if not enabled():
        yield from iterable
        return
    from tqdm import tqdm

    with tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, **kw) as bar:
        for item in bar:
            if isinstance(item, str):  # show which one is under way
                bar.set_postfix_str(item)
            yield item
