"""``python -m bench ttc_plans``: a plan that changes midway, TTC against eager tool calls.

Workload: a plan of N steps, each consuming one heavy tool result (real random 3-SAT at the
phase transition, n = 230 variables, solved by PicoSAT in a tool-worker process).  All N calls
are suggested at t = 0.  After a fraction (1/4, 1/2, 3/4) of the steps has consumed its results
the plan changes: half of the remaining steps (a seeded choice) are dropped.  Each configuration
runs with no consumer time between steps and with ``THINK_S`` per step (the consumer's own work,
e.g. decoding, during which eager calls run ahead).  Three strategies, same instances, same
2-worker limit (the machine has 2 cores):

* ``eager``        — run every call as soon as it is suggested; a dropped step's result is ignored
  (the naive bound: its saving is just the CPU of the dropped calls);
* ``eager_cancel`` — run at once, but kill the runs of dropped steps when the plan changes
  (what an eager runtime with cancellation can do: the headline peer);
* ``ttc``          — prepare all at once (validated, budget reserved, nothing runs), commit a call
  only when the consumer is within ``LOOKAHEAD`` steps of needing it, withdraw dropped consumers
  (which aborts their prepared calls before anything heavy runs).

Measured: plan wall time (until the last needed result is attached) and heavy-run CPU seconds
(rusage of every tool worker, killed ones included, from the durable log).
"""

from __future__ import annotations

import random
import tempfile
import time

from bench._common import Result, line_plot
from services.ttc.logic import PREPARED, TERMINAL_STATES
from services.ttc.runner import Coordinator

#: headline metric -> the strongest peer it is measured against (the report's headline table)
HEADLINE = {"ttc_cpu_saved_frac_vs_eager_cancel_mean": "eager cancel"}
LOOKAHEAD = 2
N_VARS = 230
SEED = 20240611
#: Bound on one plan's run (seconds).
PLAN_TIMEOUT_S = 600.0
#: The consumer's own time per step in the rows with think time (about one SAT solve).
THINK_S = 0.4
RUNS = 3


def _wait_terminal(c: Coordinator, call_id: str, deadline: float) -> None:
    while True:
        c.step()
        if c.outcome(call_id).state in TERMINAL_STATES:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"call {call_id} not finished")
        c.wait(0.5)


def _think(c: Coordinator, seconds: float) -> None:
    """The consumer's own work between two steps (e.g. decoding): the coordinator keeps running."""
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        c.step()
        if not c.running() or not c.wait(min(left, 0.05)):
            time.sleep(min(max(left, 0.0), 0.01))


def run_plan(strategy: str, n_steps: int, dropped: set[int], change_after: int, think_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, Coordinator(f"{tmp}/ttc.db", max_parallel=2) as c:
        deadline = time.monotonic() + PLAN_TIMEOUT_S
        t0 = time.perf_counter()
        ids = [c.prepare("sat", {"n_vars": N_VARS, "seed": SEED + i}, 30.0, [f"step{i}"], PLAN_TIMEOUT_S)
               for i in range(n_steps)]
        if strategy != "ttc":
            for cid in ids:
                c.commit(cid)
        plan = list(range(n_steps))
        pos = 0
        while pos < len(plan):
            if strategy == "ttc":
                for ahead in plan[pos:pos + LOOKAHEAD]:
                    if c.outcome(ids[ahead]).state == PREPARED:
                        c.commit(ids[ahead])
            step = plan[pos]
            _wait_terminal(c, ids[step], deadline)
            [delivery] = c.deliver(f"step{step}")
            c.attach(delivery.call_id, f"step{step}")
            pos += 1
            if pos == change_after:
                plan = plan[:pos] + [s for s in plan[pos:] if s not in dropped]
                if strategy != "eager":
                    for s in sorted(dropped):
                        c.withdraw(f"step{s}")
            if think_s > 0 and pos < len(plan):
                _think(c, think_s)
        wall = time.perf_counter() - t0
        c.run_until_settled(ids, PLAN_TIMEOUT_S)  # eager: the dropped runs still finish and burn CPU
        runs = c.store.all("SELECT end_status, cpu_s FROM runs")
        return {
            "strategy": STRATEGY_NAMES[strategy],
            "change_after": change_after,
            "think_s": think_s,
            "plan_wall_s": wall,
            "heavy_cpu_s": sum(r["cpu_s"] or 0.0 for r in runs),
            "runs_started": len(runs),
            "runs_killed": sum(r["end_status"].startswith("killed") for r in runs),
            "results_used": n_steps - len(dropped),
        }


STRATEGY_NAMES = {"eager": "eager, never cancels (naive bound)", "eager_cancel": "eager + cancel (peer)",
                  "ttc": "ttc (prepare, commit 2 ahead, withdraw)"}


def run(quick: bool) -> Result:
    n_steps = 4 if quick else 12
    changes = (0.5,) if quick else (0.25, 0.5, 0.75)
    thinks = (0.0,) if quick else (0.0, THINK_S)  # quick: a smoke run, one configuration
    rows, metrics = [], {"steps": float(n_steps)}
    notes = []
    saved_cancel, saved_eager, wall_ratio = {}, {}, {}
    for think in thinks:
        for frac in changes:
            change_after = max(1, round(n_steps * frac))
            rng = random.Random(SEED + change_after)
            dropped = set(rng.sample(range(change_after, n_steps), (n_steps - change_after) // 2))
            by = {s: run_plan(s, n_steps, dropped, change_after, think) for s in ("eager", "eager_cancel", "ttc")}
            rows.extend(by.values())
            key = f"change_at_{frac:g}.think_{think:g}s"
            saved_cancel[key] = 1 - by["ttc"]["heavy_cpu_s"] / by["eager_cancel"]["heavy_cpu_s"]
            saved_eager[key] = 1 - by["ttc"]["heavy_cpu_s"] / by["eager"]["heavy_cpu_s"]
            wall_ratio[key] = by["ttc"]["plan_wall_s"] / by["eager_cancel"]["plan_wall_s"]
            metrics[f"ttc_cpu_saved_frac_vs_eager_cancel.{key}"] = saved_cancel[key]
            metrics[f"ttc_cpu_saved_frac_vs_never_cancel.{key}"] = saved_eager[key]
            metrics[f"ttc_wall_ratio_vs_eager_cancel.{key}"] = wall_ratio[key]
            metrics[f"dropped_fraction.{key}"] = len(dropped) / n_steps
            notes.append(f"{key}: plan changes after {change_after} of {n_steps} steps, dropping {sorted(dropped)}")
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    metrics |= {
        "ttc_cpu_saved_frac_vs_eager_cancel_mean": mean(saved_cancel),
        "ttc_cpu_saved_frac_vs_never_cancel_mean": mean(saved_eager),
        "ttc_wall_ratio_vs_eager_cancel_max": max(wall_ratio.values()),
    }
    notes.insert(0, f"random 3-SAT n={N_VARS}, ratio 4.26, seeds {SEED}..{SEED + n_steps - 1}; 2 tool workers; "
                    f"LOOKAHEAD={LOOKAHEAD}; think_s = the consumer's own time per step between results")
    notes.insert(1, "headline peer: eager calls that are cancelled (killed) when the plan drops their step; "
                    "the never-cancel row is the naive bound (its saving equals the CPU of the dropped calls)")
    return Result(
        metrics=metrics,
        targets={"ttc_cpu_saved_frac_vs_eager_cancel_mean": (">=", 0.1),
                 "ttc_wall_ratio_vs_eager_cancel_max": ("<=", 1.25)},
        table=rows,
        notes=notes,
        plots=[line_plot("cpu_saved_vs_change_point", "TTC heavy-CPU saving by how late the plan changes",
                         "plan changes after this fraction of the steps", "CPU saved by TTC (fraction)",
                         {f"vs {peer}, think {t:g} s": (list(changes), [d[f"change_at_{f:g}.think_{t:g}s"] for f in changes])
                          for peer, d in (("eager+cancel", saved_cancel), ("never-cancel", saved_eager)) for t in thinks})],
    )
