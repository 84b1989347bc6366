"""The decision log's binary record format (kernel.logstore, format 1): round trip, a crash at
every byte of a record, checksum failures, a corrupted length, logs of JSON lines written by older
kernels and files holding both, and the follower the live view reads the log with.  The recovery
rules themselves over whole logs: tests/test_kernel_logfaults.py."""

from __future__ import annotations

import json
import os
import struct

import pytest

from kernel import logstore
from kernel.admission import BudgetAdmission
from kernel.decisions import DecisionLog
from kernel.logstore import (
    HEADER_BYTES,
    BadRecord,
    LogCorrupt,
    decode_record,
    encode_json_record,
    encode_record,
    iter_records,
    read_records,
    recover,
)
from kernel.replay import replay_file, restore
from tests.test_kernel_logfaults import _norm, _restored, _state  # the same state comparison


def _small_log(path: str, n: int = 6) -> tuple[list[int], list[dict]]:
    """A log of ``n`` decisions, each flushed: (file size after each flush, state after it)."""
    log = DecisionLog(path, fsync="never")
    adm = BudgetAdmission(decision_log=log)
    log.flush()
    sizes, states = [os.path.getsize(path)], [_state(adm)]
    for i in range(n):
        if i % 2 == 0:
            adm.decide("open", float(i), job=f"j{i}", limits={"flops": 100.0})
        else:
            adm.decide("charge", float(i), job=f"j{i - 1}", spent={"flops": 7.5})
        log.flush()
        sizes.append(os.path.getsize(path))
        states.append(_state(adm))
    log.close()
    return sizes, states


def test_records_round_trip_with_every_value_the_log_takes():
    rec = {
        "seq": 7,
        "t": 1.0019999999999998,
        "op": "audit",
        "in": {"source": "svc:é", "event": {"b": b"\x00\xfe\n", "n": [1, -2, 2**63 - 1], "x": None, "nan": 1e308}},
        "out": {"ok": True, "granted": {"tokens": 1e8, "wall_ms": 3.6e6}},
    }
    raw = encode_record(rec)
    assert raw[0] == logstore.MAGIC and raw[1] == logstore.VERSION
    assert raw[HEADER_BYTES] == 0x95  # a decision is written as a 5-array, read back as the map
    assert struct.unpack_from("<I", raw, 2)[0] == len(raw) - HEADER_BYTES
    assert decode_record(raw) == rec
    # What JSON could not hold is written as its str(), as the JSON log did (default=str).
    odd = decode_record(encode_record({"op": "x", "set": {3}, "big": 2**70, "cls": object}))
    assert odd["set"] == "{3}" and odd["big"] == str(2**70) and odd["cls"] == str(object)
    with pytest.raises(ValueError):
        encode_record({})


def test_a_binary_record_fails_its_checksum_at_every_byte_and_bit():
    raw = encode_record({"seq": 1, "t": 2.5, "op": "finish", "in": {"job": "j", "spent": {"tokens": 1.0}}, "out": {}})
    for i in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            with pytest.raises(BadRecord):
                decode_record(bytes(bad))
    with pytest.raises(BadRecord, match="torn"):
        decode_record(raw[:-1])
    with pytest.raises(BadRecord, match="after the record"):
        decode_record(raw + b"\x00")
    wrong_version = bytearray(raw)
    wrong_version[1] = 2
    with pytest.raises(BadRecord, match="version 2"):
        decode_record(bytes(wrong_version))


def test_a_crash_at_every_byte_of_the_last_record_restores_what_was_flushed_before_it(tmp_path):
    path = str(tmp_path / "d.jsonl")
    sizes, states = _small_log(path)
    data = open(path, "rb").read()
    last_start = sizes[-2]
    assert len(data) == sizes[-1]
    for cut in range(last_start, len(data) + 1):
        with open(path, "wb") as fh:
            fh.write(data[:cut])
        found = recover(path)
        whole = cut == len(data)
        assert found.cut == (None if whole or cut == last_start else (path, last_start, cut - last_start)), cut
        assert _restored(path) == (states[-1] if whole else states[-2]), cut
        assert os.path.getsize(path) == (len(data) if whole else last_start)  # the torn tail was cut


def test_damage_in_a_middle_record_is_refused_at_its_offset_even_a_length_past_the_end(tmp_path):
    path = str(tmp_path / "d.jsonl")
    sizes, _ = _small_log(path)
    data = open(path, "rb").read()
    mid = sizes[2]  # the third decision: records follow it
    for pos in (mid, mid + 1, mid + 3, mid + 7, mid + HEADER_BYTES + 2, sizes[3] - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with open(path, "wb") as fh:
            fh.write(bytes(bad))
        with pytest.raises(LogCorrupt) as info:
            restore(path)
        assert info.value.offset == mid and "readable record(s) after it" in info.value.why, pos
    # A length that says the record runs past the end of the file is not taken for a torn tail
    # while whole records follow it: nothing acknowledged is cut.
    bad = bytearray(data)
    struct.pack_into("<I", bad, mid + 2, len(data))
    with open(path, "wb") as fh:
        fh.write(bytes(bad))
    with pytest.raises(LogCorrupt) as info:
        restore(path)
    assert info.value.offset == mid
    assert open(path, "rb").read() == bytes(bad)  # refused: the file is left as it was


def test_a_forged_record_inside_a_torn_audit_payload_only_makes_recovery_refuse(tmp_path):
    """A service's audit event may carry bytes that are a well-formed record.  Inside a record
    that was written whole they are payload; inside a torn one the recovery cannot tell, so it
    refuses (fails safe) rather than cut or accept them."""
    path = str(tmp_path / "d.jsonl")
    log = DecisionLog(path, fsync="never")
    log.flush()
    forged = encode_record({"seq": 2, "t": 0.0, "op": "open", "in": {"job": "x"}, "out": {"ok": True}})
    log.append("audit", 1.0, {"source": "svc", "event": {"blob": forged}}, {"ok": True})
    log.close()
    assert [r["op"] for r in read_records(path)] == ["session", "audit"]  # whole: it is payload
    assert restore(path) is not None
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[:-1])  # the audit record torn after the forged bytes
    with pytest.raises(LogCorrupt):
        restore(path)


def _json_encoder(rec: dict | tuple) -> bytes:
    """What an older kernel wrote for a record (a decision comes as its tuple)."""
    return encode_json_record(dict(zip(logstore.DECISION_KEYS, rec)) if type(rec) is tuple else rec)


def _old_kernel_log(path: str) -> BudgetAdmission:
    """A log written by a kernel before the binary format: JSON lines with their checksums."""
    log = DecisionLog(path, fsync="never", encoder=_json_encoder)
    adm = BudgetAdmission(decision_log=log)
    adm.decide("open", 0.0, job="old", limits={"flops": 100.0})
    adm.decide("charge", 0.5, job="old", spent={"flops": 40.0})
    log.close()
    return adm


def test_a_json_lines_log_of_an_older_kernel_restores_and_a_new_kernel_appends_binary(tmp_path):
    path = str(tmp_path / "decisions.jsonl")
    old = _old_kernel_log(path)
    text = open(path, "rb").read()
    assert text.startswith(b'{"seq": 0, "op": "session"') and text.count(b"\n") == 3
    assert _restored(path) == _state(old)
    # A new kernel continues it: its records are binary, in the same file.
    report = restore(path)
    log = DecisionLog(path, fsync="never", restored=True)
    adm = BudgetAdmission(decision_log=log, restored=report, restored_at=1.0)
    adm.decide("charge", 1.0, job="old", spent={"flops": 30.0})
    adm.decide("open", 1.0, job="new", limits={"tokens": 5.0})
    log.close()
    data = open(path, "rb").read()
    spans = list(iter_records(data))
    kinds = ["json" if raw[:1] == b"{" else "binary" for _, raw in spans]
    assert kinds == ["json"] * 3 + ["binary"] * 3
    assert _restored(path) == _state(adm)
    assert _norm(restore(path).ledger.jobs["old"].spent) == {"flops": 70.0}
    assert not replay_file(path).divergences and replay_file(path).replayed == 4
    # Damage in the JSON part with binary records after it: refused at the damaged line.
    bad = bytearray(data)
    bad[spans[1][0] + 5] ^= 0x01
    with open(path, "wb") as fh:
        fh.write(bytes(bad))
    with pytest.raises(LogCorrupt) as info:
        restore(path)
    assert info.value.offset == spans[1][0]
    # A torn binary tail after JSON lines is cut back to the last whole record.
    with open(path, "wb") as fh:
        fh.write(data[:-3])
    assert restore(path).recovery.cut is None  # (restore cut it)
    assert os.path.getsize(path) == spans[-1][0]


def test_logcat_prints_both_formats_as_json_lines(tmp_path, capsys):
    from kernel.fsck import logcat_main

    path = str(tmp_path / "decisions.jsonl")
    _old_kernel_log(path)
    log = DecisionLog(path, fsync="never", restored=True)
    log.append("audit", 2.0, {"source": "s", "event": {"b": b"\x01"}}, {"ok": True})
    log.close()
    assert logcat_main([path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["op"] for line in lines] == ["session", "open", "charge", "session", "audit"]
    assert all("crc" not in json.loads(line) for line in lines)
    with open(path, "ab") as fh:
        fh.write(b"\xfe\x01junk")
    assert logcat_main([path, "--offsets"]) == 1
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 5 and "unreadable" in out.err


def test_the_follower_reads_whole_records_as_they_are_appended_and_across_a_rotation(tmp_path):
    path = str(tmp_path / "d.jsonl")
    log = DecisionLog(path, fsync="never", segment_bytes=1)
    follower = logstore.Follower(path)
    assert [r["op"] for r in follower.read()] == []  # the session record is still buffered
    log.flush()
    assert [r["op"] for r in follower.read()] == ["session"]
    # A record written in two pieces is read once it is whole.
    raw = encode_record({"seq": 1, "t": 1.0, "op": "audit", "in": {"i": 1}, "out": {"ok": True}})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, raw[:5])
    assert follower.read() == []
    os.write(fd, raw[5:])
    os.close(fd)
    assert [r["in"] for r in follower.read()] == [{"i": 1}]
    log._seq = 1
    log.state = lambda: {"ledger": {}}
    log.append("audit", 2.0, {"i": 2}, {"ok": True})
    log.flush()  # written to the full segment, then a rotation: a new file beginning with a snapshot
    assert len(logstore.segment_paths(path)) == 1
    assert [r["op"] for r in follower.read()] == ["audit", "snapshot"]
    log.append("audit", 3.0, {"i": 3}, {"ok": True})
    log.flush()
    assert [r["in"] for r in follower.read() if r["op"] == "audit"] == [{"i": 3}]
    log.close()
    follower.close()


def test_an_unencodable_decision_is_recorded_as_such_and_the_seq_goes_on(tmp_path):
    path = str(tmp_path / "d.jsonl")
    log = DecisionLog(path, fsync="never")
    cyclic: list = []
    cyclic.append(cyclic)
    log.append("audit", 1.0, {"event": cyclic}, {"ok": True})
    log.append("audit", 2.0, {"event": "fine"}, {"ok": True})
    log.close()
    recs = read_records(path)
    assert [r["seq"] for r in recs] == [0, 1, 2] and log.counters["unencodable"] == 1
    assert recs[1]["op"] == "audit" and recs[1]["unencodable"].startswith("ValueError")
    assert recs[2]["in"] == {"event": "fine"}
    assert restore(path) is not None
