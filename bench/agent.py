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
        train += tr
        held += ho[:1] if quick else ho  # quick: one held-out task per family
    return train, held


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
                    k.kill()  # its state is discarded: no graceful drain (scch's takes ~5 s)
    finally:
        if shared is not None:
            shared.kill()
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
    results = {m: results[m] for m in peers + ["reca"] + [m for m in modes if m.startswith("reca-no-")]}

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
            "quick: one held-out task per family; reca, pic, strong on one kernel in that order (reca is served "
            "nothing another mode computed; strong may be served reca's sim results); no llmseq, no ablation"
        )
    else:
        notes.append("each mode on a fresh kernel; PNGs in docs/agent/")
        try:
            draw(results, FIG_DIR)
        except Exception as exc:  # a plot is not a figure: report it and go on
            notes.append(f"plots not drawn: {exc!r}")
    return Result(metrics=metrics, targets=targets, table=rows, notes=notes, plots=plots)
