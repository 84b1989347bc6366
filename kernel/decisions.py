"""The decision log: an append-only JSON-lines file of every decision the kernel takes.

One line per decision, ``{"seq", "t", "op", "in", "out"}``: the Ledger's operations (re-run by
``python -m kernel replay``), the kernel's preemption and control orders, process controls, and
services' own decisions sent with ``mmi.audit``.  A ``session`` line opens each kernel run; its
``session`` id prefixes the run's reservation ids.
"""

from __future__ import annotations

import json
import os
import time


def new_session_id() -> str:
    """A kernel run's id: the prefix of its reservation ids."""
    return f"{os.urandom(4).hex()}."


class DecisionLog:
    """Append-only JSON-lines log of every decision: ``{"seq", "t", "op", "in", "out"}``.

    ``t`` is the kernel's monotonic clock.  Lines are buffered and flushed on every kernel tick
    (at least every quarter heartbeat interval), so a kernel crash loses at most the decisions of
    that last fraction of a second; a torn last line is reported by replay as truncated."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8", buffering=1 << 16)
        self._seq = 0
        #: This kernel run's id: the prefix of its reservation ids (replay reads it back).
        self.session = new_session_id()
        self._fh.write(json.dumps({"seq": 0, "op": "session", "t": time.monotonic(), "pid": os.getpid(),
                                   "wall": time.time(), "session": self.session}) + "\n")

    def append(self, op: str, now: float, inputs: dict, outputs: dict) -> None:
        self._seq += 1
        self._fh.write(json.dumps({"seq": self._seq, "t": now, "op": op, "in": inputs, "out": outputs},
                                  default=str) + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
