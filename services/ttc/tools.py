"""Heavy tools the transaction manager can run, and the registry that names them.

A :class:`Tool` is declared by its validator (runs in the manager at ``prepare``, cheap, raises
``ValueError`` with a message) and its ``entry`` (``"module:function"``, imported and called in
the tool-worker process, never in the manager).  ``retriable`` declares the run a pure function
of its inputs, so recovery may run it again after its process was lost; ``max_attempts`` bounds
that.

Built-in tools:

* ``sat``  — random 3-SAT (seeded, default clause/variable ratio 4.26, the phase transition where
  instances are hardest) or explicit clauses, solved by pycosat (PicoSAT); a model is checked
  against every clause before it is reported.
* ``diffusion`` — a long 2-D diffusion run (NumPy, explicit five-point scheme, zero-flux walls) that
  checkpoints its state every ``checkpoint_every`` steps and resumes from the last checkpoint
  when re-run, so a retry after a lost process repeats at most one checkpoint interval.
* ``sim`` — a simulation of :mod:`sims` (any case of :data:`sims.cases.CASES`: shallow-water dam
  breaks, diffusion; block-structured grid, uniform at one level) for up to ``steps`` root steps or
  its ``t_end``; checkpoints :meth:`sims.grid.Simulation.snapshot` every ``checkpoint_every``
  steps and resumes from it when re-run, bit for bit (the result's ``sha`` of the final state
  equals an uninterrupted run's).  ``diffusion`` above is the lighter kernel of the same shape
  the fault harness runs a thousand times.
* ``subprocess`` — runs an argv whose program is on an allow-list (resolved to absolute paths at
  registration); output captured up to a bound.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

from kernel import errors
from services.ttc.errors import UnknownTool

#: Largest random 3-SAT instance accepted (variables); PicoSAT at ratio 4.26 needs minutes beyond ~350.
SAT_MAX_VARS = 2000
SAT_MAX_CLAUSES = 20000
SIM_MAX_GRID = 1024
SIM_MAX_STEPS = 10_000_000
#: Bytes of a subprocess's stdout/stderr kept in its result.
SUBPROCESS_OUTPUT_CAP = 64 * 1024


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a tool's entry sees besides its inputs (in the worker process)."""

    call_id: str
    attempt: int
    checkpoint_dir: str


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    validate: Callable[[dict], None]
    entry: str
    resource: str = "cpu_s"
    retriable: bool = True
    max_attempts: int = 3
    mem_bytes: int = 2 << 30


class ToolRegistry:
    """Name -> :class:`Tool`."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        if tool.max_attempts < 1:
            raise ValueError(f"tool {tool.name!r}: max_attempts must be >= 1")
        self._tools[tool.name] = tool

    def get(self, name: Any) -> Tool:
        tool = self._tools.get(name) if isinstance(name, str) else None
        if tool is None:
            raise UnknownTool(f"unknown tool {name!r}; registered: {sorted(self._tools)}", tool=str(name))
        return tool

    def names(self) -> list[str]:
        return sorted(self._tools)


def _require_int(inputs: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    """An integer input in [lo, hi]; kernel.errors.BadRequest (a ValueError) otherwise."""
    return errors.require_int(inputs, key, default, lo=lo, hi=hi)


def _require_float(inputs: dict, key: str, lo: float, hi: float, default: float | None = None) -> float:
    value = inputs.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{key} must lie in [{lo}, {hi}], got {value}")
    return float(value)


def _only_keys(inputs: dict, allowed: set[str]) -> None:
    if not isinstance(inputs, dict):
        raise ValueError(f"inputs must be a map, got {type(inputs).__name__}")
    extra = set(inputs) - allowed
    if extra:
        raise ValueError(f"unexpected input keys {sorted(extra)}; allowed: {sorted(allowed)}")


# ---------------------------------------------------------------------------------------- SAT

def random_3sat(n_vars: int, ratio: float, seed: int) -> list[list[int]]:
    """A uniform random 3-SAT instance: round(ratio * n_vars) clauses of 3 distinct variables,
    each negated with probability 1/2 (Python's ``random.Random(seed)``, so fixed by the seed)."""
    rng = random.Random(seed)
    clauses = []
    for _ in range(round(ratio * n_vars)):
        variables = rng.sample(range(1, n_vars + 1), 3)
        clauses.append([v if rng.random() < 0.5 else -v for v in variables])
    return clauses


def validate_sat(inputs: dict) -> None:
    _only_keys(inputs, {"n_vars", "ratio", "seed", "clauses"})
    if "clauses" in inputs:
        if set(inputs) - {"clauses"}:
            raise ValueError("give either clauses or (n_vars, ratio, seed), not both")
        clauses = inputs["clauses"]
        if not isinstance(clauses, list) or not clauses or len(clauses) > SAT_MAX_CLAUSES:
            raise ValueError(f"clauses must be a non-empty list of at most {SAT_MAX_CLAUSES} clauses")
        for clause in clauses:
            if (not isinstance(clause, list) or not clause
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x != 0
                               and abs(x) <= SAT_MAX_VARS for x in clause)):
                raise ValueError(f"each clause must be a non-empty list of non-zero ints "
                                 f"with |x| <= {SAT_MAX_VARS}, got {clause!r}")
        return
    n = _require_int(inputs, "n_vars", 3, SAT_MAX_VARS)
    ratio = _require_float(inputs, "ratio", 0.1, 10.0, 4.26)
    _require_int(inputs, "seed", 0, 2**63 - 1)
    if round(ratio * n) > SAT_MAX_CLAUSES:
        raise ValueError(f"{round(ratio * n)} clauses exceed the cap {SAT_MAX_CLAUSES}")


def run_sat(inputs: dict, ctx: RunContext) -> dict:
    import pycosat

    if "clauses" in inputs:
        clauses = inputs["clauses"]
    else:
        clauses = random_3sat(inputs["n_vars"], inputs.get("ratio", 4.26), inputs["seed"])
    model = pycosat.solve(clauses)
    if model == "UNSAT":
        return {"sat": False, "clauses": len(clauses)}
    if model == "UNKNOWN":
        raise RuntimeError("pycosat returned UNKNOWN")
    assignment = {abs(lit): lit > 0 for lit in model}
    for clause in clauses:
        if not any(assignment.get(abs(lit), False) == (lit > 0) for lit in clause):
            raise RuntimeError(f"pycosat model violates clause {clause}")
    digest = hashlib.sha256(",".join(map(str, model)).encode()).hexdigest()[:16]
    return {"sat": True, "clauses": len(clauses), "model": model, "model_sha": digest}


# ---------------------------------------------------------------------------------- diffusion

def validate_diffusion(inputs: dict) -> None:
    _only_keys(inputs, {"n", "steps", "D", "checkpoint_every", "seed"})
    _require_int(inputs, "n", 8, SIM_MAX_GRID)
    _require_int(inputs, "steps", 1, SIM_MAX_STEPS)
    _require_float(inputs, "D", 1e-6, 1e3, 1.0)
    _require_int(inputs, "checkpoint_every", 1, SIM_MAX_STEPS, 500)
    _require_int(inputs, "seed", 0, 2**32 - 1, 0)


def run_diffusion(inputs: dict, ctx: RunContext) -> dict:
    """Explicit FTCS on the unit square, ``dt = 0.2 dx² / D`` (stability number 0.8 <= 1), zero-flux
    walls.  Conserves the total mass to rounding; the result reports the drift as a check."""
    import numpy as np

    n, steps = inputs["n"], inputs["steps"]
    D = float(inputs.get("D", 1.0))
    every = inputs.get("checkpoint_every", 500)
    dx = 1.0 / n
    dt = 0.2 * dx * dx / D
    os.makedirs(ctx.checkpoint_dir, exist_ok=True)
    ckpt = os.path.join(ctx.checkpoint_dir, "diffusion.npz")
    resumed_from = 0
    if os.path.exists(ckpt):
        with np.load(ckpt) as saved:
            u, step, mass0 = saved["u"], int(saved["step"]), float(saved["mass0"])
        resumed_from = step
    else:
        u = np.random.default_rng(inputs.get("seed", 0)).random((n, n))
        step, mass0 = 0, float(u.sum())
    coef = D * dt / (dx * dx)
    padded = np.empty((n + 2, n + 2))
    while step < steps:
        chunk = min(every - step % every, steps - step)
        for _ in range(chunk):
            padded[1:-1, 1:-1] = u
            padded[0, 1:-1], padded[-1, 1:-1] = u[0], u[-1]
            padded[1:-1, 0], padded[1:-1, -1] = u[:, 0], u[:, -1]
            u = u + coef * (padded[2:, 1:-1] + padded[:-2, 1:-1] + padded[1:-1, 2:] + padded[1:-1, :-2] - 4 * u)
        step += chunk
        if step < steps:
            tmp = ckpt + ".tmp.npz"
            np.savez(tmp, u=u, step=step, mass0=mass0)
            os.replace(tmp, ckpt)
    mass = float(u.sum())
    return {
        "steps": step,
        "t": step * dt,
        "mass": mass,
        "mass_drift": abs(mass - mass0) / abs(mass0),
        "max": float(u.max()),
        "min": float(u.min()),
        "resumed_from": resumed_from,
        "sha": hashlib.sha256(u.tobytes()).hexdigest()[:16],
    }


# ---------------------------------------------------------------------------------------- sim

_SIM_KEYS = {"case", "params", "blocks", "cells", "level", "steps", "checkpoint_every"}


def validate_sim(inputs: dict) -> None:
    from sims import cases

    _only_keys(inputs, _SIM_KEYS)
    name, params = inputs.get("case"), inputs.get("params", {})
    if not isinstance(name, str) or name not in cases.CASES:
        raise ValueError(f"case must be one of {sorted(cases.CASES)}, got {name!r}")
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in params.values()):
        raise ValueError("params must map parameter names to numbers")
    try:  # a bad parameter, a non-positive t_end, a non-finite initial state: on a 4x4 grid, now
        cases.build(cases.make_case(name, **params), blocks=1, cells=4, max_level=0, level=0)
    except (ValueError, ArithmeticError, TypeError) as exc:
        raise ValueError(f"{name}: {exc}") from exc
    blocks = _require_int(inputs, "blocks", 1, 64, 4)
    cells = _require_int(inputs, "cells", 4, SIM_MAX_GRID, 8)
    level = _require_int(inputs, "level", 0, 3, 0)
    if cells % 2 or blocks * cells << level > SIM_MAX_GRID:
        raise ValueError(f"cells must be even and blocks*cells*2^level at most {SIM_MAX_GRID} per side")
    _require_int(inputs, "steps", 1, SIM_MAX_STEPS)
    _require_int(inputs, "checkpoint_every", 1, SIM_MAX_STEPS, 100)


def run_sim(inputs: dict, ctx: RunContext) -> dict:
    """Step a :mod:`sims` run, checkpointing its snapshot; resume from the last checkpoint."""
    import numpy as np

    from sims import cases

    level = inputs.get("level", 0)
    sim = cases.build(cases.make_case(inputs["case"], **inputs.get("params", {})), blocks=inputs.get("blocks", 4),
                      cells=inputs.get("cells", 8), max_level=level, level=level)
    every = inputs.get("checkpoint_every", 100)
    os.makedirs(ctx.checkpoint_dir, exist_ok=True)
    ckpt = os.path.join(ctx.checkpoint_dir, "sim.npz")
    resumed_from = 0
    if os.path.exists(ckpt):
        with np.load(ckpt) as saved:
            snap = {k: saved[k] for k in ("levels", "time", "steps", "total_cell_updates", "dt_factor",
                                          "energy", "init_mass", "halted")}
            snap["bounds"] = tuple(json.loads(str(saved["bounds_json"])))  # floats, None, bool
            snap["U"] = [saved[f"U{lv}"] for lv in range(int(saved["nlevels"]))]
        sim.restore(snap)
        resumed_from = sim.steps
    while sim.steps < inputs["steps"] and not sim.finished:
        report = sim.step()
        if report.status == "unstable":
            raise RuntimeError(f"{inputs['case']} went unstable at step {sim.steps}: {report}")
        if sim.steps % every == 0 and sim.steps < inputs["steps"] and not sim.finished:
            snap = sim.snapshot()
            arrays = {f"U{lv}": u for lv, u in enumerate(snap.pop("U"))}
            tmp = ckpt + ".tmp.npz"
            bounds = json.dumps(snap.pop("bounds"))
            np.savez(tmp, nlevels=len(arrays), bounds_json=bounds, **arrays,
                     **{k: np.asarray(v) for k, v in snap.items()})
            os.replace(tmp, ckpt)
    status = "finished" if sim.finished else "steps_done"
    digest = hashlib.sha256()
    for u in sim.U:
        digest.update(np.ascontiguousarray(u).tobytes())
    return {"case": inputs["case"], "steps": sim.steps, "time": sim.time, "status": status,
            "cell_updates": sim.total_cell_updates,
            "mass": [float(sim.uniform(level, v).sum()) * sim.spec.h(level) ** 2 for v in range(sim.physics.nvar)],
            "resumed_from": resumed_from, "sha": digest.hexdigest()[:16]}


# --------------------------------------------------------------------------------- subprocess

def make_subprocess_validator(allowed: Iterable[str]) -> Callable[[dict], None]:
    """A validator accepting argv whose program resolves to one of ``allowed`` (names or paths)."""
    resolved: set[str] = set()
    for prog in allowed:
        path = shutil.which(prog)
        if path is None:
            raise ValueError(f"allow-listed program {prog!r} is not on PATH")
        resolved.add(os.path.realpath(path))

    def validate(inputs: dict) -> None:
        _only_keys(inputs, {"argv", "timeout_s"})
        argv = inputs.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        if any("\0" in a for a in argv):
            raise ValueError("argv must not contain NUL bytes")
        path = shutil.which(argv[0])
        if path is None or os.path.realpath(path) not in resolved:
            raise ValueError(f"program {argv[0]!r} is not on the allow-list")
        if "timeout_s" in inputs:
            _require_float(inputs, "timeout_s", 0.001, 86400.0)

    return validate


def run_subprocess(inputs: dict, ctx: RunContext) -> dict:
    """Runs argv in the worker's process group (so a group kill reaches it); fails on non-zero exit."""
    proc = subprocess.run(inputs["argv"], capture_output=True, timeout=inputs.get("timeout_s"),
                          stdin=subprocess.DEVNULL, check=False)
    out = {
        "returncode": proc.returncode,
        "stdout": proc.stdout[:SUBPROCESS_OUTPUT_CAP].decode("utf-8", "replace"),
        "stderr": proc.stderr[:SUBPROCESS_OUTPUT_CAP].decode("utf-8", "replace"),
    }
    if proc.returncode != 0:
        raise RuntimeError(f"{inputs['argv'][0]} exited {proc.returncode}: {out['stderr'][-500:]}")
    return out


DEFAULT_SUBPROCESS_ALLOW = ("true", "echo", "sleep", "sha256sum")


def default_registry(subprocess_allow: Iterable[str] = DEFAULT_SUBPROCESS_ALLOW) -> ToolRegistry:
    """The built-in tools; ``subprocess`` is limited to ``subprocess_allow``."""
    return ToolRegistry([
        Tool("sat", validate_sat, "services.ttc.tools:run_sat", retriable=True, mem_bytes=2 << 30),
        Tool("diffusion", validate_diffusion, "services.ttc.tools:run_diffusion", retriable=True, mem_bytes=2 << 30),
        Tool("sim", validate_sim, "services.ttc.tools:run_sim", retriable=True, mem_bytes=2 << 30),
        # A program's side effects are unknown: never re-run after a lost process.
        Tool("subprocess", make_subprocess_validator(subprocess_allow), "services.ttc.tools:run_subprocess",
             retriable=False, max_attempts=1, mem_bytes=2 << 30),
    ])
