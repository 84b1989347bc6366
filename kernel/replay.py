"""``python -m kernel replay LOG`` — re-run the ledger on a decision log's recorded inputs.

Each session in the log (a ``session`` line starts one: the kernel restarted) is replayed on a
fresh :class:`kernel.ledger.Ledger`.  Every ledger operation is called again with its recorded
time and inputs and its outputs compared with the recorded ones.  Operations the ledger does not
own (preempt, resume, cancel, process controls, services' ``audit`` records) are listed, not re-run.  Exit status 0 when every
decision reproduces, 1 on any divergence, 2 when the log cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from kernel.ledger import OPS, Ledger

LEDGER_OPS = frozenset(OPS)


@dataclass
class ReplayReport:
    sessions: int = 0
    replayed: int = 0
    observed: int = 0  # non-ledger decisions, listed only
    divergences: list[dict] = field(default_factory=list)
    truncated: bool = False


def _norm(x):
    return json.loads(json.dumps(x, default=str))


def replay_lines(lines) -> ReplayReport:
    report = ReplayReport()
    ledger = Ledger()
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
        if op == "session":
            report.sessions += 1
            ledger = Ledger(session=rec.get("session", ""))
            continue
        if op not in LEDGER_OPS:
            report.observed += 1
            continue
        got = _norm(getattr(ledger, op)(rec["t"], **rec.get("in", {})))
        report.replayed += 1
        if got != rec.get("out"):
            report.divergences.append({"line": n, "op": op, "recorded": rec.get("out"), "replayed": got})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernel replay", description=__doc__)
    parser.add_argument("log", help="decision log (JSON lines)")
    args = parser.parse_args(argv)
    try:
        with open(args.log, encoding="utf-8") as fh:
            report = replay_lines(fh)
    except OSError as exc:
        print(f"cannot read {args.log}: {exc}", file=sys.stderr)
        return 2
    print(f"sessions {report.sessions}  decisions replayed {report.replayed}  "
          f"other decisions {report.observed}  divergences {len(report.divergences)}"
          + ("  (last line truncated)" if report.truncated else ""))
    for d in report.divergences[:20]:
        print(f"  line {d['line']} {d['op']}: recorded {d['recorded']} replayed {d['replayed']}")
    return 1 if report.divergences else 0


if __name__ == "__main__":
    raise SystemExit(main())
