"""The growth gate: the only thing a growing model may ask before it adds structure.

A model calls ``gate.reserve("prototypes", 1)`` before it spawns a unit and grows only on ``True``.
The model's behaviour depends on nothing but these answers, so an in-process ``LocalGate`` and a
kernel-backed gate (the kernel holds the count under the experiment's job) give identical runs
whenever they give identical answers.

Budget semantics (chosen to match seed 000's story, "a cap on structural expansion"): the
``prototypes`` resource counts units *spawned*.  Pruning and merging do not give units back, so a
cap of N means at most N spawns over the whole run.  ``release`` exists for resources that are
held rather than spent (and for rolling back a reservation that could not be used); the models
call it only when built with ``release_on_removal=True`` (a cap on *live* units instead).
"""

from __future__ import annotations

from collections.abc import Mapping

from kernel.gate import Gate, LocalGate as _LocalGate

PROTOTYPES = "prototypes"

#: What a growing model needs from the runtime: the kernel's one :class:`kernel.gate.Gate`.
GrowthGate = Gate


class LocalGate(_LocalGate):
    """:class:`kernel.gate.LocalGate` counting whole units (amounts and caps are ints).  A
    resource without a cap is unlimited (the one rule of every gate); a cap of 0 forbids it."""

    def __init__(self, caps: Mapping[str, int]) -> None:
        super().__init__(caps, whole_units=True)


class UnlimitedGate(LocalGate):
    """Grants everything; counts what it granted (``used``) so runs can report it."""

    def __init__(self) -> None:
        super().__init__({})
