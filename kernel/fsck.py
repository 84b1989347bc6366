"""``python -m kernel fsck PATH [--repair] [--discard-after-damage]`` -- check and repair a decision log.

``PATH`` is a log's current segment (``decisions.jsonl``) or a directory holding logs (every
``*.jsonl`` there, and every base name of ``NAME.NNNNNN`` / ``NAME.next`` files).  For each log it
prints what a starting kernel would restore (kernel.logstore's recovery: the segments replayed,
jobs and reservations restored, the replay checks of every snapshot on the way) and every closed
segment of the history whose records do not all read.

``--repair`` does what a starting kernel does: cuts a torn tail back to the last good record and
finishes a rotation a crash interrupted.  A log damaged anywhere else is not repaired unless
``--discard-after-damage`` is given too: the current segment is then cut at the first damaged
record (the bytes cut are kept in ``PATH.cut-STAMP``), which loses every decision after it --
the operator's explicit choice, never the kernel's.

Exit status: 0 the log restores with nothing to repair (or nothing left after ``--repair``),
1 it needs (or needed) a repair, 2 it cannot be restored as it is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from kernel import logstore
from kernel.replay import restore

_PART = re.compile(r"(.+)\.(\d+|next)$")


def find_logs(where: str) -> list[str]:
    """The logs at ``where``: itself when it is not a directory, else every log in it."""
    if not os.path.isdir(where):
        return [where]
    bases = set()
    for name in os.listdir(where):
        m = _PART.fullmatch(name)
        if m and m.group(2).isascii():
            bases.add(m.group(1))
        elif name.endswith(".jsonl") and os.path.isfile(os.path.join(where, name)):
            bases.add(name)
    return sorted(os.path.join(where, b) for b in bases)


def check(path: str, *, repair: bool, discard: bool, out=print) -> int:
    """Check one log (module docstring); the exit status for it."""
    status = 0
    try:
        report = restore(path, repair=False)
    except logstore.LogCorrupt as exc:
        out(f"{path}: DAMAGED: {exc}")
        if not (repair and discard):
            out(
                "   not repaired (--repair --discard-after-damage cuts the current segment there, losing "
                "every decision after it; or start the kernel with --fresh to move the log aside)"
            )
            return 2
        if os.path.abspath(exc.path) != os.path.abspath(path):
            out(
                f"   the damage is in a closed segment ({exc.path}); move it and the segments after it aside "
                "by hand, or start the kernel with --fresh"
            )
            return 2
        data = logstore.read_bytes(path) or b""
        keep = f"{path}.cut-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        with open(keep, "xb") as fh:
            fh.write(data[exc.offset :])
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, exc.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        out(f"   cut {path} at byte {exc.offset}: {len(data) - exc.offset} byte(s) moved to {keep}")
        status = 1
        try:
            report = restore(path, repair=False)
        except logstore.LogCorrupt as again:
            out(f"{path}: still DAMAGED: {again}")
            return 2
    if report is None:
        out(f"{path}: no log here")
        return status
    found = report.recovery
    for note in found.notes:
        out(f"   {note}")
    pending = bool(found.cut or found.remove or found.adopt_next)
    if pending:
        status = max(status, 1)
        if repair:
            logstore.apply_repairs(path, found)
            out("   repaired")
        else:
            out("   needs repair (--repair, or start the kernel: it repairs this itself)")
    ledger = report.ledger
    assert ledger is not None
    out(
        f"{path}: restores {len(ledger.jobs) - 2} job(s), {len(ledger._reservations)} reservation(s), "
        f"{len(report.inflight_idem)} interrupted request(s) from {len(found.chain)} segment(s), "
        f"{len(found.records)} record(s)" + (" (fell back to an earlier snapshot)" if found.fell_back else "")
    )
    if report.divergences:
        status = max(status, 1)
        out(f"   {len(report.divergences)} replay divergence(s); first: {report.divergences[0]}")
    for seg in logstore.segment_paths(path):
        if seg in found.chain:
            continue
        scan = logstore.scan_segment(seg)
        if scan.bad_offset is not None:
            status = max(status, 1)
            out(f"   history: {seg} at byte {scan.bad_offset}: {scan.bad_why} (not needed to restore)")
    return status


def logcat(path: str, *, offsets: bool = False, out=print) -> int:
    """Print the records of the log file at ``path`` as JSON lines (``python -m kernel logcat``);
    a damaged stretch is reported on stderr and skipped.  The exit status for it."""
    data = logstore.read_bytes(path)
    if data is None:
        print(f"{path}: no such file", file=sys.stderr)
        return 2
    status = 0
    for off, raw in logstore.iter_records(data):
        try:
            rec = logstore.decode_record(raw)
        except logstore.BadRecord as exc:
            print(f"{path} at byte {off}: {len(raw)} byte(s) unreadable: {exc}", file=sys.stderr)
            status = 1
            continue
        line = logstore.to_json_line(rec)
        out(f'{{"offset": {off}, "record": {line}}}' if offsets else line)
    return status


def logcat_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernel logcat",
        description="Print decision log records (binary records and older JSON lines alike) as JSON lines, "
        "one per record, without their checksums; exit 1 if a record is unreadable.",
    )
    parser.add_argument("log", nargs="+", help="decision log files (segments oldest first)")
    parser.add_argument("--offsets", action="store_true", help='each line as {"offset": BYTE, "record": ...}')
    args = parser.parse_args(argv)
    status = 0
    try:
        for path in args.log:
            status = max(status, logcat(path, offsets=args.offsets))
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernel fsck", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="a decision log (its current segment) or a directory of logs")
    parser.add_argument("--repair", action="store_true", help="cut a torn tail, finish an interrupted rotation")
    parser.add_argument(
        "--discard-after-damage",
        action="store_true",
        help="with --repair: cut the current segment at its first damaged record",
    )
    args = parser.parse_args(argv)
    logs = find_logs(args.path)
    if not logs:
        print(f"{args.path}: no decision log found", file=sys.stderr)
        return 2
    status = 0
    for path in logs:
        try:
            status = max(status, check(path, repair=args.repair, discard=args.discard_after_damage))
        except OSError as exc:
            print(f"{path}: cannot read: {exc}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
