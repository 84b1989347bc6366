"""Invariant-Gated Multi-Fidelity Simulation (seed 001 §3.4): the pure controller.

:meth:`IGMSController.decide` reads one :class:`sims.invariants.StepReport` and returns actions;
it owns no simulation and no socket, and takes ``now`` as an argument.

Policy (in this order):
  1. non-finite values or a halted run -> :class:`Halt` (nothing else);
  2. a breached global invariant among CFL / energy growth / positivity -> :class:`SetDtFactor`
     with the factor shrunk by ``dt_shrink`` (time-step refinement); after ``calm_steps`` steps with
     no breach the factor grows back by the same ratio up to 1;
  3. every ``regrid_every`` steps: blocks whose local residual (the configured indicator, e.g.
     the numerical entropy production) exceeds ``refine_tol`` are refined, largest residual first,
     each level of refinement being one unit of the counted resource ``resource`` that must be
     reserved from the gate first (a refusal stops further refinement in this decision); blocks
     whose residual is below ``coarsen_tol`` are coarsened and their units released.

The same class with ``indicator="gradient"`` is the Clawpack-style baseline (undivided differences
of the depth against a tolerance), so both use the same refinement machinery.
"""

from __future__ import annotations

import dataclasses
import math
import numpy as np

from kernel.gate import Gate, LocalGate
from sims import invariants as inv

__all__ = ["Gate", "LocalGate"]  # re-exported: the controller's gate is the kernel's one Gate


@dataclasses.dataclass(frozen=True)
class Refine:
    block_ids: tuple[int, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class Coarsen:
    block_ids: tuple[int, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class SetDtFactor:
    factor: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Halt:
    reason: str


Action = Refine | Coarsen | SetDtFactor | Halt


@dataclasses.dataclass(frozen=True)
class IGMSConfig:
    """``indicator``: key of ``StepReport.indicators``; ``refine_tol`` > ``coarsen_tol`` >= 0."""

    indicator: str = "entropy"
    refine_tol: float = 1e-3
    coarsen_tol: float = 2.5e-4
    max_level: int = 1
    regrid_every: int = 1
    dt_shrink: float = 0.5
    min_dt_factor: float = 1.0 / 64
    calm_steps: int = 10
    resource: str = "refinements"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.refine_tol) and self.refine_tol > 0):
            raise ValueError(f"refine_tol must be positive, got {self.refine_tol!r}")
        if not (0 <= self.coarsen_tol < self.refine_tol):
            raise ValueError(f"need 0 <= coarsen_tol < refine_tol, got {self.coarsen_tol!r} / {self.refine_tol!r}")
        if self.max_level < 0 or self.regrid_every < 1 or self.calm_steps < 1:
            raise ValueError("max_level >= 0, regrid_every >= 1 and calm_steps >= 1 are required")
        if not 0 < self.dt_shrink < 1 or not 0 < self.min_dt_factor <= 1:
            raise ValueError("dt_shrink must lie in (0, 1) and min_dt_factor in (0, 1]")


DT_BREACHES = (inv.CFL, inv.ENERGY, inv.POSITIVITY)


class IGMSController:
    """Pure decision logic; see the module docstring.  ``log`` keeps (now, action) pairs."""

    def __init__(self, config: IGMSConfig, gate: Gate | None = None) -> None:
        self.config = config
        self.gate = gate if gate is not None else LocalGate()
        self.held = 0  # Invariant: units reserved from the gate == sum of block levels we caused
        self._calm = 0
        self.log: list[tuple[float, Action]] = []
        self.refused_refinements = 0

    def decide(self, report: inv.StepReport, now: float) -> list[Action]:
        cfg = self.config
        actions: list[Action] = []
        if report.status == "unstable" or inv.FINITE in report.breaches:
            actions.append(Halt(f"run unstable at t={report.time:.6g}: {', '.join(report.breaches) or 'halted'}"))
            return self._logged(now, actions)
        dt_breaches = [b for b in report.breaches if b in DT_BREACHES]
        if dt_breaches:
            self._calm = 0
            factor = max(cfg.min_dt_factor, report.dt_factor * cfg.dt_shrink)
            if factor < report.dt_factor:
                actions.append(SetDtFactor(factor, "breach: " + ", ".join(dt_breaches)))
        else:
            self._calm += 1
            if report.dt_factor < 1.0 and self._calm >= cfg.calm_steps:
                self._calm = 0
                actions.append(SetDtFactor(min(1.0, report.dt_factor / cfg.dt_shrink), "calm"))
        if report.step % cfg.regrid_every == 0 and report.status == "ok":
            actions.extend(self._regrid(report))
        return self._logged(now, actions)

    def _regrid(self, report: inv.StepReport) -> list[Action]:
        cfg = self.config
        try:
            ind = report.indicators[cfg.indicator]
        except KeyError:
            raise ValueError(f"the report carries no {cfg.indicator!r} indicator; the simulation must compute it") from None
        levels = report.levels
        out: list[Action] = []
        coarsen = np.flatnonzero((ind < cfg.coarsen_tol) & (levels > 0))
        if len(coarsen):
            self.gate.release(cfg.resource, min(len(coarsen), self.held))
            self.held -= min(len(coarsen), self.held)
            out.append(Coarsen(tuple(int(b) for b in coarsen), f"{cfg.indicator} < {cfg.coarsen_tol:g}"))
        want = np.flatnonzero((ind > cfg.refine_tol) & (levels < cfg.max_level))
        granted = []
        for b in want[np.argsort(-ind[want], kind="stable")]:
            if not self.gate.reserve(cfg.resource, 1):
                self.refused_refinements += len(want) - len(granted)
                break
            self.held += 1
            granted.append(int(b))
        if granted:
            out.append(Refine(tuple(sorted(granted)), f"{cfg.indicator} > {cfg.refine_tol:g}"))
        return out

    def _logged(self, now: float, actions: list[Action]) -> list[Action]:
        self.log.extend((now, a) for a in actions)
        return actions


def gradient_baseline(refine_tol: float, coarsen_tol: float | None = None, max_level: int = 1, gate: Gate | None = None) -> IGMSController:
    """Clawpack-style flagging: refine where the undivided difference exceeds ``refine_tol``."""
    return IGMSController(
        IGMSConfig(indicator="gradient", refine_tol=refine_tol, coarsen_tol=refine_tol / 4 if coarsen_tol is None else coarsen_tol, max_level=max_level),
        gate,
    )


def apply(sim, actions: list[Action]) -> bool:
    """Carry out ``actions`` on a :class:`sims.grid.Simulation`; False if told to halt."""
    for a in actions:
        if isinstance(a, Halt):
            return False
        if isinstance(a, SetDtFactor):
            sim.set_dt_factor(a.factor)
        elif isinstance(a, Coarsen):
            sim.coarsen(list(a.block_ids))
        elif isinstance(a, Refine):
            sim.refine(list(a.block_ids))
    return True


def run_controlled(sim, controller: IGMSController, clock=None):
    """Step ``sim`` to its end under ``controller``; returns (last report, refined block-steps).
    ``clock``: a callable for ``now`` (defaults to the simulation time)."""
    report = None
    refined_block_steps = 0
    while not sim.finished:
        report = sim.step()
        refined_block_steps += report.refined_blocks
        now = clock() if clock is not None else report.time
        if not apply(sim, controller.decide(report, now)):
            break
    return report, refined_block_steps
