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

import threading
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

PROTOTYPES = "prototypes"


@runtime_checkable
class GrowthGate(Protocol):
    """What a growing model needs from the runtime."""

    def reserve(self, resource: str, amount: int = 1) -> bool:
        """Atomically reserve ``amount`` units of ``resource``.

        ``True``: granted and counted against the cap.  ``False``: refused; nothing was counted.
        """
        ...

    def release(self, resource: str, amount: int = 1) -> None:
        """Return ``amount`` previously reserved units of ``resource``."""
        ...


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        raise ValueError(f"amount must be a positive int, got {amount!r}")


class UnlimitedGate:
    """Grants everything; counts what it granted (``used``) so runs can report it."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}

    def reserve(self, resource: str, amount: int = 1) -> bool:
        _check_amount(amount)
        self.used[resource] = self.used.get(resource, 0) + amount
        return True

    def release(self, resource: str, amount: int = 1) -> None:
        _check_amount(amount)
        held = self.used.get(resource, 0)
        if amount > held:
            raise ValueError(f"release of {amount} {resource!r} exceeds the {held} reserved")
        self.used[resource] = held - amount


class LocalGate:
    """An in-process ledger with a hard cap per resource.

    Invariant: ``0 <= used[r] <= caps[r]`` for every capped resource ``r``.  A resource with no cap
    is refused (a gate that does not know a resource must not grant it).  Thread-safe.
    """

    def __init__(self, caps: Mapping[str, int]) -> None:
        for resource, cap in caps.items():
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
                raise ValueError(f"cap for {resource!r} must be a non-negative int, got {cap!r}")
        self.caps = dict(caps)
        self.used = {resource: 0 for resource in self.caps}
        self.refused = {resource: 0 for resource in self.caps}
        self._lock = threading.Lock()

    def reserve(self, resource: str, amount: int = 1) -> bool:
        _check_amount(amount)
        with self._lock:
            cap = self.caps.get(resource)
            if cap is None or self.used[resource] + amount > cap:
                if cap is not None:
                    self.refused[resource] += 1
                return False
            self.used[resource] += amount
            return True

    def release(self, resource: str, amount: int = 1) -> None:
        _check_amount(amount)
        with self._lock:
            held = self.used.get(resource, 0)
            if amount > held:
                raise ValueError(f"release of {amount} {resource!r} exceeds the {held} reserved")
            self.used[resource] = held - amount

    def remaining(self, resource: str) -> int:
        """Units of ``resource`` still grantable (0 for an unknown resource)."""
        with self._lock:
            if resource not in self.caps:
                return 0
            return self.caps[resource] - self.used[resource]
