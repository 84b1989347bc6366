"""``python -m bench agent``: the whole, measured — a planner that only suggests, reca deciding,
against the same planner in control, on held-out tasks of three families (docs/agent.md).

Per run: the three families are generated from one seed and split by group into training and
held-out tasks; the physics tolerance and cswif's gate threshold are chosen on the training tasks
(:mod:`planner.calibrate`); then every mode runs the held-out tasks on a fresh ``python -m kernel``
(fresh caches and stores: no mode inherits another's work):

* ``pic`` (planner in control), ``strong`` (+ cancel on plan change, exact-string cache, HEFT
  order), ``llmseq`` (the language model's own order of steps), ``reca``;
* the ablation: ``reca-no-<primitive>`` for each of cpcs, ttc, scch, roi, ids, cswif, budgets.

Compute is the OS's CPU seconds of the kernel's whole process tree plus the client
(:mod:`planner.run`); tokens and FLOPs are the kernel ledger's; answers are checked by
:mod:`planner.verify` (independent of the services).  ``--quick``: small groups, one kernel for
all modes with reca first (it is served nothing another mode computed), no llmseq, no ablation.
"""

from __future__ import annotations

import os
import random
from typing import Any

from bench._common import Result, line_plot, progress
from planner import calibrate, kernel, tasks
from planner.execute import PRIMITIVES
from planner.run import Batch, run_batch

RUNS = 3
#: Runs of this process so far (each run shuffles the order of the modes with its own seed).
_RUN = 0
HEADLINE = {
    "reca_vs_pic.cpu_saving": "the same planner in control (eager concurrent tool calls, regenerate on a failed check)",
    "reca_vs_pic.wall_ratio": "the same planner in control",
    "reca_vs_strong.cpu_saving": "the strong planner in control (cancel on plan change, exact-string cache, HEFT order)",
    "reca_vs_pic.accuracy_delta": "the same planner in control",
    "reca_vs_strong.accuracy_delta": "the strong planner in control",
}
PEERS = ("pic", "strong", "llmseq")
#: Where a full run draws its PNGs (the report's own plots come from the records).
FIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "agent")


def _workload(quick: bool, seed: int) -> tuple[list[tasks.Task], list[tasks.Task]]:
    # physics needs every case in training and held-out groups (the case cycles with the group)
    train: list[tasks.Task] = []
    held: list[tasks.Task] = []
    for fam in tasks.FAMILIES:
        groups, size = ((6, 1) if fam == "physics" else (2, 1)) if quick else (6, 2)
        tr, ho = tasks.split(tasks.generate(fam, seed, groups, size))
        if quick and fam == "physics":  # quick: the diffusion case only (its level-3 reference is
            # ~0.06 CPU s; the shallow-water cases' are ~1 s each)
            tr, ho = ([t for t in x if t.spec["case"] == "gaussian_diffusion"] for x in (tr, ho))
        train += tr
        held += ho[:1] if quick else ho  # quick: one held-out task per family
    return train, held


def _discard(k: Any) -> None:
    """Stop a kernel whose state is thrown away: SIGKILL to the kernel, then to every process of its
    tree (all started by this benchmark), then the launcher's bounded reaping.  A graceful drain took ~7 s (scch's
    solver pool alone ~5 s) and killing the kernel alone ~2.3 s (helpers outliving it)."""
    import psutil

    kids = k.descendants()
    k.proc.kill()  # first, so its supervisor restarts nothing
    for p in kids:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    k.kill()


def _run_modes(
    modes: list[str], held: list[tasks.Task], tol: float, threshold: float, quick: bool
) -> dict[str, dict[str, Batch]]:
    out: dict[str, dict[str, Batch]] = {}
    shared = kernel.warm(kernel.start(threshold)) if quick else None
    try:
        for m in modes:
            k = shared or kernel.warm(kernel.start(threshold))
            try:
                out[m] = {}
                for fam in tasks.FAMILIES:
                    fam_tasks = [t for t in held if t.family == fam]
                    progress("agent", f"{m}: {fam} ({len(fam_tasks)} tasks)")
                    out[m][fam] = run_batch(k.endpoint, k.pid, m, fam_tasks, tol=tol)
            finally:
                if shared is None:
                    _discard(k)
    finally:
        if shared is not None:
            _discard(shared)
    return out


def _sum(batches: dict[str, Batch]) -> dict[str, float]:
    tot: dict[str, float] = {"cpu_s": 0.0, "wall_s": 0.0}
    for b in batches.values():
        tot["cpu_s"] += b.cpu_s
        tot["wall_s"] += b.wall_s
        for k, v in b.figures().items():
            if k in ("accuracy", "overshoot"):
                continue
            tot[k] = tot.get(k, 0.0) + v
    tot["accuracy"] = tot["correct"] / tot["tasks"] if tot.get("tasks") else float("nan")
    tot["overshoot"] = max(b.figures()["overshoot"] for b in batches.values())
    return tot


def _cpu_by(batches: dict[str, Batch]) -> dict[str, float]:
    """CPU s per part of the kernel's tree (kernel, each service, the client), over the families."""
    out: dict[str, float] = {}
    for b in batches.values():
        for part, v in b.cpu_by.items():
            out[part] = out.get(part, 0.0) + v
    return {k: round(v, 4) for k, v in sorted(out.items())}


def gantt_records(results: dict[str, dict[str, Batch]], family: str = "algo") -> dict[str, list[dict]]:
    """The events of the first task of ``family`` in each mode (for a Gantt chart)."""
    return {m: results[m][family].runs[0].events for m in results if results[m][family].runs}


def draw(results: dict[str, dict[str, Batch]], out_dir: str) -> list[str]:
    """PNGs: compute vs accuracy per family and mode; a Gantt of one task per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, len(tasks.FAMILIES), figsize=(4.2 * len(tasks.FAMILIES), 3.6))
    for ax, fam in zip(axes, tasks.FAMILIES):
        for m, per in results.items():
            f = per[fam].figures()
            ax.scatter(
                [per[fam].cpu_s],
                [f["accuracy"]],
                s=50 if m in ("reca", *PEERS) else 18,
                marker="o" if m in ("reca", *PEERS) else "x",
            )
            ax.annotate(m, (per[fam].cpu_s, f["accuracy"]), fontsize=7)
        ax.set_title(fam)
        ax.set_xlabel("CPU s (OS, kernel tree + client)")
        ax.set_ylabel("answers correct")
        ax.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "compute_accuracy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for fam in tasks.FAMILIES:
        events = gantt_records(results, fam)
        modes = [m for m in ("pic", "strong", "llmseq", "reca") if m in events]
        fig, axes = plt.subplots(len(modes), 1, figsize=(8, 1.2 + 1.1 * len(modes)), sharex=True)
        for ax, m in zip(axes, modes):
            evs = [e for e in events[m] if e["kind"] != "revise"]
            dropped = {e["step"] for e in events[m] if e["kind"] == "revise" and e.get("action") in ("drop", "replace")}
            steps = list(dict.fromkeys(e["step"] for e in evs))
            for e in evs:
                y = steps.index(e["step"])
                color = (
                    "tab:red"
                    if e.get("refused")
                    else "tab:gray"
                    if e.get("hit")
                    else "tab:orange"
                    if e["step"] in dropped
                    else "tab:blue"
                )
                ax.barh(y, max(0.005, e["t1"] - e["t0"]), left=e["t0"], color=color, height=0.6)
            for e in events[m]:
                if e["kind"] == "revise":
                    ax.axvline(e["t0"], color="tab:orange", lw=0.8)
            ax.set_yticks(range(len(steps)), steps, fontsize=7)
            ax.set_ylabel(m, fontsize=8)
        axes[-1].set_xlabel(
            "seconds since the task started (line: plan revised; orange bar: a run of a step the plan "
            "dropped; red: refused; grey: a cache hit)"
        )
        fig.suptitle(f"one {fam} task per mode", fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"gantt_{fam}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def run(quick: bool = False, seed: int | None = None) -> Result:
    # the same tasks in every run (the runs measure noise); --seed draws another workload
    train, held = _workload(quick, (4242 if quick else 9000) if seed is None else seed)
    cal = calibrate.calibrate(train)
    progress(
        "agent",
        f"calibrated on {cal.train_tasks} training physics tasks: tol {cal.tol:.4g}, "
        f"cswif threshold {cal.threshold:.4g}/M ({cal.train_escalations} escalations, "
        f"train accuracy {cal.train_accuracy:.2f})",
    )
    peers = [p for p in PEERS if not (quick and p == "llmseq")]  # quick: the two planners in control
    # quick shares one kernel: reca first, so it is served nothing another mode computed (strong may
    # be served reca's simulation results from sim's cache: that favours the peer)
    modes = (["reca"] + peers) if quick else (peers + ["reca"] + [f"reca-no-{p}" for p in PRIMITIVES])
    global _RUN
    _RUN += 1
    if not quick:  # a different order in every run: drift of the shared machine's load is not one mode's
        random.Random(_RUN).shuffle(modes)
    progress("agent", f"order of modes: {' '.join(modes)}")
    results = _run_modes(modes, held, cal.tol, cal.threshold, quick)
    # a fixed order (the report's table is a cell-wise median of the runs' tables: rows must align)
    results = {m: results[m] for m in peers + ["reca"] + [f"reca-no-{p}" for p in PRIMITIVES] if m in results}

    metrics: dict[str, float] = {
        "train.tol": cal.tol,
        "train.cswif_threshold": cal.threshold,
        "held_out_tasks": float(len(held)),
    }
    rows: list[dict[str, Any]] = []
    totals = {m: _sum(per) for m, per in results.items()}
    for m, per in results.items():
        for fam, b in per.items():
            f = b.figures()
            rows.append(
                {
                    "mode": m,
                    "family": fam,
                    "cpu_s": round(b.cpu_s, 3),
                    "wall_s": round(b.wall_s, 2),
                    "tokens": f["tokens"],
                    "flops": f["flops"],
                    "correct": f"{f['correct']}/{f['tasks']}",
                    "heavy": f["heavy_runs"],
                    "dup": f["duplicated"],
                    "orphan": f["orphaned"],
                    "cancel": f["cancelled"],
                    "refused": f["refused"],
                    "overshoot": round(f["overshoot"], 3),
                }
            )
            metrics[f"{m}.{fam}.cpu_s"] = b.cpu_s
            metrics[f"{m}.{fam}.accuracy"] = f["accuracy"]
            metrics[f"{m}.{fam}.wall_s"] = b.wall_s
        t = totals[m]
        for k in ("cpu_s", "wall_s", "accuracy", "tokens", "flops", "duplicated", "orphaned", "overshoot"):
            metrics[f"{m}.all.{k}"] = t[k]
    by_part = {m: _cpu_by(per) for m, per in results.items()}
    for m, by in by_part.items():
        for part, v in by.items():
            metrics[f"{m}.cpu_by.{part}"] = v
    r, pic, strong = totals["reca"], totals["pic"], totals["strong"]
    metrics["reca_vs_pic.cpu_saving"] = 1.0 - r["cpu_s"] / pic["cpu_s"]
    metrics["reca_vs_pic.wall_ratio"] = r["wall_s"] / pic["wall_s"]
    metrics["reca_vs_strong.cpu_saving"] = 1.0 - r["cpu_s"] / strong["cpu_s"]
    if "llmseq" in totals:
        metrics["reca_vs_llmseq.cpu_saving"] = 1.0 - r["cpu_s"] / totals["llmseq"]["cpu_s"]
    metrics["reca_vs_pic.accuracy_delta"] = r["accuracy"] - pic["accuracy"]
    metrics["reca_vs_strong.accuracy_delta"] = r["accuracy"] - strong["accuracy"]
    for fam in tasks.FAMILIES:
        metrics[f"reca_vs_pic.{fam}.cpu_saving"] = 1.0 - results["reca"][fam].cpu_s / results["pic"][fam].cpu_s
    for p in PRIMITIVES:
        m = f"reca-no-{p}"
        if m in totals:
            # the share of pic's compute this primitive saves (negative: reca is cheaper without it)
            metrics[f"ablation.{p}.cpu_s"] = totals[m]["cpu_s"] - r["cpu_s"]  # paired: the same run's reca
            metrics[f"ablation.{p}.share_of_pic_cpu"] = (totals[m]["cpu_s"] - r["cpu_s"]) / pic["cpu_s"]
            metrics[f"ablation.{p}.accuracy_delta"] = r["accuracy"] - totals[m]["accuracy"]
            # where the difference is: CPU s per part of the kernel's tree (without it minus with it)
            for part in sorted(set(by_part[m]) | set(by_part["reca"])):
                d = by_part[m].get(part, 0.0) - by_part["reca"].get(part, 0.0)
                if abs(d) >= 0.005:
                    metrics[f"ablation.{p}.cpu_by.{part}"] = d
    targets = {
        "reca_vs_pic.cpu_saving": (">=", 0.30),
        "reca_vs_pic.wall_ratio": ("<=", 1.1),
        "reca_vs_strong.cpu_saving": (">=", 0.10),
        "reca_vs_pic.accuracy_delta": (">=", 0.0),
        "reca_vs_strong.accuracy_delta": (">=", 0.0),
        "reca.all.duplicated": ("<=", 0),
        "reca.all.orphaned": ("<=", 0),
        "reca.all.overshoot": ("<=", 0),
    }
    plots = [
        line_plot(
            f"agent_{fam}",
            f"compute vs answers correct: {fam}",
            "CPU s",
            "accuracy",
            {m: ([per[fam].cpu_s], [per[fam].figures()["accuracy"]]) for m, per in results.items()},
            style="line",
        )
        for fam in tasks.FAMILIES
    ]
    notes = [
        f"held-out tasks: {len(held)} ({', '.join(f'{sum(1 for t in held if t.family == f)} {f}' for f in tasks.FAMILIES)}); "
        f"training tasks used only for the physics tolerance ({cal.tol:.4g}) and cswif's threshold ({cal.threshold:.4g}/M)",
        "cpu_s: user+system seconds of the kernel's process tree (services, tool workers, solver children, reaped "
        "ones included) plus the client, from psutil; includes the services' idle heartbeats over the batch's wall time",
    ]
    if quick:
        notes.append(
            "quick: one held-out task per family (physics: the diffusion case, trained on its own); reca, pic, "
            "strong on one kernel in that order (reca is served "
            "nothing another mode computed; strong may be served reca's sim results); no llmseq, no ablation"
        )
    else:
        notes.append("each mode on a fresh kernel; PNGs in docs/agent/")
        try:
            draw(results, FIG_DIR)
        except Exception as exc:  # a plot is not a figure: report it and go on
            notes.append(f"plots not drawn: {exc!r}")
    return Result(metrics=metrics, targets=targets, table=rows, notes=notes, plots=plots)


def markdown(doc: dict[str, Any], ablation_rows_unaligned: bool = False) -> str:
    """The tables of docs/agent.md from a ``--json`` document of this benchmark
    (``python -m bench.agent RESULT.json``): medians [min, max] over the runs.
    ``ablation_rows_unaligned``: leave the ablation modes out of the counts table (documents of
    benchmark runs before this fix listed them in each run's shuffled order, so their cell-wise
    medians mixed modes; every other figure is per metric and unaffected)."""
    m, sp = doc["metrics"], doc["spread"]

    def f(key: str, digits: int = 3) -> str:
        if key not in m:
            return ""
        lo, hi = sp.get(key, (None, None))
        v = f"{m[key]:.{digits}g}"
        return v if lo is None else f"{v} [{lo:.{digits}g}, {hi:.{digits}g}]"

    env = doc["env"]
    out = [
        f"Command: `python -m bench agent --json ...` ({doc['runs']} runs, median [min, max]); commit "
        f"`{env['commit']}`{' (dirty)' if env.get('dirty') else ''}, {env['date']}, load average at start "
        f"{env['load_start']} and end {env.get('load_end')} on {env['cpus']} CPUs shared with other sessions; "
        f"{doc['wall_s']:.0f} s in all.",
        "",
        "| target | value | target | met |",
        "|---|---|---|---|",
    ]
    for k, (op, t) in doc["targets"].items():
        out.append(f"| `{k}` | {f(k)} | {op} {t:g} | {'yes' if doc['met'][k] else '**no**'} |")
    modes = list(dict.fromkeys(r["mode"] for r in doc["rows"]))
    out += [
        "",
        "**Totals over the three families:**",
        "",
        "| mode | CPU s | wall s | accuracy | tokens | FLOPs | dup | orphaned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mo in modes:
        cells = [
            f(f"{mo}.all.{k}") for k in ("cpu_s", "wall_s", "accuracy", "tokens", "flops", "duplicated", "orphaned")
        ]
        out.append(f"| {mo} | " + " | ".join(cells) + " |")
    out += [
        "",
        "**Per family** (CPU s / accuracy):",
        "",
        "| mode | " + " | ".join(tasks.FAMILIES) + " |",
        "|---" * (len(tasks.FAMILIES) + 1) + "|",
    ]
    for mo in modes:
        cells = [
            f"{f(f'{mo}.{fam}.cpu_s')} / {m.get(f'{mo}.{fam}.accuracy', float('nan')):.2f}" for fam in tasks.FAMILIES
        ]
        out.append(f"| {mo} | " + " | ".join(cells) + " |")
    parts = sorted({k.split(".cpu_by.")[1] for k in m if ".cpu_by." in k and not k.startswith("ablation.")})
    out += [
        "",
        "**Where the CPU went** (CPU s per part of the kernel's tree, all families):",
        "",
        "| mode | " + " | ".join(parts) + " |",
        "|---" * (len(parts) + 1) + "|",
    ]
    for mo in modes:
        out.append(f"| {mo} | " + " | ".join(f(f"{mo}.cpu_by.{p}", 2) for p in parts) + " |")
    abl = [p for p in PRIMITIVES if f"ablation.{p}.share_of_pic_cpu" in m]
    if abl:
        out += [
            "",
            "**Ablation** — reca with one primitive off: CPU s without it minus with it (the same run's "
            "reca; positive: the primitive saves CPU), as a share of pic's CPU, the accuracy reca loses "
            "without it, and the parts of the tree where the difference is (median CPU s):",
            "",
            "| primitive | CPU s difference | share of pic's CPU | accuracy delta | by part |",
            "|---|---|---|---|---|",
        ]
        for p in abl:
            by = sorted(
                ((k.split(".cpu_by.")[1], v) for k, v in m.items() if k.startswith(f"ablation.{p}.cpu_by.")),
                key=lambda kv: -abs(kv[1]),
            )
            diff = (
                f(f"ablation.{p}.cpu_s", 2)
                if f"ablation.{p}.cpu_s" in m
                else f"{m[f'reca-no-{p}.all.cpu_s'] - m['reca.all.cpu_s']:+.2f}"
            )
            out.append(
                f"| {p} | {diff} | {f(f'ablation.{p}.share_of_pic_cpu')} | {f(f'ablation.{p}.accuracy_delta')} | "
                + ", ".join(f"{k} {v:+.2f}" for k, v in by[:4] if abs(v) >= 0.02)
                + " |"
            )
    out += [
        "",
        "Counts per mode and family (cell-wise medians of the runs' tables; heavy runs, duplicates, orphans and "
        "refusals barely change between runs):",
        "",
    ]
    cols = list(doc["rows"][0])
    rows = [r for r in doc["rows"] if not ablation_rows_unaligned or not r["mode"].startswith("reca-no-")]
    out += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    out += [""] + [f"Note: {n}" for n in doc["notes"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import json
    import sys

    with open(sys.argv[1]) as fh:
        print(markdown(json.load(fh), ablation_rows_unaligned="--unaligned" in sys.argv))
