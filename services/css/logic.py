"""The constraint-slack scheduler as pure logic: constraints with a measurable slack in physical
units (pint), candidate actions with estimated slack gains and costs, and the funding policies.

A :class:`Constraint` is a hard condition ``quantity <op> limit`` (``op`` ``<=`` or ``>=``) whose
slack is ``(limit - measured) / scale`` for ``<=`` (``(measured - limit) / scale`` for ``>=``), a
plain number once the units cancel: >= 0 means satisfied.  Limits, scales and measurements are
``pint`` quantities; one whose dimension does not match its quantity's is a
:class:`ConstraintError` before anything runs.  A :class:`Derivation` constraint is a type check: a
chain of formulas evaluated by pint on quantities with units, whose result must have the expected
dimension (slack +1) -- an addition of incompatible terms or a result of the wrong dimension is -1.

:class:`Funder` decides which action to fund next from the current slacks:

* ``maxmin`` (CSS): lexicographic max-min -- raise the smallest slack first: among actions
  predicted to raise the least-slack constraint without pushing any constraint below the current
  minimum, the one with the largest predicted gain per unit of measuring cost; repeated on the
  predicted slacks, so one measurement verifies a whole batch whose predicted outcome clears every
  constraint (within the budget left, least slack first).  Gain estimates start from each action's
  model and are corrected by what funded actions actually did (:meth:`Funder.observe`).
* ``worst_first``: the least-slack constraint, funded with its actions in their listed order,
  one action per measurement, without gain or cost estimates.
* ``round_robin``: the violated constraints in turn, each funded with its next listed action,
  one action per measurement.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import pint

from kernel import errors

POLICIES = ("maxmin", "worst_first", "round_robin")

#: One unit registry for every quantity CSS handles.
UREG = pint.UnitRegistry()
Q = UREG.Quantity


class ConstraintError(errors.BadRequest):
    """A constraint, derivation or action is malformed (wrong units, unknown names, bad numbers)."""


def quantity(value: Any, what: str) -> pint.Quantity:
    """``value`` (a number or a string such as ``"2e-3 m"``) as a finite pint quantity."""
    try:
        q = value if isinstance(value, pint.Quantity) else Q(value) if isinstance(value, str) else Q(float(value))
    except (pint.PintError, ValueError, TypeError, AttributeError, SyntaxError) as exc:
        raise ConstraintError(f"{what}: not a quantity: {value!r} ({exc})", reason="units") from None
    if isinstance(value, bool) or not isinstance(q.magnitude, (int, float)) or not math.isfinite(q.magnitude):
        raise ConstraintError(f"{what}: must be a finite number with units, got {value!r}", reason="range")
    return q


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``quantity op limit``; ``scale`` normalises the slack (same dimension as the quantity)."""

    name: str
    quantity: str
    op: str
    limit: pint.Quantity
    scale: pint.Quantity

    def slack(self, measured: pint.Quantity) -> float:
        gap = self.limit - measured if self.op == "<=" else measured - self.limit
        return float((gap / self.scale).to("dimensionless").magnitude)


def make_constraint(doc: Any, dimensions: dict[str, pint.util.UnitsContainer]) -> Constraint:
    """Validate one constraint document against the problem's measured quantities and their
    dimensions; every defect is a :class:`ConstraintError`."""
    if not isinstance(doc, dict):
        raise ConstraintError("a constraint is a map {name, quantity, op, limit, scale}", reason="type")
    name, qname, op = doc.get("name"), doc.get("quantity"), doc.get("op", "<=")
    if not isinstance(name, str) or not name:
        raise ConstraintError("a constraint needs a name", reason="type")
    if qname not in dimensions:
        raise ConstraintError(f"constraint {name!r}: unknown quantity {qname!r}; measured: {sorted(dimensions)}",
                              reason="unknown_quantity")
    if op not in ("<=", ">="):
        raise ConstraintError(f"constraint {name!r}: op must be '<=' or '>='", reason="type")
    limit = quantity(doc.get("limit"), f"constraint {name!r} limit")
    scale = quantity(doc.get("scale", doc.get("limit")), f"constraint {name!r} scale")
    want = dimensions[qname]
    for what, q in (("limit", limit), ("scale", scale)):
        if q.dimensionality != want:
            raise ConstraintError(f"constraint {name!r}: {what} {q:~} has dimension {q.dimensionality}, but "
                                  f"{qname} has {want}", reason="units", constraint=name)
    if scale.magnitude <= 0:
        raise ConstraintError(f"constraint {name!r}: scale must be positive", reason="range")
    return Constraint(name, qname, op, limit, scale)


@dataclasses.dataclass(frozen=True)
class Derivation:
    """Formulas ``[(symbol, expression)]`` evaluated in order by pint over ``inputs`` (symbol ->
    quantity); the last symbol's dimension must be ``expect`` (a pint dimension string)."""

    steps: tuple[tuple[str, str], ...]
    inputs: dict[str, pint.Quantity]
    expect: str

    def check(self) -> tuple[bool, str]:
        """(consistent, why): dimension errors inside a step count as inconsistent."""
        env = dict(self.inputs)
        for sym, expr in self.steps:
            try:
                val = UREG.parse_expression(expr, **env)
            except pint.DimensionalityError as exc:
                return False, f"{sym} = {expr}: {exc}"
            except (pint.PintError, SyntaxError, TypeError, ValueError, AttributeError, NameError) as exc:
                return False, f"{sym} = {expr}: cannot evaluate ({exc})"
            env[sym] = val if isinstance(val, pint.Quantity) else Q(val)
        last = env[self.steps[-1][0]]
        ok = last.check(self.expect)
        return ok, "" if ok else f"{self.steps[-1][0]} has dimension {last.dimensionality}, expected {self.expect}"


def make_derivation(doc: Any) -> Derivation:
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise ConstraintError("a derivation is a map {steps: [[symbol, expression]], inputs, expect}", reason="type")
    steps = []
    for s in doc["steps"]:
        if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, str) and x for x in s)):
            raise ConstraintError(f"derivation step {s!r} is not [symbol, expression]", reason="type")
        steps.append((s[0], s[1]))
    inputs = doc.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise ConstraintError("derivation inputs must be a map symbol -> quantity", reason="type")
    expect = doc.get("expect")
    try:
        if not isinstance(expect, str) or not expect:
            raise TypeError("not a string")
        UREG.get_dimensionality(expect)
    except (pint.PintError, TypeError, ValueError, AttributeError, KeyError) as exc:
        raise ConstraintError(f"derivation expect {expect!r} is not a dimension ({exc})", reason="units") from None
    return Derivation(tuple(steps), {str(k): quantity(v, f"input {k}") for k, v in inputs.items()}, expect)


@dataclasses.dataclass
class ActionSpec:
    """A candidate action: ``targets`` the constraints it is meant to raise (all the peers go by);
    ``predict(slacks, state) -> {constraint: predicted slack}`` its gain model and
    ``transform(state) -> state`` what it changes (what CSS plans with); ``available(state)``
    whether it can be taken now."""

    name: str
    targets: tuple[str, ...]
    predict: Callable[[dict[str, float], Any], dict[str, float]]
    transform: Callable[[Any], Any]
    available: Callable[[Any], bool] = lambda state: True


#: CSS plans until every predicted slack is at least this (a margin against estimation error).
PLAN_MARGIN = 0.05
#: Most actions funded before one measurement.
MAX_BATCH = 8


class Funder:
    """Chooses what to fund before the next measurement.  ``run_cost(state)``: the compute one
    measurement of ``state`` takes.  ``correction[action][constraint]``: observed / predicted
    slack change, learned from what funded actions did (maxmin only)."""

    def __init__(self, constraints: list[str], actions: list[ActionSpec], policy: str,
                 run_cost: Callable[[Any], float]) -> None:
        if policy not in POLICIES:
            raise ConstraintError(f"unknown policy {policy!r}; one of {POLICIES}", reason="policy")
        self.constraints = list(constraints)
        self.actions = {a.name: a for a in actions}
        self.order = [a.name for a in actions]
        self.policy = policy
        self.run_cost = run_cost
        self.correction: dict[str, dict[str, float]] = {}
        self._rr = 0
        self._next_for: dict[str, int] = {}

    def predicted(self, action: str, slacks: dict[str, float], state: Any) -> dict[str, float]:
        out = dict(slacks)
        for c, s in self.actions[action].predict(slacks, state).items():
            k = self.correction.get(action, {}).get(c, 1.0)
            out[c] = slacks[c] + k * (s - slacks[c])
        return out

    def plan(self, slacks: dict[str, float], state: Any, budget_left: float = math.inf) -> list[str]:
        """The actions to fund (in order) before the next measurement; [] when every slack is
        >= 0 or nothing applies.  The peers fund one action per measurement; CSS a batch."""
        if all(slacks[c] >= 0 for c in self.constraints):
            return []
        if self.policy == "maxmin":
            return self._maxmin(slacks, state, budget_left)
        pick = self._peer_choice(slacks, state)
        return [pick] if pick is not None else []

    # -- peers: no gain or cost estimates --------------------------------------------------------

    def _peer_choice(self, slacks: dict[str, float], state: Any) -> str | None:
        violated = [c for c in self.constraints if slacks[c] < 0]
        avail = [n for n in self.order if self.actions[n].available(state)]
        if self.policy == "worst_first":
            target = min(violated, key=lambda c: (slacks[c], self.constraints.index(c)))
            return self._next_action_for(target, avail)
        for _ in range(len(self.constraints)):  # round robin over the violated constraints
            c = self.constraints[self._rr % len(self.constraints)]
            self._rr += 1
            if slacks[c] < 0:
                pick = self._next_action_for(c, avail)
                if pick is not None:
                    return pick
        return None

    def _next_action_for(self, constraint: str, avail: list[str]) -> str | None:
        mine = [n for n in self.order if constraint in self.actions[n].targets]
        for k in range(len(mine)):  # the listed order, cycling, skipping what is not available
            i = (self._next_for.get(constraint, 0) + k) % len(mine)
            if mine[i] in avail:
                self._next_for[constraint] = i + 1
                return mine[i]
        return None

    # -- CSS: lexicographic max-min with estimates -------------------------------------------------

    def _maxmin(self, slacks: dict[str, float], state: Any, budget_left: float) -> list[str]:
        """Raise the smallest (predicted) slack first, with the action of best predicted gain per
        unit of the next measurement's cost that pushes no other constraint below the minimum;
        repeat on the predicted slacks until all clear the margin, the batch is full, or the
        next measurement would no longer fit the budget."""
        batch: list[str] = []
        s, st = dict(slacks), state
        while len(batch) < MAX_BATCH:
            worst = min(self.constraints, key=lambda c: (s[c], self.constraints.index(c)))
            floor = s[worst]
            if floor >= PLAN_MARGIN:
                break
            best, best_score, best_after = None, -math.inf, None
            for n in self.order:
                a = self.actions[n]
                if not a.available(st):
                    continue
                after = self.predicted(n, s, st)
                gain = after[worst] - floor
                if gain <= 0 or min(after.values()) < floor - 1e-12:
                    continue
                cost = max(self.run_cost(a.transform(st)), 1e-9)
                score = min(gain, PLAN_MARGIN - floor) / cost  # gain beyond the margin is not worth paying for
                if score > best_score:
                    best, best_score, best_after = n, score, after
            if best is None:
                break
            nxt = self.actions[best].transform(st)
            if batch and self.run_cost(nxt) > budget_left:
                break  # fund the least-slack constraints first; the rest wait for a later round
            batch.append(best)
            s, st = best_after, nxt
        return batch

    def observe(self, actions: list[str], before: dict[str, float], predicted: dict[str, float],
                after: dict[str, float]) -> None:
        """Correct the gain models by what a funded batch actually did: the observed change of each
        targeted constraint over the predicted one, shared by the batch's actions that target it
        (a geometric running mean, clipped to [0.1, 10])."""
        for c in {t for n in actions for t in self.actions[n].targets}:
            want = predicted[c] - before[c]
            got = after[c] - before[c]
            if abs(want) > 1e-12 and math.isfinite(got):
                ratio = max(0.1, min(10.0, got / want))
                for n in actions:
                    if c in self.actions[n].targets:
                        corr = self.correction.setdefault(n, {})
                        corr[c] = math.sqrt(corr.get(c, 1.0) * ratio)

    def predict_batch(self, actions: list[str], slacks: dict[str, float], state: Any) -> dict[str, float]:
        s, st = dict(slacks), state
        for n in actions:
            s = self.predicted(n, s, st)
            st = self.actions[n].transform(st)
        return s
