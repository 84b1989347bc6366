"""2-D shallow water, finite volume: Rusanov (local Lax-Friedrichs) flux, MUSCL reconstruction of
the conserved variables with the minmod limiter, SSP-RK2 (Heun) in time; ``order=1`` gives the
first-order scheme (piecewise constant, forward Euler).

State ``(h, hu, hv)``; walls are reflective (mirror ghosts, normal momentum odd), which makes the
wall mass flux exactly zero.  Courant number of a cell: ``dt / dx * (|u| + |v| + 2c)``, c = sqrt(gh)
(the 2-D unsplit condition); the scheme targets ``cfl`` and the watchdog's limit is 1.

Refinement indicator (Puppo 2004; Mungkasi 2016): the numerical entropy production
``S_i = (eta(U_i^{n+1}) - eta(U_i^n)) / dt + div(Psi)_i`` with ``eta = ½h(u²+v²) + ½gh²`` and the
numerical entropy flux ``Psi = ½(psi_L + psi_R) - ½a(eta_R - eta_L)`` built from the same face
states and speed ``a`` as the mass/momentum flux and time-integrated with the same RK weights.  It
is O(dx^p) where the solution is smooth and O(1/dx) at shocks, so ``|S| * dx`` (reported as
``entropy``) tends to a nonzero constant at a shock and to zero elsewhere.  The discretisation does
not conserve ``eta`` exactly, which is what makes ``S`` a residual worth watching.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sims.grid import LevelStep, minmod


class ShallowWater:
    """Physics plug-in for :class:`sims.grid.Simulation`."""

    name = "shallow_water"
    nvar = 3
    ghost = 2
    time_ratio = 2
    flip_x = (1,)
    flip_y = (2,)
    limited = True
    courant_limit = 1.0
    bounded_var = 0
    mass_vars = (0,)  # conserved totals (momentum is not: walls exert pressure)
    indicator_names = ("entropy", "gradient")

    def __init__(self, g: float = 1.0, cfl: float = 0.45, order: int = 2) -> None:
        if not (math.isfinite(g) and g > 0):
            raise ValueError(f"gravity g must be positive and finite, got {g!r}")
        if not (math.isfinite(cfl) and 0 < cfl <= 1):
            raise ValueError(f"cfl must lie in (0, 1], got {cfl!r}")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        self.g = float(g)
        self.cfl = float(cfl)
        self.order = order
        self.stages = order

    # --- contract with Simulation ---------------------------------------------------------------

    def validate(self, vals: np.ndarray) -> None:
        if not (vals[0] > 0).all():
            raise ValueError(f"depth must be positive everywhere (min {float(vals[0].min())!r})")

    def bounds(self, vmin: float, vmax: float) -> tuple[float | None, float | None, bool]:
        return 0.0, None, True

    def energy_density(self, u: Any) -> Any:
        h, hu, hv = u[0], u[1], u[2]
        return 0.5 * (hu * hu + hv * hv) / h + 0.5 * self.g * h * h

    def _speeds(self, u: Any, xp: Any) -> Any:
        h = u[0]
        c = xp.sqrt(self.g * xp.maximum(h, 0.0))
        return xp.abs(u[1] / h) + xp.abs(u[2] / h) + 2.0 * c

    def courant(self, u: Any, dx: float, dt: float) -> Any:
        return self._speeds(u, _xp(u)) * (dt / dx)

    def stable_dt(self, u: Any, dx: float) -> float:
        smax = float(self._speeds(u, _xp(u)).max())
        return self.cfl * dx / smax if smax > 0 and math.isfinite(smax) else math.nan

    # --- fluxes ---------------------------------------------------------------------------------

    def _faces(self, U: Any, axis: int, m: int, g: int, xp: Any) -> tuple[Any, Any]:
        """Left/right face states along ``axis`` (2 = x, 3 = y) for the m + 1 faces of every row of
        interior cells: shapes (3, nb, m+1, m) for x, (3, nb, m, m+1) for y."""
        other = 3 if axis == 2 else 2
        idx = [slice(None)] * 4
        idx[other] = slice(g, g + m)
        V = U[tuple(idx)]

        def sl(a: Any, lo: int, hi: int) -> Any:
            j = [slice(None)] * 4
            j[axis] = slice(lo, hi)
            return a[tuple(j)]

        if self.order == 1:
            return sl(V, g - 1, g + m), sl(V, g, g + m + 1)
        d = xp.diff(V, axis=axis)
        s = minmod(sl(d, 0, d.shape[axis] - 1), sl(d, 1, d.shape[axis]), xp)  # slope of cell c at c - 1
        UL = sl(V, g - 1, g + m) + 0.5 * sl(s, g - 2, g + m - 1)
        UR = sl(V, g, g + m + 1) - 0.5 * sl(s, g - 1, g + m)
        return UL, UR

    def _flux(self, UL: Any, UR: Any, normal: int, entropy: bool, xp: Any):
        """Rusanov flux along the direction whose momentum is variable ``normal`` (1 = x, 2 = y)."""
        g = self.g
        hL, hR = UL[0], UR[0]
        unL, unR = UL[normal] / hL, UR[normal] / hR
        cL, cR = xp.sqrt(g * xp.maximum(hL, 0.0)), xp.sqrt(g * xp.maximum(hR, 0.0))
        a = xp.maximum(xp.abs(unL) + cL, xp.abs(unR) + cR)
        fL = unL * UL
        fR = unR * UR
        fL[normal] += 0.5 * g * hL * hL
        fR[normal] += 0.5 * g * hR * hR
        F = 0.5 * (fL + fR) - 0.5 * a * (UR - UL)
        P = None
        if entropy:
            eL = 0.5 * (UL[1] * UL[1] + UL[2] * UL[2]) / hL + 0.5 * g * hL * hL
            eR = 0.5 * (UR[1] * UR[1] + UR[2] * UR[2]) / hR + 0.5 * g * hR * hR
            psiL = unL * (eL + 0.5 * g * hL * hL)
            psiR = unR * (eR + 0.5 * g * hR * hR)
            P = 0.5 * (psiL + psiR) - 0.5 * a * (eR - eL)
        return F, P

    def _rhs_fluxes(self, U: Any, m: int, g: int, entropy: bool, xp: Any):
        UL, UR = self._faces(U, 2, m, g, xp)
        Fx, Px = self._flux(UL, UR, 1, entropy, xp)
        UL, UR = self._faces(U, 3, m, g, xp)
        Fy, Py = self._flux(UL, UR, 2, entropy, xp)
        return Fx, Fy, Px, Py

    def step_level(self, sim: Any, level: int, U: Any, dt: float, t: float, want: tuple[str, ...]) -> LevelStep:
        xp = sim.xp
        spec = sim.spec
        m, g, dx = spec.m(level), spec.ghost, spec.h(level)
        entropy = "entropy" in want
        sim._fill_ghosts(level, U, t)
        Fx, Fy, Px, Py = self._rhs_fluxes(U, m, g, entropy, xp)
        if self.stages == 2:
            U1 = U.copy()
            U1[:, :, g:-g, g:-g] -= (dt / dx) * (_div(Fx, Fy))
            sim._fill_ghosts(level, U1, t + dt)
            Fx2, Fy2, Px2, Py2 = self._rhs_fluxes(U1, m, g, entropy, xp)
            Fx, Fy = 0.5 * dt * (Fx + Fx2), 0.5 * dt * (Fy + Fy2)
            if entropy:
                Px, Py = 0.5 * dt * (Px + Px2), 0.5 * dt * (Py + Py2)
        else:
            Fx, Fy = dt * Fx, dt * Fy
            if entropy:
                Px, Py = dt * Px, dt * Py
        new = U.copy()
        old_in = U[:, :, g:-g, g:-g]
        new[:, :, g:-g, g:-g] -= _div(Fx, Fy) / dx
        edges = xp.stack([Fx[:, :, 0, :], Fx[:, :, -1, :], Fy[:, :, :, 0], Fy[:, :, :, -1]], axis=2)
        ind = {}
        new_in = new[:, :, g:-g, g:-g]
        if entropy:
            S = (self.energy_density(new_in) - self.energy_density(old_in) + _div(Px[None], Py[None])[0] / dx) / dt
            ind["entropy"] = xp.abs(S) * dx
        if "gradient" in want:
            ind["gradient"] = undivided_difference(U[0], m, g, xp)
        return LevelStep(state=new, edges=edges, indicators=ind)


def _div(Fx: Any, Fy: Any) -> Any:
    return (Fx[:, :, 1:, :] - Fx[:, :, :-1, :]) + (Fy[:, :, :, 1:] - Fy[:, :, :, :-1])


def undivided_difference(q: Any, m: int, g: int, xp: Any) -> Any:
    """Clawpack's default flagging quantity: per cell the largest |q_neighbour - q| over the four
    neighbours (ghosts included).  ``q``: (nb, P, P) padded; returns (nb, m, m)."""
    c = q[:, g : g + m, g : g + m]
    return xp.maximum(
        xp.maximum(xp.abs(q[:, g + 1 : g + m + 1, g : g + m] - c), xp.abs(q[:, g - 1 : g + m - 1, g : g + m] - c)),
        xp.maximum(xp.abs(q[:, g : g + m, g + 1 : g + m + 1] - c), xp.abs(q[:, g : g + m, g - 1 : g + m - 1] - c)),
    )


def _xp(a: Any) -> Any:
    return np if isinstance(a, np.ndarray) else __import__("cupy")
