"""Decision log storage: checksummed records, segment files, and a recovery that fails safe.

**Records** (format 1, binary).  Each record is a 10-byte header and a msgpack map::

    byte 0      0xFE             marks a binary record (never the first byte of a JSON line or
                                 of UTF-8 text: old JSON-lines records are told apart by it)
    byte 1      0x01             the record format version
    bytes 2-5   length           of the payload, unsigned 32-bit little-endian
    bytes 6-9   CRC-32           of the payload, started from the length (``zlib.crc32(payload,
                                 length)``: a changed length fails it too), unsigned 32-bit
                                 little-endian
    bytes 10-   payload          the record in msgpack (kernel.codec's library): a decision
                                 ``{"seq", "t", "op", "in", "out"}`` as the array
                                 ``[seq, t, op, in, out]`` (no keys to write), any other
                                 record (session, snapshot, ...) as a map

so every byte of a record is checked: the magic and the version must be exactly these, the
length and the payload are covered by the checksum (one CRC call per record).  A record is written whole and in order;
one that runs past the end of the file is torn (a crash in the middle of its write); a header
that is not one, a length that does not fit or a checksum that fails is a :class:`BadRecord`,
never a traceback.  Records carry ``seq``: it grows by one per record within a kernel run (a
``session`` record restarts it at 0), so a record removed from the middle of a segment is
noticed like a corrupted one.  ``python -m kernel logcat LOG`` prints records as JSON lines.

**Older logs** (format 0, JSON lines) are read as before: one line of JSON whose last key is
``"crc"``, the CRC-32 (8 lowercase hex digits) of the line's bytes as they would read without
that key, i.e. of ``line[:-18] + b"}"``.  A kernel started over such a log appends binary
records to it: a segment may hold JSON lines then binary records, and every reader here
(recovery, replay, fsck, :func:`read_records`) takes both, record by record.

**Reading past damage.**  After a bad record the reader looks for the next good one: the next
line start of a JSON log, or any ``0xFE`` byte where a whole binary record with a good checksum
begins (a false match needs a 32-bit checksum to agree by chance).  The good records found after
damage decide between a torn tail (none) and damage in the middle (some).  A service's audit
payload could carry the bytes of a well-formed record; found after a torn tail it can only make
the recovery refuse (:class:`LogCorrupt`), never accept a record as the kernel's.

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
import struct
import threading
import zlib
from dataclasses import dataclass, field
from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring_ascii as _ascii
from typing import Any, Callable, Final, Iterator

import msgpack

#: The first byte of a binary record, and the format version this module writes.
MAGIC: Final = 0xFE
VERSION: Final = 1
MAGIC_BYTE: Final = b"\xfe"
#: magic, version, payload length, CRC-32.
_HEAD = struct.Struct("<BBII")
HEADER_BYTES: Final = _HEAD.size
#: The keys of a decision record, in the order of its array payload.
DECISION_KEYS: Final = ("seq", "t", "op", "in", "out")
_DECISION_KEYSET: Final = frozenset(DECISION_KEYS)
#: The largest payload a record may declare (a snapshot of the whole state is the largest record).
MAX_RECORD_BYTES: Final = 1 << 30

#: ``,"crc":"xxxxxxxx"}`` -- the fixed-size tail of every JSON record line (format 0).
_CRC_TAIL: Final = 18
_HEX8 = re.compile(rb"[0-9a-f]{8}")

#: One JSON encoder (format 0 records, :func:`encode_json_record`; ``logcat``).
_json_encoder = json.JSONEncoder(default=str, ensure_ascii=True)
#: Per thread: a msgpack packer (not thread-safe: it keeps a buffer), and the JSON C encoder with
#: its circular-reference markers (``JSONEncoder.encode`` builds one per call, most of its cost).
_per_thread = threading.local()


def _packer() -> Any:
    made = getattr(_per_thread, "packer", None)
    if made is None:
        # default=str: what the JSON log wrote for a value it could not encode (a set, an object).
        made = _per_thread.packer = msgpack.Packer(use_bin_type=True, datetime=False, default=str)
    return made


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
    """Bytes that are not a record this log wrote (checksum, header, encoding, shape)."""


class LogCorrupt(Exception):
    """A decision log that cannot be restored without losing what it acknowledged."""

    def __init__(self, path: str, offset: int, why: str) -> None:
        super().__init__(f"{path} at byte {offset}: {why}")
        self.path, self.offset, self.why = path, offset, why


def encode_record(rec: dict) -> bytes:
    """One binary record (module docstring) holding the map ``rec`` (a decision as its array)."""
    if type(rec) is not dict or not rec:
        raise ValueError("a record is a non-empty map")
    # a separate variable, not ``rec`` rebound: compiled (mypyc) code checks a dict variable's type
    payload: Any = rec
    if len(rec) == 5 and rec.keys() == _DECISION_KEYSET:
        payload = tuple(rec[k] for k in DECISION_KEYS)
    try:
        body = _packer().pack(payload)
    except BaseException:
        _packer().reset()  # a pack that raised may leave half a record in the packer's buffer
        raise
    n = len(body)
    if n > MAX_RECORD_BYTES:
        raise ValueError(f"a record of {n} bytes exceeds {MAX_RECORD_BYTES}")
    return _HEAD.pack(MAGIC, VERSION, n, zlib.crc32(body, n)) + body


def record_encoder() -> Callable[[Any], bytes]:
    """:func:`encode_record` with a packer of its own (one per decision log: no per-call lookup of
    the thread's packer; a log is appended to by one thread).  It also takes a decision as the
    tuple ``(seq, t, op, in, out)`` (written as the array payload without building the map)."""
    pack = msgpack.Packer(use_bin_type=True, datetime=False, default=str).pack  # resets itself on error
    head, crc32 = _HEAD.pack, zlib.crc32

    def encode(rec: Any) -> bytes:
        kind = type(rec)
        if kind is dict:
            if not rec:
                raise ValueError("a record is a non-empty map")
            if len(rec) == 5 and rec.keys() == _DECISION_KEYSET:
                rec = tuple(rec[k] for k in DECISION_KEYS)
        elif kind is not tuple or len(rec) != 5:
            raise ValueError("a record is a non-empty map or a decision's (seq, t, op, in, out)")
        body = pack(rec)
        n = len(body)
        if n > MAX_RECORD_BYTES:
            raise ValueError(f"a record of {n} bytes exceeds {MAX_RECORD_BYTES}")
        return head(MAGIC, VERSION, n, crc32(body, n)) + body

    return encode


def encode_json_record(rec: dict) -> bytes:
    """One format-0 record line (newline included) with its checksum as the last key: what a
    kernel before the binary format wrote (tests of old logs; ``logcat`` writes JSON without it)."""
    if not rec or "crc" in rec:
        raise ValueError("a record is a non-empty map without a 'crc' key")
    body = _encode(rec).encode("ascii")
    return b'%s,"crc":"%08x"}\n' % (body[:-1], zlib.crc32(body))


def _binary_at(data: bytes, pos: int) -> tuple[dict, int]:
    """The binary record at ``pos`` and the offset just past it; :class:`BadRecord` otherwise
    (``torn`` in the message when it runs past the end of ``data``)."""
    size = len(data)
    if size - pos < HEADER_BYTES:
        raise BadRecord(f"torn ({size - pos} of {HEADER_BYTES} header bytes)")
    magic, version, n, crc = _HEAD.unpack_from(data, pos)
    if magic != MAGIC:
        raise BadRecord("not a record")
    if version != VERSION:
        raise BadRecord(f"unknown record format version {version}")
    if n > MAX_RECORD_BYTES:
        raise BadRecord(f"record length {n} exceeds {MAX_RECORD_BYTES}")
    end = pos + HEADER_BYTES + n
    if end > size:
        raise BadRecord(f"torn ({size - pos} of {HEADER_BYTES + n} bytes)")
    body = data[pos + HEADER_BYTES : end]
    if zlib.crc32(body, n) != crc:
        raise BadRecord("checksum mismatch")
    try:
        rec = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # a record with a good checksum this version cannot read
        raise BadRecord(f"undecodable payload ({type(exc).__name__}: {exc})") from None
    if type(rec) is list and len(rec) == 5:  # a decision: [seq, t, op, in, out]
        rec = dict(zip(DECISION_KEYS, rec))
    if type(rec) is not dict or not isinstance(rec.get("op"), str):
        raise BadRecord("not a record (a map with an 'op', or a decision's 5-array)")
    return rec, end


def decode_record(raw: bytes) -> dict:
    """The record of one whole record's bytes (a binary record, or a JSON line with or without
    its newline); :class:`BadRecord` if it is not one."""
    raw = bytes(raw)
    if raw[:1] == MAGIC_BYTE:
        rec, end = _binary_at(raw, 0)
        if end != len(raw):
            raise BadRecord(f"{len(raw) - end} byte(s) after the record")
        return rec
    return decode_json_line(raw)


def decode_json_line(line: bytes) -> dict:
    """The record of one format-0 line (its newline stripped or not); :class:`BadRecord` if not."""
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


def record_at(data: bytes, pos: int) -> tuple[dict, int]:
    """The record (either format) beginning at ``pos`` and the offset just past it;
    :class:`BadRecord` otherwise."""
    if data[pos] == MAGIC:
        return _binary_at(data, pos)
    end = data.find(b"\n", pos)
    if end < 0:
        raise BadRecord("torn (no end of line)")
    return decode_json_line(data[pos : end + 1]), end + 1


def _resync(data: bytes, pos: int) -> tuple[int, dict, int] | None:
    """The first good record beginning after ``pos`` -- at a line start (JSON) or a ``0xFE`` byte
    (binary) -- as (offset, record, end); None when no good record follows."""
    size = len(data)
    nl = data.find(b"\n", pos)
    fe = data.find(MAGIC_BYTE, pos + 1)
    while nl >= 0 or fe >= 0:
        a = nl + 1 if nl >= 0 else size
        b = fe if fe >= 0 else size
        at = min(a, b)
        if at >= size:
            return None
        if a == at:
            nl = data.find(b"\n", at)
        if b == at:
            fe = data.find(MAGIC_BYTE, at + 1)
        try:
            rec, end = record_at(data, at)
        except BadRecord:
            continue
        return at, rec, end
    return None


def iter_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each record of ``data``, in order, either format; a damaged stretch is
    yielded as one span from its first bad byte to the next good record (or the end)."""
    pos, size = 0, len(data)
    while pos < size:
        try:
            _, end = record_at(data, pos)
        except BadRecord:
            found = _resync(data, pos)
            end = size if found is None else found[0]
            if data[pos] != MAGIC:  # a damaged JSON line is one span, as each line was before
                nl = data.find(b"\n", pos)
                if 0 <= nl < end:
                    end = nl + 1
        yield pos, data[pos:end]
        pos = end


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, record bytes) of each record: :func:`iter_records` (the name of the JSON-lines era)."""
    return iter_records(data)


def read_records(path: str) -> list[dict]:
    """Every readable record of the log file at ``path`` in order, either format (damaged stretches
    skipped: :func:`scan_segment` says where they are); [] when there is no file."""
    data = read_bytes(path) or b""
    return [r for _, r in scan_segment(path, data).all_records()]


def read_stream(data: bytes) -> tuple[list[dict], int]:
    """The whole records at the start of ``data`` (bytes appended to a log), either format, and
    how many bytes they and any damaged stretch before a good record take: a record still being
    written at the end is left for the next read."""
    out: list[dict] = []
    pos, size = 0, len(data)
    while pos < size:
        try:
            rec, pos = record_at(data, pos)
        except BadRecord:
            found = _resync(data, pos)
            if found is None:
                break  # an unfinished record (or damage with nothing good after it yet)
            _, rec, pos = found
        out.append(rec)
    return out, pos


class Follower:
    """Reads the records appended to a decision log, across its rotations (the current segment is
    replaced by a new file: the old one is read to its end first).  Not a reader for recovery:
    damaged stretches are skipped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._inode = os.fstat(self._fd).st_ino
        self._rest = b""

    def read(self) -> list[dict]:
        out = self._drain()
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return out
        if inode != self._inode:  # rotated: the old file was read to its end, go on with the new
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._inode, self._rest = inode, b""
            out += self._drain()
        return out

    def _drain(self) -> list[dict]:
        chunks = [self._rest]
        while True:
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        recs, used = read_stream(data)
        self._rest = data[used:]
        return recs

    def close(self) -> None:
        os.close(self._fd)


def to_json_line(rec: dict) -> str:
    """One record as a line of JSON (``python -m kernel logcat``; bytes and other values JSON has no
    type for are written as ``str()`` of them)."""
    return _encode(rec)


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
    #: (offset, record) of those good records after the first bad one.
    later: list[tuple[int, dict]] = field(default_factory=list)
    #: The first record was unreadable and the second reads (a damaged snapshot line alone).
    head_damaged: bool = False
    #: Records after a damaged head (only when head_damaged and the rest reads).
    after_head: list[tuple[int, dict]] = field(default_factory=list)

    def all_records(self) -> list[tuple[int, dict]]:
        """(offset, record) of every good record, before and after any damage."""
        return self.records + self.later

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
    """Read ``path`` record by record, either format (module docstring); never raises on content."""
    if data is None:
        data = read_bytes(path) or b""
    scan = Scan(path, size=len(data))
    later = scan.later
    pos, size = 0, len(data)
    stretches = 0  # damaged stretches
    while pos < size:
        try:
            rec, end = record_at(data, pos)
        except BadRecord as exc:
            stretches += 1
            if scan.bad_offset is None:
                scan.bad_offset, scan.bad_why = pos, str(exc)
            found = _resync(data, pos)
            if found is None:
                break
            pos, rec, end = found
        if scan.bad_offset is None:
            scan.records.append((pos, rec))
            scan.good_end = end
        else:
            scan.good_after.append(pos)
            later.append((pos, rec))
        pos = end
    if scan.bad_offset == 0 and later and stretches == 1 and pos == size:
        # Only the head is damaged (one stretch, every record after it reads to the end): the
        # snapshot of a segment whose decisions all read (a seq gap says if more was lost).
        scan.head_damaged = True
        scan.after_head = list(later)
    return scan


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
        and (
            current is None
            or not current.records
            and not current.good_after
            and (b"\n" not in (cur_data or b"") or (cur_data or b"")[:1] == MAGIC_BYTE)
        )
    ):
        # No record at all.  An empty file is a log never written (nothing to restore); bytes
        # with no readable record in them are damage, not a torn tail: the kernel writes whole
        # records, so what is left (NUL blocks a crash never filled, a file cut short) may have
        # held acknowledged decisions -- refuse rather than start fresh over it (review F7).
        if cur_data:
            what = (
                "all NUL bytes"
                if not cur_data.strip(b"\0")
                else "one unfinished record"
                if cur_data[:1] == MAGIC_BYTE
                else "one unfinished line"
            )
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
