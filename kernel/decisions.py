"""The decision log: append-only records of every decision the kernel takes, in segments.

One record per decision, ``{"seq", "t", "op", "in", "out"}``: the Ledger's operations (re-run by
``python -m kernel replay`` and on restart), the kernel's preemption and control orders, process
controls, services' own decisions sent with ``mmi.audit``, and ``run``/``ran`` marks of requests
carrying an idempotency key.  A budgeted request costs two: its ``admit`` (which starts it) and
its ``finish`` (which charges what it spent); they cannot be one record written at the end, since
a crash between them must restore the running request (its wall time counts until the last
record) and replay re-runs decisions in the order they were taken.  A ``session`` record opens
each kernel run (its ``session`` id prefixes the run's reservation ids; ``"restored": true`` when
the run continued the state the log held, see :func:`restore`).

**Records** are binary -- a 10-byte header (magic, version, length, CRC-32) and a msgpack map --
and carry a sequence number (kernel.logstore gives the format, how logs of JSON lines written by
older kernels are still read, and the recovery rules: a torn tail is cut, a damaged current segment falls back to the previous
snapshot, anything else refuses to start naming the file and offset).

**Segments and snapshots.**  The file at ``path`` is the current segment.  When the decisions
written after its snapshot pass ``segment_bytes`` (and the snapshot's own size: a large state is
never rewritten more often than its size in decisions) a new segment is written to
``path.next`` starting with a ``snapshot`` record holding the whole enforcement state (the
Ledger's :meth:`dump`, and the idempotency keys in flight) and fsynced; the full segment is then
hard-linked as ``path.NNNNNN`` (numbered in order) and ``path.next`` renamed over ``path``, so
``path`` is always a complete segment.  Restoring reads from the newest good snapshot on, so
restore time is proportional to the live state plus one segment, never to the history.  The
numbered segments keep the history for audit and replay.

**Durability** (``fsync`` policy, docs/limits.md gives the measured costs): records are written
to the operating system, whole and in order (``os.write`` of the buffered bytes, resumed where a
short or failed write stopped), at the end of every batch of messages the kernel handles and on
every tick,
so a kernel crash (SIGKILL, abort) loses no decision that was flushed; ``fsync`` decides what
survives the machine losing power: ``always`` (fsync at every flush), ``interval`` (the default:
at most every ``fsync_interval`` seconds) or ``never`` (the operating system's own write-back).
A write that fails (ENOSPC, EIO) keeps the records buffered, in order, and sets :attr:`error`
until a later flush writes them: the admission stops admitting work that needs a decision while
it is set, so nothing acknowledged is lost and the log never holds a gap.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any, Callable

from kernel import protocol as P
from kernel.logstore import record_encoder, segment_paths

log = logging.getLogger("reca.kernel")

FSYNC_POLICIES = ("always", "interval", "never")

__all__ = ["DecisionLog", "FSYNC_POLICIES", "new_session_id", "segment_paths"]


def new_session_id() -> str:
    """A kernel run's id: the prefix of its reservation ids."""
    return f"{os.urandom(4).hex()}."


def _open_log(path: str, *, exclusive: bool = False) -> int:
    """An append-only descriptor on ``path``, never through a planted symlink (mode 0600)."""
    from kernel.auth import open_append_fd

    return open_append_fd(path, exclusive=exclusive)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        # (the count in its own statement: mypyc 2.4 evaluates a call inside a memoryview slice
        # twice, which wrote every snapshot twice in the compiled core)
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: str) -> None:
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class DecisionLog:
    """Append-only, segmented, checksummed log of every decision (module docstring).

    ``state``: a callable returning the enforcement state to snapshot at each new segment (set by
    the admission that owns the ledger); without it the log is never rotated.  ``restored``: this
    run continues the state the log held (recorded in the session line).  ``snapshot_soon``:
    start a new segment (with a snapshot) at the first flush that can (after a restore that
    fell back to an earlier snapshot).  ``keep_segments``: closed segments kept (the oldest beyond
    it are deleted after each rotation; at least 2, so a damaged current segment can always fall
    back to the previous snapshot); None keeps the whole history."""

    def __init__(
        self,
        path: str,
        *,
        fsync: str = P.LOG_FSYNC,
        fsync_interval: float = P.LOG_FSYNC_INTERVAL,
        segment_bytes: int = P.LOG_SEGMENT_BYTES,
        restored: bool = False,
        snapshot_soon: bool = False,
        keep_segments: int | None = None,
        encoder: Callable[[Any], bytes] | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, got {fsync!r}")
        if keep_segments is not None and keep_segments < 2:
            raise ValueError(f"keep_segments must be at least 2 (or None: all), got {keep_segments}")
        self.keep_segments = keep_segments
        self.path = path
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.state: Callable[[], dict] | None = None
        #: ``encoder``: another record format (the tests write a log as an older kernel did); a
        #: parameter, since a compiled core calls ``record_encoder`` directly, past any patch.
        self._encode = encoder if encoder is not None else record_encoder()
        closed = segment_paths(path)
        self._next_segment = int(closed[-1].rsplit(".", 1)[-1]) + 1 if closed else 1
        created = not os.path.lexists(path)
        self._fd = _open_log(path)  # never through a planted symlink; mode 0600
        if created and fsync != "never":
            _fsync_dir(path)
        #: Bytes of the current segment on disk, and of its snapshot record (0: not known / none).
        self._bytes = os.fstat(self._fd).st_size
        self._snapshot_bytes = 0
        self._rotate_soon = snapshot_soon
        self._seq = 0
        #: Encoded records not yet written, in order; ``_done``: bytes of ``_pending[0]`` written.
        self._pending: list[bytes] = []
        self._done = 0
        self.pending_bytes = 0
        self._unsynced = False
        self._synced_at = time.monotonic()
        #: Why the last write failed (None: the log is writing); admission refuses decisions then.
        self.error: str | None = None
        self.counters = {
            "segments": len(closed),
            "fsyncs": 0,
            "fsync_s": 0.0,
            "write_errors": 0,
            "unencodable": 0,
            "segments_deleted": 0,
        }
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
        try:
            line = self._encode(rec)
        except (ValueError, TypeError, RecursionError, OverflowError) as exc:  # a cycle, an absurd depth: keep the seq
            self.counters["unencodable"] += 1
            line = self._encode(
                {
                    "seq": rec.get("seq"),
                    "t": rec.get("t"),
                    "op": rec.get("op"),
                    "unencodable": f"{type(exc).__name__}: {str(exc)[:200]}",
                }
            )
        self._pending.append(line)
        self.pending_bytes += len(line)

    def append(self, op: str, now: float, inputs: dict, outputs: dict) -> None:
        self._seq += 1
        try:
            line = self._encode((self._seq, now, op, inputs, outputs))  # a decision's array payload
        except (ValueError, TypeError, RecursionError, OverflowError):
            self._write({"seq": self._seq, "t": now, "op": op, "in": inputs, "out": outputs})  # says why
            return
        self._pending.append(line)
        self.pending_bytes += len(line)

    @property
    def writing(self) -> bool:
        """Whether every record appended so far can reach the disk (no write failing now)."""
        return self.error is None

    def flush(self) -> bool:
        """Hand buffered records to the operating system (and fsync as the policy says); start a
        new segment when this one is full.  True when nothing is left buffered."""
        now = time.monotonic()
        try:
            if self._pending:
                self._write_pending()
            if self._unsynced and (
                self.fsync == "always" or self.fsync == "interval" and now - self._synced_at >= self.fsync_interval
            ):
                self._sync(now)
            if self.state is not None and (
                self._rotate_soon or self._bytes - self._snapshot_bytes >= max(self.segment_bytes, self._snapshot_bytes)
            ):
                self._rotate()
        except OSError as exc:  # a full disk or EIO must not take the kernel down; say so loudly
            self.counters["write_errors"] += 1
            why = f"{errno.errorcode.get(exc.errno or 0, 'error')}: {exc.strerror or exc}"
            if why != self.error:
                log.error(
                    "decision log %s: %s (%d byte(s) of decisions stay buffered; decisions are "
                    "refused until it writes again)",
                    self.path,
                    why,
                    self.pending_bytes,
                )
            self.error = why
            return False
        if self.error is not None:
            log.warning("decision log %s writes again (after %s)", self.path, self.error)
            self.error = None
        return True

    def _write_pending(self) -> None:
        pending = self._pending
        if not self._done:  # the common case, one write takes it all: no memoryview, no slice
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            n = os.write(self._fd, data)  # an OSError leaves it all pending (joined at the next try)
            self._bytes += n
            self.pending_bytes -= n
            self._unsynced = True
            if n == len(data):
                pending.clear()
                return
            self._pending = [data]  # a short write: the rest below
            self._done = n
        elif len(pending) > 1:  # one write per flush, resumed where one stopped
            self._pending = [b"".join([memoryview(pending[0])[self._done :], *pending[1:]])]
            self._done = 0
        view = memoryview(self._pending[0])
        while self._done < len(view):
            n = os.write(self._fd, view[self._done :])
            self._done += n
            self._bytes += n
            self.pending_bytes -= n
            self._unsynced = True
        self._pending.clear()
        self._done = 0

    def _sync(self, now: float) -> None:
        t0 = time.perf_counter()
        os.fsync(self._fd)
        self.counters["fsyncs"] += 1
        self.counters["fsync_s"] += time.perf_counter() - t0
        self._synced_at = now
        self._unsynced = False

    def _rotate(self) -> None:
        assert self.state is not None
        self._seq += 1
        snap = self._encode(
            {"seq": self._seq, "t": time.monotonic(), "op": "snapshot", "session": self.session, "state": self.state()}
        )
        nxt = self.path + ".next"
        target = f"{self.path}.{self._next_segment:06d}"
        try:
            os.unlink(nxt)  # left by a rotation a crash interrupted (never followed if a symlink)
        except FileNotFoundError:
            pass
        linked = False
        try:
            fd = _open_log(nxt, exclusive=True)
        except OSError:
            self._seq -= 1
            raise
        try:
            _write_all(fd, snap)
            if self.fsync != "never":
                os.fsync(fd)
                os.fsync(self._fd)  # the full segment, before it becomes a numbered one
            try:
                os.link(self.path, target)
                linked = True
                os.rename(nxt, self.path)  # atomic: ``path`` is always a whole segment
            except OSError as exc:
                if linked or exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                os.rename(self.path, target)  # no hard links here: recovery adopts ``path.next``
                os.rename(nxt, self.path)
        except OSError:
            os.close(fd)
            for p in (nxt, target) if linked else (nxt,):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            self._seq -= 1
            raise
        os.close(self._fd)
        self._fd = fd
        self._next_segment += 1
        self.counters["segments"] += 1
        self._bytes = self._snapshot_bytes = len(snap)
        self._rotate_soon = False
        self._unsynced = self.fsync == "never"
        if self.fsync != "never":
            self._synced_at = time.monotonic()
            _fsync_dir(self.path)  # the link and the rename themselves
        if self.keep_segments is not None:
            for old in segment_paths(self.path)[: -self.keep_segments]:
                try:
                    os.unlink(old)
                    self.counters["segments_deleted"] += 1
                except OSError as exc:
                    log.warning("decision log: cannot delete the old segment %s: %s", old, exc)

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "segment_bytes": self._bytes,
            "fsync": self.fsync,
            "pending_bytes": self.pending_bytes,
            "error": self.error,
            **self.counters,
        }

    def close(self) -> None:
        try:
            self.flush()
            if self._pending:
                log.error(
                    "decision log %s closed with %d byte(s) of decisions unwritten (%s)",
                    self.path,
                    self.pending_bytes,
                    self.error,
                )
            elif self.fsync != "never":
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
