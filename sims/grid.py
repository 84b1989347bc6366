"""Block-structured grids: a root lattice of B x B blocks, each block n x n cells at level 0 and
refined by 2 per level, with ghost-cell exchange, conservative prolongation/restriction and the
sparse operators that do refluxing at coarse/fine faces.

Layout.  Level ``l`` holds every block at that level in one stacked array of shape
``(nvar, nb_l, P_l, P_l)`` with ``P_l = n * 2**l + 2 * ghost``: axis 2 is x, axis 3 is y, ghosts
pad both.  ``ids[l]`` lists the block ids at level ``l`` in slot order; a block id is
``bx * B + by``.  Blocks never overlap: every point of the domain is owned by exactly one block.

Ghost exchange is a fixed linear map per (target level, source level), rebuilt when the
topology changes: same-level sources copy, finer sources average (restriction), coarser sources
interpolate linearly from the coarse cell value plus its slopes (prolongation, second-order).
Walls mirror; the solver names the variables whose sign flips across an x or a y wall.

Invariant: block boundaries are aligned with every level's cell lattice, so each ghost cell lies in
exactly one owning block and each coarse/fine face pairs one coarse face with 2**(dl) fine faces.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import scipy.sparse as sp

WEST, EAST, SOUTH, NORTH = 0, 1, 2, 3
OPPOSITE = {WEST: EAST, EAST: WEST, SOUTH: NORTH, NORTH: SOUTH}


def array_module(prefer_gpu: bool = True) -> tuple[Any, Any]:
    """``(xp, sparse)``: CuPy and ``cupyx.scipy.sparse`` when CuPy imports and a trivial device
    operation succeeds, else NumPy and ``scipy.sparse``."""
    if prefer_gpu:
        try:
            import cupy  # type: ignore[import-not-found]
            import cupyx.scipy.sparse as cusparse  # type: ignore[import-not-found]

            if int((cupy.arange(4) + 1).sum()) == 10:
                return cupy, cusparse
        except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
            pass
    return np, sp


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """Geometry of a block-structured grid.

    ``blocks``: root blocks per side (B).  ``cells``: cells per block side at level 0 (n, even,
    at least 4).  ``max_level``: how many times a block may be refined by 2.  ``ghost``: ghost
    layers (1 for a 5-point stencil, 2 for MUSCL).
    """

    x0: float
    x1: float
    y0: float
    y1: float
    blocks: int
    cells: int
    max_level: int = 1
    ghost: int = 2

    def __post_init__(self) -> None:
        for name in ("x0", "x1", "y0", "y1"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"GridSpec.{name} must be finite, got {getattr(self, name)!r}")
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"empty domain [{self.x0}, {self.x1}] x [{self.y0}, {self.y1}]")
        if not math.isclose(self.x1 - self.x0, self.y1 - self.y0, rel_tol=1e-12):
            raise ValueError("the domain must be square (cells are square)")
        if self.blocks < 1:
            raise ValueError(f"need at least one block per side, got blocks={self.blocks}")
        if self.cells < 4 or self.cells % 2:
            raise ValueError(f"cells per block side must be even and >= 4, got cells={self.cells}")
        if not 0 <= self.max_level <= 4:
            raise ValueError(f"max_level must be in 0..4, got {self.max_level}")
        if self.ghost not in (1, 2):
            raise ValueError(f"ghost must be 1 or 2, got {self.ghost}")

    @property
    def block_size(self) -> float:
        return (self.x1 - self.x0) / self.blocks

    def m(self, level: int) -> int:
        """Cells per block side at ``level``."""
        return self.cells << level

    def h(self, level: int) -> float:
        """Cell width at ``level``."""
        return self.block_size / self.m(level)

    def padded(self, level: int) -> int:
        return self.m(level) + 2 * self.ghost

    @property
    def nblocks(self) -> int:
        return self.blocks * self.blocks


def minmod(a: Any, b: Any, xp: Any = np) -> Any:
    return xp.where(a * b > 0, xp.sign(a) * xp.minimum(xp.abs(a), xp.abs(b)), 0.0)


def interior_slopes(u: Any, axis: int, limited: bool, xp: Any = np) -> Any:
    """Undivided slopes (per cell) of ``u`` along ``axis`` using only cells of the same block.

    ``u``: (..., nb, m, m) interior values.  Interior cells use the centred difference (minmod of
    the one-sided ones when ``limited``); the two edge cells use the nearest inward pair, so no
    ghost data (possibly stale) enters prolongation.
    """
    d = xp.diff(u, axis=axis)
    n = u.shape[axis]

    def take(a: Any, sl: slice) -> Any:
        idx = [slice(None)] * a.ndim
        idx[axis] = sl
        return a[tuple(idx)]

    s = xp.empty_like(u)
    lo, hi = take(d, slice(0, n - 2)), take(d, slice(1, n - 1))
    idx = [slice(None)] * u.ndim
    idx[axis] = slice(1, n - 1)
    s[tuple(idx)] = minmod(lo, hi, xp) if limited else 0.5 * (lo + hi)
    idx[axis] = slice(0, 1)
    s[tuple(idx)] = minmod(take(d, slice(0, 1)), take(d, slice(1, 2)), xp) if limited else take(d, slice(0, 1))
    idx[axis] = slice(n - 1, n)
    s[tuple(idx)] = (
        minmod(take(d, slice(n - 2, n - 1)), take(d, slice(n - 3, n - 2)), xp) if limited else take(d, slice(n - 2, n - 1))
    )
    return s


@dataclasses.dataclass
class _GhostOps:
    """Ghost exchange for one target level: ``targets`` are flat indices into the padded per-variable
    array; ``value[src]`` / ``slope_x[src]`` / ``slope_y[src]`` map the source level's flat padded
    array to ghost values; ``wall_flip_x/y`` list rows whose sign flips for x/y-normal variables."""

    targets: Any
    value: dict[int, Any]
    slope_x: dict[int, Any]
    slope_y: dict[int, Any]
    flip_rows_x: Any
    flip_rows_y: Any
    #: coarser source level -> the slots of its blocks that the matrices read (ascending); their
    #: columns index the array of just those blocks, so time interpolation and slopes are computed
    #: for the blocks next to the finer level only, not the whole coarser level
    src_slots: dict[int, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _RefluxOps:
    """Refluxing for one coarse level: ``targets`` flat padded indices of corrected coarse cells;
    ``own`` maps the level's own integrated edge fluxes, ``fine[l2]`` level l2's accumulated ones.
    Correction (added to cell values): (own @ E_own - sum fine[l2] @ A_l2) / h."""

    targets: Any
    own: Any
    fine: dict[int, Any]


class BlockTopology:
    """Which block sits at which level, plus the ghost-exchange and reflux operators.

    Pure index arithmetic (NumPy); arrays live in :class:`sims.diffusion` / solvers.
    """

    def __init__(self, spec: GridSpec, levels: np.ndarray, sparse: Any = sp, nvar: int = 1,
                 fold_slopes: bool = False) -> None:
        levels = np.asarray(levels, dtype=np.int64).reshape(-1)
        if levels.shape != (spec.nblocks,):
            raise ValueError(f"levels must have {spec.nblocks} entries, got {levels.shape}")
        if levels.min() < 0 or levels.max() > spec.max_level:
            raise ValueError(f"block levels must lie in 0..{spec.max_level}")
        self.spec = spec
        self.levels = levels
        self.sparse = sparse
        self.nvar = nvar
        #: unlimited (linear) slopes: fold them into the coarse-to-fine ghost operator at build time
        self.fold_slopes = fold_slopes
        self.ids = [np.flatnonzero(levels == lv) for lv in range(spec.max_level + 1)]
        self.slot = np.empty(spec.nblocks, dtype=np.int64)
        for lv, ids in enumerate(self.ids):
            self.slot[ids] = np.arange(len(ids))
        self.ghost_ops = [self._build_ghost(lv) for lv in range(spec.max_level + 1)]
        self.reflux_ops = [self._build_reflux(lv) for lv in range(spec.max_level + 1)]

    # --- geometry helpers ---------------------------------------------------------------------

    def neighbour(self, block: int, side: int) -> int | None:
        B = self.spec.blocks
        bx, by = divmod(int(block), B)
        bx += {WEST: -1, EAST: 1}.get(side, 0)
        by += {SOUTH: -1, NORTH: 1}.get(side, 0)
        if 0 <= bx < B and 0 <= by < B:
            return bx * B + by
        return None

    def _flat(self, level: int, slot: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        P = self.spec.padded(level)
        return (slot * P + i) * P + j

    def _owner_cells(self, level: int, I: np.ndarray, J: np.ndarray):
        """For level-``level`` lattice cells (I, J) inside the domain, yield per source level the rows
        and weights of the exchange (value, slope_x, slope_y) as COO pieces."""
        spec = self.spec
        m = spec.m(level)
        g = spec.ghost
        owner = (I // m) * spec.blocks + (J // m)
        olv = self.levels[owner]
        out: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {}
        rows = np.arange(len(I))
        for src in np.unique(olv):
            sel = olv == src
            r, blk = rows[sel], owner[sel]
            slot = self.slot[blk]
            ms = spec.m(src)
            bx, by = divmod(blk, spec.blocks)
            if src == level:
                cols = self._flat(src, slot, I[sel] - bx * ms + g, J[sel] - by * ms + g)
                out.setdefault(src, []).append((r, cols, np.ones(len(r)), np.zeros(len(r)), np.zeros(len(r))))
            elif src > level:
                ratio = 1 << (src - level)
                w = 1.0 / (ratio * ratio)
                for p in range(ratio):
                    for q in range(ratio):
                        ii = I[sel] * ratio + p - bx * ms + g
                        jj = J[sel] * ratio + q - by * ms + g
                        cols = self._flat(src, slot, ii, jj)
                        out.setdefault(src, []).append((r, cols, np.full(len(r), w), np.zeros(len(r)), np.zeros(len(r))))
            else:
                ratio = 1 << (level - src)
                Ic, Jc = I[sel] // ratio, J[sel] // ratio
                dx = ((I[sel] % ratio) + 0.5) / ratio - 0.5
                dy = ((J[sel] % ratio) + 0.5) / ratio - 0.5
                cols = self._flat(src, slot, Ic - bx * ms + g, Jc - by * ms + g)
                out.setdefault(src, []).append((r, cols, np.ones(len(r)), dx, dy))
        return out

    def _build_ghost(self, level: int) -> _GhostOps | None:
        spec = self.spec
        ids = self.ids[level]
        if len(ids) == 0:
            return None
        m, g, P = spec.m(level), spec.ghost, spec.padded(level)
        M = spec.blocks * m
        # every (slot, i, j) ghost position of the four side strips (corners are never read)
        a = np.arange(g)
        inner = np.arange(g, g + m)
        strips = [
            np.stack(np.meshgrid(a, inner, indexing="ij"), -1).reshape(-1, 2),
            np.stack(np.meshgrid(a + g + m, inner, indexing="ij"), -1).reshape(-1, 2),
            np.stack(np.meshgrid(inner, a, indexing="ij"), -1).reshape(-1, 2),
            np.stack(np.meshgrid(inner, a + g + m, indexing="ij"), -1).reshape(-1, 2),
        ]
        local = np.concatenate(strips)
        slots = np.repeat(np.arange(len(ids)), len(local))
        li = np.tile(local[:, 0], len(ids))
        lj = np.tile(local[:, 1], len(ids))
        bx, by = divmod(ids[slots], spec.blocks)
        I = bx * m + li - g
        J = by * m + lj - g
        flip_x = (I < 0) | (I >= M)
        flip_y = (J < 0) | (J >= M)
        I = np.where(I < 0, -1 - I, np.where(I >= M, 2 * M - 1 - I, I))
        J = np.where(J < 0, -1 - J, np.where(J >= M, 2 * M - 1 - J, J))
        targets = self._flat(level, slots, li, lj)
        pieces = self._owner_cells(level, I, J)
        n_t = len(targets)
        value, slope_x, slope_y, src_slots = {}, {}, {}, {}
        for src, parts in pieces.items():
            r = np.concatenate([p[0] for p in parts])
            c = np.concatenate([p[1] for p in parts])
            ncols = len(self.ids[src]) * spec.padded(src) ** 2
            if src < level:  # read from the used blocks only (see _GhostOps.src_slots)
                cell = spec.padded(src) ** 2
                used, pos = np.unique(c // cell, return_inverse=True)
                c = pos.ravel() * cell + c % cell
                ncols = len(used) * cell
                src_slots[src] = used
            shape = (n_t, ncols)
            w = np.concatenate([p[2] for p in parts])
            if src < level and self.fold_slopes:  # value + linear slopes: one operator, no slope pass
                Ps, ms = spec.padded(src), spec.m(src)
                wx = np.concatenate([p[3] for p in parts])
                wy = np.concatenate([p[4] for p in parts])
                rs, cs, ws = [r], [c], [w]
                for wd, stride, at in ((wx, Ps, (c % (Ps * Ps)) // Ps - g), (wy, 1, c % Ps - g)):
                    # the unlimited slope of interior_slopes: centred inside, one-sided at the two edges
                    up = np.where(at == 0, 1.0, np.where(at == ms - 1, 0.0, 0.5)) * wd
                    down = np.where(at == 0, 0.0, np.where(at == ms - 1, 1.0, 0.5)) * wd
                    mid = np.where(at == 0, -wd, np.where(at == ms - 1, wd, 0.0))
                    rs += [r, r, r]
                    cs += [c + stride, c - stride, c]
                    ws += [up, -down, mid]
                value[src] = self._csr(np.concatenate(ws), np.concatenate(rs), np.concatenate(cs), shape)
                continue
            value[src] = self._csr(w, r, c, shape)
            if src < level:
                slope_x[src] = self._csr(np.concatenate([p[3] for p in parts]), r, c, shape)
                slope_y[src] = self._csr(np.concatenate([p[4] for p in parts]), r, c, shape)
        return _GhostOps(
            targets=targets,
            value=value,
            slope_x=slope_x,
            slope_y=slope_y,
            flip_rows_x=np.flatnonzero(flip_x),
            flip_rows_y=np.flatnonzero(flip_y),
            src_slots=src_slots,
        )

    def _csr(self, w: np.ndarray, r: np.ndarray, c: np.ndarray, shape: tuple[int, int]) -> Any:
        """The CSR matrix of COO entries (w, r, c) of ``shape``, repeated block-diagonally for each
        of the ``nvar`` variables (``kron(I_nvar, M)``: it maps a level's whole ``(nvar, ...)``
        array, flattened, in one product, without copying it), built directly in canonical form
        (rows, then columns within a row, ascending: what ``sp.csr_matrix((w, (r, c)))`` gives
        after its sort) without SciPy's COO round trip, which cost more than the rest of a regrid."""
        nv = self.nvar
        r = np.concatenate([np.asarray(r, dtype=np.int64) + v * shape[0] for v in range(nv)])
        c = np.concatenate([np.asarray(c, dtype=np.int64) + v * shape[1] for v in range(nv)])
        w = np.tile(np.asarray(w, dtype=np.float64), nv)
        shape = (nv * shape[0], nv * shape[1])
        order = np.lexsort((c, r))
        r, c, w = r[order], c[order], np.asarray(w, dtype=np.float64)[order]
        dup = (r[1:] == r[:-1]) & (c[1:] == c[:-1])
        if dup.any():  # sum repeated entries (in sorted order)
            starts = np.flatnonzero(np.concatenate([[True], ~dup]))
            r, c, w = r[starts], c[starts], np.add.reduceat(w, starts)
        indptr = np.zeros(shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=shape[0]), out=indptr[1:])
        idx = np.int32 if max(shape) < 2**31 - 1 and len(c) < 2**31 - 1 else np.int64
        mat = sp.csr_matrix((w, c.astype(idx), indptr.astype(idx)), shape=shape)
        mat.has_sorted_indices = True
        mat.has_canonical_format = True
        return mat if self.sparse is sp else self.sparse.csr_matrix(mat)

    def _build_reflux(self, level: int) -> _RefluxOps | None:
        """Coarse cells of ``level`` that touch a finer block get their face flux replaced by the
        time- and length-average of the fine fluxes (Berger-Colella refluxing).  Built for every
        (block, side) pair of the level at once; rows are numbered in order of first appearance
        over (block, side, cell along the side)."""
        spec = self.spec
        ids = self.ids[level]
        if len(ids) == 0:
            return None
        m, g, B = spec.m(level), spec.ghost, spec.blocks
        nb = len(ids)
        slot = np.repeat(np.arange(nb), 4)  # (block, side) pairs, block-major: the loop order
        side = np.tile(np.arange(4), nb)
        bx, by = divmod(ids[slot], B)
        nx = bx + np.array([-1, 1, 0, 0])[side]
        ny = by + np.array([0, 0, -1, 1])[side]
        inside = (nx >= 0) & (nx < B) & (ny >= 0) & (ny < B)
        nbr = np.where(inside, nx * B + ny, 0)
        keep = inside & (self.levels[nbr] > level)
        if not keep.any():
            return None
        slot, side, nbr = slot[keep], side[keep], nbr[keep]
        fl = self.levels[nbr]
        k = np.arange(m)
        edge = np.array([g, g + m - 1, 0, 0])[side][:, None]  # the fixed index of each side's cells
        along = k[None, :] + g
        ci = np.where((side < 2)[:, None], edge, along)
        cj = np.where((side < 2)[:, None], along, np.array([0, 0, g, g + m - 1])[side][:, None])
        flat = self._flat(level, slot[:, None], ci, cj).ravel()
        _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        rows = rank[inverse.ravel()].reshape(-1, m)
        targets = np.empty(len(first), dtype=np.int64)
        targets[rank] = flat[first]
        sign = np.where((side == EAST) | (side == NORTH), 1.0, -1.0)[:, None]
        n_t = len(targets)
        own = self._csr(np.broadcast_to(sign, rows.shape).ravel(), rows.ravel(),
                        ((slot * 4 + side)[:, None] * m + k[None, :]).ravel(), (n_t, nb * 4 * m))
        opposite = np.array([OPPOSITE[sd] for sd in range(4)])[side]
        fine = {}
        for f in np.unique(fl).tolist():
            sel = fl == f
            ratio, mf = 1 << (f - level), spec.m(f)
            q = np.arange(ratio)
            r = np.broadcast_to(rows[sel][:, None, :], (int(sel.sum()), ratio, m))
            c = ((self.slot[nbr[sel]] * 4 + opposite[sel])[:, None, None] * mf + k[None, None, :] * ratio
                 + q[None, :, None])
            w = np.broadcast_to((sign[sel] / ratio)[:, :, None], r.shape)
            fine[f] = self._csr(w.ravel(), r.ravel(), c.ravel(), (n_t, len(self.ids[f]) * 4 * mf))
        return _RefluxOps(targets=targets, own=own, fine=fine)

    # --- statistics ---------------------------------------------------------------------------

    def cell_count(self) -> int:
        return int(sum(len(ids) * self.spec.m(lv) ** 2 for lv, ids in enumerate(self.ids)))

    def refined_cells(self) -> int:
        """Cells in blocks above level 0."""
        return int(sum(len(ids) * self.spec.m(lv) ** 2 for lv, ids in enumerate(self.ids) if lv > 0))


# --------------------------------------------------------------------------------------------
# The simulation: Berger-Oliger subcycling on the block hierarchy, with refluxing.
# --------------------------------------------------------------------------------------------


class SimulationHalted(RuntimeError):
    """step() on a run that went unstable (or finished); restore() a snapshot to go on."""


@dataclasses.dataclass
class LevelStep:
    """What a physics step of one level returns: the new padded state, the time-integrated edge
    fluxes ``(nvar, nb, 4, m)`` (for refluxing), and per-cell indicator fields ``(nb, m, m)``."""

    state: Any
    edges: Any
    indicators: dict[str, Any]


class Simulation:
    """A conservative finite-volume run on a block-structured grid.

    ``physics`` supplies the scheme (see :class:`sims.diffusion.Diffusion`,
    :class:`sims.shallow_water.ShallowWater`); ``init(xlo, xhi, ylo, yhi)`` returns cell averages
    ``(nvar, *shape)`` over the given cell bounds.  ``levels``: initial level per block id.

    Time stepping (Berger-Oliger): one :meth:`step` advances level 0 by ``dt``, then each finer
    level ``time_ratio`` times by ``dt / time_ratio``, recursively; coarse ghost values are
    interpolated linearly in time; afterwards each coarse cell next to a finer block has its face
    flux replaced by the time-integrated fine fluxes (refluxing), so the sum of every conserved
    variable is preserved to round-off whatever the mix of levels.

    ``indicators``: which local refinement indicators to compute (they cost a few array passes a
    step; uniform baselines pass ``()``).
    """

    def __init__(
        self,
        physics: Any,
        spec: GridSpec,
        init: Any,
        *,
        t_end: float,
        levels: Any = None,
        indicators: tuple[str, ...] = (),
        halo_cells: int = 3,
        prefer_gpu: bool = False,
    ) -> None:
        if spec.ghost < physics.ghost:
            raise ValueError(f"{physics.name} needs ghost >= {physics.ghost}, grid has {spec.ghost}")
        if not (math.isfinite(t_end) and t_end > 0):
            raise ValueError(f"t_end must be a positive finite number, got {t_end!r}")
        unknown = set(indicators) - set(physics.indicator_names)
        if unknown:
            raise ValueError(f"unknown indicators {sorted(unknown)}; {physics.name} offers {physics.indicator_names}")
        self.physics = physics
        self.spec = spec
        self.t_end = float(t_end)
        self.indicator_names = tuple(indicators)
        self.halo_cells = int(halo_cells)
        self.xp, self.sparse = array_module(prefer_gpu)
        if levels is None:
            levels = np.zeros(spec.nblocks, dtype=np.int64)
        self.topo = BlockTopology(spec, levels, self.sparse, physics.nvar, not physics.limited)
        self._neighbours = np.array(
            [[-1 if (n := self.topo.neighbour(b, s)) is None else n for s in range(4)] for b in range(spec.nblocks)]
        )
        self.U = [self._sample(init, lv) for lv in range(spec.max_level + 1)]
        self.time = 0.0
        self.steps = 0
        self.total_cell_updates = 0
        self.dt_factor = 1.0
        self.halted = False
        self._init_mass = self._mass()
        self._energy = self._energy_total()
        self._bounds = physics.bounds(self._values_min(), self._values_max())
        self._ind_own: dict[str, list] = {}
        self._ind_strip: dict[str, list] = {}

    # --- state construction ---------------------------------------------------------------------

    def _cell_bounds(self, level: int, ids: np.ndarray):
        spec = self.spec
        m, h = spec.m(level), spec.h(level)
        bx, by = divmod(ids, spec.blocks)
        k = np.arange(m)
        xlo = spec.x0 + bx[:, None] * spec.block_size + k[None, :] * h
        ylo = spec.y0 + by[:, None] * spec.block_size + k[None, :] * h
        XL = np.broadcast_to(xlo[:, :, None], (len(ids), m, m))
        YL = np.broadcast_to(ylo[:, None, :], (len(ids), m, m))
        return XL, XL + h, YL, YL + h

    def _empty(self, level: int, nb: int) -> Any:
        P = self.spec.padded(level)
        return self.xp.zeros((self.physics.nvar, nb, P, P))

    def _sample(self, init: Any, level: int) -> Any:
        ids = self.topo.ids[level]
        arr = self._empty(level, len(ids))
        if len(ids):
            vals = np.asarray(init(*self._cell_bounds(level, ids)), dtype=np.float64)
            if vals.shape != (self.physics.nvar, len(ids), self.spec.m(level), self.spec.m(level)):
                raise ValueError(f"initial condition returned shape {vals.shape}")
            if not np.isfinite(vals).all():
                raise ValueError("initial condition has non-finite values")
            self.physics.validate(vals)
            g = self.spec.ghost
            arr[:, :, g:-g, g:-g] = self.xp.asarray(vals)
        return arr

    def interior(self, level: int) -> Any:
        g = self.spec.ghost
        return self.U[level][:, :, g:-g, g:-g]

    # --- ghost exchange -------------------------------------------------------------------------

    def _source(self, src: int, level: int, t: float, slots: Any = None) -> Any:
        """Level ``src`` as seen by ``level`` at time ``t``: coarser levels interpolated in time.
        ``slots``: only these blocks of the source (all when None)."""
        U = self.U[src] if slots is None else self.U[src][:, slots]
        if src >= level:
            return U
        t0, t1 = self._t_old[src], self._t[src]
        if t1 <= t0 or t >= t1:
            return U
        a = (t - t0) / (t1 - t0)
        old = self._U_old[src] if slots is None else self._U_old[src][:, slots]
        return old + a * (U - old)

    def _fill_ghosts(self, level: int, arr: Any, t: float) -> None:
        ops = self.topo.ghost_ops[level]
        ph, xp, g = self.physics, self.xp, self.spec.ghost
        srcs = {s: (arr if s == level else self._source(s, level, t, ops.src_slots.get(s))) for s in ops.value}
        slopes = {}
        for s in ops.slope_x:
            inner = srcs[s][:, :, g:-g, g:-g]
            sx = xp.zeros_like(srcs[s])
            sy = xp.zeros_like(srcs[s])
            sx[:, :, g:-g, g:-g] = interior_slopes(inner, 2, ph.limited, xp)
            sy[:, :, g:-g, g:-g] = interior_slopes(inner, 3, ph.limited, xp)
            slopes[s] = (sx, sy)
        # all variables in one product per operator (the operators are kron(I_nvar, M))
        vals = None
        for s, mat in ops.value.items():
            part = mat @ srcs[s].reshape(-1)
            if s in slopes:
                part = part + ops.slope_x[s] @ slopes[s][0].reshape(-1) + ops.slope_y[s] @ slopes[s][1].reshape(-1)
            vals = part if vals is None else vals + part
        vals = vals.reshape(ph.nvar, -1)
        for v in ph.flip_x:
            vals[v, ops.flip_rows_x] *= -1.0
        for v in ph.flip_y:
            vals[v, ops.flip_rows_y] *= -1.0
        arr.reshape(ph.nvar, -1)[:, ops.targets] = vals

    # --- time stepping --------------------------------------------------------------------------

    def stable_dt(self) -> float:
        """The root-level dt that keeps every level within the scheme's target Courant number."""
        r = self.physics.time_ratio
        best = math.inf
        for lv in range(self.spec.max_level + 1):
            if len(self.topo.ids[lv]):
                best = min(best, self.physics.stable_dt(self.interior(lv), self.spec.h(lv)) * r**lv)
        return best

    def set_dt_factor(self, factor: float) -> None:
        """Scale the stable dt by ``factor`` (0 < factor <= 8; > 1 breaks the CFL watchdog on
        purpose, which tests use)."""
        if not (math.isfinite(factor) and 0.0 < factor <= 8.0):
            raise ValueError(f"dt factor must lie in (0, 8], got {factor!r}")
        self.dt_factor = float(factor)

    def _level_step(self, level: int, dt: float, t: float, want: tuple[str, ...]) -> LevelStep:
        return self.physics.step_level(self, level, self.U[level], dt, t, want)

    def _advance(self, level: int, dt: float, last: bool) -> None:
        L = self.spec.max_level
        ids = self.topo.ids[level]
        for f in range(level + 1, L + 1):
            if len(self.topo.ids[f]):
                self._acc[f][level] = None
        res = None
        self._t_old[level] = self._t[level]
        if len(ids):
            self._U_old[level] = self.U[level]
            want = self.indicator_names if last else ()
            res = self._level_step(level, dt, self._t[level], want)
            self.U[level] = res.state
            self._dt_used[level] = dt
            for c in range(level):
                prev = self._acc[level].get(c)
                self._acc[level][c] = res.edges if prev is None else prev + res.edges
            self._updates += len(ids) * self.spec.m(level) ** 2 * self.physics.stages
            for name, field in res.indicators.items():
                own, strips = _block_max(field, self.halo_cells, self.xp)
                self._ind_own[name][level] = own
                self._ind_strip[name][level] = strips
        self._t[level] = self._t_old[level] + dt
        if level < L and any(len(self.topo.ids[f]) for f in range(level + 1, L + 1)):
            r = self.physics.time_ratio
            for k in range(r):
                self._advance(level + 1, dt / r, last and k == r - 1)
            self._t[level + 1] = self._t[level]
        if res is not None:
            self._reflux(level, res.edges)

    def _reflux(self, level: int, edges: Any) -> None:
        ops = self.topo.reflux_ops[level]
        if ops is None:
            return
        h, nv = self.spec.h(level), self.physics.nvar
        corr = ops.own @ edges.reshape(-1)  # every variable at once (kron(I_nvar, M) operators)
        for f, mat in ops.fine.items():
            corr = corr - mat @ self._acc[f][level].reshape(-1)
        self.U[level].reshape(nv, -1)[:, ops.targets] += corr.reshape(nv, -1) / h

    def step(self) -> Any:
        """Advance one root step (clipped to ``t_end``) and return the watchdog's
        :class:`sims.invariants.StepReport`.  A step that produces non-finite values or breaks
        positivity halts the run (``status == "unstable"``); further calls raise
        :class:`SimulationHalted`."""
        if self.halted:
            raise SimulationHalted("the run is halted (unstable); restore a snapshot to continue")
        if self.finished:
            raise SimulationHalted(f"the run reached t_end={self.t_end}")
        L = self.spec.max_level
        dt_stable = self.stable_dt()
        if not math.isfinite(dt_stable) or dt_stable <= 0:
            self.halted = True
            return self._report(0.0, 0, ("non_finite",))
        dt = min(dt_stable * self.dt_factor, self.t_end - self.time)
        self._t = [self.time] * (L + 1)
        self._t_old = [self.time] * (L + 1)
        self._U_old = [None] * (L + 1)
        self._acc: list[dict[int, Any]] = [{} for _ in range(L + 1)]
        self._dt_used = [dt / self.physics.time_ratio**lv for lv in range(L + 1)]
        self._updates = 0
        for name in self.indicator_names:
            self._ind_own[name] = [None] * (L + 1)
            self._ind_strip[name] = [None] * (L + 1)
        with np.errstate(all="ignore"):
            self._advance(0, dt, True)
        self.time = self.time + dt if self.t_end - self.time - dt > 1e-12 * self.t_end else self.t_end
        self.steps += 1
        self.total_cell_updates += self._updates
        return self._report(dt, self._updates, ())

    # --- invariants -----------------------------------------------------------------------------

    def _mass(self) -> np.ndarray:
        tot = np.zeros(self.physics.nvar)
        for lv in range(self.spec.max_level + 1):
            if len(self.topo.ids[lv]):
                tot += _np(self.interior(lv).sum(axis=(1, 2, 3))) * self.spec.h(lv) ** 2
        return tot

    def _energy_total(self) -> float:
        return float(
            sum(
                float(self.physics.energy_density(self.interior(lv)).sum()) * self.spec.h(lv) ** 2
                for lv in range(self.spec.max_level + 1)
                if len(self.topo.ids[lv])
            )
        )

    def _values_min(self) -> float:
        v = self.physics.bounded_var
        return min(float(self.interior(lv)[v].min()) for lv in range(self.spec.max_level + 1) if len(self.topo.ids[lv]))

    def _values_max(self) -> float:
        v = self.physics.bounded_var
        return max(float(self.interior(lv)[v].max()) for lv in range(self.spec.max_level + 1) if len(self.topo.ids[lv]))

    def _report(self, dt: float, updates: int, forced: tuple[str, ...]) -> Any:
        from sims import invariants as inv

        spec, ph, xp = self.spec, self.physics, self.xp
        N = spec.nblocks
        bmin = np.full(N, np.nan)
        bcour = np.zeros(N)
        benergy = np.zeros(N)
        finite = True
        for lv in range(spec.max_level + 1):
            ids = self.topo.ids[lv]
            if not len(ids):
                continue
            u = self.interior(lv)
            finite = finite and bool(xp.isfinite(u).all())
            bmin[ids] = _np(u[ph.bounded_var].min(axis=(1, 2)))
            h = spec.h(lv)
            dtl = dt / ph.time_ratio**lv
            if dtl > 0:
                bcour[ids] = _np(ph.courant(u, h, dtl).max(axis=(1, 2)))
            benergy[ids] = _np(ph.energy_density(u).sum(axis=(1, 2))) * h * h
        mass = self._mass()
        mv = list(ph.mass_vars)
        drift = float(np.max(np.abs(mass[mv] - self._init_mass[mv]) / np.maximum(np.abs(self._init_mass[mv]), 1e-300)))
        energy = float(benergy.sum())
        g = inv.GlobalInvariants(
            mass=tuple(float(x) for x in mass),
            mass_rel_drift=drift if finite else math.inf,
            energy=energy,
            energy_rel_change=(energy - self._energy) / abs(self._energy) if self._energy else 0.0,
            min_value=float(np.nanmin(bmin)) if finite else math.nan,
            max_value=self._values_max() if finite else math.nan,
            courant=float(bcour.max()),
            finite=finite,
        )
        lo, hi, strict = self._bounds
        breaches = forced or inv.global_breaches(
            g, previous_energy=self._energy, courant_limit=ph.courant_limit, lower_bound=lo, upper_bound=hi, strict_lower=strict
        )
        self._energy = energy if finite else self._energy
        indicators = {}
        for name in self.indicator_names:
            own = np.zeros(N)
            strips = np.zeros((N, 4))
            for lv in range(spec.max_level + 1):
                o = self._ind_own.get(name, [None] * (lv + 1))[lv]
                if o is not None:
                    own[self.topo.ids[lv]] = o
                    strips[self.topo.ids[lv]] = self._ind_strip[name][lv]
            indicators[name] = inv.with_halo(own, strips, self._neighbours)
        block_breaches = {
            inv.CFL: np.flatnonzero(bcour > ph.courant_limit),
            inv.POSITIVITY: np.flatnonzero(~(bmin > lo) if strict else bmin < (lo if lo is not None else -np.inf)),
        }
        unstable = inv.FINITE in breaches or (strict and inv.POSITIVITY in breaches)
        if unstable:
            self.halted = True
        status = "unstable" if unstable else ("finished" if self.time >= self.t_end else "ok")
        return inv.StepReport(
            step=self.steps,
            time=self.time,
            dt=dt,
            dt_factor=self.dt_factor,
            cell_updates=updates,
            total_cell_updates=self.total_cell_updates,
            cells=self.topo.cell_count(),
            levels=self.topo.levels.copy(),
            block_min=bmin,
            block_courant=bcour,
            block_energy=benergy,
            indicators=indicators,
            globals=g,
            breaches=tuple(breaches),
            block_breaches=block_breaches,
            status=status,
        )

    @property
    def finished(self) -> bool:
        return self.time >= self.t_end

    # --- regridding -----------------------------------------------------------------------------

    def refine(self, block_ids: Any) -> list[int]:
        """Refine the given blocks by one level (conservative, slope-limited prolongation).
        Blocks already at ``max_level`` are skipped; returns the ids actually refined."""
        ids = self._check_ids(block_ids)
        todo = [b for b in ids if self.topo.levels[b] < self.spec.max_level]
        if todo:
            new = self.topo.levels.copy()
            new[todo] += 1
            self._regrid(new)
        return todo

    def coarsen(self, block_ids: Any) -> list[int]:
        """Coarsen the given blocks by one level (average of 2 x 2 children, conservative).
        Blocks at level 0 are skipped; returns the ids actually coarsened."""
        ids = self._check_ids(block_ids)
        todo = [b for b in ids if self.topo.levels[b] > 0]
        if todo:
            new = self.topo.levels.copy()
            new[todo] -= 1
            self._regrid(new)
        return todo

    def _check_ids(self, block_ids: Any) -> list[int]:
        out = []
        for b in np.atleast_1d(np.asarray(block_ids)).tolist():
            if not isinstance(b, int) or not 0 <= b < self.spec.nblocks:
                raise ValueError(f"unknown block id {b!r}; ids are 0..{self.spec.nblocks - 1}")
            out.append(b)
        return sorted(set(out))

    def _regrid(self, new_levels: np.ndarray) -> None:
        """Move every block's interior to its new level: one gather, one batched prolongation or
        restriction per (old level, new level) pair and one scatter, whatever the block count
        (AMReX-style: the work of a level is one array call, not a Python loop over blocks)."""
        g, limited, xp = self.spec.ghost, self.physics.limited, self.xp
        old_topo = self.topo
        topo = BlockTopology(self.spec, new_levels, self.sparse, self.physics.nvar, not self.physics.limited)
        U = [self._empty(lv, len(ids)) for lv, ids in enumerate(topo.ids)]
        for olv in range(self.spec.max_level + 1):
            for lv in range(self.spec.max_level + 1):
                moving = old_topo.ids[olv][topo.levels[old_topo.ids[olv]] == lv]
                if not len(moving):
                    continue
                data = self.U[olv][:, old_topo.slot[moving], g:-g, g:-g]
                for _ in range(olv, lv):
                    data = _prolong(data, limited, xp)
                for _ in range(lv, olv):
                    data = _restrict(data)
                U[lv][:, topo.slot[moving], g:-g, g:-g] = data
        self.topo, self.U = topo, U

    # --- preempt / resume -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: a dict of NumPy arrays and scalars."""
        return {
            "levels": self.topo.levels.copy(),
            "U": [_np(u).copy() for u in self.U],
            "time": self.time,
            "steps": self.steps,
            "total_cell_updates": self.total_cell_updates,
            "dt_factor": self.dt_factor,
            "energy": self._energy,
            "init_mass": self._init_mass.copy(),
            "bounds": self._bounds,
            "halted": self.halted,
        }

    def restore(self, snap: dict[str, Any]) -> None:
        """Return to a :meth:`snapshot`; the following steps reproduce the original run exactly."""
        levels = np.asarray(snap["levels"])
        if levels.shape != (self.spec.nblocks,):
            raise ValueError("snapshot is from a different grid")
        self.topo = BlockTopology(self.spec, levels, self.sparse, self.physics.nvar, not self.physics.limited)
        self.U = [self.xp.asarray(u).copy() for u in snap["U"]]
        self.time = float(snap["time"])
        self.steps = int(snap["steps"])
        self.total_cell_updates = int(snap["total_cell_updates"])
        self.dt_factor = float(snap["dt_factor"])
        self._energy = float(snap["energy"])
        self._init_mass = np.asarray(snap["init_mass"]).copy()
        self._bounds = tuple(snap["bounds"])
        self.halted = bool(snap["halted"])

    # --- output -------------------------------------------------------------------------------

    def uniform(self, level: int, var: int = 0) -> np.ndarray:
        """The variable ``var`` on the uniform lattice of ``level`` (coarser blocks prolonged
        piecewise constantly, finer ones averaged), as a NumPy (M, M) array indexed [x, y].
        One array call per level (all its blocks at once)."""
        spec = self.spec
        m, B, g = spec.m(level), spec.blocks, spec.ghost
        out = np.empty((B, m, B, m))
        for lv, ids in enumerate(self.topo.ids):
            if not len(ids):
                continue
            d = _np(self.U[lv][var][:, g:-g, g:-g])  # (nb, m_lv, m_lv), in slot order = ids order
            if lv < level:
                r = 1 << (level - lv)
                d = np.repeat(np.repeat(d, r, 1), r, 2)
            elif lv > level:
                r = 1 << (lv - level)
                d = d.reshape(len(ids), m, r, m, r).mean(axis=(2, 4))
            bx, by = divmod(ids, B)
            out[bx, :, by, :] = d
        return out.reshape(B * m, B * m)

    def l1_error(self, reference: np.ndarray, ref_level: int, var: int = 0) -> float:
        """Area-weighted L1 distance between this run's cell averages and ``reference`` (a uniform
        array at ``ref_level`` >= every block level) averaged onto this run's cells."""
        spec = self.spec
        mr, B, g = spec.m(ref_level), spec.blocks, spec.ghost
        ref4 = np.asarray(reference).reshape(B, mr, B, mr)
        total = 0.0
        for lv, ids in enumerate(self.topo.ids):
            if not len(ids):
                continue
            if lv > ref_level:
                raise ValueError(f"reference level {ref_level} is coarser than block {ids[0]} (level {lv})")
            bx, by = divmod(ids, B)
            r, m = 1 << (ref_level - lv), spec.m(lv)
            ref = ref4[bx, :, by, :].reshape(len(ids), m, r, m, r).mean(axis=(2, 4))
            total += float(np.abs(_np(self.U[lv][var][:, g:-g, g:-g]) - ref).sum()) * spec.h(lv) ** 2
        return total


def _np(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _block_max(field: Any, halo: int, xp: Any):
    from sims.invariants import block_max_with_strips

    return block_max_with_strips(field, halo, xp)


def _prolong(data: Any, limited: bool, xp: Any) -> Any:
    """(nvar, nb, m, m) -> (nvar, nb, 2m, 2m): children = parent +- slope/4 in x and y (sums exactly
    to 4 x parent up to round-off, so mass is conserved)."""
    sx = interior_slopes(data, 2, limited, xp)
    sy = interior_slopes(data, 3, limited, xp)
    nv, nb, m, _ = data.shape
    out = xp.empty((nv, nb, 2 * m, 2 * m))
    for p, dx in ((0, -0.25), (1, 0.25)):
        for q, dy in ((0, -0.25), (1, 0.25)):
            out[:, :, p::2, q::2] = data + dx * sx + dy * sy
    return out


def _restrict(data: Any) -> Any:
    """(nvar, nb, 2m, 2m) -> (nvar, nb, m, m): the average of each 2 x 2 group of children."""
    nv, nb, m2, _ = data.shape
    m = m2 // 2
    return data.reshape(nv, nb, m, 2, m, 2).mean(axis=(3, 5))
