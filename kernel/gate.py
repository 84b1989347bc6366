"""The gate: the one thing pure code asks before it spends a counted resource.

Seed 001's central primitive.  Pure code (the growing RBF network, the IGMS controller, the
transaction manager) is written against :class:`Gate` and behaves the same under every
implementation that gives the same answers:

* :class:`LocalGate` — in-process capacities (experiments, unit tests, offline runs);
* :class:`KernelGate` / :class:`AsyncKernelGate` — the kernel's ledger holds the count, under a
  job, through ``mmi.gate.*`` (blocking and async forms of one body: each operation is written
  once as a generator of the management calls it needs, which the blocking gate drives with
  ``client.call`` and the async one with ``await client.call``; the caller passes any object with
  a ``call(service, payload)`` method, e.g. ``clients.Client`` / ``clients.AsyncClient``, under
  asyncio or trio).

**The rule for unknown resources** (one rule, the kernel's): a resource the gate has no cap for
is *unlimited* — granted and counted.  In the kernel, a counted kind no job up the chain limits
is ungoverned in the same way.  To forbid a resource, give it a cap of 0.

Semantics shared by every gate:

* ``reserve(resource, amount, key)`` is all or nothing: True (granted and counted) or False
  (refused, nothing counted).  ``key`` names the holding (one per transaction, say) so that
  ``release(resource, amount, key)`` gives back exactly that one; releasing a key not held is a
  no-op (it may have been taken by an earlier process: the kernel's lease returns those).
* ``reserve_up_to(resource, amount)`` grants ``min(amount, what is left)`` (whole units for an
  integer amount) and returns how much: one kernel round trip where ``amount`` single
  reservations would take ``amount``.  Granted units are spent at once.
* ``release`` without a key returns units to the pool; more than is in use is an error.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Generator, Mapping
from typing import Any, Protocol, cast, runtime_checkable

from kernel import errors
from kernel import protocol as P

log = logging.getLogger("reca.gate")

Amount = int | float


@runtime_checkable
class Gate(Protocol):
    """What pure code needs from the runtime to spend counted resources."""

    def reserve(self, resource: str, amount: Amount = 1, key: str | None = None) -> bool:
        """Atomically take ``amount`` of ``resource``: True (granted, counted) or False (refused,
        nothing counted)."""
        ...

    def release(self, resource: str, amount: Amount = 1, key: str | None = None) -> None:
        """Give back ``amount`` (or what ``key`` holds) of ``resource``."""
        ...


def check_amount(amount: Any, *, whole: bool = False, zero: bool = False) -> None:
    """``amount`` must be a finite number > 0 (>= 0 with ``zero``); an int when ``whole``."""
    ok = isinstance(amount, int) if whole else isinstance(amount, (int, float))
    if isinstance(amount, bool) or not ok or not math.isfinite(amount) or amount < 0 or (amount == 0 and not zero):
        what = "a positive int" if whole else "a positive number"
        raise ValueError(f"amount must be {what}, got {amount!r}")


class LocalGate:
    """An in-process gate: a cap per resource; a resource without a cap is unlimited.

    ``used`` and ``refused`` count per resource.  ``whole_units``: amounts must be positive ints
    (units such as prototypes).  Invariant: ``0 <= used[r] <= caps[r]`` for every capped ``r``.
    Thread-safe.
    """

    def __init__(self, caps: Mapping[str, Amount] | None = None, *, whole_units: bool = False) -> None:
        self.whole_units = whole_units
        for resource, cap in (caps or {}).items():
            kinds: tuple[type, ...] = (int,) if whole_units else (int, float)
            if isinstance(cap, bool) or not isinstance(cap, kinds) or cap < 0:
                raise ValueError(
                    f"cap for {resource!r} must be a non-negative {'int' if whole_units else 'number'}, got {cap!r}"
                )
        self.caps: dict[str, Amount] = dict(caps or {})
        self.used: dict[str, Amount] = collections.defaultdict(int)
        self.refused: collections.Counter[str] = collections.Counter()
        self._held: dict[str, tuple[str, Amount]] = {}  # key -> (resource, amount)
        self._lock = threading.Lock()

    def _left(self, resource: str) -> float:
        cap = self.caps.get(resource)
        return math.inf if cap is None else cap - self.used[resource]

    def reserve(self, resource: str, amount: Amount = 1, key: str | None = None) -> bool:
        check_amount(amount, whole=self.whole_units)
        with self._lock:
            if amount > self._left(resource) + 1e-9:
                self.refused[resource] += 1
                return False
            self.used[resource] += amount
            if key is not None:
                self._held[key] = (resource, amount)
            return True

    def reserve_up_to(self, resource: str, amount: Amount) -> Amount:
        check_amount(amount, whole=self.whole_units)
        with self._lock:
            left = max(0.0, self._left(resource))
            got: Amount = (
                amount if amount <= left + 1e-9 else (math.floor(left + 1e-9) if isinstance(amount, int) else left)
            )
            if got < amount:
                self.refused[resource] += 1
            self.used[resource] += got
            return got

    def release(self, resource: str, amount: Amount = 1, key: str | None = None) -> None:
        with self._lock:
            if key is not None:
                held = self._held.pop(key, None)
                if held is not None:
                    self.used[held[0]] -= held[1]
                return
            check_amount(amount, whole=self.whole_units, zero=True)
            have = self.used[resource]
            if amount > have + 1e-9:
                raise ValueError(f"cannot release {amount} {resource!r}: exceeds the {have} reserved")
            self.used[resource] = have - amount

    def remaining(self, resource: str) -> float:
        """Units of ``resource`` still grantable (inf for a resource without a cap)."""
        with self._lock:
            return self._left(resource)


class Caller(Protocol):
    """What the kernel gates need of a client: one blocking request."""

    def call(self, service: str, payload: Any = None, **kw: Any) -> Any: ...


class AsyncCaller(Protocol):
    """What :class:`AsyncKernelGate` needs of a client: one asyncio request."""

    async def call(self, service: str, payload: Any = None, **kw: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Held:
    """A kernel reservation a gate holds for one key, and what to take again if lost."""

    reservation: str
    job: str
    resource: str
    amount: Amount


#: Refusals a gate answers False to (anything else the kernel says is raised).
REFUSALS = (errors.Refused, errors.BudgetExceeded)


#: One step of a gate operation: the management call to make, ``(service, payload)``.
Call = tuple[str, dict[str, Any]]
#: A gate operation written once: a generator that yields the calls it needs, is sent each
#: call's result (or thrown its RecaError), and returns the operation's answer.  The blocking
#: gate drives it with ``client.call``, the async gate with ``await client.call``.
Op = Generator[Call, Any, Any]


class _KernelGateBase:
    """The body of the kernel gates, once for blocking and async callers: every operation is an
    :data:`Op` (no I/O here); :class:`KernelGate` and :class:`AsyncKernelGate` only drive them."""

    def __init__(self, job: str, hold: bool, lease_s: float | None) -> None:
        #: The job reservations are taken in (settable between calls).
        self.job = job
        #: True: ``reserve`` holds (commit later, release, lease renewed); False: spent at once.
        self.hold = hold
        self.lease_s = lease_s
        #: key -> the reservation this process holds for it (hold mode).
        self.held: dict[str, Held] = {}
        self.grants = 0
        self.refusals = 0
        self.release_failures = 0
        #: Reservations the kernel no longer held at a renewal, taken again / lost for good.
        self.retaken = 0
        self.leases_lost = 0
        self._keys = 0

    def _reserve_arg(
        self, job: str, resource: str, amount: Amount, *, up_to: bool = False, commit: bool | None = None
    ) -> dict[str, Any]:
        arg: dict[str, Any] = {
            "job": job,
            "resource": resource,
            "amount": amount,
            "commit": (not self.hold) if commit is None else commit,
        }
        if up_to:
            arg["up_to"] = True
        if self.lease_s is not None and not arg["commit"]:
            arg["lease_s"] = self.lease_s
        return arg

    def _oldest(self, resource: str) -> str | None:
        return next((k for k, h in self.held.items() if h.resource == resource), None)

    # -- the operations, written once ---------------------------------------------------------

    def _reserve(self, resource: str, amount: Amount, key: str | None) -> Op:
        try:
            out = yield P.MMI_GATE_RESERVE, self._reserve_arg(self.job, resource, amount)
        except REFUSALS:
            self.refusals += 1
            return False
        self.grants += 1
        if "reservation" in out:
            if key is None:
                self._keys += 1
                key = f"{resource}#{self._keys}"
            self.held[key] = Held(out["reservation"], self.job, resource, amount)
        return True

    def _reserve_up_to(self, resource: str, amount: Amount) -> Op:
        try:
            out = yield P.MMI_GATE_RESERVE, self._reserve_arg(self.job, resource, amount, up_to=True, commit=True)
        except REFUSALS:
            self.refusals += 1
            return 0
        self.grants += 1
        return out["granted"]

    def _commit(self, key: str) -> Op:
        k = key if key in self.held else self._oldest(key)
        if k is None:
            raise KeyError(f"no reservation held for {key!r}")
        held = self.held.pop(k)
        yield P.MMI_GATE_COMMIT, {"reservation": held.reservation}

    def _release(self, resource: str, key: str | None) -> Op:
        k = key if key is not None else self._oldest(resource)
        held = None if k is None else self.held.pop(k, None)
        if held is None:
            return
        try:
            yield P.MMI_GATE_RELEASE, {"reservation": held.reservation}
        except errors.RecaError as exc:
            self.release_failures += 1  # the kernel's lease reclaims the units
            log.warning("gate release of %s failed: %s", held.reservation, exc)

    def _renew(self) -> Op:
        if not self.held:
            return 0
        arg: dict[str, Any] = {"reservations": [h.reservation for h in self.held.values()]}
        if self.lease_s is not None:
            arg["lease_s"] = self.lease_s
        try:
            out = yield P.MMI_GATE_RENEW, arg
        except errors.RecaError as exc:  # the next renewal retries; the lease is longer
            log.warning("gate renewal failed: %s", exc)
            return 0
        unknown = set(out.get("unknown", ()))
        for key, lost in [(k, h) for k, h in self.held.items() if h.reservation in unknown]:
            try:
                again = yield P.MMI_GATE_RESERVE, self._reserve_arg(lost.job, lost.resource, lost.amount)
            except REFUSALS as exc:
                self.leases_lost += 1
                del self.held[key]
                log.warning("%s: the kernel lost its reservation and refused it again: %s", key, exc)
                continue
            except errors.RecaError as exc:  # kernel still (re)starting: the next renewal retries
                log.warning("%s: taking its lost reservation again failed: %s", key, exc)
                continue
            self.held[key] = Held(again["reservation"], lost.job, lost.resource, lost.amount)
            self.retaken += 1
        return len(out.get("renewed", ()))


class KernelGate(_KernelGateBase):
    """:class:`Gate` backed by the kernel's ledger, blocking.  ``client``: a client, or a
    factory called on first use.  Used from one thread at a time (a client's socket is)."""

    def __init__(
        self,
        client: Caller | Callable[[], Caller],
        job: str = "default",
        *,
        hold: bool = False,
        lease_s: float | None = None,
    ) -> None:
        super().__init__(job, hold, lease_s)
        self._client: Caller | None = None
        self._factory: Callable[[], Caller] | None = None
        if hasattr(client, "call"):
            self._client = cast(Caller, client)
        else:
            self._factory = client

    @property
    def client(self) -> Caller:
        if self._client is None:
            assert self._factory is not None
            self._client = self._factory()
        return self._client

    def _drive(self, op: Op) -> Any:
        try:
            call = next(op)
            while True:
                try:
                    result = self.client.call(*call)
                except errors.RecaError as exc:
                    call = op.throw(exc)
                else:
                    call = op.send(result)
        except StopIteration as done:
            return done.value

    def reserve(self, resource: str, amount: Amount = 1, key: str | None = None) -> bool:
        """Take ``amount`` of ``resource`` (held under ``key`` in hold mode): True or False."""
        return self._drive(self._reserve(resource, amount, key))

    def reserve_up_to(self, resource: str, amount: Amount) -> Amount:
        """Take and spend ``min(amount, what is left)`` in one round trip; returns how much."""
        return self._drive(self._reserve_up_to(resource, amount))

    def commit(self, key: str) -> None:
        """Spend the reservation held for ``key`` (or, given a resource name, its oldest)."""
        self._drive(self._commit(key))

    def release(self, resource: str, amount: Amount = 1, key: str | None = None) -> None:
        """Give back the reservation held for ``key`` (else the oldest of ``resource``).  Units
        spent at grant are not given back (spending is final); nothing held: a no-op."""
        self._drive(self._release(resource, key))

    def renew(self) -> int:
        """Extend every held reservation by one lease.  One the kernel no longer holds (it
        restarted, or a renewal came late) is taken again; if the kernel refuses, it is dropped
        and counted in ``leases_lost``.  Returns how many were renewed."""
        return self._drive(self._renew())


class AsyncKernelGate(_KernelGateBase):
    """The async form of :class:`KernelGate` (same arguments, same body, coroutine methods); runs
    under any event loop the client runs under (asyncio or trio with :class:`clients.AsyncClient`)."""

    def __init__(
        self, client: AsyncCaller, job: str = "default", *, hold: bool = False, lease_s: float | None = None
    ) -> None:
        super().__init__(job, hold, lease_s)
        self.client = client

    async def _drive(self, op: Op) -> Any:
        try:
            call = next(op)
            while True:
                try:
                    result = await self.client.call(*call)
                except errors.RecaError as exc:
                    call = op.throw(exc)
                else:
                    call = op.send(result)
        except StopIteration as done:
            return done.value

    async def reserve(self, resource: str, amount: Amount = 1, key: str | None = None) -> bool:
        return await self._drive(self._reserve(resource, amount, key))

    async def reserve_up_to(self, resource: str, amount: Amount) -> Amount:
        """Take and spend ``min(amount, what is left)`` in one round trip; returns how much."""
        return await self._drive(self._reserve_up_to(resource, amount))

    async def commit(self, key: str) -> None:
        await self._drive(self._commit(key))

    async def release(self, resource: str, amount: Amount = 1, key: str | None = None) -> None:
        await self._drive(self._release(resource, key))

    async def renew(self) -> int:
        """As :meth:`KernelGate.renew`."""
        return await self._drive(self._renew())
