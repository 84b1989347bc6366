"""The training domain: synthetic multi-step arithmetic chains, generated offline.

A question lists independent items ``a+b*c``; the answer works each item in two steps::

    Q:17+25*3,40+12*7;25*3=75;17+75=92;12*7=84;40+84=124;<eos>

Every step is checkable exactly (:mod:`lm.verifier`).  The lazy form ``L:`` asks for the items as
thunks instead of their expansions (Lazy-of-Thought, :mod:`lm.thunks`)::

    L:17+25*3,40+12*7;⟦ev(17+25*3)⟧;⟦ev(40+12*7)⟧;<eos>

Items are independent by construction, so a repaired item never invalidates another item; the two
steps inside an item depend on each other (the second restates the first step's result).
"""

from __future__ import annotations

import dataclasses
import random

A_RANGE = (1, 99)
B_RANGE = (2, 39)
C_RANGE = (2, 9)
MAX_ITEMS = 5


@dataclasses.dataclass(frozen=True)
class Item:
    """One question item ``a+b*c``."""

    a: int
    b: int
    c: int

    @property
    def expr(self) -> str:
        return f"{self.a}+{self.b}*{self.c}"

    @property
    def product(self) -> int:
        return self.b * self.c

    @property
    def value(self) -> int:
        return self.a + self.b * self.c

    def steps(self) -> tuple[str, str]:
        """The two correct steps, without separators."""
        return f"{self.b}*{self.c}={self.product}", f"{self.a}+{self.product}={self.value}"

    def expansion(self) -> str:
        """The item's worked text, each step terminated by ``;``."""
        s1, s2 = self.steps()
        return f"{s1};{s2};"

    def thunk(self) -> str:
        return f"⟦ev({self.expr})⟧;"


def random_item(rng: random.Random) -> Item:
    return Item(rng.randint(*A_RANGE), rng.randint(*B_RANGE), rng.randint(*C_RANGE))


def random_items(rng: random.Random, n_items: int) -> list[Item]:
    if not 1 <= n_items <= MAX_ITEMS:
        raise ValueError(f"n_items must be in [1, {MAX_ITEMS}], got {n_items}")
    return [random_item(rng) for _ in range(n_items)]


def prompt(items: list[Item], *, lazy: bool = False) -> str:
    """The question text the model is conditioned on (ends with ``;``)."""
    return ("L:" if lazy else "Q:") + ",".join(it.expr for it in items) + ";"


def answer(items: list[Item], *, lazy: bool = False) -> str:
    """The correct answer text that follows :func:`prompt`."""
    return "".join(it.thunk() if lazy else it.expansion() for it in items)


def chain(items: list[Item], *, lazy: bool = False) -> str:
    return prompt(items, lazy=lazy) + answer(items, lazy=lazy)
