"""A decision log that fails safe (issue 24): checksummed records, a torn tail cut back, a damaged
current segment restored from the previous snapshot, anything else refused with the file and the
offset -- and never an acknowledged decision lost.

The fault test builds a real log (a BudgetAdmission over a DecisionLog, rotating every few KiB),
notes after every flush what was acknowledged (the bytes on disk and the ledger's state), and then
rebuilds the files as a crash at every record boundary and at random bytes would have left them:
each must restore exactly the state of the last decision written whole before the cut."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from kernel.admission import BudgetAdmission
from kernel.decisions import DecisionLog
from kernel.logstore import (
    LogCorrupt,
    decode_record,
    encode_json_record,
    encode_record,
    iter_lines,
    recover,
    segment_paths,
)
from kernel.replay import restore

RNG_SEED = 24


def _norm(x):
    return json.loads(json.dumps(x))


def _state(adm: BudgetAdmission) -> dict:
    d = _norm(adm.ledger.dump())
    d.pop("session")
    return d


def _restored(path: str) -> dict | None:
    report = restore(path)
    if report is None:
        return None
    d = _norm(report.ledger.dump())
    d.pop("session")
    return d


class Built:
    """A real log and what was acknowledged: acks[i] = (segment index, bytes of it, state)."""

    def __init__(self, folder, steps: int = 140, segment_bytes: int = 4096) -> None:
        self.folder = str(folder)
        self.path = os.path.join(self.folder, "d.jsonl")
        log = DecisionLog(self.path, segment_bytes=segment_bytes, fsync="never")
        adm = BudgetAdmission(decision_log=log)
        self.acks: list[tuple[int, int, dict]] = []

        def flushed():
            before = len(segment_paths(self.path))
            log.flush()
            closed = segment_paths(self.path)
            if len(closed) > before:  # rotated in this flush: the old segment was full first
                self.acks.append((before, os.path.getsize(closed[before]), _state(adm)))
            self.acks.append((len(closed), os.path.getsize(self.path), _state(adm)))

        flushed()
        rng = random.Random(RNG_SEED)
        for n in range(steps):
            job = f"j{n}"
            adm.decide("open", float(n), job=job, limits={"flops": 100.0, "units": 3})
            flushed()
            adm.decide("charge", float(n), job=job, spent={"flops": float(rng.randint(1, 99))})
            flushed()
            if n % 3:
                adm.decide("close", float(n), job=job)
            else:
                adm.decide("reserve", float(n), job=job, resource="units", amount=1, lease=1e3)
            flushed()
        log.close()
        self.final = _state(adm)
        self.files = [*segment_paths(self.path), self.path]
        self.data = [open(p, "rb").read() for p in self.files]

    def expected(self, seg: int, cut: int) -> dict | None:
        """The state after the last decision acknowledged before a crash at byte ``cut`` of
        segment ``seg`` (every earlier segment whole)."""
        best = None
        for c, size, state in self.acks:
            if c < seg or c == seg and size <= cut:
                best = state
        return best

    def crash(self, dest: str, seg: int, cut: int) -> str:
        """Files as a crash at byte ``cut`` of segment ``seg`` leaves them, in ``dest``."""
        os.makedirs(dest)
        path = os.path.join(dest, "d.jsonl")
        for i in range(seg):
            with open(f"{path}.{i + 1:06d}", "wb") as fh:
                fh.write(self.data[i])
        with open(path, "wb") as fh:
            fh.write(self.data[seg][:cut])
        return path

    def copy(self, dest: str) -> str:
        shutil.copytree(self.folder, dest)
        return os.path.join(dest, "d.jsonl")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return Built(tmp_path_factory.mktemp("log"))


def test_the_built_log_rotated_and_restores_whole(built):
    assert len(built.files) >= 4  # several segments, so crashes fall on every kind of boundary
    assert _restored(built.path) == built.final


def test_a_crash_at_every_record_boundary_loses_no_acknowledged_decision(built, tmp_path):
    n = 0
    for seg, data in enumerate(built.data):
        cuts = [0] + [off + len(line) for off, line in iter_lines(data)]
        for cut in cuts:
            path = built.crash(str(tmp_path / f"b{seg}-{cut}"), seg, cut)
            assert _restored(path) == built.expected(seg, cut), (seg, cut)
            n += 1
    assert n > 3 * 140  # every decision's boundary was tried


def test_a_crash_at_random_bytes_cuts_the_torn_record_and_keeps_the_rest(built, tmp_path):
    rng = random.Random(RNG_SEED)
    for i in range(150):
        seg = rng.randrange(len(built.data))
        cut = rng.randrange(len(built.data[seg]) + 1)
        path = built.crash(str(tmp_path / f"r{i}"), seg, cut)
        assert _restored(path) == built.expected(seg, cut), (seg, cut)
        # Restoring cut the torn tail: the next kernel appends after whole records only.
        assert recover(path).cut is None


def _line_starts(data: bytes) -> list[int]:
    return [off for off, _ in iter_lines(data)]


def test_a_damaged_byte_is_refused_at_its_record_or_restored_from_the_previous_snapshot(built, tmp_path):
    """A damaged record with good ones after it is refused, naming the file and the record's
    offset; a damaged snapshot at the head of the current segment falls back to the previous
    segment and loses nothing; a damaged last record is a torn tail."""
    rng = random.Random(RNG_SEED + 1)
    data = built.data[-1]
    starts = _line_starts(data)
    seen = set()
    # Random bytes, and one byte of the last record, of a middle one and of the snapshot for sure.
    picks = [rng.randrange(len(data)) for _ in range(117)]
    picks += [rng.randrange(starts[-1], len(data)), rng.randrange(starts[1], starts[2]), rng.randrange(starts[1])]
    for i, pos in enumerate(picks):
        if data[pos] == 0x0A:
            continue
        bad = bytearray(data)
        bad[pos] ^= 0x20 if data[pos] != 0x2A else 0x01  # never makes a newline
        path = built.copy(str(tmp_path / f"f{i}"))
        with open(path, "wb") as fh:
            fh.write(bytes(bad))
        record = max(j for j, s in enumerate(starts) if s <= pos)
        if record == len(starts) - 1:
            seen.add("tail")
            assert _restored(path) == built.expected(len(built.data) - 1, starts[record])
        elif record == 0:
            seen.add("snapshot")
            assert _restored(path) == built.final
        else:
            seen.add("middle")
            with pytest.raises(LogCorrupt) as info:
                restore(path)
            assert info.value.path == path and info.value.offset == starts[record]
            assert f"{path} at byte {starts[record]}" in str(info.value)
    assert seen == {"tail", "snapshot", "middle"}


def _write_lines(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as fh:
        fh.write(b"".join(lines))


def _lines(path: str) -> list[bytes]:
    return [line for _, line in iter_lines(open(path, "rb").read())]


@pytest.mark.parametrize(
    "junk",
    [b"\xff\xfe not utf-8 \x80\n", b"[" * 100_000 + b"\n", b"{}\n", b"\n\n"],
    ids=["non-utf8", "deep", "no-checksum", "blank"],
)
def test_junk_lines_are_typed_errors_in_the_middle_and_cut_at_the_end(built, tmp_path, junk):
    path = built.copy(str(tmp_path / "mid"))
    lines = _lines(path)
    _write_lines(path, lines[:3] + [junk] + lines[3:])
    with pytest.raises(LogCorrupt) as info:
        restore(path)
    assert info.value.offset == sum(map(len, lines[:3]))
    path = built.copy(str(tmp_path / "end"))
    _write_lines(path, lines + [junk])
    assert _restored(path) == built.final
    assert open(path, "rb").read() == b"".join(lines)  # cut back to the last good record


def test_a_deep_line_with_a_good_checksum_is_a_typed_error_not_a_traceback():
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"op":"audit","x":' + deep + b"}"
    import zlib

    line = body[:-1] + b',"crc":"%08x"}\n' % zlib.crc32(body)
    with pytest.raises(ValueError, match="nested too deep"):
        decode_record(line)


def test_a_removed_record_is_noticed_by_its_sequence_number(built, tmp_path):
    path = built.copy(str(tmp_path / "gap"))
    lines = _lines(path)
    _write_lines(path, lines[:4] + lines[5:])  # e.g. a charge that exhausted a job
    with pytest.raises(LogCorrupt, match="records are missing") as info:
        restore(path)
    assert info.value.offset == sum(map(len, lines[:4]))


def test_a_removed_snapshot_restores_from_the_previous_one(built, tmp_path):
    path = built.copy(str(tmp_path / "nosnap"))
    lines = _lines(path)
    assert decode_record(lines[0])["op"] == "snapshot"
    _write_lines(path, lines[1:])
    assert _restored(path) == built.final  # the previous segment, then this one's decisions
    # One more record gone after it is a gap, refused.
    _write_lines(path, lines[2:])
    with pytest.raises(LogCorrupt, match="records are missing"):
        restore(path)


def test_an_unfinished_rotation_restores_everything(built, tmp_path):
    """Every state a crash inside a rotation can leave (this kernel's link-then-rename, and the
    rename-then-rename of one without hard links)."""
    last = len(built.data) - 1
    # Old order: the full segment renamed away, the new one (only its snapshot) still at .next.
    path = built.crash(str(tmp_path / "a"), last, 0)
    os.unlink(path)
    snapshot = _lines(built.files[-1])[0]
    with open(path + ".next", "wb") as fh:
        fh.write(snapshot)
    assert _restored(path) == built.expected(last, len(snapshot))
    assert os.path.exists(path) and not os.path.exists(path + ".next")
    # New order: the full segment linked, the new one not yet renamed over it.
    path = built.copy(str(tmp_path / "b"))
    os.link(path, f"{path}.{last + 1:06d}")
    with open(path + ".next", "wb") as fh:
        fh.write(snapshot)
    assert _restored(path) == built.final
    assert segment_paths(path) == [f"{path}.{i + 1:06d}" for i in range(last)]
    assert not os.path.exists(path + ".next")
    # The current segment missing or empty: the segments before it.
    for name, damage in (("c", os.unlink), ("d", lambda p: open(p, "wb").close())):
        path = built.copy(str(tmp_path / name))
        damage(path)
        assert _restored(path) == built.expected(last, 0)


def test_segments_that_restore_nothing_refuse(built, tmp_path):
    path = built.copy(str(tmp_path / "x"))
    for p in segment_paths(path):
        os.unlink(p)
    data = bytearray(open(path, "rb").read())
    data[5] ^= 0x20  # the snapshot, and no segment before it
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(LogCorrupt, match="no segment begins with a readable snapshot") as info:
        restore(path)
    assert info.value.path == path and info.value.offset == 0
    # Closed segments and no current one, all unreadable: refused, never a fresh start.
    path = built.copy(str(tmp_path / "y"))
    os.unlink(path)
    for p in segment_paths(path):
        with open(p, "r+b") as fh:
            fh.write(b"#")
    with pytest.raises(LogCorrupt):
        restore(path)


def test_after_a_fallback_the_next_kernel_writes_a_snapshot_and_restores_again(built, tmp_path):
    path = built.copy(str(tmp_path / "z"))
    open(path, "wb").close()  # an empty current segment
    report = restore(path)
    assert report.recovery.fell_back
    log = DecisionLog(path, segment_bytes=1 << 20, fsync="never", restored=True, snapshot_soon=True)
    adm = BudgetAdmission(decision_log=log, restored=report, restored_at=1e3)
    adm.decide("open", 1e3, job="after", limits={"flops": 5.0})
    log.flush()
    log.close()
    assert decode_record(_lines(path)[0])["op"] == "snapshot"  # a start point again
    assert _restored(path) == _state(adm)
    assert not restore(path).recovery.fell_back


def test_records_round_trip_and_checksum_every_byte():
    rec = {"seq": 3, "op": "charge", "in": {"job": "é", "x": float("inf")}, "out": {"ok": True}}
    raw = encode_record(rec)
    assert raw[:2] == b"\xfe\x01" and decode_record(raw) == rec
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x04
        with pytest.raises(ValueError):
            decode_record(bytes(bad))
    # An older kernel's JSON line (format 0) reads the same, and is checksummed the same way.
    line = encode_json_record(rec)
    assert line.isascii() and json.loads(line)["crc"] and decode_record(line)["in"] == rec["in"]
    for i in range(len(line) - 1):
        bad = bytearray(line)
        bad[i] ^= 0x04
        with pytest.raises(ValueError):
            decode_record(bytes(bad))


_FSIZE_CHILD = r"""
import json, os, resource, signal, sys
sys.path.insert(0, sys.argv[2])
from kernel.admission import BudgetAdmission
from kernel.decisions import DecisionLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
path = sys.argv[1]
log = DecisionLog(path, fsync="always")
adm = BudgetAdmission(decision_log=log)
adm.decide("open", 0.0, job="a", limits={"flops": 10.0})
assert log.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 100, hard))
for n in range(20):
    adm.decide("charge", float(n), job="a", spent={"flops": 0.5})
failed = not log.flush()
error = log.error
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
again = log.flush()
log.close()
print(json.dumps({"failed": failed, "error": error, "again": again, "after": log.error,
                  "spent": adm.ledger.jobs["a"].spent}))
"""


def test_a_failing_write_keeps_every_decision_in_order_and_writes_it_later(tmp_path):
    """A real write failure (the file-size limit: EFBIG, like ENOSPC) part-way through a flush:
    the log says so, keeps the rest buffered, and once it can write again the file holds every
    decision whole and in order -- no gap, no torn record in the middle."""
    path = str(tmp_path / "d.jsonl")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, path, repo], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["failed"] and got["error"].startswith("EFBIG") and got["again"] and got["after"] is None
    report = restore(path)
    assert report.recovery.cut is None and not report.divergences
    assert _norm(report.ledger.jobs["a"].spent) == got["spent"] == {"flops": 10.0}
    seqs = [decode_record(line)["seq"] for line in _lines(path)]
    assert seqs == list(range(len(seqs)))


def test_fsck_checks_repairs_and_discards_only_when_told(built, tmp_path, capsys):
    from kernel.fsck import main as fsck

    folder = str(tmp_path / "k")
    path = built.copy(folder)
    assert fsck([folder]) == 0
    lines = _lines(path)
    _write_lines(path, lines + [lines[-1][:7]])  # a torn tail
    assert fsck([folder]) == 1 and "torn tail" in capsys.readouterr().out
    assert fsck([folder, "--repair"]) == 1
    assert fsck([folder]) == 0 and _restored(path) == built.final
    # Damage in the middle: refused until the operator discards what follows it.
    _write_lines(path, lines[:5] + [b"junk\n"] + lines[5:])
    assert fsck([path, "--repair"]) == 2
    assert f"{path} at byte {sum(map(len, lines[:5]))}" in capsys.readouterr().out
    assert fsck([path, "--repair", "--discard-after-damage"]) == 1
    assert fsck([path]) == 0
    cut = [p for p in os.listdir(folder) if ".cut-" in p]
    assert len(cut) == 1 and open(os.path.join(folder, cut[0]), "rb").read().startswith(b"junk\n")
    assert _restored(path) == built.expected(len(built.data) - 1, sum(map(len, lines[:5])))


def test_keep_segments_bounds_the_history_and_still_restores(tmp_path):
    path = str(tmp_path / "d.jsonl")
    log = DecisionLog(path, segment_bytes=4096, fsync="never", keep_segments=2)
    adm = BudgetAdmission(decision_log=log)
    for n in range(300):
        adm.decide("open", float(n), job=f"j{n}", limits={"flops": 10.0})
        adm.decide("close", float(n), job=f"j{n}")
        log.flush()
    log.close()
    closed = segment_paths(path)
    assert len(closed) == 2 and log.counters["segments_deleted"] > 0
    assert int(closed[-1].rsplit(".", 1)[1]) > 2  # numbering goes on
    assert _restored(path) == _state(adm)
    open(path, "wb").close()  # and a damaged current segment still has a snapshot to fall back to
    assert restore(path) is not None
    with pytest.raises(ValueError):
        DecisionLog(path, keep_segments=1)


@pytest.mark.parametrize("damage", ["zeroed", "one partial line"])
def test_a_young_log_with_no_readable_record_is_damage_not_a_torn_tail(tmp_path, damage, capsys):
    """Review F7: a one-segment log whose bytes read as NUL (blocks a crash never filled), or that
    was cut to a piece of its first line, was taken for a kernel that died before its first
    record: cut, and the kernel started fresh.  It is refused, naming the file and offset 0."""
    from kernel.fsck import main as fsck

    path = str(tmp_path / "decisions.jsonl")
    log = DecisionLog(path, fsync="never")
    adm = BudgetAdmission(decision_log=log)
    for n in range(5):
        adm.decide("open", float(n), job=f"kept{n}", limits={"flops": 10.0})
    log.close()
    data = open(path, "rb").read()
    bad = b"\0" * len(data) if damage == "zeroed" else data[:40]
    with open(path, "wb") as fh:
        fh.write(bad)
    with pytest.raises(LogCorrupt) as info:
        restore(path)
    assert info.value.path == path and info.value.offset == 0 and f"{path} at byte 0" in str(info.value)
    assert fsck([path]) == 2 and "DAMAGED" in capsys.readouterr().out
    assert open(path, "rb").read() == bad  # nothing cut
    with open(path, "wb"):
        pass
    assert restore(path) is None and fsck([path]) == 0  # an empty file: a log never written
