"""``python -m kernel replay LOG [LOG...]`` — re-run the ledger on a decision log's recorded inputs.

Every ledger operation is called again with its recorded time and inputs and its outputs
compared with the recorded ones.  A ``session`` line starts a fresh :class:`kernel.ledger.Ledger`
unless it says ``"restored": true`` (that kernel run continued the state before it); a
``snapshot`` line (the head of every segment after the first, kernel.decisions) loads the state it
holds, after checking it against the state replayed so far when there is one.  Pass the closed
segments (``LOG.000001`` ...) before the current one to replay a whole history; one segment alone
replays from its snapshot.  Operations the ledger does not own (preempt, resume, cancel, process
controls, services' ``audit`` records, ``run``/``ran`` marks) are listed, not re-run.  Exit status
0 when every decision reproduces, 1 on any divergence, 2 when the log cannot be read.

Every record's checksum is checked (kernel.logstore; the binary records the kernel writes and
the JSON lines of older logs, in any mix): a JSON line that fails it (or has none) is still
replayed by this command when it parses, and listed as unverified (exit status 1); a binary
record that fails it is unreadable.  ``line N`` in the output is the N-th record of the files.

The kernel restores its enforcement state on start with :func:`restore`: kernel.logstore's
recovery picks the records (from the newest good snapshot on, a torn tail cut, anything worse
refused with the file and offset) and :func:`replay_records` -- the code path of this command --
replays them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

from kernel import logstore
from kernel.ledger import OPS, Ledger

# What services and clients read a decision log with (kernel.replay is public, kernel.logstore is not):
# every readable record of a file, either format; the records appended to a log, across rotations.
from kernel.logstore import Follower, read_records  # noqa: F401  (re-exported)

LEDGER_OPS = frozenset(OPS)


@dataclass
class ReplayReport:
    sessions: int = 0
    replayed: int = 0
    observed: int = 0  # non-ledger decisions, listed only
    snapshots: int = 0
    divergences: list[dict] = field(default_factory=list)
    truncated: bool = False
    #: The state at the end: the ledger, and idempotency keys of requests that were dispatched
    #: and not answered (``run`` without ``ran``).
    ledger: Ledger | None = None
    inflight_idem: set[tuple[str | None, str]] = field(default_factory=set)  # (principal, idem)
    last_t: float | None = None  # the time of the last decision read
    #: Lines whose checksum failed or was missing (replayed anyway when they parse), and lines that
    #: could not be read at all: (line, why).
    unverified: list[int] = field(default_factory=list)
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    #: How :func:`restore` found the records (kernel.logstore.Recovery), when it did.
    recovery: Any = None
    #: Stored FINALs of finished requests by (principal, idempotency key): ``final`` decisions
    #: and snapshots' ``dedup`` (kernel.dedup restores them).
    finals: dict = field(default_factory=dict)


def _norm(x):
    return json.loads(json.dumps(x, default=str))


def replay_lines(lines: Iterable[str | bytes], report: ReplayReport | None = None) -> ReplayReport:
    """Replay records given one by one as their bytes -- binary records and JSON lines, in any mix
    (continuing ``report``'s state when given: the next segment of a log).  A JSON line without a
    good checksum is replayed when it parses and listed in ``unverified``; a record that does not
    read is listed in ``unreadable`` (``truncated`` when it is the last)."""
    report = report or ReplayReport()

    def records():
        last_bad = 0
        n = 0
        for n, line in enumerate(lines, 1):
            raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else bytes(line)
            if raw[:1] != logstore.MAGIC_BYTE:
                raw = raw.strip()
            if not raw:
                continue
            try:
                yield n, logstore.decode_record(raw)
                continue
            except logstore.BadRecord as exc:
                why = exc
            try:
                if raw[:1] == logstore.MAGIC_BYTE:
                    raise why
                rec = logstore.parse_json_record(raw)
            except logstore.BadRecord as exc:
                report.unreadable.append((n, str(exc)))
                last_bad = n
                continue
            report.unverified.append(n)
            yield n, rec
        report.truncated = bool(last_bad) and last_bad == n  # only the last record can be torn by a crash

    return replay_records(records(), report)


def replay_data(data: bytes, report: ReplayReport | None = None) -> ReplayReport:
    """Replay one log file's bytes (either format, kernel.logstore.iter_records splits them)."""
    return replay_lines((raw for _, raw in logstore.iter_records(data)), report)


def replay_file(path: str, report: ReplayReport | None = None) -> ReplayReport:
    """Replay the log file at ``path`` (:func:`replay_data`); OSError when it cannot be read."""
    data = logstore.read_bytes(path)
    if data is None:
        raise FileNotFoundError(path)
    return replay_data(data, report)


def idem_key(entry: Any) -> tuple[str | None, str] | None:
    """The (principal, idempotency key) of a ``run``/``ran`` record's inputs or of a snapshot's
    ``inflight_idem`` entry: ``{"principal", "idem"}`` / ``[principal, idem]``; an older log's
    ``{"idem"}`` / bare string has no principal (None: it stands for the key of any principal)."""
    if isinstance(entry, dict):
        idem, who = entry.get("idem"), entry.get("principal")
    elif isinstance(entry, (list, tuple)) and len(entry) == 2:
        who, idem = entry
    else:
        idem, who = entry, None
    if not isinstance(idem, str) or not idem:
        return None
    return (who if isinstance(who, str) else None, idem)


def replay_records(records: Iterable[tuple[Any, dict]], report: ReplayReport | None = None) -> ReplayReport:
    """Replay decoded records ``(where, record)`` (``where`` names it in a divergence)."""
    report = report or ReplayReport()
    ledger = report.ledger
    idem = report.inflight_idem
    for n, rec in records:
        op = rec.get("op")
        if isinstance(rec.get("t"), (int, float)):
            report.last_t = rec["t"]
        if op == "session":
            report.sessions += 1
            if rec.get("restored") and ledger is not None:
                ledger.session = rec.get("session", "")
            else:
                ledger = Ledger(session=rec.get("session", ""))
                idem.clear()
                report.finals.clear()
            continue
        if op == "snapshot":
            report.snapshots += 1
            state = rec.get("state", {})
            if ledger is not None and _norm(ledger.dump()) != _norm(state.get("ledger")):
                report.divergences.append(
                    {"line": n, "op": op, "recorded": "snapshot state", "replayed": "a different state"}
                )
            ledger = Ledger.load(state["ledger"])
            idem.clear()
            idem.update(k for k in map(idem_key, state.get("inflight_idem", ())) if k is not None)
            report.finals = {
                (r.get("principal"), r.get("idem")): r for r in state.get("dedup", ()) if isinstance(r, dict)
            }
            continue
        if op == "final":
            final = rec.get("in", {})
            if isinstance(final, dict):
                report.finals[(final.get("principal"), final.get("idem"))] = final
        if op == "run":
            key = idem_key(rec.get("in"))
            if key is not None:
                idem.add(key)
        elif op == "ran":
            idem.discard(idem_key(rec.get("in")))
        if op not in LEDGER_OPS or ledger is None:
            report.observed += 1
            continue
        try:
            got = _norm(getattr(ledger, op)(rec["t"], **rec.get("in", {})))
        except Exception as exc:  # a line this ledger cannot take (another version's): say so
            report.divergences.append(
                {"line": n, "op": op, "recorded": rec.get("out"), "replayed": f"{type(exc).__name__}: {exc}"}
            )
            continue
        report.replayed += 1
        if got != rec.get("out") and got != _norm(rec.get("out")):  # (a binary record keeps int keys)
            report.divergences.append({"line": n, "op": op, "recorded": rec.get("out"), "replayed": got})
    report.ledger = ledger
    return report


def restore(path: str, *, repair: bool = True) -> ReplayReport | None:
    """The enforcement state the log at ``path`` holds, or None when there is no log at all.
    Raises :class:`kernel.logstore.LogCorrupt` (naming the file and offset) rather than restore
    less than the log acknowledged; ``repair``: cut a torn tail and finish an interrupted rotation
    on disk first (what a kernel about to append does).  ``report.recovery`` says what was done."""
    found = logstore.recover(path)  # never through a planted symlink
    if found is None:
        return None
    if not found.records:  # nothing to restore (only stale rotation files to remove)
        if repair:
            logstore.apply_repairs(path, found)
        return None
    report = replay_records(((f"{p}@{off}", r) for p, off, r in found.records), ReplayReport())
    if report.ledger is None:  # recover() always starts at a snapshot or a fresh session
        raise logstore.LogCorrupt(path, 0, "the records restore no state")
    if repair:
        logstore.apply_repairs(path, found)
    report.recovery = found
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernel replay", description=__doc__)
    parser.add_argument("log", nargs="+", help="decision log segments, oldest first")
    args = parser.parse_args(argv)
    report = ReplayReport()
    for path in args.log:
        try:
            data = logstore.read_bytes(path)
        except OSError as exc:
            print(f"cannot read {path}: {exc}", file=sys.stderr)
            return 2
        if data is None:
            print(f"cannot read {path}: no such file", file=sys.stderr)
            return 2
        before = len(report.unverified), len(report.unreadable)
        replay_data(data, report)
        if (len(report.unverified), len(report.unreadable)) != before:
            print(
                f"{path}: {len(report.unverified) - before[0]} record(s) without a good checksum, "
                f"{len(report.unreadable) - before[1]} unreadable",
                file=sys.stderr,
            )
    print(
        f"sessions {report.sessions}  snapshots {report.snapshots}  decisions replayed {report.replayed}  "
        f"other decisions {report.observed}  divergences {len(report.divergences)}"
        + ("  (last line truncated)" if report.truncated else "")
    )
    for d in report.divergences[:20]:
        print(f"  line {d['line']} {d['op']}: recorded {d['recorded']} replayed {d['replayed']}")
    for n, why in report.unreadable[:20]:
        print(f"  line {n} unreadable: {why}")
    return 1 if report.divergences or report.unverified or report.unreadable and not report.truncated else 0


if __name__ == "__main__":
    raise SystemExit(main())
