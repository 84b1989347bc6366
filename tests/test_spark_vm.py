"""The pure opcode VM (spark/vm.py): semantics, typed errors, and the step-budget invariant on
randomised and hostile tapes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm import chains
from spark import tapes, vm


def run(tape, **limits):
    return vm.run_local(vm.parse_tape(tape), vm.Limits(**limits))


def test_chain_tape_computes_and_checks_every_step():
    items = [chains.Item(17, 25, 3), chains.Item(40, 12, 7)]
    m = run(tapes.chain_tape(items))
    assert m.status is vm.Status.HALTED
    assert m.output == [92, 124]
    checks = [t for t in m.trace if t["op"] == "CHECK"]
    assert [c["label"] for c in checks] == ["25*3=75", "17+75=92", "12*7=84", "40+84=124"]
    assert all(c["ok"] for c in checks)
    assert [t["text"] for t in m.trace if t["op"] == "PLAN"] == ["25*3", "17+75", "12*7", "40+84"]


def test_loop_fib_and_heap_tapes_give_the_right_values():
    assert run(tapes.loop_tape(100), max_steps=5000).output == [5050]
    assert run(tapes.fib_tape(12), max_steps=100_000).output == [144]
    m = run(tapes.heap_tape(50), max_steps=10_000)
    assert m.status is vm.Status.HALTED and m.trace[-1]["ok"] and m.cells == 50


def test_a_wrong_check_is_recorded_and_an_assert_faults():
    m = run([["PUSH", 2], ["PUSH", 3], "MUL", ["PUSH", 7], ["CHECK", "2*3=7"], "HALT"])
    assert m.status is vm.Status.HALTED and m.trace[-1]["ok"] is False and m.stack == [0]
    m = run([["PUSH", 0], ["ASSERT", "nonzero"]])
    assert m.fault is vm.Fault.CHECK


@pytest.mark.parametrize("kind", tapes.MALFORMED)
def test_malformed_tapes_are_typed_errors_before_anything_runs(kind):
    with pytest.raises(vm.TapeError) as info:
        vm.parse_tape(tapes.malformed_tape(kind))
    expected = vm.UnknownOpcode if kind == "unknown_opcode" else vm.MalformedTape
    assert type(info.value) is expected
    assert info.value.code == ("unknown_opcode" if kind == "unknown_opcode" else "malformed_tape")


def test_limits_can_only_be_tightened():
    base = vm.Limits(max_steps=100)
    assert base.tightened({"max_steps": 10**9}).max_steps == 100
    assert base.tightened({"max_cells": 5}).max_cells == 5
    with pytest.raises(vm.MalformedTape):
        base.tightened({"max_stepz": 1})
    with pytest.raises(vm.MalformedTape):
        base.tightened({"max_steps": -1})


@pytest.mark.parametrize(
    ("kind", "fault"),
    [
        ("infinite", vm.Fault.STEP_BUDGET),
        ("recursion", vm.Fault.DEPTH),
        ("huge_alloc", vm.Fault.MEMORY),
        ("alloc_loop", vm.Fault.MEMORY),
        ("stack_bomb", vm.Fault.STACK),
        ("int_bomb", vm.Fault.ARITHMETIC),
    ],
)
def test_every_hostile_tape_is_stopped_with_its_fault(kind, fault):
    m = run(tapes.hostile_tape(kind, random.Random(1)), max_steps=100_000)
    assert m.status is vm.Status.FAULTED and m.fault is fault, m.message
    assert m.steps <= 100_000
    assert m.cells <= m.limits.max_cells and len(m.stack) <= m.limits.max_stack
    assert len(m.frames) <= m.limits.max_depth


def test_huge_allocation_is_refused_before_a_cell_exists():
    m = run([["PUSH", 10**15], "ALLOC", "HALT"])
    assert m.fault is vm.Fault.MEMORY and m.cells == 0 and m.heap == []


def test_the_step_budget_is_exact():
    m = run(tapes.hostile_tape("infinite", random.Random(0)), max_steps=1000)
    assert m.fault is vm.Fault.STEP_BUDGET and m.steps == 1000
    # A tape that needs exactly its budget halts.
    need = run(tapes.loop_tape(10), max_steps=10**6).steps
    assert run(tapes.loop_tape(10), max_steps=need).status is vm.Status.HALTED
    assert run(tapes.loop_tape(10), max_steps=need - 1).fault is vm.Fault.STEP_BUDGET


def test_slices_resume_where_they_stopped():
    tape = vm.parse_tape(tapes.fib_tape(10))
    whole = vm.run_local(tape, vm.Limits(max_steps=10**5))
    m = vm.Machine(tape, vm.Limits(max_steps=10**5))
    slices = 0
    while m.run(7) is vm.Status.READY:
        slices += 1
    assert slices > 10 and m.result() == whole.result()


def test_syscalls_push_the_answer_or_fault():
    tape = [["SVC", "echo", {"x": 41}], ["FIELD", "x"], ["PUSH", 1], "ADD", "EMIT", "HALT"]
    m = vm.run_local(vm.parse_tape(tape), vm.Limits(), answer=lambda call: dict(call.payload))
    assert m.output == [42] and m.syscalls == 1 and m.steps == 5 + 1 + vm.Limits().svc_cost
    m = vm.run_local(vm.parse_tape(tape), vm.Limits())
    assert m.fault is vm.Fault.SERVICE


def test_type_and_arithmetic_faults():
    assert run([["PUSH", "a"], ["PUSH", 1], "SUB"]).fault is vm.Fault.TYPE
    assert run([["PUSH", 1], ["PUSH", 0], "DIV"]).fault is vm.Fault.ARITHMETIC
    assert run(["ADD"]).fault is vm.Fault.UNDERFLOW
    assert run([["LOAD", "nope"]]).fault is vm.Fault.TYPE


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), budget=st.integers(0, 30_000))
def test_no_tape_ever_runs_past_its_step_budget(seed, budget):
    rng = random.Random(seed)
    kind, raw = tapes.random_tape(rng)
    tape = vm.parse_tape(raw)
    m = vm.run_local(tape, vm.Limits(max_steps=budget))
    assert m.steps <= budget
    assert m.status in (vm.Status.HALTED, vm.Status.FAULTED)
    if tapes.KINDS[kind] and kind in ("infinite", "stack_bomb", "alloc_loop", "int_bomb", "recursion", "huge_alloc"):
        assert m.status is vm.Status.FAULTED
    again = vm.run_local(tape, vm.Limits(max_steps=budget))  # deterministic: the outcome re-runs
    assert again.result() == m.result()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.text(max_size=6), st.lists(st.one_of(st.text(max_size=6), st.integers(), st.none()), max_size=3)),
        max_size=8,
    )
)
def test_arbitrary_input_parses_or_raises_a_tape_error(raw):
    try:
        tape = vm.parse_tape(raw)
    except vm.TapeError:
        return
    m = vm.run_local(tape, vm.Limits(max_steps=500))
    assert m.steps <= 500
