"""Case (d) of CSS: a shallow-water run (``sims`` smooth hump, g = 1 m/s², depths in m) whose
configuration a planner chose badly, with the constraints measured from real runs:

* ``cfl``: the largest cell Courant number over every step <= the scheme's 0.45;
* ``accuracy``: mean absolute depth error against a finer reference run <= a tolerance (m);
* ``conservation``: drift of the total water volume <= 1e-9 m³ (sims/invariants.py's mass check);
* ``entropy``: the sign of entropy production -- the largest per-step growth of the total
  energy (the shallow-water entropy, m⁵/s² per unit density) must be <= 0;
* ``units``: the planner's derivation of the stable time step must come out in seconds (pint).

Actions and their models (what CSS's estimates start from; the peers use only ``targets``):

=============== ========================= ==========================================
action          changes                   predicted effect (CSS's starting estimate)
=============== ========================= ==========================================
``shrink_dt``   dt factor x 0.7           Courant x 0.7; energy growth removed
``refine``      cells per block x 2       depth error x 2^-order
``raise_order`` scheme order 1 -> 2       depth error x 0.35
``rederive``    the derivation's step     units consistent (checked by pint, no run)
=============== ========================= ==========================================

Compute is counted in cell updates (``StepReport.total_cell_updates``) of every measuring run;
:func:`run_cost` predicts it exactly from a configuration (steps x cells x stages).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from services.css.logic import Q, ActionSpec, ConstraintError, Derivation, make_constraint, make_derivation
from sims import cases

BLOCKS = 2
REF_CELLS = 48
MAX_CELLS = 24
CFL_LIMIT = 0.45
#: ``shrink_dt`` multiplies the time step by this.
SHRINK = 0.7
#: Predicted depth-error factor of raising the order from 1 to 2.
ORDER_GAIN = 0.45
#: Measured quantities and their dimensions.
DIMENSIONS = {
    "courant": Q(1.0).dimensionality,
    "depth_error": Q(1.0, "m").dimensionality,
    "volume_drift": Q(1.0, "m**3").dimensionality,
    "energy_growth": Q(1.0, "m**5/s**2").dimensionality,
}
#: The planner's derivation of the stable step (adds a speed to a speed squared) and its repair.
BAD_DERIVATION = {"steps": [["c", "u + g * h"], ["dt", "cfl * dx / c"]],
                  "inputs": {"u": "0.1 m/s", "g": "1 m/s**2", "h": "1.1 m", "cfl": "0.45", "dx": "0.083 m"},
                  "expect": "[time]"}
GOOD_STEPS = [["c", "u + (g * h) ** 0.5"], ["dt", "cfl * dx / c"]]


@dataclasses.dataclass
class Config:
    cells: int
    dt_factor: float
    order: int
    derivation: Derivation


def default_constraints(tolerance_m: float) -> list[dict]:
    return [
        {"name": "cfl", "quantity": "courant", "op": "<=", "limit": CFL_LIMIT, "scale": CFL_LIMIT},
        {"name": "accuracy", "quantity": "depth_error", "op": "<=", "limit": f"{tolerance_m} m",
         "scale": f"{tolerance_m} m"},
        {"name": "conservation", "quantity": "volume_drift", "op": "<=", "limit": "1e-9 m**3", "scale": "1e-9 m**3"},
        {"name": "entropy", "quantity": "energy_growth", "op": "<=", "limit": "0 m**5/s**2",
         "scale": "1e-9 m**5/s**2"},
    ]


def parse_start(doc: Any) -> Config:
    if not isinstance(doc, dict):
        raise ConstraintError("'start' is a map {cells, dt_factor, order}", reason="type")
    cells, dtf, order = doc.get("cells", 6), doc.get("dt_factor", 1.0), doc.get("order", 2)
    if isinstance(cells, bool) or not isinstance(cells, int) or not 4 <= cells <= MAX_CELLS or cells % 2:
        raise ConstraintError(f"start.cells must be an even integer in 4..{MAX_CELLS} (cells per block side)",
                              reason="range")
    if isinstance(dtf, bool) or not isinstance(dtf, (int, float)) or not 0.05 <= dtf <= 4.0:
        raise ConstraintError("start.dt_factor must lie in [0.05, 4]", reason="range")
    if order not in (1, 2):
        raise ConstraintError("start.order must be 1 or 2", reason="range")
    return Config(cells, float(dtf), order, make_derivation(doc.get("derivation", BAD_DERIVATION)))


@functools.lru_cache(maxsize=2)
def reference(order: int = 2, cells: int = REF_CELLS) -> np.ndarray:
    sim = cases.build(cases.sw_smooth_hump(order=order), blocks=BLOCKS, cells=cells, max_level=0, level=0)
    cases.run_to_end(sim)
    return sim.uniform(0)


def _build(cfg: Config) -> Any:
    sim = cases.build(cases.sw_smooth_hump(order=cfg.order), blocks=BLOCKS, cells=cfg.cells, max_level=0, level=0)
    sim.set_dt_factor(cfg.dt_factor)
    return sim


def run_cost(cfg: Config) -> float:
    """Cell updates the run of ``cfg`` will take (exact for a fixed step: steps x cells x stages)."""
    sim = _build(cfg)
    dt = sim.stable_dt() * cfg.dt_factor
    n_cells = (BLOCKS * cfg.cells) ** 2
    return math.ceil(sim.t_end / dt) * n_cells * cfg.order


def measure(cfg: Config) -> tuple[dict[str, Any], int]:
    """Run ``cfg`` to the end; the measured quantities (pint) and the cell updates it took."""
    sim = _build(cfg)
    courant, growth, report = 0.0, -math.inf, None
    while not sim.finished:
        report = sim.step()
        g = report.globals
        courant = max(courant, g.courant if math.isfinite(g.courant) else math.inf)
        growth = max(growth, g.energy_rel_change * g.energy if math.isfinite(g.energy_rel_change) else math.inf)
        if report.status == "unstable":
            break
    assert report is not None
    ref = reference()
    u = sim.uniform(0)
    m, k = u.shape[0], ref.shape[0] // u.shape[0]
    err = float(np.abs(u - ref.reshape(m, k, m, k).mean(axis=(1, 3))).mean()) if np.isfinite(u).all() else math.inf
    cell_area = (2.0 / (BLOCKS * cfg.cells)) ** 2
    volume = float(np.nansum(u)) * cell_area
    drift = report.globals.mass_rel_drift * volume if report.globals.finite else math.inf
    big = 1e30  # a halted (non-finite) run: every measure is hopeless, but finite for the arithmetic
    out = {"courant": Q(min(courant, big)), "depth_error": Q(min(err, big), "m"),
           "volume_drift": Q(min(drift, big), "m**3"), "energy_growth": Q(min(growth, big), "m**5/s**2")}
    return out, int(report.total_cell_updates)


def actions() -> list[ActionSpec]:
    """The candidate actions with their gain models (see the module docstring)."""

    def shrink(s: dict[str, float], cfg: Config) -> dict[str, float]:
        courant = CFL_LIMIT * (1.0 - s["cfl"])
        return {"cfl": 1.0 - SHRINK * courant / CFL_LIMIT, "entropy": max(s["entropy"], 0.0),
                "conservation": max(s["conservation"], 0.0)}

    def refine(s: dict[str, float], cfg: Config) -> dict[str, float]:
        return {"accuracy": 1.0 - (1.0 - s["accuracy"]) * 2.0 ** -cfg.order}

    def raise_order(s: dict[str, float], cfg: Config) -> dict[str, float]:
        return {"accuracy": 1.0 - (1.0 - s["accuracy"]) * ORDER_GAIN}

    return [
        ActionSpec("shrink_dt", ("cfl", "entropy", "conservation"), shrink, lambda c: apply("shrink_dt", c),
                   lambda c: c.dt_factor * SHRINK >= 0.05),
        ActionSpec("refine", ("accuracy",), refine, lambda c: apply("refine", c), lambda c: c.cells * 2 <= MAX_CELLS),
        ActionSpec("raise_order", ("accuracy",), raise_order, lambda c: apply("raise_order", c),
                   lambda c: c.order == 1),
        ActionSpec("rederive", ("units",), lambda s, c: {"units": 1.0}, lambda c: apply("rederive", c),
                   lambda c: not c.derivation.check()[0]),
    ]


def apply(action: str, cfg: Config) -> Config:
    """The configuration after ``action`` (a new object; ``cfg`` is unchanged)."""
    if action == "shrink_dt":
        return dataclasses.replace(cfg, dt_factor=cfg.dt_factor * SHRINK)
    if action == "refine":
        return dataclasses.replace(cfg, cells=cfg.cells * 2)
    if action == "raise_order":
        return dataclasses.replace(cfg, order=2)
    if action == "rederive":
        return dataclasses.replace(cfg, derivation=make_derivation({**BAD_DERIVATION, "steps": GOOD_STEPS}))
    raise ValueError(f"unknown action {action!r}")


def needs_run(action: str) -> bool:
    return action != "rederive"


def constraints(docs: list[dict]) -> list:
    return [make_constraint(d, DIMENSIONS) for d in docs]
