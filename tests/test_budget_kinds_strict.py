"""A misspelt budget kind is an error, not a counted resource that limits nothing (review): any
name outside kernel.protocol.BUDGET_KINDS is a counted resource (docs/budgets.md), so
``{"flopz": 10}`` used to open a job whose flops were unlimited, and a worker's
``ctx.charge(flopz=5)`` charged nothing.  Counted resources (``protos``, ``cpu_s``, ...) stay."""

from __future__ import annotations

import math

import pytest

from kernel import errors
from kernel import protocol as P
from kernel.worker import RequestState
from services.base import Context
from tests.test_kernel_enforce import ALICE, OP, call, kern  # noqa: F401  (kern: the fixture)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("flopz", "flops"),
        ("Flops", "flops"),
        ("flosp", "flops"),
        ("token", "tokens"),
        ("wall-ms", "wall_ms"),
        ("vm_step", "vm_steps"),
    ],
)
def test_a_near_miss_of_a_kind_is_named(name, kind):
    assert P.budget_kind_typo(name) == kind


@pytest.mark.parametrize(
    "name",
    [
        *P.BUDGET_KINDS,
        "protos",
        "prototypes",
        "refinements",
        "escalations",
        "cpu_s",
        "wall_s",
        "cell_updates",
        "units",
        "solver_calls",
        "ponder_steps",
    ],
)
def test_kinds_and_counted_resources_are_not_typos(name):
    assert P.budget_kind_typo(name) is None


def test_opening_a_job_with_a_misspelt_kind_is_a_bad_request(kern):  # noqa: F811
    router = kern[0]
    for who in (ALICE, OP):
        out = call(router, who, P.MMI_JOB_OPEN, {"job": f"j-{who.name}", "budget": {"flopz": 10}})
        assert isinstance(out, errors.BadRequest) and "'flops'" in out.message, out
        assert out.detail.get("kind") == "budget_kind"
    assert f"j-{ALICE.name}" not in router.management.budget.ledger.jobs
    ok = call(router, ALICE, P.MMI_JOB_OPEN, {"job": "g", "budget": {"flops": 10, "protos": 2, "cpu_s": 5}})
    assert ok["ok"] and ok["limits"] == {"flops": 10, "protos": 2, "cpu_s": 5}


def _ctx() -> Context:
    return Context(None, RequestState(bytes(16), {"v": 1, "id": 1}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "amounts",
    [
        {"flopz": 5},
        {"Tokens": 1},
        {"flops": -1},
        {"flops": math.nan},
        {"flops": math.inf},
        {"flops": "5"},
        {"flops": True},
    ],
)
def test_a_worker_charge_of_a_misspelt_kind_or_a_bad_amount_is_refused(amounts):
    ctx = _ctx()
    ctx.charge(flops=1)
    with pytest.raises(errors.BadRequest):
        ctx.charge(tokens=2, **amounts)
    assert ctx.spent == {"flops": 1}  # nothing of the refused call was recorded


def test_a_worker_charges_kinds_and_counted_resources():
    ctx = _ctx()
    ctx.charge(flops=2.5, tokens=3, solver_calls=1)
    ctx.charge(flops=1)
    assert ctx.spent == {"flops": 3.5, "tokens": 3, "solver_calls": 1}
