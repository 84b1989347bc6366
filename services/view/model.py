"""The live view's state, with no I/O: snapshots of ``mmi.stats`` and control-bus messages in,
the page's state out (time passed in).

Invariants: ``events`` holds at most ``max_events`` entries, newest last, each ``{t, kind, text}``;
an event is derived from a *change* between two snapshots (a restart count that grew, a state that
became ``given_up``, a counter of refusals that grew, a job that became exhausted) or from one
control message, so a snapshot repeated is no event.
"""

from __future__ import annotations

import collections
import json
from typing import Any


def segments(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bars ``{task, worker, start, end, kind, critical}`` of a cpcs run replayed from its events
    (``kind``: run, paused, failed, lost).  The same reading as ``services.cpcs.gantt.segments``
    (a service does not import another service; tests/test_view.py checks the two agree)."""
    open_: dict[str, dict[str, Any]] = {}
    critical: dict[str, bool] = {}
    out: list[dict[str, Any]] = []

    def close(task: str, t: float, kind: str | None = None) -> None:
        seg = open_.pop(task, None)
        if seg is not None:
            if kind is not None and seg["kind"] == "run":
                seg["kind"] = kind
            seg["end"] = t
            out.append(seg)

    last = 0.0
    for e in events:
        t, ev, task = float(e.get("t", 0.0)), e.get("ev"), e.get("task", "")
        last = max(last, t)
        if ev == "dispatch":
            critical[task] = bool(e.get("critical"))
        elif ev in ("start", "resumed", "paused"):
            close(task, t)
            open_[task] = {
                "task": task,
                "worker": e.get("worker", ""),
                "start": t,
                "kind": "paused" if ev == "paused" else "run",
                "critical": critical.get(task, False),
            }
        elif ev == "done":
            close(task, t)
        elif ev in ("failed", "lost"):
            close(task, t, ev)
    for task in list(open_):
        close(task, last)
    return out


#: Events kept for the page.
MAX_EVENTS = 200
#: Counters of mmi.stats whose growth is an event of this kind.
COUNTER_EVENTS = {"refused": "refusal", "exhausted": "refusal", "preempts": "preempt", "forbidden_ready": "refusal"}


def _burn(job: dict) -> tuple[str | None, float]:
    """The most-spent limited kind of a job and the fraction spent (0 for an unlimited job)."""
    best: tuple[str | None, float] = (None, 0.0)
    for kind, limit in (job.get("limits") or {}).items():
        if isinstance(limit, (int, float)) and limit > 0:
            frac = float((job.get("spent") or {}).get(kind, 0) or 0) / float(limit)
            if best[0] is None or frac > best[1]:
                best = (kind, min(1.0, frac))
    return best


class ViewModel:
    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self.events: collections.deque[dict] = collections.deque(maxlen=max_events)
        self.snapshot: dict[str, Any] = {}
        self.version = 0
        self._children: dict[str, dict] = {}
        self._counters: dict[str, float] = {}
        self._exhausted: set[str] = set()
        #: The events of the latest cpcs run seen in the decision log (its Gantt chart).
        self.cpcs_events: list[dict] = []

    def _event(self, now: float, kind: str, text: str) -> None:
        self.events.append({"t": now, "kind": kind, "text": text})

    def on_stats(self, stats: dict, now: float) -> None:
        """A new ``mmi.stats`` answer."""
        children = {c["name"]: c for c in stats.get("children", []) if isinstance(c, dict) and "name" in c}
        for name, child in children.items():
            before = self._children.get(name)
            if before is None:
                continue
            if (child.get("restarts") or 0) > (before.get("restarts") or 0):
                self._event(
                    now,
                    "restart",
                    f"{name} restarted (pid {child.get('pid')}); last exit: "
                    f"{child.get('reason') or child.get('last_exit')}",
                )
            if child.get("state") == "given_up" and before.get("state") != "given_up":
                self._event(now, "given_up", f"gave up on {name}: {child.get('reason')}")
        counters = {**stats.get("counters", {}), **stats.get("ledger", {})}
        for key, kind in COUNTER_EVENTS.items():
            grew = (counters.get(key) or 0) - (self._counters.get(key) or 0)
            if self._counters and grew > 0:
                self._event(now, kind, f"{key} +{grew:g}")
        jobs = stats.get("jobs") or {}
        exhausted = {name for name, j in jobs.items() if j.get("exhausted")}
        for name in sorted(exhausted - self._exhausted):
            self._event(now, "refusal", f"job {name!r} ran out of {jobs[name]['exhausted']}")
        self._children, self._counters, self._exhausted = children, counters, exhausted
        rows = []
        for name, j in sorted(jobs.items()):
            kind, frac = _burn(j)
            rows.append(
                {
                    "name": name,
                    "owner": j.get("owner"),
                    "parent": j.get("parent"),
                    "kind": kind,
                    "burn": frac,
                    "spent": j.get("spent"),
                    "limits": j.get("limits"),
                    "running": j.get("running"),
                    "exhausted": j.get("exhausted"),
                }
            )
        services = [
            {
                "name": name,
                **{
                    k: s.get(k)
                    for k in ("workers", "free_slots", "queued", "inflight", "requests", "errors", "p50_ms", "p99_ms")
                },
            }
            for name, s in sorted((stats.get("services") or {}).items())
        ]
        pids = {w.get("pid") for w in stats.get("workers", []) if isinstance(w, dict)}
        procs = [
            dict(c, worker="-" if c.get("state") != "running" else "yes" if c.get("pid") in pids else "NO")
            for c in children.values()
        ]
        self.snapshot = {
            "t": now,
            "health": stats.get("health", "ready"),
            "summary": stats.get("summary", {}),
            "services": services,
            "children": procs,
            "jobs": rows,
        }
        self.version += 1

    def on_control(self, topic: str, message: Any, now: float) -> None:
        """One message published on the control bus (``ctl/<service>/<op>``)."""
        parts = topic.split("/")
        if len(parts) != 3 or not isinstance(message, dict):
            return
        _, service, op = parts
        if op not in ("preempt", "resume", "cancel"):
            return
        if "job" in message:
            target = f"job {message['job']!r}"
        else:
            token = message.get("token")
            target = f"request {token.hex()[:12] if isinstance(token, bytes) else token}"
        self._event(
            now, op, f"{op} {target} on {service}" + (f" ({message['reason']})" if message.get("reason") else "")
        )
        self.version += 1

    def on_log_line(self, line: str, now: float) -> bool:
        """One JSON line of a decision log (an older kernel's format): :meth:`on_log_record`."""
        if '"cpcs"' not in line:  # cheap filter: most records are the ledger's
            return False
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        return self.on_log_record(rec, now) if isinstance(rec, dict) else False

    def on_log_record(self, rec: dict, now: float) -> bool:
        """One record of the kernel's decision log: a ``cpcs`` audit record extends the current run's
        events (a ``submit`` starts a new run).  True when the Gantt chart changed."""
        inp = rec.get("input") or rec.get("in") or {}
        if rec.get("op") != "audit" or not isinstance(inp, dict) or inp.get("source") != "cpcs":
            return False
        event = inp.get("event")
        if not isinstance(event, dict):
            return False
        if event.get("ev") == "submit":
            self.cpcs_events = []
        self.cpcs_events.append(event)
        self.version += 1
        return True

    def gantt(self) -> dict | None:
        """The current cpcs run as bars ``{task, worker, start, end, kind, critical}`` and its rows."""
        if not self.cpcs_events:
            return None
        segs = segments(self.cpcs_events)
        t_end = max([s["end"] for s in segs] + [float(e.get("t", 0.0)) for e in self.cpcs_events] + [1e-9])
        started = {e.get("task") for e in self.cpcs_events if e.get("ev") == "start"}
        ended = {e.get("task") for e in self.cpcs_events if e.get("ev") in ("done", "cancelled", "gave_up")}
        done = bool(started) and started <= ended
        return {
            "rows": sorted({s["worker"] for s in segs}),
            "segments": segs,
            "t_end": t_end,
            "done": done,
            "tasks": len({s["task"] for s in segs}),
        }

    def state(self) -> dict:
        """What the page is sent."""
        return {**self.snapshot, "events": list(self.events), "gantt": self.gantt(), "version": self.version}
