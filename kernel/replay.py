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

The kernel restores its enforcement state on start with :func:`replay_lines` over the current
segment (:func:`restore`): the same code path as this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from kernel.auth import UnsafeRuntimeDir
from kernel.ledger import OPS, Ledger

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
    inflight_idem: set[str] = field(default_factory=set)
    last_t: float | None = None  # the time of the last decision read
    #: Stored FINALs of finished requests by (principal, idempotency key): ``final`` decisions
    #: and snapshots' ``dedup`` (kernel.dedup restores them).
    finals: dict = field(default_factory=dict)


def _norm(x):
    return json.loads(json.dumps(x, default=str))


def replay_lines(lines, report: ReplayReport | None = None) -> ReplayReport:
    """Replay ``lines`` (continuing ``report``'s state when given: the next segment of a log)."""
    report = report or ReplayReport()
    ledger = report.ledger
    idem = report.inflight_idem
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            report.truncated = True  # only the last line can be torn by a crash
            continue
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
                report.divergences.append({"line": n, "op": op, "recorded": "snapshot state",
                                           "replayed": "a different state"})
            ledger = Ledger.load(state["ledger"])
            idem.clear()
            idem.update(state.get("inflight_idem", ()))
            report.finals = {(r.get("principal"), r.get("idem")): r for r in state.get("dedup", ())
                             if isinstance(r, dict)}
            continue
        if op == "final":
            final = rec.get("in", {})
            if isinstance(final, dict):
                report.finals[(final.get("principal"), final.get("idem"))] = final
        if op == "run":
            idem.add(rec.get("in", {}).get("idem"))
        elif op == "ran":
            idem.discard(rec.get("in", {}).get("idem"))
        if op not in LEDGER_OPS or ledger is None:
            report.observed += 1
            continue
        try:
            got = _norm(getattr(ledger, op)(rec["t"], **rec.get("in", {})))
        except Exception as exc:  # a line this ledger cannot take (another version's): say so
            report.divergences.append({"line": n, "op": op, "recorded": rec.get("out"),
                                       "replayed": f"{type(exc).__name__}: {exc}"})
            continue
        report.replayed += 1
        if got != rec.get("out"):
            report.divergences.append({"line": n, "op": op, "recorded": rec.get("out"), "replayed": got})
    report.ledger = ledger
    return report


def restore(path: str) -> ReplayReport | None:
    """The enforcement state the log at ``path`` holds (its current segment replayed), or None
    when there is no log yet."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeRuntimeDir(f"{path} is a symlink; refusing to read through it") from exc
        raise
    with os.fdopen(fd, encoding="utf-8") as fh:
        report = replay_lines(fh)
    return report if report.ledger is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernel replay", description=__doc__)
    parser.add_argument("log", nargs="+", help="decision log segments, oldest first (JSON lines)")
    args = parser.parse_args(argv)
    report = ReplayReport()
    for path in args.log:
        try:
            with open(path, encoding="utf-8") as fh:
                replay_lines(fh, report)
        except OSError as exc:
            print(f"cannot read {path}: {exc}", file=sys.stderr)
            return 2
    print(f"sessions {report.sessions}  snapshots {report.snapshots}  decisions replayed {report.replayed}  "
          f"other decisions {report.observed}  divergences {len(report.divergences)}"
          + ("  (last line truncated)" if report.truncated else ""))
    for d in report.divergences[:20]:
        print(f"  line {d['line']} {d['op']}: recorded {d['recorded']} replayed {d['replayed']}")
    return 1 if report.divergences else 0


if __name__ == "__main__":
    raise SystemExit(main())
