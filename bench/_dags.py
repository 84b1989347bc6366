"""Workloads for ``bench cpcs``: random layered DAGs in the contention regime and WfCommons
workflow shapes, each with the truth (real run time per attempt, failing first attempts) drawn
apart from the planner's estimates, so ETAs are wrong until a task is probed.

Everything is generated from a seed at run time; nothing is downloaded (WfCommons' WfChef
recipes ship their trace statistics inside the package)."""

from __future__ import annotations

import math
import random
from typing import Any

from services.cpcs.dag import Dag, parse_dag
from services.cpcs.logic import Truth

#: Estimates are off by a per-kind bias in [1/KIND_BIAS, KIND_BIAS] and per-task noise (lognormal sigma).
KIND_BIAS = 2.0
TASK_NOISE = 0.25


def _attempts_failing(rng: random.Random, p: float, max_attempts: int) -> int:
    fails = 0
    while fails < max_attempts - 1 and rng.random() > p:
        fails += 1
    return fails


def layered(seed: int, workers: int = 4, *, layers: int = 5, chain_s: float = 0.6, light_s: float = 0.15,
            kinds: int = 3, fail: float = 0.0, service: str = "work", flat: bool = False,
            straggle: float = 0.0, slow: float = 5.0) -> tuple[Dag, dict[str, Truth]]:
    """A layered DAG in the contention regime: per layer one heavy task continuing a chain and
    light tasks enough to fill the other workers for about as long (total work / workers is close
    to the critical path).  The planner lists each layer in random order.  ``fail``: the largest
    failure probability of an attempt (drawn per task; the planner's p_success is the true one).

    ``flat``: the planner cannot tell tasks apart -- every estimate is the mean estimate (it knows
    the total work, not where it is), and a task's kind is its role (``chain`` or ``light``), so
    what a task of a kind really takes can be learnt only by running one: the case where static
    ranks are blind and runtime information decides.  ``straggle``: the probability that a
    task's first attempt runs ``slow`` times longer (a straggler; later attempts run normally)."""
    rng = random.Random(seed)
    bias = {f"k{k}": math.exp(rng.uniform(-math.log(KIND_BIAS), math.log(KIND_BIAS))) for k in range(kinds)}
    tasks: list[dict[str, Any]] = []
    truth: dict[str, Truth] = {}
    prev_chain: str | None = None
    prev: list[str] = []
    for L in range(layers):
        layer: list[dict[str, Any]] = []
        n_light = max(1, round((workers - 1) * chain_s / light_s * rng.uniform(0.8, 1.1)))
        for j in range(n_light + 1):
            heavy = j == 0
            tid = f"L{L}{'c' if heavy else 'x'}{j}"
            kind = f"k{rng.randrange(kinds)}"
            est = (chain_s if heavy else light_s) * rng.lognormvariate(0.0, 0.3)
            real = est * bias[kind] * rng.lognormvariate(0.0, TASK_NOISE)
            if heavy:
                deps = [prev_chain] if prev_chain else []
            else:
                deps = rng.sample(prev, min(len(prev), rng.randint(0, 2))) if prev else []
            p = 1.0 - rng.uniform(0.0, fail) if fail else 1.0
            if flat:
                kind = "chain" if heavy else "light"
            layer.append({"id": tid, "service": service, "eta_s": round(est, 4), "p_success": round(p, 4),
                          "deps": sorted(set(deps)), "kind": kind, "max_attempts": 4})
            fails = _attempts_failing(rng, p, 4)
            truth[tid] = Truth(real, fails, slow if straggle and rng.random() < straggle else 1.0)
            if heavy:
                prev_chain = tid
        rng.shuffle(layer)
        tasks += layer
        prev = [t["id"] for t in layer]
    if flat:
        mean = sum(t["eta_s"] for t in tasks) / len(tasks)
        for t in tasks:
            t["eta_s"] = round(mean, 4)
    return parse_dag({"tasks": tasks}), truth


WFCOMMONS_RECIPES = ("montage", "epigenomics", "blast", "1000genome")


def wfcommons(seed: int, recipe: str, n_tasks: int = 40, *, scale_s: float = 4.0,
              service: str = "work") -> tuple[Dag, dict[str, Truth]]:
    """A workflow from a WfChef recipe (structure and run times from real execution traces),
    scaled so its total work is ``scale_s`` per... total work = scale_s * 4 (four workers' worth
    of ``scale_s``).  The planner's estimate of a task is the mean trace run time of its
    category; the truth is the generated run time."""
    import numpy as np
    from wfcommons import WorkflowGenerator
    from wfcommons.wfchef.recipes import BlastRecipe, EpigenomicsRecipe, GenomeRecipe, MontageRecipe

    cls = {"montage": MontageRecipe, "epigenomics": EpigenomicsRecipe, "blast": BlastRecipe,
           "1000genome": GenomeRecipe}[recipe]
    random.seed(seed)
    np.random.seed(seed)
    wf = WorkflowGenerator(cls.from_num_tasks(n_tasks)).build_workflow()
    raw = {name: max(float(t.runtime or 0.0), 1e-3) for name, t in wf.tasks.items()}
    cat = {name: str(t.category or t.name.rsplit("_", 1)[0]) for name, t in wf.tasks.items()}
    by_cat: dict[str, list[float]] = {}
    for name, r in raw.items():
        by_cat.setdefault(cat[name], []).append(r)
    total = sum(raw.values())
    k = scale_s * 4 / total
    ids = {name: f"w{i}" for i, name in enumerate(sorted(wf.tasks))}
    parents: dict[str, list[str]] = {name: [] for name in wf.tasks}
    for a, b in wf.edges:
        parents[b].append(a)
    rng = random.Random(seed)
    order = sorted(wf.tasks)
    rng.shuffle(order)  # the planner's listing: no particular order
    tasks = []
    truth = {}
    for name in order:
        est = max(sum(by_cat[cat[name]]) / len(by_cat[cat[name]]) * k, 0.005)
        tasks.append({"id": ids[name], "service": service, "eta_s": round(est, 5), "kind": cat[name],
                      "deps": sorted(ids[p] for p in parents[name]), "max_attempts": 3})
        truth[ids[name]] = Truth(max(raw[name] * k, 0.005))
    return parse_dag({"tasks": tasks}), truth


def lower_bound(dag: Dag, truth: dict[str, Truth], workers: int) -> float:
    """max(critical path, total work / workers) of the true run times, failed attempts included
    (a straggler's slow first attempt is not: no schedule needs to sit it out, so the bound stays
    a bound for one that restarts it)."""
    dur = {tid: tr.run_s * (1 + tr.fail_attempts) for tid, tr in truth.items()}
    return max(dag.critical_path_s(dur), sum(dur.values()) / workers)


#: The planner's guess of one decoded token's time (s) and of a subgoal's length (tokens).
DECODE_TOKEN_S = 0.008
DECODE_GUESS_TOKENS = 55


def derivation(seed: int, *, layers: int = 4, width: tuple[int, int] = (2, 4), max_new: int = 120,
               service: str = "decode") -> Dag:
    """A multi-subgoal derivation for the ``decode`` service: each subgoal is a chain question of
    1..5 items the model works step by step (19..100 tokens: its length is the model's, unknown
    to the planner, who guesses ``DECODE_GUESS_TOKENS`` for every subgoal); a subgoal depends on
    one or two of the previous layer's."""
    from lm import chains

    rng = random.Random(seed)
    tasks: list[dict[str, Any]] = []
    prev: list[str] = []
    for L in range(layers):
        cur = []
        for j in range(rng.randint(*width)):
            items = chains.random_items(rng, rng.randint(1, chains.MAX_ITEMS))
            tid = f"g{L}_{j}"
            deps = rng.sample(prev, min(len(prev), rng.randint(1, 2))) if prev else []
            cur.append({"id": tid, "service": service, "kind": "subgoal",
                        "eta_s": DECODE_GUESS_TOKENS * DECODE_TOKEN_S, "deps": sorted(deps),
                        "payload": {"op": "generate", "prompt": chains.prompt(items), "max_new": max_new,
                                    "keep": False}})
        rng.shuffle(cur)
        tasks += cur
        prev = [t["id"] for t in cur]
    return parse_dag({"tasks": tasks})
