"""Gantt charts of a CPCS run, drawn from its decision events alone (the FINAL's ``events`` or
the ``audit`` lines of source ``cpcs`` in the kernel's decision log), with matplotlib."""

from __future__ import annotations

from typing import Any, Iterable


def segments(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bars ``{task, worker, start, end, kind}`` with kind ``run``, ``paused``, ``failed`` (a
    failed attempt's run) or ``lost`` (its worker died), replayed from the events."""
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
        elif ev in ("start", "resumed"):
            close(task, t)
            open_[task] = {"task": task, "worker": e.get("worker", ""), "start": t, "kind": "run",
                           "critical": critical.get(task, False)}
        elif ev == "paused":
            close(task, t)
            open_[task] = {"task": task, "worker": e.get("worker", ""), "start": t, "kind": "paused",
                           "critical": critical.get(task, False)}
        elif ev == "done":
            close(task, t)
        elif ev == "failed":
            close(task, t, "failed")
        elif ev == "lost":
            close(task, t, "lost")
    for task in list(open_):
        close(task, last)
    return out


def events_from_log(path: str) -> list[dict[str, Any]]:
    """The cpcs events of the last run recorded in a kernel decision log (either record format)."""
    from kernel.replay import read_records

    runs: list[list[dict[str, Any]]] = []
    for rec in read_records(path):
        inp = rec.get("input") or rec.get("in") or {}
        if rec.get("op") != "audit" or not isinstance(inp, dict) or inp.get("source") != "cpcs":
            continue
        ev = inp.get("event") or {}
        if ev.get("ev") == "submit":
            runs.append([])
        if runs:
            runs[-1].append(ev)
    return runs[-1] if runs else []


def draw(events: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Write the chart of ``events`` to ``path`` (PNG); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs = segments(events)
    rows = sorted({s["worker"] for s in segs})
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * max(1, len(rows))))
    colour = {"run": "#4c72b0", "paused": "#999999", "failed": "#c44e52", "lost": "#8c8c8c"}
    for s in segs:  # paused tasks are thin bars under the row, so the task running over them shows
        y = rows.index(s["worker"])
        c = "#dd8452" if s["kind"] == "run" and s["critical"] else colour[s["kind"]]
        y, h = (y - 0.3, 0.15) if s["kind"] == "paused" else (y + 0.05, 0.55)
        ax.barh(y, s["end"] - s["start"], left=s["start"], height=h, color=c, edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("seconds since submit")
    ax.set_title(title or "CPCS run")
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="#dd8452", label="critical when dispatched"), Patch(color=colour["run"], label="run"),
                       Patch(color=colour["paused"], label="paused (preempted)"),
                       Patch(color=colour["failed"], label="failed attempt"), Patch(color=colour["lost"], label="worker lost")],
              loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m services.cpcs.gantt DECISIONS.jsonl OUT.png``: chart the last cpcs run of a
    kernel decision log."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m services.cpcs.gantt", description=main.__doc__)
    parser.add_argument("log")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    events = events_from_log(args.log)
    if not events:
        print(f"no cpcs run in {args.log}")
        return 1
    print(draw(events, args.out, f"cpcs run from {args.log}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
