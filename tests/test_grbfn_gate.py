"""The growth gate ledger."""

import threading

import pytest

from sims.grbfn.gate import PROTOTYPES, GrowthGate, LocalGate, UnlimitedGate


def test_local_gate_grants_up_to_the_cap_then_refuses():
    gate = LocalGate({PROTOTYPES: 3})
    assert [gate.reserve(PROTOTYPES) for _ in range(5)] == [True, True, True, False, False]
    assert gate.used[PROTOTYPES] == 3 and gate.refused[PROTOTYPES] == 2
    assert gate.remaining(PROTOTYPES) == 0
    assert not gate.reserve(PROTOTYPES, 1)


def test_local_gate_multi_unit_reservation_is_all_or_nothing():
    gate = LocalGate({PROTOTYPES: 5})
    assert gate.reserve(PROTOTYPES, 4)
    assert not gate.reserve(PROTOTYPES, 2)
    assert gate.used[PROTOTYPES] == 4
    assert gate.reserve(PROTOTYPES, 1)


def test_release_returns_units_and_over_release_is_an_error():
    gate = LocalGate({PROTOTYPES: 2})
    assert gate.reserve(PROTOTYPES, 2)
    gate.release(PROTOTYPES, 1)
    assert gate.remaining(PROTOTYPES) == 1
    with pytest.raises(ValueError, match="exceeds"):
        gate.release(PROTOTYPES, 2)


def test_unknown_resource_is_unlimited_and_zero_cap_refuses_everything():
    """The one rule of every gate (kernel.gate): no cap means unlimited, as in the kernel's ledger."""
    gate = LocalGate({PROTOTYPES: 0})
    assert not gate.reserve(PROTOTYPES)
    assert gate.reserve("escalations", 7) and gate.used["escalations"] == 7
    assert gate.remaining("escalations") == float("inf")


@pytest.mark.parametrize("amount", [0, -1, 1.5, True])
def test_bad_amounts_raise(amount):
    for gate in (LocalGate({PROTOTYPES: 3}), UnlimitedGate()):
        with pytest.raises(ValueError, match="amount"):
            gate.reserve(PROTOTYPES, amount)


@pytest.mark.parametrize("cap", [-1, 2.0, None])
def test_bad_caps_raise(cap):
    with pytest.raises(ValueError, match="cap"):
        LocalGate({PROTOTYPES: cap})


def test_unlimited_gate_counts_and_both_satisfy_the_protocol():
    gate = UnlimitedGate()
    assert all(gate.reserve(PROTOTYPES) for _ in range(100))
    gate.release(PROTOTYPES, 40)
    assert gate.used[PROTOTYPES] == 60
    assert isinstance(gate, GrowthGate) and isinstance(LocalGate({}), GrowthGate)


def test_concurrent_reservations_never_exceed_the_cap():
    gate = LocalGate({PROTOTYPES: 500})
    granted = []
    start = threading.Barrier(8)

    def worker():
        start.wait()
        granted.append(sum(gate.reserve(PROTOTYPES) for _ in range(200)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    assert sum(granted) == 500 == gate.used[PROTOTYPES]
