"""Aggregating runs into a ``reca.bench/1`` result file, ``bench all`` and ``bench report``.

``aggregate`` turns the :class:`~bench._common.Result` of K runs of one benchmark into one JSON
document (medians, [min, max] spread, sample counts, targets judged on the median).  ``run_all``
runs every registered benchmark (every module of the ``bench`` package not starting with ``_``)
in its own process and writes ``DIR/NAME.json`` and ``DIR/NAME.log``.  ``write_report`` turns a
directory of result files into ``docs/benchmarks.md`` plus PNG plots drawn with matplotlib.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench._common import SCHEMA, Result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: What cannot change a figure: the documents, the stored results of runs (bench/results/), the
#: duration estimates (bench/durations.json), the tests and CI (nothing under bench/ imports them).
NOT_CODE = (":(exclude)docs", ":(exclude)bench/results", ":(exclude)bench/durations.json", ":(exclude)tests",
            ":(exclude).ci", ":(exclude,glob)**/*.md")


def code_version() -> str:
    """A hash of every tracked file that can change a figure (all but :data:`NOT_CODE`), so that
    one ``bench all`` continued in batches across commits that only add its results or the
    documents reads as one version of the code -- and a batch after any other change does not."""
    listing = _git("ls-files", "--stage", "--", ".", *NOT_CODE)  # the index: HEAD where not dirty
    return hashlib.sha1(listing.encode()).hexdigest()[:12] if listing else "?"


def environment() -> dict[str, Any]:
    """Where and when: commit, the code's version (:func:`code_version`), whether the code was
    changed from the commit (``dirty``; documents do not count), UTC date, CPU, core count, load."""
    return {
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "code": code_version(),
        # Untracked files count: a new bench/NAME.py is run, a new package shadows a module.
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=normal", "--", ".", *NOT_CODE)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _median_rows(tables: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Cell-wise medians when every run produced the same table shape, else the first run's."""
    first = tables[0]
    if len(tables) == 1 or any(len(t) != len(first) or [list(r) for r in t] != [list(r) for r in first]
                               for t in tables):
        return first
    out = []
    for i, row in enumerate(first):
        merged = {}
        for k, v in row.items():
            cells = [t[i][k] for t in tables]
            merged[k] = statistics.median(cells) if all(_number(c) for c in cells) else v
        out.append(merged)
    return out


def aggregate(name: str, quick: bool, results: list[Result], env: dict[str, Any], wall_s: float, *,
              headline: dict[str, str] | None = None, deterministic: bool = False) -> dict[str, Any]:
    """One ``reca.bench/1`` document from the results of ``len(results)`` runs.  ``headline``: the
    module's ``HEADLINE`` (metric -> its strongest peer, in words); ``deterministic``: the
    module's ``DETERMINISTIC`` (its figures do not change between runs, so one run is reported
    as deterministic rather than as a median)."""
    keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    metrics, spread = {}, {}
    for k in keys:
        vals = [r.metrics[k] for r in results if k in r.metrics and r.metrics[k] is not None]
        nums = [float(v) for v in vals if _number(v)]
        if nums:
            metrics[k] = statistics.median(nums)
            if len(results) > 1:
                spread[k] = [min(nums), max(nums)]
        elif vals:
            metrics[k] = float(vals[0]) if isinstance(vals[0], (int, float)) else vals[0]
    targets: dict[str, list] = {}
    for k, (op, _) in results[0].targets.items():
        vals = [float(r.targets[k][1]) for r in results if k in r.targets]
        targets[k] = [op, statistics.median(vals)]
    judged = Result(metrics=metrics, targets={k: (op, v) for k, (op, v) in targets.items()})
    samples: dict[str, int] = {}
    for r in results:
        for k, n in r.samples.items():
            samples[k] = min(samples.get(k, n), int(n))
    notes = list(dict.fromkeys(n for r in results for n in r.notes))
    env = dict(env, load_end=[round(x, 2) for x in os.getloadavg()])
    return {
        "schema": SCHEMA, "bench": name, "quick": quick, "runs": len(results), "wall_s": round(wall_s, 2),
        "env": env, "metrics": metrics, "spread": spread, "samples": samples, "targets": targets,
        "met": judged.met(), "rows": _median_rows([r.table for r in results]), "notes": notes,
        "plots": results[len(results) // 2].plots,
        "headline": {k: v for k, v in (headline or {}).items() if k in metrics},
        "deterministic": bool(deterministic),
    }


# --- bench all ---------------------------------------------------------------------------------

#: Measured wall time of each benchmark (``bench/durations.json``): name -> {"full_s", "quick_s",
#: and for each of those the "commit", "date", "load" (1-minute load average at start and end) and
#: "runs" it was measured with}.  ``bench all`` prints its estimate from this file before each
#: benchmark and records what it measured in ``DIR/durations.json``; ``python -m bench durations
#: DIR`` copies a run's records into this file, so a future quiet full run can be planned.
DURATIONS_FILE = os.path.join(ROOT, "bench", "durations.json")


def load_durations(path: str = DURATIONS_FILE) -> dict[str, dict[str, Any]]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def estimate(name: str, quick: bool, durations: dict[str, dict[str, Any]]) -> float | None:
    """The recorded wall seconds of ``name`` in this mode, or None when never measured."""
    v = durations.get(name, {}).get("quick_s" if quick else "full_s")
    return float(v) if _number(v) else None


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def plan(names: list[str], quick: bool, durations: dict[str, dict[str, Any]]) -> list[str]:
    """Lines of the estimate: each benchmark's recorded duration (with the load it was measured
    at) and the total of those known."""
    mode = "quick" if quick else "full"
    lines = [f"[bench all] plan ({mode} mode), estimates from {os.path.relpath(DURATIONS_FILE, ROOT)}:"]
    known = 0.0
    for name in names:
        est = estimate(name, quick, durations)
        rec = durations.get(name, {}).get(f"{mode}_at", {})
        if est is not None:
            known += est
        at = (f"  (measured {rec.get('date', '?')}, commit {rec.get('commit', '?')}, runs {rec.get('runs') or 'default'}, "
              f"load {rec.get('load', '?')})") if est is not None else "  (never measured)"
        lines.append(f"  {name:12s} {_hms(est):>10s}{at}")
    missing = [n for n in names if estimate(n, quick, durations) is None]
    lines.append(f"  total of the known: {_hms(known)}" + (f"; unknown: {', '.join(missing)}" if missing else ""))
    return lines


def run_all(names: list[str], out_dir: str, quick: bool, runs: int | None,
            extra: dict[str, list[str]] | None = None) -> int:
    """Run each benchmark in its own process; progress on stderr; returns how many failed.

    Before each benchmark its estimated duration is printed; after it, the measured one, and
    ``DIR/durations.json`` is rewritten with every benchmark measured so far (wall seconds, mode,
    runs, commit, date, load at start and end, exit status), so an interrupted run keeps its record.
    ``extra``: additional command-line arguments per benchmark (e.g. the soak's ``--minutes``)."""
    os.makedirs(out_dir, exist_ok=True)
    durations = load_durations()
    for line in plan(names, quick, durations):
        print(line, file=sys.stderr, flush=True)
    rec_path = os.path.join(out_dir, "durations.json")
    record = load_durations(rec_path)  # a run in batches (--only) adds to the same record
    failed = 0
    t_all = time.monotonic()
    env = environment()
    for i, name in enumerate(names, 1):
        est = estimate(name, quick, durations)
        print(f"[bench all] {i}/{len(names)} {name} ... estimated {_hms(est)} (log: {out_dir}/{name}.log)",
              file=sys.stderr, flush=True)
        load0 = round(os.getloadavg()[0], 2)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "bench", name, "--json", os.path.join(out_dir, f"{name}.json")]
        if quick:
            cmd.append("--quick")
        if runs is not None:
            cmd += ["--runs", str(runs)]
        cmd += (extra or {}).get(name, [])
        with open(os.path.join(out_dir, f"{name}.log"), "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        took = time.monotonic() - t0
        if rc != 0:
            failed += 1
            with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
                json.dump({"schema": SCHEMA, "bench": name, "quick": quick, "env": environment(),
                           "error": f"exit status {rc}; see {name}.log", "metrics": {}}, fh, indent=2)
        record[name] = {"wall_s": round(took, 1), "quick": quick, "runs": runs, "rc": rc,
                        "args": (extra or {}).get(name, []), "commit": env["commit"] + ("+" if env["dirty"] else ""),
                        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "load": [load0, round(os.getloadavg()[0], 2)], "estimate_s": est}
        with open(rec_path, "w") as fh:
            json.dump(record, fh, indent=1)
        print(f"[bench all] {i}/{len(names)} {name} {'FAILED' if rc else 'done'} in {_hms(took)} "
              f"(estimated {_hms(est)}; total {_hms(time.monotonic() - t_all)})", file=sys.stderr, flush=True)
    print(f"[bench all] wall time per benchmark (recorded in {rec_path}):", file=sys.stderr)
    for name, r in ((n, record[n]) for n in names if n in record):
        print(f"  {name:12s} {_hms(r['wall_s']):>10s}  estimated {_hms(r['estimate_s']):>10s}  load {r['load']}",
              file=sys.stderr)
    print(f"  total {_hms(time.monotonic() - t_all)}", file=sys.stderr, flush=True)
    return failed


def record_durations(run_dir: str, path: str = DURATIONS_FILE) -> list[str]:
    """Copy the successful measurements of ``run_dir/durations.json`` (from ``bench all``) into
    ``path``, as each benchmark's ``full_s`` or ``quick_s``; returns the names updated."""
    with open(os.path.join(run_dir, "durations.json")) as fh:
        measured = json.load(fh)
    known = load_durations(path)
    done = []
    for name, r in measured.items():
        if r.get("rc") != 0 or not _number(r.get("wall_s")):
            continue
        mode = "quick" if r.get("quick") else "full"
        entry = known.setdefault(name, {})
        entry[f"{mode}_s"] = r["wall_s"]
        entry[f"{mode}_at"] = {k: r.get(k) for k in ("commit", "date", "load", "runs", "args")}
        done.append(name)
    with open(path, "w") as fh:
        json.dump(dict(sorted(known.items())), fh, indent=1)
        fh.write("\n")
    return done


# --- bench report -----------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(c for r in rows for c in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def _draw(plot: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    kind = plot.get("kind", "line")
    for s in plot.get("series", []):
        if kind == "cdf":
            ax.step(s["x"], s["y"], where="post", label=s["label"])
        elif kind == "bar":
            ax.bar([str(x) for x in s["x"]], s["y"], label=s["label"])
        else:
            ax.plot(s["x"], s["y"], "o-" if len(s["x"]) < 40 else "-", label=s["label"], markersize=4)
    if plot.get("logx"):
        ax.set_xscale("log")
    if plot.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(plot.get("xlabel", ""))
    ax.set_ylabel(plot.get("ylabel", ""))
    ax.set_title(plot.get("title", ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if plot.get("series"):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load(in_dir: str) -> list[dict[str, Any]]:
    docs = []
    for fn in sorted(os.listdir(in_dir)):
        if not fn.endswith(".json"):
            continue
        try:
            with open(os.path.join(in_dir, fn)) as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            doc = {"bench": fn[:-5], "error": f"unreadable result file: {exc}", "metrics": {}}
        if isinstance(doc, dict) and "bench" in doc:
            docs.append(doc)
    return docs


def _runs(d: dict[str, Any]) -> str:
    if d.get("deterministic"):
        return "deterministic"
    n = d.get("runs", 1)
    return f"median of {n}" if n > 1 else "1 run"


def _wall_times(docs: list[dict[str, Any]]) -> list[str]:
    """The run time of each benchmark in these results (for planning the next full run), beside
    the full-mode duration recorded in bench/durations.json."""
    known = load_durations()
    rows = []
    for d in docs:
        if "error" in d or not _number(d.get("wall_s")):
            continue
        env = d.get("env", {})
        rows.append({"benchmark": d["bench"], "mode": "quick" if d.get("quick") else "full",
                     "runs": d.get("runs", 1), "wall": _hms(d["wall_s"]),
                     "load (1 min) start -> end": f"{env.get('load_start', ['?'])[0]} -> {env.get('load_end', ['?'])[0]}",
                     "recorded full run": _hms(estimate(d["bench"], False, known))})
    if not rows:
        return []
    total = sum(d["wall_s"] for d in docs if "error" not in d and _number(d.get("wall_s")))
    return (["## Wall time", "",
             f"How long each benchmark took here ({_hms(total)} in all, one after another), and its full run as "
             "recorded in bench/durations.json (`python -m bench all --plan` prints the estimate of a run).", ""]
            + _md_table(rows) + [""])


def _sections(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """A report split at its ``## `` headings: the lines before the first, then (heading, body)."""
    head: list[str] = []
    parts: list[tuple[str, list[str]]] = []
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("## "):
            parts.append((line[3:].strip(), []))
        elif parts:
            parts[-1][1].append(line)
        else:
            head.append(line)
    return head, parts


def _row_bench(row: str) -> str:
    """The benchmark a table row of the report is about (its first cell, links and '(quick)' removed)."""
    cell = row.split("|")[1].strip()
    if cell.startswith("[") and "]" in cell:
        cell = cell[1:cell.index("]")]
    return cell.removesuffix(" (quick)").strip()


def _merge_table(old: list[str], new: list[str], names: set[str]) -> list[str]:
    """``old``'s body with the table rows of the benchmarks in ``names`` replaced by ``new``'s rows
    (in ``new``'s order, where the first such row was, or at the table's end); text from ``new``."""
    new_rows = [r for r in new if r.startswith("| ") and not r.startswith("| benchmark")]
    out: list[str] = []
    placed = False
    for r in old:
        is_row = r.startswith("| ") and not r.startswith("| benchmark")
        if is_row and _row_bench(r) in names:
            if not placed:
                out += new_rows
                placed = True
            continue
        out.append(r)
    if not placed:
        last = max((i for i, r in enumerate(out) if r.startswith("|")), default=len(out) - 1)
        out[last + 1:last + 1] = new_rows
    return out


def merge_reports(old_text: str, new_text: str, names: set[str], note: str) -> str:
    """``old_text`` (a report) with the benchmarks in ``names`` taken from ``new_text``: their
    sections replaced or appended, their rows of the Headlines, Targets and Wall time tables
    replaced, and ``note`` (which results, from where) added to the header."""
    old_head, old_parts = _sections(old_text)
    _, new_parts = _sections(new_text)
    new_by = dict(new_parts)
    tables = ("Headlines", "Targets", "Wall time")
    out_parts: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for title, body in old_parts:
        if title in tables and title in new_by:
            body = _merge_table(body, new_by[title], names)
        elif title in names:
            body = new_by.get(title, body)
        out_parts.append((title, body))
        seen.add(title)
    for title, body in new_parts:  # a table or benchmark the old report did not have
        if title in seen:
            continue
        if title in tables:
            at = next((i for i, (t, _) in enumerate(out_parts) if t not in tables), len(out_parts))
            out_parts.insert(at, (title, body))
        else:
            out_parts.append((title, body))
    head = [h for h in old_head if not (h.startswith("- **updated** ") and any(f"`{n}`" in h for n in names))]
    while head and not head[-1].strip():
        head.pop()
    head += [note, ""]
    lines = head + [line for t, b in out_parts for line in [f"## {t}", *b]]
    return "\n".join(lines).rstrip() + "\n"


def write_report(in_dir: str, out_md: str, command: str = "", expected: list[str] | None = None,
                 update: bool = False, img_dir: str | None = None) -> str:
    """Write the markdown report (and PNGs next to it, in ``<out_md stem>/``); returns its path.

    ``update``: keep the report already at ``out_md`` and replace (or add) only the benchmarks that
    have a result file in ``in_dir`` — for publishing one benchmark's run without a whole ``bench all``;
    the header then names each updated benchmark with its commit, date and load."""
    docs = _load(in_dir)
    if update and os.path.exists(out_md):
        with open(out_md) as fh:
            old_text = fh.read()
        with tempfile.TemporaryDirectory() as tmp:
            fresh = write_report(in_dir, os.path.join(tmp, os.path.basename(out_md)), command,
                                 img_dir=os.path.splitext(out_md)[0])
            with open(fresh) as fh:
                new_text = fh.read()
        names = {d["bench"] for d in docs}
        notes = []
        for d in docs:
            env = d.get("env", {})
            notes.append(f"`{d['bench']}` (commit {env.get('commit', '?')}{' (dirty)' if env.get('dirty') else ''}, "
                         f"{env.get('date', '?')}, load {env.get('load_start', ['?'])[0]} -> "
                         f"{env.get('load_end', ['?'])[0]})")
        note = (f"- **updated** by `python -m bench report {in_dir} --update`"
                f"{' from ' + command if command else ''}: {', '.join(notes)}; every other section is from the run above.")
        with open(out_md, "w") as fh:
            fh.write(merge_reports(old_text, new_text, names, note))
        return out_md
    img_dir = img_dir or os.path.splitext(out_md)[0]
    os.makedirs(img_dir, exist_ok=True)
    rel_img = os.path.basename(img_dir)
    envs = [d["env"] for d in docs if "env" in d]
    lines = ["# Benchmarks", "",
             f"Generated by `python -m bench report {in_dir}` from the result files of "
             f"{command or '`python -m bench all --out ' + in_dir + '`'}. Do not edit by hand.", ""]
    analysis = os.path.join(os.path.dirname(out_md), "benchmarks-analysis.md")
    if os.path.exists(analysis):
        lines += ["How the figures are produced, what each is compared against, and why the missed targets are "
                  "missed: [benchmarks-analysis.md](benchmarks-analysis.md).", ""]
    if envs:
        commits = sorted({e.get("commit", "?") + (" (dirty)" if e.get("dirty") else "") for e in envs})
        # One version of the code: the same code hash (commits that only added results or documents)
        # and nothing changed in the tree; results from before the code hash existed go by commit.
        # Where git could not say (code "?"), or the tree was dirty, each result is its own version;
        # so is a change of Python or machine between batches.
        versions = {(e.get("code") or e.get("commit", "?"), e.get("python"), e.get("machine"))
                    if e.get("code", "") != "?" and not e.get("dirty") else id(e) for e in envs}
        dates = sorted(e.get("date", "?") for e in envs)
        loads = [e[k][0] for e in envs for k in ("load_start", "load_end") if e.get(k)]
        code = sorted({e["code"] for e in envs if e.get("code")})
        lines += [f"- commit: {', '.join(commits)}" + (f"; code version {', '.join(code)} (bench/_report.py "
                                                        "code_version)" if code else ""),
                  f"- dates: {dates[0]} to {dates[-1]}",
                  f"- machine: {envs[0].get('machine', '?')}, Python {envs[0].get('python', '?')}",
                  f"- 1-minute load average during the runs: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} "
                  f"(on {envs[0].get('cpus', '?')} logical CPUs; above the CPU count the figures were "
                  "measured under contention from other work on the machine)", ""]
        if len(versions) > 1:
            lines += [f"**Mixed code**: these results come from {len(versions)} versions of the code (or of Python or "
                      "the machine; a dirty tree or an unknown version counts once per result); a report for "
                      "publication is one `bench all` at one version.", ""]
        elif len(commits) > 1:
            lines += [f"One version of the code across {len(commits)} commits: the later ones only add results "
                      "or documents.", ""]
    missing = sorted(set(expected or []) - {d["bench"] for d in docs})
    if missing:
        lines += [f"**Not in this report** (no result file): {', '.join(missing)}.", ""]
    quick = [d["bench"] for d in docs if d.get("quick")]
    if quick:
        lines += [f"**Quick runs** (`--quick`, smaller workloads): {', '.join(quick)}.", ""]
    heads = [(d, k, peer) for d in docs if "error" not in d for k, peer in d.get("headline", {}).items()]
    if heads:
        lines += ["## Headlines", "",
                  "Each headline figure beside the strongest peer it is measured against (in the same run); "
                  "median [min, max] over the runs, or deterministic.", "",
                  "| benchmark | headline | value | against (strongest peer) | target |", "|---|---|---|---|---|"]
        for d, k, peer in heads:
            sp = d.get("spread", {}).get(k)
            rng = f" [{_fmt(sp[0])}, {_fmt(sp[1])}]" if sp else ""
            t = d.get("targets", {}).get(k)
            tgt = (f"{t[0]} {_fmt(float(t[1]))}: {'met' if d['met'].get(k) else 'NOT met'}") if t else ""
            lines.append(f"| [{d['bench']}](#{d['bench']}) | `{k}` | {_fmt(d['metrics'].get(k, float('nan')))}{rng} "
                         f"({_runs(d)}) | {_fmt(peer)} | {tgt} |")
        lines.append("")
    lines += ["## Targets", "",
              "Every target of every benchmark, judged on the median over the runs; the missed ones are listed "
              "with their median, [min, max] over the runs, and the target.", "",
              "| benchmark | runs | targets met | missed: median [min, max] vs target |", "|---|---|---|---|"]
    for d in docs:
        if "error" in d:
            lines.append(f"| {d['bench']} | - | run failed: {_fmt(d['error'])} | |")
            continue
        missed = []
        for k, (op, val) in d.get("targets", {}).items():
            if d["met"].get(k):
                continue
            sp = d.get("spread", {}).get(k)
            rng = f" [{_fmt(sp[0])}, {_fmt(sp[1])}]" if sp else ""
            missed.append(f"`{k}` {_fmt(d['metrics'].get(k, float('nan')))}{rng} vs {op} {_fmt(float(val))}")
        n_t = len(d.get("targets", {}))
        lines.append(f"| {d['bench']}{' (quick)' if d.get('quick') else ''} | {_runs(d)} | "
                     f"{n_t - len(missed)}/{n_t} | {'<br>'.join(missed)} |")
    lines.append("")
    lines += _wall_times(docs)
    for d in docs:
        lines += [f"## {d['bench']}", ""]
        if "error" in d:
            lines += [f"Run failed: {_fmt(d['error'])}", ""]
            continue
        env = d.get("env", {})
        lines += [f"{_runs(d)}{' (quick)' if d.get('quick') else ''}, "
                  f"{_fmt(d.get('wall_s', float('nan')))} s in all; commit {env.get('commit', '?')}, "
                  f"{env.get('date', '?')}, load {env.get('load_start', ['?'])[0]} -> "
                  f"{env.get('load_end', ['?'])[0]}", ""]
        if d.get("rows"):
            lines += _md_table(d["rows"])
            if d.get("runs", 1) > 1 and not d.get("deterministic"):
                lines += ["", f"(numeric cells: medians over {d['runs']} runs)"]
            lines.append("")
        mrows = []
        for k, v in d["metrics"].items():
            row = {"metric": k, "median": v}
            sp = d.get("spread", {}).get(k)
            row["min"], row["max"] = (sp[0], sp[1]) if sp else ("", "")
            row["samples/run"] = d.get("samples", {}).get(k, "")
            t = d.get("targets", {}).get(k)
            row["target"] = f"{t[0]} {_fmt(float(t[1]))}" if t else ""
            row["met"] = ("**met**" if d["met"].get(k) else "NOT met") if t else ""
            mrows.append(row)
        lines += _md_table(mrows) + [""]
        for n in d.get("notes", []):
            lines.append(f"- {n}")
        if d.get("notes"):
            lines.append("")
        for p in d.get("plots", []):
            fn = f"{d['bench']}_{p.get('name', 'plot')}.png"
            try:
                _draw(p, os.path.join(img_dir, fn))
            except Exception as exc:  # noqa: BLE001 - a bad plot record must not lose the report
                lines += [f"(plot {p.get('name')} could not be drawn: {exc})", ""]
                continue
            lines += [f"![{p.get('title', fn)}]({rel_img}/{fn})", ""]
    with open(out_md, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")
    return out_md
