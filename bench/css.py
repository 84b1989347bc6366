"""CSS against round-robin and worst-slack-first funding on case (d): a shallow-water run whose
configuration a planner chose badly (too large a time step, too coarse a grid or too low an order,
a units error in the time-step derivation), through the ``css`` service under a real kernel, each
run funded from a job with the same budget.

Per seed: the start configuration (cells, dt factor, order), the accuracy tolerance and the
listing order of the actions (what the peers follow) are drawn.  CSS's estimate constants
(services.css.problem.ORDER_GAIN, services.css.logic.PLAN_MARGIN) were chosen on seeds 0-9; the
figures here are on held-out seeds from 100.  Compute = cell updates of every measuring run
(simulation work, not wall time: the figures do not depend on this machine's load).
"""

from __future__ import annotations

import random
import statistics

from bench._common import Result

POLICIES = ("maxmin", "worst_first", "round_robin")
BUDGET = 3e6  # cell updates, the same for every policy
HELD_OUT = 100


def case(seed: int) -> dict:
    from services.css import problem

    rng = random.Random(seed)
    start = {"cells": rng.choice([6, 12]), "dt_factor": round(rng.uniform(1.2, 2.4), 4), "order": rng.choice([1, 2])}
    tol = rng.uniform(1.5e-4, 8e-4)
    names = [a.name for a in problem.actions()]
    rng.shuffle(names)
    return {"start": start, "tolerance_m": tol, "actions": names}


def run(quick: bool = False) -> Result:
    from clients import Client
    from clients.launch import LocalKernel, kernel_config, service_block

    seeds = range(HELD_OUT, HELD_OUT + (2 if quick else 10))
    got: dict[str, list[dict]] = {p: [] for p in POLICIES}
    kern = LocalKernel(kernel_config(service_block("css", "services.css"), heartbeat=0.5, liveness=10))
    try:
        with Client(kern.endpoint, timeout=300, retries=0) as c:
            c.wait_for_service("css", 60)
            for seed in seeds:
                doc = case(seed)
                for pol in POLICIES:
                    job = f"css-{seed}-{pol}"
                    c.open_job(job, {"cell_updates": BUDGET})
                    out = c.call("css", {**doc, "policy": pol}, job=job)
                    got[pol].append(out)
                print(f"  seed {seed}: " + "  ".join(
                    f"{p} {got[p][-1]['compute']:>8d}{'' if got[p][-1]['satisfied'] else ' (unsatisfied)'}"
                    f" in {got[p][-1]['runs']} runs" for p in POLICIES), flush=True)
    finally:
        kern.stop()

    def ratio(p: str) -> list[float]:
        return [a["compute"] / b["compute"] for a, b in zip(got[p], got["round_robin"])]

    def sd(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    table = []
    for p in POLICIES:
        comp = [o["compute"] for o in got[p]]
        runs = [o["runs"] for o in got[p]]
        r = ratio(p)
        table.append({"policy": p, "seeds": len(comp), "satisfied": sum(o["satisfied"] for o in got[p]),
                      "compute (cell updates)": f"{statistics.mean(comp):,.0f} ± {sd(comp):,.0f}",
                      "measuring runs": f"{statistics.mean(runs):.1f}",
                      "compute / round-robin": f"{statistics.mean(r):.3f} ± {sd(r):.3f} (min {min(r):.2f}, max {max(r):.2f})"})
    metrics = {
        "css_compute_over_round_robin": statistics.mean(ratio("maxmin")),
        "css_compute_over_round_robin_total": sum(o["compute"] for o in got["maxmin"])
        / sum(o["compute"] for o in got["round_robin"]),
        "css_compute_over_worst_first": statistics.mean(
            [a["compute"] / b["compute"] for a, b in zip(got["maxmin"], got["worst_first"])]),
        "css_satisfied_fraction": statistics.mean(float(o["satisfied"]) for o in got["maxmin"]),
        "round_robin_satisfied_fraction": statistics.mean(float(o["satisfied"]) for o in got["round_robin"]),
    }
    targets = {"css_compute_over_round_robin": ("<=", 0.7), "css_satisfied_fraction": (">=", 1.0)}
    notes = [f"held-out seeds {seeds.start}..{seeds.stop - 1}; every policy funded from a job of {BUDGET:g} cell updates",
             "ratios are per seed (CSS compute / round-robin compute), then mean ± sample sd"]
    return Result(metrics=metrics, targets=targets, table=table, notes=notes)
