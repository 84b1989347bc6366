"""Three workload families, generated with seeds and split into training and held-out tasks.

* ``math``: derivations in groups of related problems that share subgoals.  A task asks for two
  symbolic subgoals (an antiderivative and an equation's solutions; members of the group's
  classes under renaming and affine substitution, sometimes an exact repeat of an earlier text,
  sometimes a one-off) and an arithmetic chain whose items come from the group's pool; the
  language model gets some chain steps wrong.
* ``algo``: SAT tool calls whose plans change mid-run.  A small probe instance decides which of
  two heavy instances the task needs (the planner suggests both, speculatively); on some tasks
  the planner then replaces the needed instance by another (``swap``).  Instances recur within a
  group.  A short chain is decoded beside them.
* ``physics``: what-ifs.  A coarse simulation and an escalation to a finer level; the answer must
  be within the family's tolerance of a fine reference.  Some escalations pay (the coarse run
  misses the tolerance), some do not.  Parameters recur within a group.

Generation is a pure function of the seed.  :func:`split` puts whole groups into training or
held-out sets (no group straddles both), so nothing tuned on training tasks has seen a held-out
group's subgoals, instances or parameters.
"""

from __future__ import annotations

import dataclasses
import random

from lm import chains
from reason import workload as W

FAMILIES = ("math", "algo", "physics")
#: Tasks per group.
GROUP_SIZE = 4
#: Simulation grid of the physics family: blocks x blocks root blocks of cells² cells.
SIM_BLOCKS, SIM_CELLS = 2, 8
#: The coarse level and the escalation's level; the verifier's reference level.
SIM_FROM, SIM_TO, SIM_REF = 0, 2, 3
PHYSICS_CASES = ("sw_smooth_hump", "radial_dam_break", "gaussian_diffusion")
#: SAT sizes: the probe, and the heavy instances.
SAT_PROBE_VARS = (50, 70)
SAT_HEAVY_VARS = (150, 190)


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    family: str
    group: int
    spec: dict


def _math_group(rng: random.Random, g: int, base: str, n: int) -> list[Task]:
    integ = W.classes(rng, 2, ("integrate",))
    solve = W.classes(rng, 1, ("solve",))
    pool = chains.random_items(rng, 5)
    seen: list[dict] = []
    out = []
    for i in range(n):
        subgoals = []
        for kind_classes in (integ, solve):
            if seen and rng.random() < 0.15:  # an exact repeat of an earlier text of the group
                sg = dict(rng.choice([s for s in seen if s["kind"] == kind_classes[0][0]] or seen))
            elif rng.random() < 0.1:  # a one-off problem
                kind = kind_classes[0][0]
                template = rng.choice(sorted(W.FAMILIES[kind]))
                sg, _ = W.member(kind, template, (rng.randint(11, 40), rng.randint(6, 40)), rng)
            else:
                kind, template, consts = rng.choice(kind_classes)
                sg, _ = W.member(kind, template, consts, rng)
            seen.append(sg)
            subgoals.append(sg)
        items = rng.sample(pool, 3)
        out.append(
            Task(f"{base}-m{g}.{i}", "math", g, {"subgoals": subgoals, "items": [[it.a, it.b, it.c] for it in items]})
        )
    return out


def _algo_group(rng: random.Random, g: int, base: str, n: int) -> list[Task]:
    heavy = [{"n_vars": rng.randint(*SAT_HEAVY_VARS), "ratio": 4.26, "seed": rng.randrange(1 << 30)} for _ in range(4)]
    out = []
    for i in range(n):
        probe = {"n_vars": rng.randint(*SAT_PROBE_VARS), "ratio": 4.26, "seed": rng.randrange(1 << 30)}
        a, b = rng.sample(range(len(heavy)), 2)
        swap = rng.choice([k for k in range(len(heavy)) if k not in (a, b)]) if rng.random() < 0.4 else None
        items = chains.random_items(rng, 2)
        out.append(
            Task(
                f"{base}-a{g}.{i}",
                "algo",
                g,
                {
                    "probe": probe,
                    "if_sat": heavy[a],
                    "if_unsat": heavy[b],
                    "swap": heavy[swap] if swap is not None else None,
                    "items": [[it.a, it.b, it.c] for it in items],
                },
            )
        )
    return out


def _physics_params(case: str, rng: random.Random) -> dict:
    if case == "sw_smooth_hump":
        return {"amplitude": round(rng.uniform(0.05, 0.4), 3), "width": round(rng.uniform(0.12, 0.4), 3)}
    if case == "radial_dam_break":
        return {
            "h_in": round(rng.uniform(1.5, 3.0), 3),
            "radius": round(rng.uniform(0.4, 1.0), 3),
            "t_end": round(rng.uniform(0.5, 1.5), 3),
        }
    return {"sigma": round(rng.uniform(0.05, 0.25), 3), "D": round(rng.uniform(0.5, 1.5), 3)}


def _physics_group(rng: random.Random, g: int, base: str, n: int) -> list[Task]:
    case = PHYSICS_CASES[g % len(PHYSICS_CASES)]
    params_pool = [_physics_params(case, rng) for _ in range(3)]
    out = []
    for i in range(n):
        params = rng.choice(params_pool)
        out.append(
            Task(
                f"{base}-p{g}.{i}",
                "physics",
                g,
                {
                    "case": case,
                    "params": params,
                    "blocks": SIM_BLOCKS,
                    "cells": SIM_CELLS,
                    "from_level": SIM_FROM,
                    "to_level": SIM_TO,
                },
            )
        )
    return out


_GEN = {"math": _math_group, "algo": _algo_group, "physics": _physics_group}


def generate(family: str, seed: int, groups: int, group_size: int = GROUP_SIZE) -> list[Task]:
    """``groups`` groups of ``group_size`` related tasks of ``family`` (a pure function of the seed)."""
    if family not in _GEN:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    if groups < 1 or group_size < 1:
        raise ValueError("groups and group_size must be >= 1")
    rng = random.Random(f"{family}:{seed}")
    out: list[Task] = []
    for g in range(groups):
        out += _GEN[family](rng, g, f"{family[0]}{seed}", group_size)
    return out


def split(tasks: list[Task], held_out_every: int = 2) -> tuple[list[Task], list[Task]]:
    """(training, held-out): every ``held_out_every``-th group is held out (whole groups)."""
    train = [t for t in tasks if t.group % held_out_every != held_out_every - 1]
    held = [t for t in tasks if t.group % held_out_every == held_out_every - 1]
    return train, held
