"""The decision log: append-only JSON lines of every decision the kernel takes, in segments.

One line per decision, ``{"seq", "t", "op", "in", "out"}``: the Ledger's operations (re-run by
``python -m kernel replay`` and on restart), the kernel's preemption and control orders, process
controls, services' own decisions sent with ``mmi.audit``, and ``run``/``ran`` marks of requests
carrying an idempotency key.  A ``session`` line opens each kernel run (its ``session`` id
prefixes the run's reservation ids; ``"restored": true`` when the run continued the state the
log held, see :func:`restore`).

**Segments and snapshots.**  The file at ``path`` is the current segment.  When it passes
``segment_bytes`` it is renamed ``path.NNNNNN`` (numbered in order) and a new segment starts with
a ``snapshot`` line holding the whole enforcement state (the Ledger's :meth:`dump`, and the
idempotency keys in flight).  Restoring reads the current segment only: its snapshot, then the
decisions after it, so restore time is proportional to the live state plus one segment, never to
the history.  The numbered segments keep the history for audit and replay.

**Durability** (``fsync`` policy, docs/limits.md gives the measured costs): lines are written to
the operating system at the end of every batch of messages the kernel handles and on every tick,
so a kernel crash (SIGKILL, abort) loses no decision that was flushed; ``fsync`` decides what
survives the machine losing power: ``always`` (fsync at every flush), ``interval`` (the default:
at most every ``fsync_interval`` seconds) or ``never`` (the operating system's own write-back).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Any, Callable

from kernel import protocol as P

from kernel.auth import open_append

log = logging.getLogger("reca.kernel")

FSYNC_POLICIES = ("always", "interval", "never")

#: One encoder for every line (``json.dumps(..., default=str)`` builds a new one per call).
_encode = json.JSONEncoder(default=str).encode


def new_session_id() -> str:
    """A kernel run's id: the prefix of its reservation ids."""
    return f"{os.urandom(4).hex()}."


def segment_paths(path: str) -> list[str]:
    """The closed segments of the log at ``path``, oldest first (the current one is ``path``)."""
    return sorted(p for p in glob.glob(glob.escape(path) + ".*") if p.rsplit(".", 1)[-1].isdigit())


class DecisionLog:
    """Append-only, segmented JSON-lines log of every decision (module docstring).

    ``state``: a callable returning the enforcement state to snapshot at each new segment (set by
    the admission that owns the ledger); without it the log is never rotated.  ``restored``: this
    run continues the state the log held (recorded in the session line)."""

    def __init__(
        self,
        path: str,
        *,
        fsync: str = P.LOG_FSYNC,
        fsync_interval: float = P.LOG_FSYNC_INTERVAL,
        segment_bytes: int = P.LOG_SEGMENT_BYTES,
        restored: bool = False,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.path = path
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.state: Callable[[], dict] | None = None
        closed = segment_paths(path)
        self._next_segment = int(closed[-1].rsplit(".", 1)[-1]) + 1 if closed else 1
        self._fh = open_append(path)  # never through a planted symlink; mode 0600
        self._bytes = self._fh.tell()
        self._seq = 0
        self._dirty = False
        self._synced_at = time.monotonic()
        self.counters = {"segments": len(closed), "fsyncs": 0, "fsync_s": 0.0}
        #: This kernel run's id: the prefix of its reservation ids (replay reads it back).
        self.session = new_session_id()
        self._write(
            {
                "seq": 0,
                "op": "session",
                "t": time.monotonic(),
                "pid": os.getpid(),
                "wall": time.time(),
                "session": self.session,
                "restored": restored,
            }
        )

    def _write(self, rec: dict) -> None:
        line = _encode(rec) + "\n"
        self._fh.write(line)
        self._bytes += len(line)
        self._dirty = True

    def append(self, op: str, now: float, inputs: dict, outputs: dict) -> None:
        self._seq += 1
        self._write({"seq": self._seq, "t": now, "op": op, "in": inputs, "out": outputs})

    def flush(self) -> None:
        """Hand buffered lines to the operating system (and fsync as the policy says); start a
        new segment when this one is full."""
        if not self._dirty:
            return
        self._dirty = False
        try:
            self._fh.flush()
            now = time.monotonic()
            if self.fsync == "always" or self.fsync == "interval" and now - self._synced_at >= self.fsync_interval:
                self._sync(now)
            if self._bytes >= self.segment_bytes and self.state is not None:
                self._rotate()
        except OSError as exc:  # a full disk or EMFILE must not take the kernel down; say so loudly
            self._dirty = True
            log.error("decision log %s: %s (decisions stay buffered)", self.path, exc)

    def _sync(self, now: float) -> None:
        t0 = time.perf_counter()
        os.fsync(self._fh.fileno())
        self.counters["fsyncs"] += 1
        self.counters["fsync_s"] += time.perf_counter() - t0
        self._synced_at = now

    def _rotate(self) -> None:
        assert self.state is not None
        state = self.state()
        target = f"{self.path}.{self._next_segment:06d}"
        nxt = self.path + ".next"
        try:
            os.unlink(nxt)  # left by a rotation a crash interrupted (never followed if a symlink)
        except FileNotFoundError:
            pass
        fh = open_append(nxt)
        self._fh.flush()
        if self.fsync != "never":
            os.fsync(self._fh.fileno())
        self._fh.close()
        os.rename(self.path, target)
        os.rename(self.path + ".next", self.path)
        self._fh = fh
        self._next_segment += 1
        self.counters["segments"] += 1
        self._bytes = 0
        self._seq += 1
        self._write(
            {"seq": self._seq, "t": time.monotonic(), "op": "snapshot", "session": self.session, "state": state}
        )
        self._fh.flush()
        if self.fsync != "never":
            self._sync(time.monotonic())
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)  # the renames themselves
            finally:
                os.close(dfd)

    def stats(self) -> dict[str, Any]:
        return {"path": self.path, "segment_bytes": self._bytes, "fsync": self.fsync, **self.counters}

    def close(self) -> None:
        try:
            self._fh.flush()
            if self.fsync != "never":
                os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
