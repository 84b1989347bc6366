"""``python -m bench ttc_plans``: a plan that changes midway, TTC against eager tool calls.

Workload: a plan of N steps, each consuming one heavy tool result (real random 3-SAT at the
phase transition, n = 230 variables, solved by PicoSAT in a tool-worker process).  All N calls
are suggested at t = 0.  After the first quarter of the steps has consumed its results the plan
changes: half of the remaining steps (a seeded choice) are dropped.  Three strategies, same
instances, same 2-worker limit (the machine has 2 cores):

* ``eager``        — run every call as soon as it is suggested; a dropped step's result is ignored;
* ``eager_cancel`` — run at once, but kill the runs of dropped steps when the plan changes
  (what an eager runtime with cancellation can do);
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

from bench._common import Result
from services.ttc.logic import PREPARED, TERMINAL_STATES
from services.ttc.runner import Coordinator

LOOKAHEAD = 2
N_VARS = 230
SEED = 20240611
#: Bound on one plan's run (seconds).
PLAN_TIMEOUT_S = 600.0


def _wait_terminal(c: Coordinator, call_id: str, deadline: float) -> None:
    while True:
        c.step()
        if c.outcome(call_id).state in TERMINAL_STATES:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"call {call_id} not finished")
        c.wait(0.5)


def run_plan(strategy: str, n_steps: int, dropped: set[int], change_after: int) -> dict:
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
        wall = time.perf_counter() - t0
        c.run_until_settled(ids, PLAN_TIMEOUT_S)  # eager: the dropped runs still finish and burn CPU
        runs = c.store.all("SELECT end_status, cpu_s FROM runs")
        return {
            "strategy": strategy,
            "plan_wall_s": wall,
            "heavy_cpu_s": sum(r["cpu_s"] or 0.0 for r in runs),
            "runs_started": len(runs),
            "runs_killed": sum(r["end_status"].startswith("killed") for r in runs),
            "results_used": n_steps - len(dropped),
        }


def run(quick: bool) -> Result:
    n_steps = 8 if quick else 24
    change_after = n_steps // 4
    rng = random.Random(SEED)
    dropped = set(rng.sample(range(change_after, n_steps), (n_steps - change_after) // 2))
    rows = [run_plan(s, n_steps, dropped, change_after) for s in ("eager", "eager_cancel", "ttc")]
    by = {r["strategy"]: r for r in rows}
    metrics = {
        "steps": float(n_steps),
        "steps_dropped": float(len(dropped)),
        "eager_heavy_cpu_s": by["eager"]["heavy_cpu_s"],
        "eager_cancel_heavy_cpu_s": by["eager_cancel"]["heavy_cpu_s"],
        "ttc_heavy_cpu_s": by["ttc"]["heavy_cpu_s"],
        "ttc_cpu_saved_vs_eager_s": by["eager"]["heavy_cpu_s"] - by["ttc"]["heavy_cpu_s"],
        "ttc_cpu_saved_frac_vs_eager": 1 - by["ttc"]["heavy_cpu_s"] / by["eager"]["heavy_cpu_s"],
        "ttc_cpu_saved_frac_vs_eager_cancel": 1 - by["ttc"]["heavy_cpu_s"] / by["eager_cancel"]["heavy_cpu_s"],
        "eager_plan_wall_s": by["eager"]["plan_wall_s"],
        "ttc_plan_wall_s": by["ttc"]["plan_wall_s"],
        "ttc_wall_ratio_vs_eager": by["ttc"]["plan_wall_s"] / by["eager"]["plan_wall_s"],
    }
    return Result(
        metrics=metrics,
        targets={"ttc_cpu_saved_frac_vs_eager": (">=", 0.2)},
        table=rows,
        notes=[f"random 3-SAT n={N_VARS}, ratio 4.26, seeds {SEED}..{SEED + n_steps - 1}; plan changes after "
               f"{change_after} steps, dropping steps {sorted(dropped)}; 2 workers; LOOKAHEAD={LOOKAHEAD}"],
    )
