"""The invariant watchdog: per-block and global invariants of one simulation step, and the record
(:class:`StepReport`) a controller reads.

Global invariants, checked every (root) step:
  * mass: every conserved variable's total must stay at its initial value to round-off
    (``mass_rel_drift <= MASS_REL_TOL``);
  * positivity: depth (shallow water) stays > 0; for diffusion the maximum principle
    (values within the initial [min, max]) plays this role;
  * energy: the total energy (shallow water ½h|u|²+½gh², diffusion ½u²) must not grow by more than
    ``ENERGY_REL_TOL`` per step; physically it only decreases with closed walls;
  * CFL: the largest cell Courant number must stay below the scheme's limit;
  * finiteness: no NaN or Inf anywhere.

Local (per block) every step: minimum depth, largest Courant number, energy, and the refinement
indicators (``entropy`` production for shallow water, ``truncation`` Richardson estimate for
diffusion, and the Clawpack-style undivided ``gradient`` used by the baseline), each taken as the
maximum over the block and a halo of cells of its neighbours so a front is caught one step early.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

MASS_REL_TOL = 1e-11
ENERGY_REL_TOL = 1e-9
BOUND_REL_TOL = 1e-9

# Breach names (stable strings: the controller and the services match on them).
MASS = "mass"
POSITIVITY = "positivity"
ENERGY = "energy_growth"
CFL = "cfl"
FINITE = "non_finite"


@dataclasses.dataclass(frozen=True)
class GlobalInvariants:
    """Whole-domain invariants after a step.  ``mass`` per conserved variable; ``courant`` the
    largest cell Courant number over all levels (with each level's own dt)."""

    mass: tuple[float, ...]
    mass_rel_drift: float
    energy: float
    energy_rel_change: float
    min_value: float
    max_value: float
    courant: float
    finite: bool


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one root step did and what the watchdog saw.

    ``cell_updates``: cell-stage updates done in this step (the FLOPs proxy charged to a budget).
    ``levels``: level per block id.  ``block_*`` arrays are indexed by block id.
    ``indicators``: indicator name -> per-block value (with halo).  ``breaches``: names of global
    invariants breached in this step; ``block_breaches``: invariant name -> block ids breaching it.
    ``status``: "ok", "finished" (t reached t_end) or "unstable" (the run is halted).
    """

    step: int
    time: float
    dt: float
    dt_factor: float
    cell_updates: int
    total_cell_updates: int
    cells: int
    levels: np.ndarray
    block_min: np.ndarray
    block_courant: np.ndarray
    block_energy: np.ndarray
    indicators: dict[str, np.ndarray]
    globals: GlobalInvariants
    breaches: tuple[str, ...]
    block_breaches: dict[str, np.ndarray]
    status: str

    @property
    def refined_blocks(self) -> int:
        return int(np.count_nonzero(self.levels > 0))


def block_max_with_strips(field: Any, halo: int, xp: Any = np) -> tuple[np.ndarray, np.ndarray]:
    """``field``: (nb, m, m).  Returns (own max per block, (nb, 4) max over the ``halo`` cells
    along the west, east, south, north edges) as NumPy arrays."""
    h = max(1, min(halo, field.shape[1]))
    own = field.max(axis=(1, 2))
    strips = xp.stack(
        [
            field[:, :h, :].max(axis=(1, 2)),
            field[:, -h:, :].max(axis=(1, 2)),
            field[:, :, :h].max(axis=(1, 2)),
            field[:, :, -h:].max(axis=(1, 2)),
        ],
        axis=1,
    )
    return _to_numpy(own), _to_numpy(strips)


def with_halo(own: np.ndarray, strips: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Per block: max of its own value and each neighbour's facing edge strip.

    ``own`` (N,), ``strips`` (N, 4) by side, ``neighbours`` (N, 4) block ids or -1 at walls."""
    out = own.copy()
    opposite = np.array([1, 0, 3, 2])
    for side in range(4):
        nb = neighbours[:, side]
        ok = nb >= 0
        out[ok] = np.maximum(out[ok], strips[nb[ok], opposite[side]])
    return out


def _to_numpy(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def global_breaches(
    g: GlobalInvariants,
    *,
    previous_energy: float,
    courant_limit: float,
    lower_bound: float | None,
    upper_bound: float | None,
    strict_lower: bool = False,
) -> tuple[str, ...]:
    """Names of breached global invariants (see module docstring).  ``strict_lower``: the lower
    bound itself is a breach (depth 0 is as bad as negative depth)."""
    out = []
    if not g.finite:
        return (FINITE,)
    if g.mass_rel_drift > MASS_REL_TOL:
        out.append(MASS)
    scale = max(abs(lower_bound or 0.0), abs(upper_bound or 0.0), 1.0)
    if lower_bound is not None and (
        g.min_value <= lower_bound if strict_lower else g.min_value < lower_bound - BOUND_REL_TOL * scale
    ):
        out.append(POSITIVITY)
    if upper_bound is not None and g.max_value > upper_bound + BOUND_REL_TOL * scale:
        out.append(POSITIVITY)
    if g.energy > previous_energy * (1.0 + ENERGY_REL_TOL) + 1e-300:
        out.append(ENERGY)
    if g.courant > courant_limit:
        out.append(CFL)
    return tuple(dict.fromkeys(out))
