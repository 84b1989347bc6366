"""Named test cases and a factory that builds a :class:`sims.grid.Simulation` for one.

* ``radial_dam_break`` — PyClaw's radial dam break
  (``examples/shallow_2d/radial_dam_break.py``): domain [-2.5, 2.5]², depth ``h_in`` = 2 inside
  radius 0.5 about the centre and ``h_out`` = 1 outside, at rest, g = 1, to t = 2.5, reflective walls.
* ``gaussian_diffusion`` — a Gaussian bump diffusing in [-1, 1]² with zero-flux walls.
* ``cosine_diffusion`` — ``1 + cos(pi x) cos(pi y)`` on [0, 1]², zero flux at the walls; the mode
  decays as exp(-2 pi² D t), an exact solution used for the convergence order.
* ``sw_smooth_hump`` — a small smooth depth hump at rest (no shock before t_end): convergence order.
* ``lake_at_rest`` — constant depth, no motion: nothing ever changes (a finer run gains nothing).

Initial cell averages are exact where a closed form exists (Gaussian, cosine) and otherwise
averaged over 8 x 8 sub-samples per cell, so the disc's staircase error is far below the scheme's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
from scipy.special import erf

from sims.diffusion import Diffusion
from sims.grid import GridSpec, Simulation
from sims.shallow_water import ShallowWater

SUBSAMPLES = 8


@dataclasses.dataclass(frozen=True)
class Case:
    """A named problem: physics, square domain, end time and the initial-condition function."""

    name: str
    physics: Any
    domain: tuple[float, float, float, float]
    t_end: float
    init: Callable[..., np.ndarray]
    params: dict[str, float]


def _finite(params: dict[str, float]) -> None:
    for k, v in params.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"case parameter {k} must be a finite number, got {v!r}")


def _subsampled(f: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def init(xlo, xhi, ylo, yhi):
        acc = np.zeros(np.shape(xlo))
        for p in range(SUBSAMPLES):
            x = xlo + (xhi - xlo) * (p + 0.5) / SUBSAMPLES
            for q in range(SUBSAMPLES):
                y = ylo + (yhi - ylo) * (q + 0.5) / SUBSAMPLES
                acc += f(x, y)
        return acc / SUBSAMPLES**2

    return init


def radial_dam_break(
    h_in: float = 2.0, h_out: float = 1.0, radius: float = 0.5, g: float = 1.0, t_end: float = 2.5, order: int = 2, cfl: float = 0.45,
    x0: float = 0.0, y0: float = 0.0,
) -> Case:
    """``x0``, ``y0``: the dam's centre (off-centre, its shock meets the walls early)."""
    params = dict(h_in=h_in, h_out=h_out, radius=radius, g=g, t_end=t_end, x0=x0, y0=y0)
    _finite(params)
    if h_in <= 0 or h_out <= 0:
        raise ValueError(f"depths must be positive, got h_in={h_in}, h_out={h_out}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    depth = _subsampled(lambda x, y: np.where((x - x0) ** 2 + (y - y0) ** 2 <= radius * radius, h_in, h_out))

    def init(xlo, xhi, ylo, yhi):
        h = depth(xlo, xhi, ylo, yhi)
        return np.stack([h, np.zeros_like(h), np.zeros_like(h)])

    return Case("radial_dam_break", ShallowWater(g=g, cfl=cfl, order=order), (-2.5, 2.5, -2.5, 2.5), t_end, init, params)


def sw_smooth_hump(amplitude: float = 0.1, width: float = 0.3, depth: float = 1.0, t_end: float = 0.3, order: int = 2, cfl: float = 0.45,
                   x0: float = 0.0, y0: float = 0.0) -> Case:
    """A hump at (``x0``, ``y0``) on a lake at rest."""
    params = dict(amplitude=amplitude, width=width, depth=depth, t_end=t_end, x0=x0, y0=y0)
    _finite(params)
    if depth <= 0 or depth - abs(amplitude) <= 0:
        raise ValueError(f"depth must stay positive: depth={depth}, amplitude={amplitude}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    hump = _subsampled(lambda x, y: depth + amplitude * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (width * width)))

    def init(xlo, xhi, ylo, yhi):
        h = hump(xlo, xhi, ylo, yhi)
        return np.stack([h, np.zeros_like(h), np.zeros_like(h)])

    return Case("sw_smooth_hump", ShallowWater(g=1.0, cfl=cfl, order=order), (-1.0, 1.0, -1.0, 1.0), t_end, init, params)


def lake_at_rest(depth: float = 1.0, t_end: float = 0.5) -> Case:
    params = dict(depth=depth, t_end=t_end)
    _finite(params)
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}")

    def init(xlo, xhi, ylo, yhi):
        h = np.full(np.shape(xlo), float(depth))
        return np.stack([h, np.zeros_like(h), np.zeros_like(h)])

    return Case("lake_at_rest", ShallowWater(g=1.0), (-1.0, 1.0, -1.0, 1.0), t_end, init, params)


def gaussian_diffusion(sigma: float = 0.1, amplitude: float = 1.0, D: float = 1.0, t_end: float = 0.02, x0: float = 0.0, y0: float = 0.0) -> Case:
    params = dict(sigma=sigma, amplitude=amplitude, D=D, t_end=t_end, x0=x0, y0=y0)
    _finite(params)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")

    def cdf(a, mu):
        return 0.5 * (1.0 + erf((a - mu) / (math.sqrt(2.0) * sigma)))

    def init(xlo, xhi, ylo, yhi):
        # exact cell average of amplitude * exp(-r²/2σ²)
        norm = amplitude * 2.0 * math.pi * sigma * sigma
        ax = cdf(xhi, x0) - cdf(xlo, x0)
        ay = cdf(yhi, y0) - cdf(ylo, y0)
        return (norm * ax * ay / ((xhi - xlo) * (yhi - ylo)))[None]

    return Case("gaussian_diffusion", Diffusion(D=D), (-1.0, 1.0, -1.0, 1.0), t_end, init, params)


def cosine_diffusion(D: float = 1.0, t_end: float = 0.02) -> Case:
    """u = 1 + cos(pi x) cos(pi y) on [0, 1]², zero flux at the walls.  Exact solution:
    1 + cos(pi x) cos(pi y) exp(-2 pi² D t)."""
    params = dict(D=D, t_end=t_end)
    _finite(params)

    def init(xlo, xhi, ylo, yhi):
        sx = (np.sin(np.pi * xhi) - np.sin(np.pi * xlo)) / (np.pi * (xhi - xlo))
        sy = (np.sin(np.pi * yhi) - np.sin(np.pi * ylo)) / (np.pi * (yhi - ylo))
        return (1.0 + sx * sy)[None]

    return Case("cosine_diffusion", Diffusion(D=D), (0.0, 1.0, 0.0, 1.0), t_end, init, params)


def cosine_exact(case: Case, xlo, xhi, ylo, yhi) -> np.ndarray:
    """Exact cell averages of ``cosine_diffusion`` at ``case.t_end``."""
    decay = math.exp(-2.0 * math.pi**2 * case.params["D"] * case.t_end)
    return 1.0 + (case.init(xlo, xhi, ylo, yhi)[0] - 1.0) * decay


CASES: dict[str, Callable[..., Case]] = {
    "radial_dam_break": radial_dam_break,
    "sw_smooth_hump": sw_smooth_hump,
    "lake_at_rest": lake_at_rest,
    "gaussian_diffusion": gaussian_diffusion,
    "cosine_diffusion": cosine_diffusion,
}


def make_case(name: str, **params: Any) -> Case:
    """The case ``name`` with ``params`` overriding its defaults; ValueError on an unknown name or
    an invalid parameter."""
    try:
        factory = CASES[name]
    except KeyError:
        raise ValueError(f"unknown case {name!r}; known cases: {', '.join(sorted(CASES))}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for case {name!r}: {exc}") from None


def build(
    case: Case | str,
    *,
    blocks: int,
    cells: int,
    max_level: int = 1,
    level: int | None = None,
    levels: Any = None,
    indicators: tuple[str, ...] = (),
    halo_cells: int = 3,
    t_end: float | None = None,
    prefer_gpu: bool = False,
) -> Simulation:
    """A :class:`Simulation` of ``case`` on ``blocks`` x ``blocks`` root blocks of ``cells``² cells.
    ``level``: start every block at that level (uniform run); ``levels``: per-block levels."""
    if isinstance(case, str):
        case = make_case(case)
    x0, x1, y0, y1 = case.domain
    spec = GridSpec(x0, x1, y0, y1, blocks=blocks, cells=cells, max_level=max_level, ghost=case.physics.ghost)
    if level is not None:
        if levels is not None:
            raise ValueError("give level or levels, not both")
        if not 0 <= level <= max_level:
            raise ValueError(f"level must lie in 0..{max_level}, got {level}")
        levels = np.full(spec.nblocks, level)
    return Simulation(
        case.physics,
        spec,
        case.init,
        t_end=case.t_end if t_end is None else t_end,
        levels=levels,
        indicators=indicators,
        halo_cells=halo_cells,
        prefer_gpu=prefer_gpu,
    )


def run_to_end(sim: Simulation, on_step: Callable[[Any], None] | None = None) -> Any:
    """Step ``sim`` until it finishes or halts; returns the last report."""
    report = None
    while not sim.finished:
        report = sim.step()
        if on_step is not None:
            on_step(report)
        if report.status == "unstable":
            break
    return report
