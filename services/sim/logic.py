"""The simulation worker's pure part: request parsing, run state, fidelity orders, wire records.

No sockets here.  :func:`parse_run` turns a request payload into a built
:class:`sims.grid.Simulation` (every invalid parameter becomes :class:`kernel.errors.BadRequest`);
:class:`RunState` holds one live run and the fidelity orders queued for it, applied only at a step
boundary (:meth:`RunState.apply_pending`), so a run's trajectory depends only on the orders and the
steps they were applied after, never on when a message happened to arrive.

Wire record of one step (``report_to_wire``): every field of :class:`sims.invariants.StepReport`,
arrays as lists, plus ``run`` and ``control`` (the per-worker service name that reaches the worker
holding the run).  ``services.igms`` rebuilds a ``StepReport`` from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np

from kernel import errors
from sims import cases
from sims.grid import Simulation

#: Largest grid a request may ask for: cells per side at the finest level (memory bound).
MAX_CELLS_PER_SIDE = 1024
MAX_BLOCKS = 64
MAX_LEVEL = 3
#: Default and largest number of root steps one run may take (a run never burns budget unbounded).
DEFAULT_MAX_STEPS = 20_000
MAX_MAX_STEPS = 1_000_000
#: How long a controlled run waits for its controller's order after a step, seconds (default).
ORDER_TIMEOUT = 30.0
MAX_DT_FACTOR = 8.0

_RUN_KEYS = {"op", "run", "case", "params", "blocks", "cells", "max_level", "level", "levels", "indicators",
             "t_end", "dt_factor", "controlled", "report_every", "max_steps", "order_timeout_s", "cache"}
#: Ends of a run that are a pure function of its request (when no order was applied): cacheable.
CACHEABLE_STATUS = frozenset({"finished", "max_steps", "unstable"})
_ORDER_KEYS = {"op", "run", "step", "refine", "coarsen", "dt_factor", "halt"}


def cache_key(payload: dict, spec: "RunSpec", sim: Simulation) -> str | None:
    """The canonical key of a ``run`` request whose result may be served from the result cache,
    or None when it may not be (not asked for with ``cache: true``, ``controlled``, or naming its
    own ``run`` id: such a run may be steered by fidelity orders, so its end is not a function of
    the request alone).

    The key is everything the run's trajectory depends on, canonicalised: the case's name and
    *every* parameter of its factory with the defaults filled in (``{"D": 1}`` and ``{}`` of a case
    whose default ``D`` is 1 are one key; a parameter given as ``2`` and as ``2.0`` are two keys,
    never merged), the grid (blocks, cells, max level, the initial level of every block: ``level``
    and an equivalent ``levels`` are one key), indicators, the resolved end time, dt factor and
    step cap, and the SHA-256 digest of the initial state.  Never the run id, ``report_every`` or
    the order timeout (they change no result).  Two requests with equal keys run bit-identical
    trajectories; two that differ in any parameter never share a key."""
    if payload.get("cache") is not True or spec.controlled or payload.get("run") is not None:
        return None
    import inspect

    bound = inspect.signature(cases.CASES[spec.case]).bind(**spec.params)
    bound.apply_defaults()
    canon = {
        "case": spec.case,
        "params": {k: [type(v).__name__, v] for k, v in sorted(bound.arguments.items())},
        "blocks": spec.blocks, "cells": spec.cells, "max_level": spec.max_level,
        "levels": [int(v) for v in sim.topo.levels],
        "indicators": list(payload.get("indicators", [])),
        "t_end": float(sim.t_end), "dt_factor": spec.dt_factor, "max_steps": spec.max_steps,
        "init": state_digest(sim),
    }
    return hashlib.sha256(repr(sorted(canon.items())).encode()).hexdigest()


def _int(payload: dict, key: str, default: int, lo: int, hi: int) -> int:
    return errors.require_int(payload, key, default, lo=lo, hi=hi)


def _number(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise errors.BadRequest(f"{key} must be a finite number, got {v!r}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A validated run request."""

    run_id: str
    case: str
    params: dict[str, float]
    blocks: int
    cells: int
    max_level: int
    controlled: bool
    report_every: int
    max_steps: int
    order_timeout: float
    dt_factor: float


def parse_run(payload: Any, run_id: str) -> tuple[RunSpec, Simulation]:
    """Validate a ``run`` payload and build its simulation; :class:`BadRequest` on anything invalid
    (unknown case or key, bad parameter, grid too large, unknown indicator)."""
    if not isinstance(payload, dict):
        raise errors.BadRequest(f"a sim request is a map, got {type(payload).__name__}")
    unknown = set(payload) - _RUN_KEYS
    if unknown:
        raise errors.BadRequest(f"unknown keys {sorted(unknown)}; allowed: {sorted(_RUN_KEYS)}")
    name = payload.get("case")
    if not isinstance(name, str):
        raise errors.BadRequest(f"case must be a name, one of {sorted(cases.CASES)}")
    params = payload.get("params") or {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise errors.BadRequest("params must be a map of parameter name to number")
    blocks = _int(payload, "blocks", 4, 1, MAX_BLOCKS)
    cells = _int(payload, "cells", 8, 0, MAX_CELLS_PER_SIDE)
    if cells < 4 or cells % 2:
        raise errors.BadRequest(f"cells must be an even number >= 4, got {cells}")
    max_level = _int(payload, "max_level", 1, 0, MAX_LEVEL)
    if blocks * cells << max_level > MAX_CELLS_PER_SIDE:
        raise errors.BadRequest(f"grid too large: {blocks}x{cells} cells at level {max_level} exceeds "
                                f"{MAX_CELLS_PER_SIDE} per side")
    indicators = payload.get("indicators", [])
    if not isinstance(indicators, (list, tuple)) or not all(isinstance(i, str) for i in indicators):
        raise errors.BadRequest("indicators must be a list of names")
    if not isinstance(payload.get("cache", False), bool):
        raise errors.BadRequest("cache must be true or false")
    dt_factor = _number(payload.get("dt_factor", 1.0), "dt_factor")
    order_timeout = _number(payload.get("order_timeout_s", ORDER_TIMEOUT), "order_timeout_s")
    if not 0 < order_timeout <= 3600:
        raise errors.BadRequest(f"order_timeout_s must lie in (0, 3600], got {order_timeout}")
    spec = RunSpec(run_id, name, dict(params), blocks, cells, max_level, bool(payload.get("controlled", False)),
                   _int(payload, "report_every", 1, 1, 1_000_000),
                   _int(payload, "max_steps", DEFAULT_MAX_STEPS, 1, MAX_MAX_STEPS), order_timeout, dt_factor)
    t_end = payload.get("t_end")
    try:
        case = cases.make_case(name, **params)
        sim = cases.build(case, blocks=blocks, cells=cells, max_level=max_level, level=payload.get("level"),
                          levels=payload.get("levels"), indicators=tuple(indicators),
                          t_end=None if t_end is None else _number(t_end, "t_end"))
        sim.set_dt_factor(dt_factor)
    except errors.BadRequest:
        raise
    except (ValueError, TypeError, IndexError) as exc:
        raise errors.BadRequest(f"invalid run of {name!r}: {exc}") from None
    return spec, sim


@dataclasses.dataclass(frozen=True)
class FidelityOrder:
    """Orders applied to a run at its next step boundary, in this order: dt factor, coarsen,
    refine (the order of :func:`sims.igms.apply`).  ``step``: the step after which the controller
    decided (a controlled run waits for it); ``halt``: stop the run."""

    run_id: str
    step: int | None
    refine: tuple[int, ...] = ()
    coarsen: tuple[int, ...] = ()
    dt_factor: float | None = None
    halt: bool = False


def parse_order(message: Any, nblocks_of: dict[str, int]) -> FidelityOrder:
    """Validate a fidelity order against the runs this worker holds (``run id -> block count``).
    :class:`BadRequest` if malformed, :class:`Refused` if the run is not held here."""
    if not isinstance(message, dict):
        raise errors.BadRequest("a fidelity order is a map")
    unknown = set(message) - _ORDER_KEYS
    if unknown:
        raise errors.BadRequest(f"unknown keys {sorted(unknown)} in a fidelity order")
    run_id = message.get("run")
    if not isinstance(run_id, str):
        raise errors.BadRequest("a fidelity order names its run ('run')")
    if run_id not in nblocks_of:
        raise errors.Refused(f"unknown run {run_id!r}: not running on this worker", run=run_id)
    n = nblocks_of[run_id]
    ids = {}
    for key in ("refine", "coarsen"):
        v = message.get(key, [])
        if not isinstance(v, (list, tuple)) or not all(
                isinstance(b, int) and not isinstance(b, bool) and 0 <= b < n for b in v):
            raise errors.BadRequest(f"{key} must be a list of block ids in 0..{n - 1}, got {v!r}")
        ids[key] = tuple(sorted(set(v)))
    dt = message.get("dt_factor")
    if dt is not None:
        dt = _number(dt, "dt_factor")
        if not 0 < dt <= MAX_DT_FACTOR:
            raise errors.BadRequest(f"dt_factor must lie in (0, {MAX_DT_FACTOR:g}], got {dt}")
    step = message.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise errors.BadRequest(f"step must be a non-negative integer, got {step!r}")
    return FidelityOrder(run_id, step, ids["refine"], ids["coarsen"], dt, bool(message.get("halt", False)))


class RunState:
    """One live run.  Invariant: orders are applied only by :meth:`apply_pending`, which the run's
    own loop calls between steps; ``acked_step`` is the largest ``step`` of an order received."""

    def __init__(self, spec: RunSpec, sim: Simulation) -> None:
        self.spec = spec
        self.sim = sim
        self.pending: list[FidelityOrder] = []
        self.acked_step = -1
        self.halt_requested = False
        self.refined = 0  # block-levels added by orders
        self.coarsened = 0
        self.orders_applied = 0

    def submit(self, order: FidelityOrder) -> None:
        self.pending.append(order)
        if order.step is not None:
            self.acked_step = max(self.acked_step, order.step)

    def apply_pending(self) -> None:
        orders, self.pending = self.pending, []
        for o in orders:
            if o.halt:
                self.halt_requested = True
            if o.dt_factor is not None:
                self.sim.set_dt_factor(o.dt_factor)
            if o.coarsen:
                self.coarsened += len(self.sim.coarsen(list(o.coarsen)))
            if o.refine:
                self.refined += len(self.sim.refine(list(o.refine)))
            self.orders_applied += 1

    def summary(self, status: str, reason: str = "") -> dict[str, Any]:
        sim = self.sim
        return {
            "run": self.spec.run_id, "case": self.spec.case, "status": status, "reason": reason,
            "steps": sim.steps, "time": sim.time, "t_end": sim.t_end,
            "total_cell_updates": int(sim.total_cell_updates),
            "levels": [int(v) for v in sim.topo.levels], "dt_factor": sim.dt_factor,
            "orders_applied": self.orders_applied, "refined": self.refined, "coarsened": self.coarsened,
            "mass_rel_drift": float(_mass_drift(sim)), "digest": state_digest(sim),
        }


def _mass_drift(sim: Simulation) -> float:
    """Relative drift of the conserved totals (the physics' ``mass_vars``), as the watchdog has it."""
    mv = list(sim.physics.mass_vars)
    m0 = np.asarray(sim._init_mass)[mv]
    with np.errstate(all="ignore"):
        return float(np.max(np.abs(sim._mass()[mv] - m0) / np.maximum(np.abs(m0), 1e-300)))


def state_digest(sim: Simulation) -> str:
    """SHA-256 of everything the next step depends on (levels, every level's array bytes, time,
    dt factor): equal digests mean bit-identical runs."""
    snap = sim.snapshot()
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(snap["levels"], dtype=np.int64).tobytes())
    for u in snap["U"]:
        h.update(str(u.shape).encode())
        h.update(np.ascontiguousarray(u).tobytes())
    h.update(repr((snap["time"], snap["steps"], snap["dt_factor"])).encode())
    return h.hexdigest()


def _list(a: Any) -> list:
    return np.asarray(a).tolist()


def report_to_wire(run_id: str, control: str, report: Any) -> dict[str, Any]:
    """A :class:`sims.invariants.StepReport` as a msgpack-able map (see module docstring)."""
    return {
        "run": run_id, "control": control,
        "step": report.step, "time": report.time, "dt": report.dt, "dt_factor": report.dt_factor,
        "cell_updates": int(report.cell_updates), "total_cell_updates": int(report.total_cell_updates),
        "cells": int(report.cells), "levels": _list(report.levels),
        "block_min": _list(report.block_min), "block_courant": _list(report.block_courant),
        "block_energy": _list(report.block_energy),
        "indicators": {k: _list(v) for k, v in report.indicators.items()},
        "globals": {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(report.globals).items()},
        "breaches": list(report.breaches),
        "block_breaches": {k: _list(v) for k, v in report.block_breaches.items()},
        "status": report.status,
    }
