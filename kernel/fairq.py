"""Weighted fair share of a service's slots across principals: deficit round robin (DRR).

One :class:`FairQueue` per service holds the requests waiting for a slot.  Across principals the
slots are shared by deficit round robin (Shreedhar and Varghese, 1995) with unit cost per
request: each principal with waiting requests is visited in turn and may dispatch ``weight``
requests per round (a fractional weight carries its remainder in the principal's *deficit* to
the next round).  Within one principal, requests go by priority (highest first), then by the
order the caller gives (the router: round-robin across the principal's clients, then FIFO).

So priority orders only within a principal: one principal's priority-1000 backlog delays another
principal's request by at most one round (``sum of the other weights`` dispatches), never
indefinitely.  Weights come from the config (``[enforce] weights``; default 1 each).

An **operator's** priority crosses principals (issue 23: "priority orders requests within one
principal (an operator's may cross)"): a request the router pushes with ``crosses`` (an operator
acting for itself, at a priority above the default) waits in the *express* heap, served before
every principal's round, by priority, then order, then arrival; it counts in every principal's
:meth:`FairQueue.top_priority` (a paused request of any principal does not take its slot back
ahead of it).  Only operators can do this, and only on purpose: their ordinary requests share
the slots like anyone's.

Invariants (:meth:`FairQueue.check`):

* ``active`` holds exactly the principals with at least one entry in their heap, each once;
* a principal not in ``active`` has deficit 0 (an idle principal banks no credit);
* every deficit is in ``[0, max(weight, 1) + 1)`` (credit never piles up);
* ``len(queue)`` counts entries, live or done, express ones included (done ones are dropped
  lazily at pop, or by :meth:`compact`).

Pure: no clock, no I/O; entries are tuples whose last element is the request (``entry[-1]``), any
object with a ``done`` attribute.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["DEFAULT_WEIGHT", "FairQueue"]

#: A principal's weight when the config names none.
DEFAULT_WEIGHT = 1.0
#: The least weight: a principal of weight w needs 1/w rotations of :meth:`FairQueue.pop` to earn one
#: dispatch (1e-7 took 2.7 s of the kernel's one thread; 1e-300 would never return).
MIN_WEIGHT = 1e-3


class FairQueue:
    """Deficit round robin across principals, a priority heap within each."""

    __slots__ = ("weights", "heaps", "active", "deficit", "express", "_seq", "_n", "_spent")

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        for who, w in (weights or {}).items():
            if not (isinstance(w, (int, float)) and w >= MIN_WEIGHT):
                raise ValueError(f"weight of principal {who!r} must be a number >= {MIN_WEIGHT:g}, got {w!r}")
        self.weights: Mapping[str, float] = dict(weights or {})
        self.heaps: dict[str, list[tuple[Any, ...]]] = {}
        self.active: collections.deque[str] = collections.deque()
        self.deficit: dict[str, float] = {}
        #: Requests whose priority crosses principals (an operator's): (-priority, order, arrival,
        #: principal, request), served before any principal's round.
        self.express: list[tuple[Any, ...]] = []
        self._seq = itertools.count()
        self._n = 0
        #: The principal whose quantum the last dispatch spent (None: none, or it moved on).
        self._spent: str | None = None

    def weight(self, principal: str) -> float:
        return float(self.weights.get(principal, DEFAULT_WEIGHT))

    # -- the container the router reads -------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """Every entry (live or done), in no particular order; ``entry[-1]`` is the request."""
        for heap in list(self.heaps.values()):
            yield from heap
        yield from list(self.express)

    def clear(self) -> None:
        self.express.clear()
        self.heaps.clear()
        self.active.clear()
        self.deficit.clear()
        self._n = 0
        self._spent = None

    # -- queueing -------------------------------------------------------------------------------

    def push(self, principal: str, priority: int, order: Any, req: Any, *, crosses: bool = False) -> None:
        """Queue ``req`` of ``principal`` at ``priority`` (higher first), then ``order`` (lower
        first), then arrival; with ``crosses`` (an operator's priority), ahead of every
        principal's round."""
        if crosses:
            heapq.heappush(self.express, (-priority, order, next(self._seq), principal, req))
            self._n += 1
            return
        heap = self.heaps.get(principal)
        if heap is None:
            heap = self.heaps[principal] = []
            if self.active and self.active[0] == self._spent:
                # the head just spent its quantum (it is alone, so rotating left it in front):
                # the newcomer goes before its next round, not after it
                self.active.appendleft(principal)
            else:
                self.active.append(principal)
            self.deficit[principal] = 0.0
        heapq.heappush(heap, (-priority, order, next(self._seq), req))
        self._n += 1

    def _drop_done(self, principal: str) -> bool:
        """Pop done entries off ``principal``'s heap; False (and the principal retired) when it
        has nothing live left."""
        heap = self.heaps[principal]
        while heap and heap[0][-1].done:
            heapq.heappop(heap)
            self._n -= 1
        if heap:
            return True
        del self.heaps[principal]
        self.deficit.pop(principal, None)
        self.active.remove(principal)
        return False

    def _express_top(self) -> tuple[Any, ...] | None:
        while self.express and self.express[0][-1].done:
            heapq.heappop(self.express)
            self._n -= 1
        return self.express[0] if self.express else None

    def pop(self) -> Any | None:
        """The next request: an express one first (an operator's crossing priority), else by DRR
        (None when nothing live waits)."""
        if self._express_top() is not None:
            self._n -= 1
            return heapq.heappop(self.express)[-1]
        while self.active:
            who = self.active[0]
            if not self._drop_done(who):
                continue
            if self.deficit[who] < 1.0:
                # a new round for this principal: its quantum, then it goes to the back
                self.deficit[who] += self.weight(who)
                if self.deficit[who] < 1.0:
                    self.active.rotate(-1)
                    continue
            self.deficit[who] -= 1.0
            req = heapq.heappop(self.heaps[who])[-1]
            self._n -= 1
            self._spent = None
            if not self._drop_done(who):
                pass  # retired: its deficit is forgotten (no banking while idle)
            elif self.deficit[who] < 1.0:
                self.active.rotate(-1)  # its quantum is spent: the next principal's turn
                self._spent = who
            return req
        return None

    def top_priority(self, principal: str | None = None) -> int | None:
        """The highest priority of any live waiting request, or of ``principal``'s (None: none waits)."""
        top = self._express_top()
        best = None if top is None else -top[0]  # an operator's crossing priority counts for everyone
        for who in list(self.active) if principal is None else [p for p in self.active if p == principal]:
            if self._drop_done(who):
                p = -self.heaps[who][0][0]
                best = p if best is None or p > best else best
        return best

    def compact(self, live: int, slack: int = 64) -> None:
        """Drop done entries when they outnumber the live ones (``live``) by more than ``slack``."""
        if self._n <= 2 * live + slack:
            return
        kept = [e for e in self.express if not e[-1].done]
        self._n -= len(self.express) - len(kept)
        heapq.heapify(kept)
        self.express = kept
        for who in list(self.heaps):
            kept = [e for e in self.heaps[who] if not e[-1].done]
            self._n -= len(self.heaps[who]) - len(kept)
            if kept:
                heapq.heapify(kept)
                self.heaps[who] = kept
            else:
                del self.heaps[who]
                self.deficit.pop(who, None)
                self.active.remove(who)

    def check(self) -> None:
        """Raise AssertionError naming the first broken invariant."""
        assert sorted(self.active) == sorted(self.heaps), "active principals != principals with entries"
        assert len(set(self.active)) == len(self.active), "a principal is active twice"
        assert all(self.heaps.values()), "an empty heap is kept"
        assert set(self.deficit) == set(self.heaps), "a deficit for an idle principal"
        assert all(0.0 <= d < max(self.weight(w), 1.0) + 1.0 for w, d in self.deficit.items()), "deficit out of range"
        assert self._n == sum(map(len, self.heaps.values())) + len(self.express), "entry count"
