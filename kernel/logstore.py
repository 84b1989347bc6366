"""Decision log storage: checksummed records, segment files, and a recovery that fails safe.

**Records.**  Each record is one line of JSON whose last key is ``"crc"``: the CRC-32 (8 lowercase
hex digits) of the line's bytes as they would read without that key, i.e. of
``line[:-18] + b"}"``.  Lines stay valid JSON for every reader (``json.loads(line)["op"]``) and
every byte of a record is covered.  The writer encodes with ``ensure_ascii``, so a record is
ASCII; a line that is not UTF-8, not JSON, nested deeper than the parser takes, lacks the
checksum or fails it is a :class:`BadRecord`, never a traceback.  Records carry ``seq``: it
grows by one per record within a kernel run (a ``session`` line restarts it at 0), so a record
removed from the middle of a segment is noticed like a corrupted one.

**Segments.**  ``path`` is the current segment; closed ones are ``path.NNNNNN`` (oldest first).
Every segment after the first begins with a ``snapshot`` record of the whole enforcement state.
A rotation writes the new segment (its snapshot) to ``path.next`` and fsyncs it, hard-links the
full current segment as the next numbered one, then renames ``path.next`` over ``path``: at
every instant ``path`` is a complete segment (kernel.decisions).

**Recovery** (:func:`recover`): the state is replayed from the newest *start point* -- a
segment whose first record is a readable ``snapshot`` or a ``session`` that did not continue an
earlier state -- through every segment after it.  So a missing, empty or corrupt current
segment (its snapshot unreadable; what a crash between the two steps of a rotation written by
an older kernel leaves) falls back to the previous good snapshot and the segments after it.
Damage at the end of the newest segment with no readable record after it is a torn tail: it is
cut back to the end of the last good record (a non-empty log with no readable record at all is
not a torn tail but damage: :class:`LogCorrupt`) (what a crash in the middle of a write leaves;
nothing after it was acknowledged, since records reach the disk whole and in order).  Anything
else -- a bad record with good ones after it, a gap in ``seq``, no start point at all -- raises
:class:`LogCorrupt` naming the file and the byte offset: a kernel never starts silently from
nothing over a log it cannot read (``python -m kernel --fresh`` moves such a log aside;
``python -m kernel fsck`` checks and repairs).
"""

from __future__ import annotations

import json
import os
import re
import threading
import zlib
from dataclasses import dataclass, field
from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring_ascii as _ascii
from typing import Any, Iterator

#: ``,"crc":"xxxxxxxx"}`` -- the fixed-size tail of every record line.
_CRC_TAIL = 18
_HEX8 = re.compile(rb"[0-9a-f]{8}")

#: One encoder for every record (``json.dumps(..., default=str)`` builds a new one per call).
_json_encoder = json.JSONEncoder(default=str, ensure_ascii=True)
# The C encoder (``_c_make_encoder``, None without json's C speedups) is made once per thread:
# ``JSONEncoder.encode`` builds one per call, most of its cost.
#: Per thread: (its circular-reference markers, its C encoder); the markers are shared by every
#: call of that thread's encoder, so no two threads may share one.
_per_thread = threading.local()


def _encode(rec: Any) -> str:
    """``rec`` as JSON text, byte for byte what ``_json_encoder.encode`` writes."""
    if _c_make_encoder is None or type(rec) is not dict:
        return _json_encoder.encode(rec)
    made = getattr(_per_thread, "encoder", None)
    if made is None:
        markers: dict[int, Any] = {}
        encoder = _c_make_encoder(markers, str, _ascii, None, ": ", ", ", False, False, True)
        made = _per_thread.encoder = (markers, encoder)
    try:
        return "".join(made[1](rec, 0))
    except BaseException:
        made[0].clear()  # an encode that raised may leave ids behind (a false "circular" later)
        raise


class BadRecord(ValueError):
    """One line that is not a record this log wrote (checksum, encoding, JSON, shape)."""


class LogCorrupt(Exception):
    """A decision log that cannot be restored without losing what it acknowledged."""

    def __init__(self, path: str, offset: int, why: str) -> None:
        super().__init__(f"{path} at byte {offset}: {why}")
        self.path, self.offset, self.why = path, offset, why


def encode_record(rec: dict) -> bytes:
    """One record line (newline included) with its checksum as the last key."""
    if not rec or "crc" in rec:
        raise ValueError("a record is a non-empty map without a 'crc' key")
    body = _encode(rec).encode("ascii")
    return b'%s,"crc":"%08x"}\n' % (body[:-1], zlib.crc32(body))


def decode_record(line: bytes) -> dict:
    """The record of one line (its newline stripped or not); :class:`BadRecord` if it is not one."""
    if line.endswith(b"\n"):
        line = line[:-1]
    if len(line) < _CRC_TAIL + 2 or line[-_CRC_TAIL:-10] != b',"crc":"' or line[-2:] != b'"}':
        raise BadRecord("no checksum")
    if not _HEX8.fullmatch(line[-10:-2]):
        raise BadRecord("malformed checksum")
    body = line[:-_CRC_TAIL] + b"}"
    if zlib.crc32(body) != int(line[-10:-2], 16):
        raise BadRecord("checksum mismatch")
    return parse_json_record(body)


def parse_json_record(body: bytes | str) -> dict:
    """A JSON record map from raw bytes (no checksum check); :class:`BadRecord` on anything else."""
    try:
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
    except UnicodeDecodeError as exc:
        raise BadRecord(f"not UTF-8 at byte {exc.start}") from None
    try:
        rec = json.loads(text)
    except RecursionError:
        raise BadRecord("JSON nested too deep") from None
    except json.JSONDecodeError as exc:
        raise BadRecord(f"not JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:
        raise BadRecord(f"not JSON ({exc})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("op"), str):
        raise BadRecord("not a record (a JSON map with an 'op')")
    return rec


def segment_paths(path: str) -> list[str]:
    """The closed segments of the log at ``path``, oldest first (the current one is ``path``)."""
    base = os.path.basename(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(base + ".") and name[len(base) + 1 :].isdigit() and name[len(base) + 1 :].isascii():
            found.append((int(name[len(base) + 1 :]), os.path.join(os.path.dirname(path), name)))
    return [p for _, p in sorted(found)]


def read_bytes(path: str) -> bytes | None:
    """A log file's bytes (never through a symlink), or None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            from kernel.auth import UnsafeRuntimeDir

            raise UnsafeRuntimeDir(f"{path} is a symlink; refusing to read through it") from exc
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each line of ``data``; the last one may lack its newline."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        yield pos, data[pos:end]
        pos = end


@dataclass
class Scan:
    """One segment read and checked."""

    path: str
    size: int = 0
    #: (offset, record) of every good record before the first bad byte.
    records: list[tuple[int, dict]] = field(default_factory=list)
    #: Offset just past the last good record before the first bad byte.
    good_end: int = 0
    #: First bad byte, and why (None: the whole segment reads).
    bad_offset: int | None = None
    bad_why: str = ""
    #: Good records after the first bad one (their offsets): the damage is not a torn tail.
    good_after: list[int] = field(default_factory=list)
    #: The first record was unreadable and the second reads (a damaged snapshot line alone).
    head_damaged: bool = False
    #: Records after a damaged head (only when head_damaged and the rest reads).
    after_head: list[tuple[int, dict]] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.size > 0 or bool(self.records)

    @property
    def torn_tail(self) -> bool:
        return self.bad_offset is not None and not self.good_after

    def start_point(self) -> bool:
        """Whether replay can begin at this segment: its first record is a readable snapshot or
        a session that did not continue an earlier state."""
        if not self.records or self.records[0][0] != 0:
            return False
        head = self.records[0][1]
        return (
            head["op"] == "snapshot"
            and isinstance(head.get("state"), dict)
            and isinstance(head["state"].get("ledger"), dict)
        ) or (head["op"] == "session" and not head.get("restored"))


def scan_segment(path: str, data: bytes | None = None) -> Scan:
    """Read ``path`` record by record (module docstring); never raises on content."""
    if data is None:
        data = read_bytes(path) or b""
    scan = Scan(path, size=len(data))
    later: list[tuple[int, dict]] = []
    first_bad_line_end = 0
    for off, line in iter_lines(data):
        try:
            if not line.endswith(b"\n"):
                raise BadRecord("torn (no end of line)")
            rec = decode_record(line)
        except BadRecord as exc:
            if scan.bad_offset is None:
                scan.bad_offset, scan.bad_why = off, str(exc)
                first_bad_line_end = off + len(line)
            continue
        if scan.bad_offset is None:
            scan.records.append((off, rec))
            scan.good_end = off + len(line)
        else:
            scan.good_after.append(off)
            later.append((off, rec))
    if scan.bad_offset == 0 and later and later[0][0] == first_bad_line_end and len(later) == len(scan.good_after):
        # Only the first line is damaged: the snapshot of a segment whose decisions all read.
        contiguous = all(a[0] < b[0] for a, b in zip(later, later[1:]))
        if contiguous and _lines_contiguous(data, first_bad_line_end, later):
            scan.head_damaged = True
            scan.after_head = later
    return scan


def _lines_contiguous(data: bytes, start: int, recs: list[tuple[int, dict]]) -> bool:
    """Whether ``recs`` are every line from ``start`` on (no unreadable line between them)."""
    pos = start
    for off, _ in recs:
        if off != pos:
            return False
        pos = data.find(b"\n", off) + 1
    return pos == len(data)


def check_seq(path: str, recs: list[tuple[int, dict]], prev_seq: int | None) -> int | None:
    """Raise :class:`LogCorrupt` at the first record whose ``seq`` does not follow; the last seq."""
    for off, rec in recs:
        seq = rec.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise LogCorrupt(path, off, f"record without a seq ({rec.get('op')!r})")
        if rec["op"] == "session":
            if seq != 0:
                raise LogCorrupt(path, off, f"session record with seq {seq}")
        elif prev_seq is not None and seq != prev_seq + 1:
            raise LogCorrupt(path, off, f"record seq {seq} follows seq {prev_seq}: records are missing")
        prev_seq = seq
    return prev_seq


@dataclass
class Recovery:
    """What :func:`recover` found: the records to replay, in order, and what it did or would do."""

    #: Segments replayed, oldest first.
    chain: list[str] = field(default_factory=list)
    records: list[tuple[str, int, dict]] = field(default_factory=list)  # (path, offset, record)
    #: Human-readable lines: each fallback, cut and removal (the kernel prints them loudly).
    notes: list[str] = field(default_factory=list)
    #: (path, offset, bytes) of a torn tail to cut.
    cut: tuple[str, int, int] | None = None
    #: The current segment needs a fresh snapshot (restored from an earlier one).
    fell_back: bool = False
    #: Files to remove (a stale ``.next``, a closed segment that is a second link of the current).
    remove: list[str] = field(default_factory=list)
    #: ``path.next`` to rename over a missing current segment.
    adopt_next: bool = False


def recover(path: str) -> Recovery | None:
    """Work out what the log at ``path`` holds (module docstring): None when there is no log at
    all, else the records to replay; :class:`LogCorrupt` when that would lose acknowledged
    decisions.  Changes nothing on disk (:func:`apply_repairs` does)."""
    rec = Recovery()
    closed = segment_paths(path)
    nxt = path + ".next"
    cur_data = read_bytes(path)
    next_data = read_bytes(nxt)
    if cur_data is None and next_data is None and not closed:
        return None
    if closed and cur_data is not None and os.path.samefile(closed[-1], path):
        # A rotation linked the current segment and died before renaming the new one over it.
        rec.notes.append(f"{closed[-1]} is a second link of {path} (an unfinished rotation): removed")
        rec.remove.append(closed[-1])
        closed = closed[:-1]
    current: Scan | None = None
    if next_data is not None:
        nscan = scan_segment(nxt, next_data)
        if cur_data is None and nscan.start_point() and nscan.bad_offset is None:
            rec.notes.append(f"{path} missing: {nxt} (the snapshot of an unfinished rotation) becomes it")
            rec.adopt_next = True
            current = nscan
            current.path = path
        else:
            rec.notes.append(f"{nxt} left by an unfinished rotation: removed")
            rec.remove.append(nxt)
    if current is None and cur_data is not None:
        current = scan_segment(path, cur_data)
    if (
        not closed
        and not rec.adopt_next
        and (current is None or not current.records and b"\n" not in (cur_data or b""))
    ):
        # No record at all.  An empty file is a log never written (nothing to restore); bytes
        # with no readable record in them are damage, not a torn tail: the kernel writes whole
        # lines, so what is left (NUL blocks a crash never filled, a file cut short) may have
        # held acknowledged decisions -- refuse rather than start fresh over it (review F7).
        if cur_data:
            what = "all NUL bytes" if not cur_data.strip(b"\0") else "one unfinished line"
            raise LogCorrupt(
                path, 0, f"{len(cur_data)} byte(s), {what}, and no readable record: damaged, not a torn tail"
            )
        return rec if rec.remove else None
    segments: list[Scan | str] = [*closed, current] if current is not None else list(closed)
    if current is None or not current.exists:
        rec.notes.append(
            f"{path} is {'empty' if current is not None else 'missing'}: restoring from the segments before it"
        )
        rec.fell_back = True
        segments = list(closed)
    if not segments:
        raise LogCorrupt(path, 0, "the log holds no record to restore from")
    # The newest start point.
    scans: dict[int, Scan] = {}
    start = None
    for i in range(len(segments) - 1, -1, -1):
        s = segments[i]
        scans[i] = s if isinstance(s, Scan) else scan_segment(s)
        if scans[i].start_point():
            start = i
            break
        if s is current:
            sc = scans[i]
            why = (
                sc.bad_why
                if sc.bad_offset == 0
                else f"it begins with {sc.records[0][1]['op']!r}"
                if sc.records
                else "no record"
            )
            rec.notes.append(
                f"{sc.path}: no readable snapshot at its start ({why}); restoring from the "
                "previous one and the decisions after it"
            )
            rec.fell_back = True
    if start is None:
        oldest = scans[min(scans)]
        why = (
            oldest.bad_why
            if oldest.bad_offset == 0
            else f"it begins with {oldest.records[0][1]['op']!r}"
            if oldest.records
            else "no record"
        )
        raise LogCorrupt(oldest.path, 0, f"no segment begins with a readable snapshot or a fresh session ({why})")
    last_i = len(segments) - 1
    prev_seq: int | None = None
    for i in range(start, last_i + 1):
        s = scans.get(i) or scan_segment(segments[i])  # type: ignore[arg-type]
        recs = s.records
        if i > start:
            if s.head_damaged:  # its snapshot line alone is damaged: the decisions after it follow
                rec.notes.append(
                    f"{s.path} at byte 0: snapshot unreadable ({s.bad_why}); replaying its "
                    "decisions over the previous segment"
                )
                recs = s.after_head
                if recs and recs[0][1]["op"] != "session" and prev_seq is not None:
                    prev_seq += 1  # the snapshot's own seq
                s = Scan(s.path, size=s.size, records=recs, good_end=s.size)
            elif recs and recs[0][1]["op"] == "snapshot":
                raise LogCorrupt(s.path, 0, "a snapshot this recovery should have started from")
            elif recs and recs[0][1]["op"] != "session" and prev_seq is not None:
                # Every segment after the first begins with a snapshot: one missing there is the
                # snapshot alone when the decisions go on one past the previous segment's last.
                rec.notes.append(
                    f"{s.path}: no snapshot at its start; replaying its decisions over the previous segment"
                )
                prev_seq += 1
        if s.bad_offset is not None:
            if i == last_i and s.torn_tail:
                rec.cut = (s.path, s.good_end, s.size - s.good_end)
                rec.notes.append(
                    f"{s.path}: torn tail cut at byte {s.good_end} ({s.size - s.good_end} byte(s): {s.bad_why})"
                )
            else:
                raise LogCorrupt(
                    s.path, s.bad_offset, f"{s.bad_why}, with {len(s.good_after)} readable record(s) after it"
                )
        prev_seq = check_seq(s.path, recs, prev_seq)
        rec.chain.append(s.path)
        rec.records.extend((s.path, off, r) for off, r in recs)
    return rec


def apply_repairs(path: str, rec: Recovery) -> None:
    """Make the files match ``rec``: adopt ``path.next``, remove stale files, cut a torn tail."""
    folder = os.path.dirname(os.path.abspath(path))
    if rec.adopt_next:
        os.rename(path + ".next", path)
    for p in rec.remove:
        if p == path + ".next" and rec.adopt_next:
            continue
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    if rec.cut is not None:
        target, offset, _ = rec.cut
        fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        rec.cut = None
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def move_aside(path: str, stamp: str) -> str | None:
    """Move every file of the log at ``path`` (current, closed segments, ``.next``) into a new
    folder ``path.old-STAMP`` (``--fresh``: nothing is deleted); the folder, or None if none."""
    files = [p for p in (path, path + ".next", *segment_paths(path)) if os.path.lexists(p)]
    if not files:
        return None
    dest = f"{path}.old-{stamp}"
    os.mkdir(dest, 0o700)
    for p in files:
        os.rename(p, os.path.join(dest, os.path.basename(p)))
    return dest
