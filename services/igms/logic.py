"""IGMS service, pure part: the request's controller settings, the step report rebuilt from the
simulation worker's wire record, and the gate adapter that lets the synchronous
:class:`sims.igms.IGMSController` spend units the kernel already granted.

Why an adapter: the controller asks its gate synchronously, one unit per refinement, and stops at
the first refusal.  The service cannot block the event loop on kernel round trips inside
``decide``, so before each decision it asks the kernel's gate, in one round trip, for *up to* as
many units as the controller can possibly ask for (:func:`wanted_refinements`; ``mmi.gate.reserve``
with ``up_to``, spent at once); ``decide`` then runs against :class:`PrefetchedGate`, which grants
from that pool in the same order the kernel would have.  The controller asks for exactly
:func:`wanted_refinements` units until the first refusal, so it uses every unit granted: the
kernel's count equals the controller's grants exactly.  (A service that dies between the grant and
sending its order has spent units it did not apply: the cap is never exceeded, only under-used.)

Budget semantics: a refinement is *spent* when granted.  Coarsening does not give units back (the
controller's ``release`` is counted here, not sent), so the job's ``refinements`` limit caps the
number of refinements ever made, like the ``prototypes`` cap of the growth gate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernel import errors
from sims import invariants as inv
from sims.igms import Action, Coarsen, Halt, IGMSConfig, Refine, SetDtFactor

_CONFIG_KEYS = {"indicator", "refine_tol", "coarsen_tol", "regrid_every", "dt_shrink", "min_dt_factor",
                "calm_steps", "resource"}
#: Keys of an igms ``run`` request passed on to the simulation worker.
SIM_KEYS = {"case", "params", "blocks", "cells", "max_level", "level", "levels", "t_end", "dt_factor",
            "max_steps", "order_timeout_s"}
DEFAULT_INDICATOR = {"radial_dam_break": "entropy", "sw_smooth_hump": "entropy", "lake_at_rest": "entropy",
                     "gaussian_diffusion": "truncation", "cosine_diffusion": "truncation"}


def parse_request(payload: Any) -> tuple[IGMSConfig, dict[str, Any]]:
    """``payload`` = simulation keys (:data:`SIM_KEYS`) + controller keys; returns the controller
    config and the controlled ``sim`` run request.  :class:`BadRequest` on anything invalid."""
    if not isinstance(payload, dict):
        raise errors.BadRequest("an igms request is a map")
    unknown = set(payload) - SIM_KEYS - _CONFIG_KEYS - {"op"}
    if unknown:
        raise errors.BadRequest(f"unknown keys {sorted(unknown)}")
    case = payload.get("case")
    conf = {k: payload[k] for k in _CONFIG_KEYS if k in payload}
    conf.setdefault("indicator", DEFAULT_INDICATOR.get(case, "entropy") if isinstance(case, str) else "entropy")
    conf["max_level"] = payload.get("max_level", 1)
    try:
        cfg = IGMSConfig(**conf)
    except (TypeError, ValueError) as exc:
        raise errors.BadRequest(f"invalid IGMS settings: {exc}") from None
    sim = {k: payload[k] for k in SIM_KEYS if k in payload}
    sim.update(op="run", controlled=True, indicators=[cfg.indicator])
    return cfg, sim


def report_from_wire(w: dict[str, Any]) -> inv.StepReport:
    """Inverse of ``services.sim.logic.report_to_wire`` (arrays back to NumPy)."""
    try:
        g = dict(w["globals"])
        g["mass"] = tuple(g["mass"])
        return inv.StepReport(
            step=int(w["step"]), time=float(w["time"]), dt=float(w["dt"]), dt_factor=float(w["dt_factor"]),
            cell_updates=int(w["cell_updates"]), total_cell_updates=int(w["total_cell_updates"]),
            cells=int(w["cells"]), levels=np.asarray(w["levels"], dtype=np.int64),
            block_min=np.asarray(w["block_min"], dtype=float), block_courant=np.asarray(w["block_courant"], dtype=float),
            block_energy=np.asarray(w["block_energy"], dtype=float),
            indicators={k: np.asarray(v, dtype=float) for k, v in w["indicators"].items()},
            globals=inv.GlobalInvariants(**g), breaches=tuple(w["breaches"]),
            block_breaches={k: np.asarray(v, dtype=np.int64) for k, v in w["block_breaches"].items()},
            status=str(w["status"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.BadRequest(f"malformed step report from the simulation worker: {exc!r}") from None


def wanted_refinements(report: inv.StepReport, cfg: IGMSConfig) -> int:
    """The most units :meth:`IGMSController.decide` can ask for on ``report`` (0 off regrid steps
    and on halted or finished runs)."""
    if report.status != "ok" or inv.FINITE in report.breaches or report.step % cfg.regrid_every:
        return 0
    ind = report.indicators.get(cfg.indicator)
    if ind is None:
        return 0
    return int(np.count_nonzero((ind > cfg.refine_tol) & (report.levels < cfg.max_level)))


class PrefetchedGate:
    """:class:`sims.igms.Gate` over ``units`` already reserved from the kernel for ``resource``.

    Invariant: ``0 <= used <= units``; a refused reservation takes nothing.  ``release`` is
    counted but gives nothing back (granted refinements are spent)."""

    def __init__(self, resource: str, units: int) -> None:
        if units < 0:
            raise ValueError(f"units must be >= 0, got {units}")
        self.resource = resource
        self.units = units
        self.used = 0
        self.refused = 0
        self.released = 0

    def reserve(self, resource: str, n: int) -> bool:
        if n < 0:
            raise ValueError(f"cannot reserve a negative amount ({n})")
        if resource != self.resource or self.used + n > self.units:
            self.refused += 1
            return False
        self.used += n
        return True

    def release(self, resource: str, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot release a negative amount ({n})")
        self.released += n


def order_from_actions(run_id: str, step: int, actions: list[Action]) -> dict[str, Any]:
    """The ``fidelity`` order (see ``services.sim``) carrying ``actions`` decided after ``step``."""
    order: dict[str, Any] = {"op": "fidelity", "run": run_id, "step": step}
    for a in actions:
        if isinstance(a, Halt):
            order["halt"] = True
        elif isinstance(a, SetDtFactor):
            order["dt_factor"] = a.factor
        elif isinstance(a, Coarsen):
            order["coarsen"] = sorted(set(order.get("coarsen", [])) | set(a.block_ids))
        elif isinstance(a, Refine):
            order["refine"] = sorted(set(order.get("refine", [])) | set(a.block_ids))
    return order
