"""Block-structured solvers: conservation across coarse/fine boundaries, convergence order, the dam
break against a fine reference, snapshot/restore exactness, the watchdog, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from sims import cases, invariants
from sims import grid
from sims.grid import GridSpec, Simulation, SimulationHalted

PATTERNS = {
    "checker": np.array([0, 1, 1, 0] * 2 + [1, 0, 0, 1] * 2),
    "one_fine": np.eye(1, 16, 5, dtype=int)[0],
    "all_fine": np.ones(16, dtype=int),
}


def _mass(sim: Simulation) -> float:
    return float(sim._mass()[0])


@pytest.mark.parametrize("name,t_end", [("radial_dam_break", 0.4), ("gaussian_diffusion", 0.004)])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_mass_conserved_to_round_off_one_level(name, t_end, pattern):
    sim = cases.build(name, blocks=4, cells=4, max_level=1, levels=PATTERNS[pattern], t_end=t_end)
    m0 = _mass(sim)
    report = cases.run_to_end(sim)
    assert report.status == "finished"
    assert abs(_mass(sim) - m0) <= 1e-13 * abs(m0)
    assert report.globals.mass_rel_drift <= invariants.MASS_REL_TOL


@pytest.mark.parametrize("name,t_end", [("radial_dam_break", 0.3), ("gaussian_diffusion", 0.003)])
def test_mass_conserved_with_two_level_jumps_and_regrids(name, t_end):
    levels = np.random.default_rng(7).integers(0, 3, 16)
    levels[0], levels[1] = 0, 2  # a direct level-0 / level-2 face
    sim = cases.build(name, blocks=4, cells=4, max_level=2, levels=levels, t_end=t_end)
    m0 = _mass(sim)
    rng = np.random.default_rng(3)
    while not sim.finished:
        sim.step()
        sim.refine(rng.choice(16, 3, replace=False))
        sim.coarsen(rng.choice(16, 3, replace=False))
    assert abs(_mass(sim) - m0) <= 1e-13 * abs(m0)


def test_reflux_is_what_conserves_mass():
    """With refluxing disabled the same mixed-level run loses mass well above round-off."""
    sim = cases.build("radial_dam_break", blocks=4, cells=4, max_level=1, levels=PATTERNS["checker"], t_end=0.3)
    sim._reflux = lambda level, edges: None
    m0 = _mass(sim)
    cases.run_to_end(sim)
    assert abs(_mass(sim) - m0) > 1e-8 * abs(m0)


def _cosine_error(cells: int, levels: np.ndarray | None, max_level: int) -> float:
    case = cases.make_case("cosine_diffusion", t_end=0.01)
    sim = cases.build(case, blocks=2, cells=cells, max_level=max_level, levels=levels)
    cases.run_to_end(sim)
    M = 2 * (cells << max_level)
    e = np.linspace(0.0, 1.0, M + 1)
    XL, YL = np.meshgrid(e[:-1], e[:-1], indexing="ij")
    XH, YH = np.meshgrid(e[1:], e[1:], indexing="ij")
    return sim.l1_error(cases.cosine_exact(case, XL, XH, YL, YH), max_level)


def test_diffusion_second_order_uniform_and_mixed():
    uniform = [_cosine_error(c, None, 0) for c in (4, 8, 16)]
    orders = np.log2(np.array(uniform[:-1]) / uniform[1:])
    assert np.all(orders > 1.9), orders
    mixed = [_cosine_error(c, np.array([1, 0, 0, 1]), 1) for c in (4, 8, 16)]
    orders = np.log2(np.array(mixed[:-1]) / mixed[1:])
    assert np.all(orders > 1.8), orders


@pytest.mark.parametrize("order,min_rate", [(2, 1.6), (1, 0.5)])
def test_shallow_water_self_convergence(order, min_rate):
    sols = []
    for cells in (16, 32, 64, 128):
        sim = cases.build(cases.make_case("sw_smooth_hump", order=order, t_end=0.2), blocks=1, cells=cells, max_level=0)
        cases.run_to_end(sim)
        sols.append(sim.uniform(0))
    diffs = []
    for a, b in zip(sols[:-1], sols[1:]):
        n = a.shape[0]
        diffs.append(np.abs(a - b.reshape(n, 2, n, 2).mean(axis=(1, 3))).mean())
    rate = np.log2(diffs[-2] / diffs[-1])
    assert rate > min_rate, (diffs, rate)


def test_dam_break_error_decreases_with_resolution():
    case = cases.make_case("radial_dam_break", t_end=0.5)
    ref = cases.build(case, blocks=4, cells=4, max_level=3, level=3)
    cases.run_to_end(ref)
    reference = ref.uniform(3)
    errors = []
    for lv in (0, 1, 2):
        sim = cases.build(case, blocks=4, cells=4, max_level=3, level=lv)
        cases.run_to_end(sim)
        errors.append(sim.l1_error(reference, 3))
    assert errors[0] > 1.5 * errors[1] > 1.5 * 1.5 * errors[2]
    # the radial symmetry of the set-up survives (x <-> y mirror)
    assert np.allclose(reference, reference.T, atol=1e-12)


def test_dam_break_watchdog_quiet_on_a_healthy_run():
    sim = cases.build("radial_dam_break", blocks=4, cells=4, max_level=1, levels=PATTERNS["checker"], t_end=0.5, indicators=("entropy", "gradient"))
    while not sim.finished:
        r = sim.step()
        assert r.breaches == (), r.breaches
        assert r.globals.min_value > 0 and r.globals.courant <= 1.0
        assert r.globals.energy_rel_change <= 0.0
        assert r.cell_updates > 0 and r.total_cell_updates >= r.cell_updates
    assert set(r.indicators) == {"entropy", "gradient"}
    assert r.indicators["entropy"].shape == (16,) and np.all(r.indicators["entropy"] >= 0)


def test_energy_decreases_over_the_dam_break():
    sim = cases.build("radial_dam_break", blocks=4, cells=4, max_level=0, t_end=1.0)
    e0 = sim._energy_total()
    cases.run_to_end(sim)
    assert sim._energy_total() < e0


def test_entropy_indicator_peaks_at_the_shock_and_vanishes_on_smooth_flow():
    smooth = cases.build(cases.make_case("sw_smooth_hump", amplitude=0.01, t_end=0.05), blocks=2, cells=16, indicators=("entropy",))
    shock = cases.build(cases.make_case("radial_dam_break", t_end=0.05), blocks=2, cells=16, indicators=("entropy",))
    rs, rd = cases.run_to_end(smooth), cases.run_to_end(shock)
    assert rd.indicators["entropy"].max() > 100 * rs.indicators["entropy"].max()


def test_lake_at_rest_stays_at_rest():
    sim = cases.build("lake_at_rest", blocks=2, cells=4, max_level=1, levels=[0, 1, 1, 0])
    before = sim.uniform(1)
    cases.run_to_end(sim)
    assert np.array_equal(sim.uniform(1), before)
    assert np.abs(sim.uniform(1, var=1)).max() == 0.0


def test_snapshot_restore_reproduces_exactly():
    sim = cases.build("radial_dam_break", blocks=4, cells=4, max_level=1, levels=PATTERNS["checker"], t_end=0.6, indicators=("entropy",))
    for _ in range(3):
        sim.step()
    snap = sim.snapshot()
    sim.refine([0, 15])
    first = [sim.step() for _ in range(4)]
    state_a = [u.copy() for u in sim.U]
    sim.restore(snap)
    sim.refine([0, 15])
    second = [sim.step() for _ in range(4)]
    for a, b in zip(state_a, sim.U):
        assert np.array_equal(a, b)
    assert [r.time for r in first] == [r.time for r in second]
    assert [r.total_cell_updates for r in first] == [r.total_cell_updates for r in second]
    assert np.array_equal(first[-1].indicators["entropy"], second[-1].indicators["entropy"])


def test_refine_then_coarsen_round_trips_the_data():
    sim = cases.build("gaussian_diffusion", blocks=2, cells=8, max_level=1)
    before = sim.uniform(0)
    assert sim.refine([1, 2]) == [1, 2]
    assert sim.refine([1]) == []  # already at max_level
    assert sim.coarsen([1, 2]) == [1, 2]
    assert np.allclose(sim.uniform(0), before, rtol=0, atol=1e-15)


def _block(sim: Simulation, b: int) -> np.ndarray:
    """Block ``b``'s interior (nvar, m, m), read block by block (the reference for the level-wide
    array calls of regrid, uniform and l1_error)."""
    lv, g = int(sim.topo.levels[b]), sim.spec.ghost
    return np.asarray(sim.U[lv][:, int(sim.topo.slot[b]), g:-g, g:-g])


def test_regrid_uniform_and_l1_match_a_block_by_block_reference():
    sim = cases.build("radial_dam_break", blocks=4, cells=4, max_level=2, levels=PATTERNS["checker"], t_end=0.6)
    for _ in range(2):
        sim.step()
    old = {b: _block(sim, b) for b in range(16)}
    old_levels = sim.topo.levels.copy()
    new_levels = old_levels.copy()
    new_levels[[0, 10]] += 1  # 0 -> 1
    new_levels[[1, 5]] += 1  # 1 -> 2
    new_levels[[12]] -= 1  # 1 -> 0
    sim._regrid(new_levels)  # every kind of move in one regrid
    moved = sim.topo.levels - old_levels
    assert set(moved.tolist()) == {-1, 0, 1}
    for b in range(16):
        data, got = old[b], _block(sim, b)
        if moved[b] == 1:
            want = grid._prolong(data[:, None], sim.physics.limited, np)[:, 0]
        elif moved[b] == -1:
            nv, m2, _ = data.shape
            want = data.reshape(nv, m2 // 2, 2, m2 // 2, 2).mean(axis=(2, 4))
        else:
            want = data
        assert np.array_equal(got, want), b
    level = 2
    ref = np.empty((16 * 4, 16 * 4))
    for b in range(16):
        d, lv = _block(sim, b)[0], int(sim.topo.levels[b])
        r = 1 << (level - lv)
        bx, by = divmod(b, 4)
        ref[bx * 16 : (bx + 1) * 16, by * 16 : (by + 1) * 16] = np.repeat(np.repeat(d, r, 0), r, 1)
    assert np.array_equal(sim.uniform(level), ref)
    shifted = ref + np.linspace(0, 1, ref.size).reshape(ref.shape)
    want = 0.0
    for b in range(16):
        lv, bx, by = int(sim.topo.levels[b]), *divmod(b, 4)
        m, r = 4 << lv, 1 << (level - lv)
        avg = shifted[bx * 16 : (bx + 1) * 16, by * 16 : (by + 1) * 16].reshape(m, r, m, r).mean(axis=(1, 3))
        want += float(np.abs(_block(sim, b)[0] - avg).sum()) * sim.spec.h(lv) ** 2
    assert sim.l1_error(shifted, level) == pytest.approx(want, rel=1e-12)


def test_folded_linear_slopes_give_the_ghosts_of_value_plus_slope_operators():
    """Diffusion's (unlimited, linear) coarse slopes are folded into one coarse-to-fine ghost
    operator; the ghosts must equal those of separate value and slope operators (to round-off)."""
    sim = cases.build("gaussian_diffusion", blocks=4, cells=4, max_level=1, levels=PATTERNS["checker"], t_end=0.004)
    sim.step()
    folded = grid.BlockTopology(sim.spec, sim.topo.levels, nvar=1, fold_slopes=True)
    apart = grid.BlockTopology(sim.spec, sim.topo.levels, nvar=1, fold_slopes=False)
    assert not folded.ghost_ops[1].slope_x and apart.ghost_ops[1].slope_x
    ghosts = []
    for topo in (folded, apart):
        sim.topo = topo
        arr = sim.U[1].copy()
        sim._t_old, sim._t = [0.0, 0.0], [0.0, 0.0]  # no time interpolation
        sim._fill_ghosts(1, arr, 0.0)
        ghosts.append(arr.reshape(-1)[topo.ghost_ops[1].targets])
    assert np.allclose(ghosts[0], ghosts[1], rtol=1e-13, atol=1e-15)
    assert np.abs(ghosts[0]).max() > 0


def test_csr_operators_equal_scipy_coo_construction():
    import scipy.sparse as sp

    topo = grid.BlockTopology(GridSpec(0.0, 1.0, 0.0, 1.0, blocks=2, cells=4, max_level=1, ghost=2), np.array([0, 1, 1, 0]))
    rng = np.random.default_rng(3)
    for dups in (False, True):
        r = rng.integers(0, 50, 400)
        c = rng.permutation(100_000)[:400] if not dups else rng.integers(0, 30, 400)
        w = rng.standard_normal(400)
        got = topo._csr(w, r, c, (50, 100_000))
        want = sp.csr_matrix((w, (r, c)), shape=(50, 100_000))
        assert got.has_canonical_format
        assert np.array_equal(got.indptr, want.indptr) and np.array_equal(got.indices, want.indices)
        if dups:  # repeated entries summed: the order of the additions may differ from SciPy's
            assert np.allclose(got.data, want.data, rtol=1e-14, atol=1e-14)
        else:
            assert np.array_equal(got.data, want.data)


def test_unstable_run_is_halted_and_reported():
    sim = cases.build("radial_dam_break", blocks=2, cells=8, t_end=2.5)
    sim.set_dt_factor(8.0)
    statuses = []
    for _ in range(40):
        r = sim.step()
        statuses.append(r.status)
        if r.status == "unstable":
            break
    assert statuses[-1] == "unstable", statuses
    assert {invariants.FINITE, invariants.POSITIVITY} & set(r.breaches)
    with pytest.raises(SimulationHalted):
        sim.step()


def test_cfl_breach_is_flagged_before_blow_up():
    sim = cases.build("radial_dam_break", blocks=2, cells=8, t_end=2.5)
    sim.set_dt_factor(3.0)
    r = sim.step()
    assert invariants.CFL in r.breaches
    assert len(r.block_breaches[invariants.CFL]) > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(h_in=-1.0), "positive"),
        (dict(h_out=0.0), "positive"),
        (dict(h_in=float("nan")), "finite"),
        (dict(radius=float("inf")), "finite"),
        (dict(colour="blue"), "bad parameters"),
    ],
)
def test_bad_case_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cases.make_case("radial_dam_break", **kwargs)


def test_unknown_case():
    with pytest.raises(ValueError, match="unknown case 'tsunami'"):
        cases.make_case("tsunami")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(blocks=0, cells=8), "at least one block"),
        (dict(blocks=2, cells=0), "cells per block"),
        (dict(blocks=2, cells=5), "cells per block"),
        (dict(blocks=2, cells=8, max_level=9), "max_level"),
    ],
)
def test_bad_grid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GridSpec(0.0, 1.0, 0.0, 1.0, **kwargs)


def test_bad_grid_domain_and_runtime_arguments():
    with pytest.raises(ValueError, match="finite"):
        GridSpec(0.0, float("inf"), 0.0, 1.0, blocks=1, cells=4)
    sim = cases.build("gaussian_diffusion", blocks=2, cells=4, max_level=1)
    with pytest.raises(ValueError, match="unknown block id"):
        sim.refine([4])
    with pytest.raises(ValueError, match="dt factor"):
        sim.set_dt_factor(0.0)
    with pytest.raises(ValueError, match="unknown indicators"):
        cases.build("gaussian_diffusion", blocks=2, cells=4, indicators=("entropy",))
    with pytest.raises(ValueError, match="t_end"):
        cases.build("gaussian_diffusion", blocks=2, cells=4, t_end=-1.0)


def test_non_finite_initial_state_rejected():
    case = cases.make_case("lake_at_rest")

    def bad_init(*bounds):
        out = case.init(*bounds)
        out[0, 0, 0, 0] = np.nan
        return out

    spec = GridSpec(*case.domain, blocks=1, cells=4, max_level=0)
    with pytest.raises(ValueError, match="non-finite"):
        Simulation(case.physics, spec, bad_init, t_end=1.0)

    def dry_init(*bounds):
        out = case.init(*bounds)
        out[0, 0, 1, 1] = -0.5
        return out

    with pytest.raises(ValueError, match="depth must be positive"):
        Simulation(case.physics, spec, dry_init, t_end=1.0)
