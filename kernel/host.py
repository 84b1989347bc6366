"""The host port: what the pure core needs from the machine, behind one injected interface.

The router, the admission and the management calls read no clock, no process table and no
randomness of their own: time is passed in, and the rest comes through a :class:`Host`.
:class:`SystemHost` is the real machine (psutil, ``os.urandom``, the supervisor's children);
:class:`FakeHost` is a deterministic one for tests, fuzzing and in-process benchmarks (its
tokens come from a seeded generator, its CPU times from a table the test sets).
"""

from __future__ import annotations

import os
import random
import time
from typing import Callable, Protocol

__all__ = ["FakeHost", "Host", "SystemHost"]


class Host(Protocol):
    """What the core asks of the machine.  Every method is cheap and never blocks."""

    def monotonic(self) -> float:
        """Seconds of a monotonic clock (the shell reads it and passes ``now`` in)."""
        ...

    def cpu_seconds(self, pid: int) -> float | None:
        """User + system CPU seconds of process ``pid`` (None: gone or unreadable)."""
        ...

    def owns_pid(self, child: str, pid: int) -> bool:
        """Whether ``pid`` is the process (or one of the processes) of supervised child ``child``."""
        ...

    def token(self, nbytes: int) -> bytes:
        """``nbytes`` unpredictable bytes (request tokens, reservation ids, session ids)."""
        ...


class SystemHost:
    """The real machine.  ``owns_pid`` asks the supervisor when there is one (else no pid of a
    child is trusted)."""

    #: Bytes drawn from the OS at once for tokens (one getrandom call per ~256 request tokens).
    POOL = 4096

    def __init__(self, owns_pid: Callable[[str, int], bool] | None = None,
                 group_cpu: Callable[[int], float | None] | None = None) -> None:
        self._owns_pid = owns_pid
        #: CPU seconds of the enforcer group of a supervised worker's pid (kernel/enforce.py: its
        #: helpers included), None for a pid in no group; else the pid's own CPU is read.
        self._group_cpu = group_cpu
        self._pool = b""
        self._at = 0

    def monotonic(self) -> float:
        return time.monotonic()

    def cpu_seconds(self, pid: int) -> float | None:
        if self._group_cpu is not None:
            grouped = self._group_cpu(pid)
            if grouped is not None:
                return grouped
        import psutil

        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.Error, OSError):
            return None
        return float(times.user + times.system)

    def owns_pid(self, child: str, pid: int) -> bool:
        return self._owns_pid is not None and self._owns_pid(child, pid)

    def token(self, nbytes: int) -> bytes:
        """``nbytes`` from ``os.urandom``, drawn in blocks of :data:`POOL` bytes (each byte is
        handed out once; a forked child must not keep using its parent's host: the kernel's
        children are exec'd, so they never do)."""
        at = self._at
        if at + nbytes > len(self._pool):
            self._pool, at = os.urandom(max(self.POOL, nbytes)), 0
        self._at = at + nbytes
        return self._pool[at : at + nbytes]


class FakeHost:
    """A deterministic host: a settable clock, CPU times from ``cpu`` (pid -> seconds), the
    children's pids from ``children`` (child -> pids) and tokens from a seeded generator."""

    def __init__(self, seed: int = 0, now: float = 0.0) -> None:
        self.now = now
        self.cpu: dict[int, float] = {}
        self.children: dict[str, set[int]] = {}
        self._rng = random.Random(seed)

    def monotonic(self) -> float:
        return self.now

    def cpu_seconds(self, pid: int) -> float | None:
        return self.cpu.get(pid)

    def owns_pid(self, child: str, pid: int) -> bool:
        return pid in self.children.get(child, ())

    def token(self, nbytes: int) -> bytes:
        return self._rng.getrandbits(8 * nbytes).to_bytes(nbytes, "big")
