"""A counted-resource gate held by the kernel, with the same interface as the in-process
ledgers the pure code uses (``reserve(resource, amount) -> bool``, ``release(resource, amount)``).

The kernel holds the count; this object only asks.  ``reserve`` commits at once (the unit is
spent when granted) unless ``hold=True``, in which case the reservation is kept until
:meth:`commit` or :meth:`release` (or until its lease in the kernel runs out: presumed abort).
"""

from __future__ import annotations

from typing import Any

from clients.sync import Client
from kernel import errors
from kernel import protocol as P


class KernelGate:
    def __init__(self, client: Client, job: str, *, hold: bool = False) -> None:
        self.client = client
        self.job = job
        self.hold = hold
        self.refusals = 0
        self.grants = 0
        self._held: dict[str, list[str]] = {}

    def reserve(self, resource: str, amount: int | float = 1) -> bool:
        """Atomically take ``amount`` units from the kernel; False (and nothing taken) if refused."""
        try:
            out: Any = self.client.reserve(self.job, resource, amount, commit=not self.hold)
        except (errors.Refused, errors.BudgetExceeded):
            self.refusals += 1
            return False
        self.grants += 1
        if self.hold:
            self._held.setdefault(resource, []).append(out["reservation"])
        return True

    def commit(self, resource: str) -> None:
        """Spend the oldest held reservation of ``resource``."""
        rid = self._held[resource].pop(0)
        self.client.call(P.MMI_GATE_COMMIT, {"reservation": rid})

    def release(self, resource: str, amount: int | float = 1) -> None:
        """Give back the oldest held reservation of ``resource`` (no-op for committed units:
        spending is final, a cap on structural growth counts every unit ever granted)."""
        held = self._held.get(resource)
        if held:
            self.client.call(P.MMI_GATE_RELEASE, {"reservation": held.pop(0)})
