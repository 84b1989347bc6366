"""The one gate (kernel/gate.py): LocalGate's rules, and KernelGate / AsyncKernelGate driving the
kernel's real ledger (Router + BudgetAdmission + Management, in process, time passed in)."""

from __future__ import annotations

import math

import pytest

from kernel import errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.gate import AsyncKernelGate, Gate, KernelGate, LocalGate
from kernel.mmi import Management
from kernel.router import Router


class InProcessKernel:
    """A client whose requests go straight to a Router's management handlers (no sockets)."""

    def __init__(self) -> None:
        admission = BudgetAdmission()
        self.router = Router(lambda frames: None, admission=admission, management=Management(admission))
        self.now = 0.0
        self.calls = 0

    def call(self, service: str, payload=None, **kw):
        self.calls += 1
        self.now += 0.001
        out = self.router.management.handle(self.router, service, payload, self.now, caller=b"me")
        if isinstance(out, errors.RecaError):
            raise out
        return out


class AsyncInProcessKernel(InProcessKernel):
    async def call(self, service: str, payload=None, **kw):  # type: ignore[override]
        return InProcessKernel.call(self, service, payload, **kw)


def test_no_cap_means_unlimited_and_a_zero_cap_forbids():
    gate = LocalGate({"a": 0})
    assert isinstance(gate, Gate)
    assert not gate.reserve("a") and gate.refused["a"] == 1
    assert gate.reserve("b", 1e9) and gate.used["b"] == 1e9 and math.isinf(gate.remaining("b"))


def test_up_to_grants_what_is_left_in_whole_units_for_ints():
    gate = LocalGate({"u": 5, "f": 1.5})
    assert gate.reserve_up_to("u", 3) == 3 and gate.reserve_up_to("u", 3) == 2 and gate.reserve_up_to("u", 1) == 0
    assert gate.used["u"] == 5 and gate.refused["u"] == 2
    assert gate.reserve_up_to("f", 2.0) == 1.5
    assert LocalGate({"u": 2}).reserve_up_to("u", 2.5) == 2


def test_keyed_release_gives_back_that_holding_and_unknown_keys_are_a_no_op():
    gate = LocalGate({"cpu": 10.0})
    assert gate.reserve("cpu", 4.0, "c1") and gate.reserve("cpu", 3.0, "c2")
    gate.release("cpu", 999, "c1")  # the key decides the amount
    assert gate.used["cpu"] == 3.0
    gate.release("cpu", 4.0, "c1")  # released already: nothing happens
    gate.release("cpu", 4.0, "never-held")
    assert gate.used["cpu"] == 3.0
    with pytest.raises(ValueError, match="exceeds"):
        gate.release("cpu", 5.0)


@pytest.mark.parametrize("amount", [0, -1, float("nan"), True, "1"])
def test_bad_amounts_raise(amount):
    with pytest.raises(ValueError, match="amount"):
        LocalGate().reserve("r", amount)


def test_kernel_gate_spends_at_grant_and_up_to_is_one_round_trip():
    kern = InProcessKernel()
    kern.call(P.MMI_JOB_OPEN, {"job": "g", "budget": {"refinements": 5}})
    gate = KernelGate(kern, "g")
    assert gate.reserve("refinements", 2)
    before = kern.calls
    assert gate.reserve_up_to("refinements", 10) == 3
    assert kern.calls == before + 1
    assert gate.reserve_up_to("refinements", 1) == 0 and not gate.reserve("refinements")
    assert gate.grants == 2 and gate.refusals == 2 and gate.held == {}
    assert kern.call(P.MMI_JOB_STATS, {"job": "g"})["spent"]["refinements"] == 5
    gate.release("refinements", 1)  # spent at grant: nothing to give back


def test_kernel_gate_hold_mode_keys_commit_release_and_renew_retakes_lost_ones():
    kern = InProcessKernel()
    kern.call(P.MMI_JOB_OPEN, {"job": "h", "budget": {"cpu_s": 10}})
    gate = KernelGate(lambda: kern, "h", hold=True, lease_s=60)
    assert gate.reserve("cpu_s", 4, "call-1") and gate.reserve("cpu_s", 3, "call-2")
    assert kern.call(P.MMI_JOB_STATS, {"job": "h"})["remaining"]["cpu_s"] == 3
    gate.commit("call-1")
    gate.release("cpu_s", 3, "call-2")
    stats = kern.call(P.MMI_JOB_STATS, {"job": "h"})
    assert stats["spent"]["cpu_s"] == 4 and stats["remaining"]["cpu_s"] == 6
    assert gate.reserve("cpu_s", 2, "call-3")
    kern.call(P.MMI_GATE_RELEASE, {"reservation": gate.held["call-3"].reservation})  # lost behind its back
    assert gate.renew() == 0 and gate.retaken == 1 and "call-3" in gate.held
    assert kern.call(P.MMI_JOB_STATS, {"job": "h"})["remaining"]["cpu_s"] == 4
    with pytest.raises(KeyError):
        gate.commit("nothing-held")


async def test_async_kernel_gate_has_the_same_answers():
    kern = AsyncInProcessKernel()
    await kern.call(P.MMI_JOB_OPEN, {"job": "a", "budget": {"u": 3}})
    gate = AsyncKernelGate(kern, "a")
    assert await gate.reserve("u") and await gate.reserve_up_to("u", 5) == 2 and not await gate.reserve("u")
    held = AsyncKernelGate(kern, "a", hold=True)
    await kern.call(P.MMI_JOB_OPEN, {"job": "b", "budget": {"u": 2}})
    held.job = "b"
    assert await held.reserve("u", 2, "k")
    await held.release("u", 2, "k")
    assert await held.reserve("u", 2, "k2")
    await held.commit("k2")
    assert (await kern.call(P.MMI_JOB_STATS, {"job": "b"}))["spent"]["u"] == 2
