"""Generated reasoning tapes: benign ones (arithmetic chains worked and checked step by step,
bounded loops, recursion with a base case, service calls) and hostile ones (infinite loop,
unbounded recursion, huge allocation, allocation in a loop, stack bomb, integer blow-up), plus
malformed tapes for the typed-error path.  Deterministic in the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
from typing import Any

from lm import chains

#: Every kind :func:`random_tape` draws, and whether it is hostile.
KINDS: dict[str, bool] = {
    "chain": False,
    "loop": False,
    "fib": False,
    "heap": False,
    "infinite": True,
    "recursion": True,
    "huge_alloc": True,
    "alloc_loop": True,
    "stack_bomb": True,
    "int_bomb": True,
}
MALFORMED = ("unknown_opcode", "bad_arity", "bad_target", "not_a_list", "bad_literal")


def chain_tape(items: list[chains.Item]) -> list[Any]:
    """The arithmetic chain ``a+b*c, ...`` as a plan-compute-check tape (the tape form of what the
    chain LM writes): each item's two steps computed on the stack and checked against the
    value written out, each result emitted."""
    tape: list[Any] = []
    for it in items:
        tape += [
            ["PLAN", f"{it.b}*{it.c}"],
            ["PUSH", it.b],
            ["PUSH", it.c],
            "MUL",
            "DUP",
            ["PUSH", it.product],
            ["CHECK", f"{it.b}*{it.c}={it.product}"],
            ["ASSERT", "product"],
            ["PLAN", f"{it.a}+{it.product}"],
            ["PUSH", it.a],
            "ADD",
            "DUP",
            ["PUSH", it.value],
            ["CHECK", f"{it.a}+{it.product}={it.value}"],
            ["ASSERT", "sum"],
            "EMIT",
        ]
    return tape + ["HALT"]


def loop_tape(n: int) -> list[Any]:
    """Sum 1..n in a counted loop (about 11 steps per iteration); emits the sum."""
    return [
        ["PUSH", n],
        ["STORE", "i"],
        ["PUSH", 0],
        ["STORE", "s"],
        ["LOAD", "i"],
        ["JZ", 16],  # 4, 5
        ["LOAD", "s"],
        ["LOAD", "i"],
        "ADD",
        ["STORE", "s"],  # 6..9
        ["LOAD", "i"],
        ["PUSH", 1],
        "SUB",
        ["STORE", "i"],
        ["JMP", 4],
        "NOP",  # 10..15
        ["LOAD", "s"],
        ["PUSH", n * (n + 1) // 2],
        ["CHECK", "gauss"],
        ["ASSERT", "gauss"],
        ["LOAD", "s"],
        "EMIT",
        "HALT",
    ]


def fib_tape(n: int) -> list[Any]:
    """Recursive Fibonacci with a base case (call depth n, ~fib(n) calls)."""
    return [
        ["PUSH", n],
        ["CALL", 4],
        "EMIT",
        "HALT",
        # 4: fib(x): x on the stack -> fib(x)
        "DUP",
        ["PUSH", 2],
        "LT",
        ["JZ", 9],
        "RET",
        # 9: x >= 2
        "DUP",
        ["PUSH", 1],
        "SUB",
        ["CALL", 4],
        "SWAP",
        ["PUSH", 2],
        "SUB",
        ["CALL", 4],
        "ADD",
        "RET",
    ]


def heap_tape(n: int) -> list[Any]:
    """Allocate n cells, write i*i into each, read the last back and check it."""
    return [
        ["PUSH", n],
        "ALLOC",
        ["STORE", "h"],
        ["PUSH", 0],
        ["STORE", "i"],
        ["LOAD", "i"],
        ["PUSH", n],
        "LT",
        ["JZ", 21],  # 5..8
        ["LOAD", "h"],
        ["LOAD", "i"],
        ["LOAD", "i"],
        ["LOAD", "i"],
        "MUL",
        "PUT",  # 9..14
        ["LOAD", "i"],
        ["PUSH", 1],
        "ADD",
        ["STORE", "i"],
        ["JMP", 5],
        "NOP",  # 15..20
        ["LOAD", "h"],
        ["PUSH", n - 1],
        "GET",
        ["PUSH", (n - 1) ** 2],
        ["CHECK", "last"],
        "EMIT",
        "HALT",
    ]


def hostile_tape(kind: str, rng: random.Random) -> list[Any]:
    if kind == "infinite":
        return [["PLAN", "spin"], ["PUSH", 1], "POP", ["JMP", 1]]
    if kind == "recursion":
        return [["CALL", 0]]
    if kind == "huge_alloc":
        return [["PUSH", rng.choice([10**9, 2**40, 10**15])], "ALLOC", "HALT"]
    if kind == "alloc_loop":
        return [["PUSH", rng.randint(100, 4000)], "ALLOC", "POP", ["JMP", 0]]
    if kind == "stack_bomb":
        return [["PUSH", 7], ["JMP", 0]]
    if kind == "int_bomb":
        return [["PUSH", rng.randint(2, 9)], "DUP", "MUL", ["JMP", 1]]
    raise ValueError(f"unknown hostile kind {kind!r}")


def random_tape(rng: random.Random, kind: str | None = None) -> tuple[str, list[Any]]:
    """(kind, tape) drawn from :data:`KINDS` (uniformly unless ``kind`` is given)."""
    kind = kind or rng.choice(sorted(KINDS))
    if kind == "chain":
        return kind, chain_tape(chains.random_items(rng, rng.randint(1, chains.MAX_ITEMS)))
    if kind == "loop":
        return kind, loop_tape(rng.randint(1, 400))
    if kind == "fib":
        return kind, fib_tape(rng.randint(1, 14))
    if kind == "heap":
        return kind, heap_tape(rng.randint(1, 300))
    return kind, hostile_tape(kind, rng)


def malformed_tape(kind: str) -> Any:
    if kind == "unknown_opcode":
        return [["PUSH", 1], ["FROBNICATE"], "HALT"]
    if kind == "bad_arity":
        return [["PUSH", 1, 2]]
    if kind == "bad_target":
        return [["JMP", 99]]
    if kind == "not_a_list":
        return {"PUSH": 1}
    if kind == "bad_literal":
        return [["PUSH", {"a": 1}]]
    raise ValueError(f"unknown malformed kind {kind!r}")
