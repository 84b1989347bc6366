"""An independent invariant checker for a transaction log: ``python -m services.ttc.checker DB``.

It reads only the SQLite file (plain SQL, read-only, none of the manager's code paths) and the OS
process table (psutil), and counts four violations, each of which must be 0 once a live manager
has run ``recover``:

``orphaned_runs``   a live process tagged ``RECA_TTC_RUN=<this log's id>/...`` whose run is not the
                    open, current attempt of a RUNNING call owned by a live manager;
``lost_results``    a DONE/FAILED call without a durable result, an active consumer of a finished
                    call without a delivery record, or a finished worker's result file left for a
                    RUNNING call whose manager is dead (the result exists but was never recorded);
``double_attached`` (call, consumer) pairs attached more than once, or delivered again after they
                    were attached (from the append-only audit log);
``stuck_calls``     PREPARED past its deadline, RUNNING without an open run of a live manager or
                    past its wall deadline, COMMITTED with no live manager to run it.

Exit status: 0 when every count is 0, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import sys
import time

import psutil

ENV_RUN_TAG = "RECA_TTC_RUN"
#: Slack on the wall deadline before a RUNNING call counts as stuck (the manager's expiry cadence).
STUCK_GRACE_S = 5.0


@dataclasses.dataclass(frozen=True)
class Counts:
    orphaned_runs: int
    lost_results: int
    double_attached: int
    stuck_calls: int
    details: tuple[str, ...] = ()

    def total(self) -> int:
        return self.orphaned_runs + self.lost_results + self.double_attached + self.stuck_calls

    def as_dict(self) -> dict:
        return {"orphaned_runs": self.orphaned_runs, "lost_results": self.lost_results,
                "double_attached": self.double_attached, "stuck_calls": self.stuck_calls}


# The checker reads /proc itself, on purpose: it must not share code with the manager it checks
# (services.ttc.runner uses psutil for the same facts).  A run's token is its creation time in
# centiseconds: boot time (/proc/stat ``btime``) + start ticks (field 22 of /proc/<pid>/stat).
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _boot_time() -> int:
    with open("/proc/stat", "rb") as fh:
        for line in fh:
            if line.startswith(b"btime"):
                return int(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _stat(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
        return round((int(fields[19]) / _CLK_TCK + _boot_time()) * 100), fields[0]
    except OSError:
        return None


def _alive(pid: int | None, token: int | None) -> bool:
    st = None if pid is None else _stat(pid)
    # within a centisecond: the two readers round independently
    return st is not None and token is not None and abs(st[0] - token) <= 1 and st[1] not in ("Z", "X")


def _tagged(prefix: str) -> dict[int, str]:
    out = {}
    for proc in psutil.process_iter():
        try:
            tag = proc.environ().get(ENV_RUN_TAG)
            if tag and tag.startswith(prefix) and proc.status() != psutil.STATUS_ZOMBIE:
                out[proc.pid] = tag
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return out


def check(db_path: str, *, now: float | None = None, workdir: str | None = None) -> Counts:
    """Count the four violations for the log at ``db_path`` (workdir defaults to ``<db>.d``)."""
    now = time.time() if now is None else now
    workdir = workdir or db_path + ".d"
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0)
    conn.row_factory = sqlite3.Row
    details: list[str] = []
    try:
        store_id = conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()[0]
        live_managers = {r["manager_id"] for r in conn.execute("SELECT * FROM managers WHERE ended_at IS NULL")
                         if _alive(r["pid"], r["start_token"])}
        calls = {r["call_id"]: r for r in conn.execute("SELECT * FROM calls")}
        open_runs = {r["tag"]: r for r in conn.execute("SELECT * FROM runs WHERE ended_at IS NULL")}

        def legitimate(run) -> bool:
            call = calls.get(run["call_id"])
            return (call is not None and call["state"] == "RUNNING" and call["attempts"] == run["attempt"]
                    and run["manager_id"] in live_managers)

        orphans = 0
        for pid, tag in _tagged(store_id + "/").items():
            run = open_runs.get(tag)
            if run is None or not legitimate(run):
                orphans += 1
                details.append(f"orphan pid {pid} tag {tag}")

        lost = 0
        for r in conn.execute("SELECT c.call_id FROM calls c LEFT JOIN results r ON r.call_id=c.call_id"
                              " WHERE c.state IN ('DONE','FAILED') AND r.call_id IS NULL"):
            lost += 1
            details.append(f"finished call {r[0]} has no result")
        for r in conn.execute("SELECT k.call_id, k.consumer FROM consumers k JOIN calls c ON c.call_id=k.call_id"
                              " LEFT JOIN deliveries d ON d.call_id=k.call_id AND d.consumer=k.consumer"
                              " WHERE c.state IN ('DONE','FAILED') AND k.active=1 AND d.call_id IS NULL"):
            lost += 1
            details.append(f"finished call {r[0]} has no delivery for {r[1]}")
        for tag, run in open_runs.items():
            result_file = os.path.join(workdir, "runs", tag.replace("/", "_") + ".result.json")
            if run["manager_id"] not in live_managers and os.path.exists(result_file):
                lost += 1
                details.append(f"result of {tag} is on disk but not in the log (manager dead)")

        double = 0
        seen: dict[tuple[str, str], int] = {}
        for r in conn.execute("SELECT op, call_id, inputs FROM audit WHERE op IN ('attached','deliver') ORDER BY seq"):
            key = (r["call_id"], json.loads(r["inputs"]).get("consumer"))
            if r["op"] == "attached":
                seen[key] = seen.get(key, 0) + 1
                if seen[key] == 2:
                    double += 1
                    details.append(f"{key} attached twice")
            elif seen.get(key):
                double += 1
                details.append(f"{key} delivered again after it was attached")

        stuck = 0
        run_by_call = {run["call_id"]: run for run in open_runs.values()}
        for call_id, c in calls.items():
            state = c["state"]
            why = None
            # Presumed abort is applied by the service's sweep (every SWEEP_INTERVAL_S = 2 s), so a
            # prepared call is stuck only once it is past its deadline by more than the grace.
            if state == "PREPARED" and c["prepare_deadline"] + STUCK_GRACE_S <= now:
                why = "prepared past its deadline"
            elif state == "RUNNING":
                run = run_by_call.get(call_id)
                if run is None or run["manager_id"] not in live_managers:
                    why = "running without a live manager"
                elif run["wall_deadline"] + STUCK_GRACE_S <= now:
                    why = "running past its wall deadline"
            elif state == "COMMITTED" and not live_managers:
                why = "committed with no live manager"
            if why:
                stuck += 1
                details.append(f"call {call_id} {why}")
    finally:
        conn.close()
    return Counts(orphans, lost, double, stuck, tuple(details))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ttc.checker", description=__doc__.split("\n")[0])
    parser.add_argument("db", help="path of the transaction log (SQLite)")
    parser.add_argument("--workdir", help="the manager's work directory (default DB.d)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    if not os.path.exists(args.db):
        print(f"no such log: {args.db}", file=sys.stderr)
        return 2
    counts = check(args.db, workdir=args.workdir)
    if args.json:
        print(json.dumps(counts.as_dict()))
    else:
        for key, value in counts.as_dict().items():
            print(f"{key:16s} {value}")
        for line in counts.details:
            print("  " + line)
    return 0 if counts.total() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
