"""2-D diffusion ``u_t = D (u_xx + u_yy)``, conservative finite volume: face flux
``-D (u_R - u_L) / dx`` (the 5-point Laplacian), forward Euler in time with ``dt ~ dx²`` so the
scheme is second order overall.  Walls are zero-flux (mirror ghosts make the wall flux exactly 0).

Stability number of a cell: ``4 D dt / dx²`` (forward Euler is stable and satisfies the maximum
principle for <= 1); the scheme targets ``cfl`` and the watchdog's limit is 1.  Fine levels take
``time_ratio = 4`` substeps per coarse step because the stable dt scales with dx².

Refinement indicator ``truncation``: a Richardson estimate of the local truncation error of the
Laplacian, ``tau ~ (L_2h(R u) - R(L_h u)) / 3`` on each 2 x 2 group of cells (R = average onto
the 2x coarser lattice), times D.  The scheme conserves mass exactly and dissipates the discrete
energy ½∫u² exactly as its own discrete identity says, so neither reveals under-resolution; the
truncation estimate is what the discretisation does *not* satisfy and scales as dx² u_xxxx.
(The entropy-production analogue, (½u²)^{n+1} - (½u²)^n + div(u F) + D|grad u|², reduces
identically to the O(dt) time-stepping term ½(du)²/dt for this scheme: it measures the time error,
not the spatial one, so it is not used.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sims.grid import LevelStep
from sims.shallow_water import undivided_difference


class Diffusion:
    """Physics plug-in for :class:`sims.grid.Simulation`."""

    name = "diffusion"
    nvar = 1
    ghost = 1
    time_ratio = 4
    stages = 1
    flip_x = ()
    flip_y = ()
    limited = False
    courant_limit = 1.0
    bounded_var = 0
    mass_vars = (0,)
    indicator_names = ("truncation", "gradient")

    def __init__(self, D: float = 1.0, cfl: float = 0.9) -> None:
        if not (math.isfinite(D) and D > 0):
            raise ValueError(f"diffusivity D must be positive and finite, got {D!r}")
        if not (math.isfinite(cfl) and 0 < cfl <= 1):
            raise ValueError(f"cfl must lie in (0, 1], got {cfl!r}")
        self.D = float(D)
        self.cfl = float(cfl)

    def validate(self, vals: np.ndarray) -> None:
        return None

    # Forward Euler with 4 D dt / dx² <= 1 obeys the maximum principle exactly on a uniform grid;
    # at subcycled coarse/fine interfaces (time-interpolated ghosts + refluxing) it does not, and
    # undershoots of ~6e-6 of the range were measured on an under-resolved Gaussian.  The watchdog
    # therefore allows BOUND_SLACK of the initial range: an unstable step overshoots far more.
    BOUND_SLACK = 1e-3

    def bounds(self, vmin: float, vmax: float) -> tuple[float | None, float | None, bool]:
        """Maximum principle: values stay within the initial range (plus BOUND_SLACK of it)."""
        slack = self.BOUND_SLACK * max(vmax - vmin, abs(vmax), 1e-300)
        return vmin - slack, vmax + slack, False

    def energy_density(self, u: Any) -> Any:
        return 0.5 * u[0] * u[0]

    def courant(self, u: Any, dx: float, dt: float) -> Any:
        xp = np if isinstance(u, np.ndarray) else __import__("cupy")
        return xp.full(u.shape[1:], 4.0 * self.D * dt / (dx * dx))

    def stable_dt(self, u: Any, dx: float) -> float:
        return self.cfl * dx * dx / (4.0 * self.D)

    def step_level(self, sim: Any, level: int, U: Any, dt: float, t: float, want: tuple[str, ...]) -> LevelStep:
        xp = sim.xp
        spec = sim.spec
        m, g, dx = spec.m(level), spec.ghost, spec.h(level)
        sim._fill_ghosts(level, U, t)
        q = U[0]
        Fx = (-self.D * dt / dx) * (q[:, g : g + m + 1, g : g + m] - q[:, g - 1 : g + m, g : g + m])
        Fy = (-self.D * dt / dx) * (q[:, g : g + m, g : g + m + 1] - q[:, g : g + m, g - 1 : g + m])
        new = U.copy()
        new[0, :, g:-g, g:-g] -= ((Fx[:, 1:, :] - Fx[:, :-1, :]) + (Fy[:, :, 1:] - Fy[:, :, :-1])) / dx
        edges = xp.stack([Fx[:, 0, :], Fx[:, -1, :], Fy[:, :, 0], Fy[:, :, -1]], axis=1)[None]
        ind = {}
        if "truncation" in want:
            ind["truncation"] = self.D * richardson_truncation(q[:, g:-g, g:-g], dx, xp)
        if "gradient" in want:
            ind["gradient"] = undivided_difference(q, m, g, xp)
        return LevelStep(state=new, edges=edges, indicators=ind)


def _laplacian_edge_padded(u: Any, dx: float, xp: Any) -> Any:
    """5-point Laplacian of (nb, k, k) with edge replication (zero normal derivative at the
    block edge; the estimate is local, so edge cells only get a one-sided view)."""
    nb, k, _ = u.shape
    p = xp.empty((nb, k + 2, k + 2))  # edge replication by hand (np.pad costs more than the stencil);
    p[:, 1:-1, 1:-1] = u  # the corners are never read
    p[:, 0, 1:-1] = u[:, 0]
    p[:, -1, 1:-1] = u[:, -1]
    p[:, 1:-1, 0] = u[:, :, 0]
    p[:, 1:-1, -1] = u[:, :, -1]
    return (p[:, 2:, 1:-1] + p[:, :-2, 1:-1] + p[:, 1:-1, 2:] + p[:, 1:-1, :-2] - 4.0 * u) / (dx * dx)


def richardson_truncation(u: Any, dx: float, xp: Any = np) -> Any:
    """|tau| per cell (nb, m, m): |L_2h(R u) - R(L_h u)| / 3 on each 2 x 2 group, spread back to
    its four cells.  The three edge rows/columns of coarse cells are copied from the nearest
    interior coarse cell, where the edge-replicated stencil is not a truncation estimate."""
    nb, m, _ = u.shape
    k = m // 2
    Ru = u.reshape(nb, k, 2, k, 2).mean(axis=(2, 4))
    RLu = _laplacian_edge_padded(u, dx, xp).reshape(nb, k, 2, k, 2).mean(axis=(2, 4))
    tau = xp.abs(_laplacian_edge_padded(Ru, 2 * dx, xp) - RLu) / 3.0
    if k >= 3:
        tau[:, 0, :] = tau[:, 1, :]
        tau[:, -1, :] = tau[:, -2, :]
        tau[:, :, 0] = tau[:, :, 1]
        tau[:, :, -1] = tau[:, :, -2]
    return xp.repeat(xp.repeat(tau, 2, axis=1), 2, axis=2)
