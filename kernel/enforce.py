"""Budgets the operating system enforces: one :class:`Enforcer` over three backends.

An enforcer owns a subtree of *groups*, one per supervised service (and one per helper process a
service starts: ttc's tool runs, scch's capped parser), and offers the hard controls that do not
depend on a worker's cooperation:

========================  ======================================  ======================================  ============================
operation                 cgroup v2 (delegated subtree)           cgroup v1 (controllers mounted rw)      signals + rlimits
========================  ======================================  ======================================  ============================
place a process           ``cgroup.procs`` (+ earlier children)   ``cgroup.procs`` of each hierarchy     remember the pid (tree by
                                                                                                          ``psutil`` descendants)
freeze / thaw             ``cgroup.freeze`` + ``cgroup.events``   ``freezer.state`` FROZEN / THAWED       SIGSTOP / SIGCONT each
                          (the whole subtree, atomically)         (the whole subtree, atomically)         process of the tree
kill                      ``cgroup.kill`` (else freeze, SIGKILL   freeze, SIGKILL every task, thaw        SIGKILL each process
                          every task, thaw)
CPU used (what to bill)   ``cpu.stat`` ``usage_usec``             ``cpuacct.usage`` (ns)                  ``psutil`` user + system of
                                                                                                          the tree (+ reaped children)
memory ceiling            ``memory.max``                          ``memory.limit_in_bytes`` (+ memsw)     ``RLIMIT_AS`` (prlimit)
cpu weight                ``cpu.weight`` (1..10000)               ``cpu.shares`` = weight * 1024 / 100    nice value
fork bomb ceiling         ``pids.max``                            ``pids.max``                            ``RLIMIT_NPROC`` (per user;
                                                                                                          root ignores it)
========================  ======================================  ======================================  ============================

The backend is chosen once, at start (:func:`open_enforcer`): ``auto`` takes cgroup v2 where this
process sits in a delegated subtree with the ``cpu``, ``memory`` and ``pids`` controllers, else
cgroup v1 where the ``freezer``, ``cpuacct``, ``cpu``, ``memory`` and ``pids`` hierarchies are
mounted writable, else signals and rlimits -- and logs a warning that names why each stronger
backend was not taken (never silently unenforced).  A configuration that names a backend which is
not available gets :class:`EnforcerUnavailable` with the reason: the kernel refuses to start.

Layout (every backend): ``<base>/reca-<kernel pid>/`` is the subtree, created under the kernel's
*own* group in each hierarchy (so limits set above the kernel still hold), with the kernel in
``kernel`` at a higher cpu weight than its services, each service in ``<service>/main`` and its
helpers in ``<service>/<helper>`` -- leaves only, which cgroup v2 requires ("no internal
processes"); freeze, kill, CPU and memory of ``<service>`` cover the service and every helper.
Groups left by a kernel that died (its pid gone) are removed at the next start.

Delegation (cgroup v2 for a non-root kernel): run the kernel in a unit whose subtree it owns --
``systemd-run --user --scope -p Delegate=yes python -m kernel`` for a user session, or
``Delegate=yes`` in a system unit -- so that its cgroup's ``cgroup.controllers`` lists ``cpu
memory pids`` and the directory is writable by the kernel's user.  Without delegation, writes
fail with EACCES and ``auto`` falls back (and says so).

A process in a service's group joins a helper group of its own with :func:`join_group` (the
supervisor passes the service's group in :data:`ENV_GROUP`).  Every operation here is a few small
file writes; freeze polls until the kernel reports the group frozen, bounded by ``timeout``.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("reca.enforce")

__all__ = [
    "BACKENDS",
    "CGROUP1",
    "CGROUP2",
    "CGROUP_ROOT",
    "DEFAULT_WEIGHT",
    "ENV_GROUP",
    "FREEZE_TIMEOUT",
    "KERNEL_WEIGHT",
    "RT_BUDGET_US",
    "RT_HOLD_S",
    "SIGNALS",
    "V1_CONTROLLERS",
    "V2_CONTROLLERS",
    "CgroupV1Group",
    "CgroupV2Group",
    "Enforcer",
    "EnforcerError",
    "EnforcerUnavailable",
    "FreezeTimeout",
    "Group",
    "Landing",
    "Limits",
    "MemoryStat",
    "SignalGroup",
    "join_group",
    "limit_address_space",
    "open_enforcer",
    "remove_helper_group",
    "service_group",
    "weight_to_nice",
    "weight_to_shares",
]

#: The backends, strongest first.
CGROUP2, CGROUP1, SIGNALS = "cgroup2", "cgroup1", "signals"
BACKENDS = (CGROUP2, CGROUP1, SIGNALS)
#: Where the cgroup hierarchies are mounted (overridable for tests with a fake tree).
CGROUP_ROOT = "/sys/fs/cgroup"
#: The v1 hierarchies the v1 backend needs, each mounted as its own hierarchy.
V1_CONTROLLERS = ("freezer", "cpuacct", "cpu", "memory", "pids")
#: The v2 controllers the v2 backend needs enabled in its delegated subtree.
V2_CONTROLLERS = ("cpu", "memory", "pids")
#: The default (v2) cpu weight of a group and the kernel's own weight (10x: it stays timely when
#: the services it supervises saturate the machine).
DEFAULT_WEIGHT = 100
KERNEL_WEIGHT = 1000
#: The largest v1 ``cpu.shares`` (a group being frozen gets it until thawed, see CgroupV1Group.freeze).
SHARES_MAX = 262144
#: Longest a freeze waits for the kernel to report the group frozen, seconds.
FREEZE_TIMEOUT = 1.0
#: Real-time budget of a reca subtree (cgroup v1 ``cpu.rt_runtime_us``, microseconds per
#: ``cpu.rt_period_us``, default 1 s): a group being frozen borrows it while its tasks run at
#: SCHED_FIFO to enter the freezer (:func:`_fifo`); the kernel caps what they can take at 1%.
RT_BUDGET_US = 10000
#: Longest a freeze not yet reported landed keeps what it raised for itself, seconds: its tasks at
#: SCHED_FIFO and the real-time budget they run under (the group's freeze can be slow to land when
#: that budget is spent or a task waits in the kernel; past this the group's cpu.shares boost takes
#: over, :class:`Landing`).  The budget goes back the moment the freeze lands, found by the lander
#: thread every :data:`LAND_POLL_S`, and it is never held past this -- before, a freeze that waited
#: longer than its caller (the ladder waits 5 ms) held it until the thaw, a second later, and every
#: other group's freeze meanwhile fell back to the boost (EBUSY).
RT_HOLD_S = 0.02
#: How often the lander looks at the freezes written but not yet reported landed, seconds.
LAND_POLL_S = 0.0005
#: Environment variable through which a child learns its service's group (JSON).
ENV_GROUP = "RECA_ENFORCE_GROUP"
#: A group name: one path segment, no dots-only names.
_SEGMENT = re.compile(r"[A-Za-z0-9_@#+=-][A-Za-z0-9_.@#+=-]{0,79}")


class EnforcerError(RuntimeError):
    """An enforcement operation failed (the message names the group and the file)."""


class EnforcerUnavailable(EnforcerError):
    """The backend asked for cannot be used here; ``reason`` says why."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"enforcer backend {backend!r} is not available: {reason}")
        self.backend = backend
        self.reason = reason


class FreezeTimeout(EnforcerError):
    """The group did not report frozen within the bound."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Ceilings of a group; ``None`` leaves a ceiling as it is.  ``cpu_weight`` is on the v2
    scale (1..10000, default 100)."""

    mem_bytes: int | None = None
    cpu_weight: int | None = None
    pids_max: int | None = None

    def __post_init__(self) -> None:
        if self.mem_bytes is not None and (not isinstance(self.mem_bytes, int) or self.mem_bytes < 1 << 20):
            raise ValueError(f"mem_bytes must be an integer >= 1 MiB, got {self.mem_bytes!r}")
        if self.cpu_weight is not None and not (isinstance(self.cpu_weight, int) and 1 <= self.cpu_weight <= 10000):
            raise ValueError(f"cpu_weight must be an integer in [1, 10000], got {self.cpu_weight!r}")
        if self.pids_max is not None and not (isinstance(self.pids_max, int) and self.pids_max >= 1):
            raise ValueError(f"pids_max must be a positive integer, got {self.pids_max!r}")


@dataclasses.dataclass(frozen=True)
class MemoryStat:
    usage: int | None  # bytes now
    peak: int | None  # most bytes used (None where the backend does not record it)
    limit: int | None  # the ceiling (None: none)
    oom_kills: int | None  # processes killed at the ceiling (None: not recorded)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _SEGMENT.fullmatch(name) or set(name) == {"."}:
        raise ValueError(f"bad group name {name!r}: one segment of [A-Za-z0-9_.@#+=-], at most 80 characters")
    return name


def weight_to_shares(weight: int) -> int:
    """v2 ``cpu.weight`` (default 100) -> v1 ``cpu.shares`` (default 1024)."""
    return max(2, min(262144, round(weight * 1024 / 100)))


def weight_to_nice(weight: int) -> int:
    """v2 weight -> nice value: each nice step is a factor of 1.25 of CPU share (CFS)."""
    return max(-20, min(19, -round(math.log(weight / DEFAULT_WEIGHT) / math.log(1.25))))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise EnforcerError(f"cannot read {path}: {exc.strerror}") from exc


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(value)
    except OSError as exc:
        raise EnforcerError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _rmtree_groups(path: Path, busy_wait: float = 2.0) -> None:
    """rmdir a group and its subgroups, deepest first (cgroup dirs hold only kernel files).  A
    group whose last tasks are dying (not yet reaped) is busy for a moment: retried for
    ``busy_wait`` seconds, then left for the next start's sweep (logged)."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        _rmtree_groups(sub, busy_wait)
    deadline = time.monotonic() + busy_wait
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cannot remove group %s: %s (the next start sweeps it)", path, exc.strerror)
                return
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _place_tree(pid: int, place: Callable[[int], None]) -> None:
    """Move ``pid`` and every descendant it already has into a group (``place``: its method).

    Writing a pid to ``cgroup.procs`` moves that process only: a child it forked before the write
    stays where it was and would escape every freeze, kill and ceiling.  The kernel serialises
    fork against migration, so a child forked after the parent's move is born inside; one forked
    before is found by the scan that follows the move, repeated until a scan finds nothing new.
    A descendant that exits meanwhile is skipped; the root's own death is ProcessLookupError."""
    place(pid)
    moved = {pid}
    for _ in range(100):  # a tree that keeps forking new processes faster than the scan: bounded
        try:
            todo = [c.pid for c in psutil.Process(pid).children(recursive=True) if c.pid not in moved]
        except psutil.NoSuchProcess:
            return
        if not todo:
            return
        for child in todo:
            moved.add(child)
            with contextlib.suppress(ProcessLookupError):
                place(child)


def _fifo(tids: Iterable[int]) -> list[int]:
    """Run each task (thread id) of ``tids`` that runs at SCHED_OTHER at SCHED_FIFO priority 1
    (its children reset to SCHED_OTHER at fork); returns those that took it.  A freeze writes its
    order first, then calls this: a task enters the freezer (or takes its SIGSTOP) only when it
    next runs, and a runnable task of an ordinary policy waits for the scheduler's next tick (4 ms
    at HZ 250) or more on a busy machine, however large its weight; a real-time task preempts at
    once, runs into the pending freeze and stops (measured under two CPU burners at load 7: freeze
    p99 7.9 -> 0.36 ms, p50 1.6 -> 0.19 ms, 300 samples each, interleaved).  The order matters: a
    task raised *before* the freeze is written would spin at real-time priority, ahead of the very
    process that is to write it.  A task the caller may not raise (not root; a cgroup without a
    real-time budget) or that is gone is skipped.  :func:`_unfifo` puts them back."""
    out: list[int] = []
    fifo = getattr(os, "SCHED_FIFO", None)
    if fifo is None:
        return out
    param = os.sched_param(1)
    for tid in tids:
        try:
            if os.sched_getscheduler(tid) != os.SCHED_OTHER:
                continue  # batch, idle or real-time already: left as its owner set it
            os.sched_setscheduler(tid, fifo | getattr(os, "SCHED_RESET_ON_FORK", 0), param)
        except OSError:
            continue
        out.append(tid)
    return out


def _unfifo(tids: Iterable[int]) -> None:
    """Back to SCHED_OTHER (its nice value kept) -- before a thaw: a thawed task must not run at
    real-time priority.  Only a task still at exactly what :func:`_fifo` set (SCHED_FIFO 1 with
    reset-on-fork) is touched: a thread id kept across a kill may belong to another process by now."""
    fifo = getattr(os, "SCHED_FIFO", None)
    if fifo is None:
        return
    ours = fifo | getattr(os, "SCHED_RESET_ON_FORK", 0)
    param = os.sched_param(0)
    for tid in tids:
        with contextlib.suppress(OSError):
            if os.sched_getscheduler(tid) == ours and os.sched_getparam(tid).sched_priority == 1:
                os.sched_setscheduler(tid, os.SCHED_OTHER, param)


def _run_delay(tids: Iterable[int]) -> float:
    """Seconds the tasks ``tids`` have waited on a runqueue, runnable but not running (the second
    field of ``/proc/TID/schedstat``); a task gone or without scheduler statistics counts 0."""
    total = 0
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{tid}/schedstat").read_text().split()[1])
    return total / 1e9


def _tids(root: Path, name: str) -> list[int]:
    """Thread ids listed in ``name`` files (v1 ``tasks``, v2 ``cgroup.threads``) under ``root``."""
    out: list[int] = []
    for path in root.rglob(name):
        with contextlib.suppress(OSError, ValueError):
            out.extend(int(t) for t in path.read_text().split())
    return out


# -- freezes that land after their caller stopped waiting -----------------------------------------


@dataclasses.dataclass
class Landing:
    """A freeze written but not reported landed when its caller stopped waiting (pure: time is
    passed in).  Its group holds, from the write, what it raised to make it land: tasks at
    SCHED_FIFO under a borrowed real-time budget (``rt``), else a cpu.shares boost.

    Invariants: the real-time budget goes back at the first look that finds the freeze landed,
    and never later than ``hold`` after the write (then the boost takes over); everything goes
    back at the first look past ``watch`` or landed; a thaw ends the landing at once."""

    since: float  # when the freeze was written
    rt: bool = True  # still holding the real-time budget (and the tasks raised)
    hold: float = RT_HOLD_S
    watch: float = FREEZE_TIMEOUT

    def step(self, now: float, landed: bool) -> tuple[bool, bool]:
        """At ``now``, the freeze ``landed`` or not: (give the real-time budget back now,
        done -- give everything back, stop looking)."""
        done = landed or now - self.since >= self.watch
        give = self.rt and (done or now - self.since >= self.hold)
        if give:
            self.rt = False
        return give, done


class _Lander:
    """One daemon thread that settles the groups whose freezes are landing
    (:meth:`Group._settle`, every :data:`LAND_POLL_S`); it sleeps while there are none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: list[Group] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, group: "Group") -> None:
        with self._lock:
            if group not in self._groups:
                self._groups.append(group)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="reca-freeze-lander", daemon=True)
                self._thread.start()
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._groups)

    def _run(self) -> None:
        while True:
            with self._lock:
                groups = list(self._groups)
            if not groups:
                self._wake.wait()
                self._wake.clear()  # before the next look: an add meanwhile is seen there
                continue
            now = time.monotonic()
            for g in groups:
                try:
                    done = g._settle(now)
                except Exception:  # noqa: BLE001 - a group removed meanwhile: nothing left to give back
                    log.exception("settling the freeze of group %s", g.name)
                    done = True
                if done:
                    with self._lock:
                        self._groups.remove(g)
            time.sleep(LAND_POLL_S)


_LANDER = _Lander()


def _new_lander() -> None:
    global _LANDER, _BOOSTS_LOCK
    _LANDER = _Lander()  # a forked child has no lander thread, and its locks may have been held
    _BOOSTS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lander)


# -- groups ---------------------------------------------------------------------------------------


class Group(abc.ABC):
    """One group of processes.  Operations on a group cover its subgroups too."""

    backend: str = ""

    def __init__(self, name: str) -> None:
        self.name = name
        #: guards what a freeze raised (and its :class:`Landing`): the lander thread gives it back
        self._lock = threading.RLock()
        self._landing: Landing | None = None

    def _landed(self) -> bool:
        """Whether the OS reports the group's freeze landed (the lander's look)."""
        return self.frozen()

    def _give_rt(self) -> None:
        """Give back what a freeze raised at real-time priority (its tasks, a borrowed budget)."""

    def _end_raise(self) -> None:
        """Give back all that a freeze raised: real-time priority and any boost."""
        self._give_rt()

    def _raised(self) -> tuple[bool, bool]:
        """What the freeze being written still holds raised: (anything at all, real-time priority
        or a borrowed budget among it).  Under ``_lock``."""
        return False, False

    def _await_landing(self, t0: float, since: float, timeout: float) -> float:
        """Wait (bounded by ``timeout``) for the freeze written at ``since`` to be reported landed,
        then give back all it raised; one not reported by then is handed to the lander, which gives
        it back when it lands, at the latest RT_HOLD_S after the write (before: at the thaw, a second
        later on the ladder), and :class:`FreezeTimeout` is raised."""
        try:
            took = _wait_until(self._landed, t0, timeout, self.name)
        except FreezeTimeout:
            with self._lock:
                held, rt = self._raised()
                if held:
                    self._land_later(since, rt)
            raise
        with self._lock:  # frozen: real-time priority or a boost buys nothing more
            self._end_raise()
        return took

    def _land_later(self, since: float, rt: bool) -> None:
        """The caller stops waiting for a freeze written at ``since`` that has not landed: the
        lander gives back what it raised when it lands (:class:`Landing`).  Under ``_lock``."""
        self._landing = Landing(since, rt)
        _LANDER.add(self)

    def _settle(self, now: float) -> bool:
        """The lander's look at a landing freeze; True once nothing is left to give back."""
        with self._lock:
            if self._landing is None:
                return True
            give, done = self._landing.step(now, self._landed())
            if give:
                self._give_rt()
                if not done:
                    self.boost("freeze")  # the budget is back; the shares boost until it lands
            if done:
                self._landing = None
                self._end_raise()
            return done

    @abc.abstractmethod
    def sub(self, name: str, limits: Limits | None = None) -> "Group":
        """The subgroup ``name`` (created if missing), with ``limits`` applied."""

    @abc.abstractmethod
    def place(self, pid: int) -> None:
        """Move process ``pid`` into this group; processes it starts later follow it."""

    def place_tree(self, pid: int) -> None:
        """Move ``pid`` and the processes it already started (see :func:`_place_tree`)."""
        _place_tree(pid, self.place)

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Every live process in the group and its subgroups."""

    @abc.abstractmethod
    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> float:
        """Stop every process of the group; returns the seconds until the OS reported it stopped.
        Raises :class:`FreezeTimeout` past ``timeout``."""

    @abc.abstractmethod
    def thaw(self) -> None:
        """Let the group's processes run again."""

    @abc.abstractmethod
    def frozen(self) -> bool: ...

    def boost(self, why: str = "preempt") -> None:
        """Run the group's tasks ahead of others until :meth:`unboost` (cgroup v1: cpu.shares; a
        no-op where the backend has no weights to raise)."""

    def unboost(self, why: str = "preempt") -> None:
        """End a :meth:`boost` with the same ``why``."""

    def _refuse_caller(self) -> None:
        """Freezing a group that holds the caller would stop the caller for good."""
        if os.getpid() in self.pids():
            raise EnforcerError(f"group {self.name} holds this process: it cannot freeze itself")

    def kill(self) -> int:
        """SIGKILL every process of the group, then thaw it; returns how many.  Never waits for a
        freeze: the freeze is only *started* (so that a process stops forking as soon as it lands),
        every pid gets SIGKILL, and the group is thawed (a frozen task dies only once thawed, v1 in
        particular).  A second pass kills what forked in between.  The caller is never killed."""
        me = os.getpid()
        victims: set[int] = set()
        for _ in range(2):
            if me not in self.pids():
                with contextlib.suppress(EnforcerError):
                    self.freeze(timeout=0.0)  # writes the freeze, does not wait for it
            now = [pid for pid in self.pids() if pid != me and pid not in victims]
            for pid in now:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            victims.update(now)
            with contextlib.suppress(EnforcerError):
                self.thaw()
            if not now:
                break
        return len(victims)

    @abc.abstractmethod
    def cpu_seconds(self) -> float:
        """CPU time the group's processes used, as the OS measured it, seconds."""

    def cpu_waited(self) -> float | None:
        """Seconds the group's live tasks have waited runnable for a CPU (summed over them: it
        drops when a task exits); None where unknown.  With :meth:`cpu_seconds` it is the CPU
        the group *wants*: a worker starved by a busy machine burns little but waits much
        (kernel/ladder.py counts both as burning)."""
        return None

    @abc.abstractmethod
    def memory(self) -> MemoryStat: ...

    @abc.abstractmethod
    def set_limits(self, limits: Limits) -> None: ...

    def set_memory_ceiling(self, mem_bytes: int | None) -> None:
        """Set (or, with None, lift) the group's memory ceiling: past it the OOM killer kills a
        process of the group.  Per-request ceilings use this (kernel/ladder.py)."""
        raise EnforcerError(f"group {self.name}: the {self.backend} backend has no per-request memory ceiling")

    @abc.abstractmethod
    def remove(self) -> None:
        """Kill what is left in the group and remove it (and its subgroups)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend}

    def handle(self) -> str:
        """What a child needs to find this group again (:func:`join_group`), as JSON."""
        return json.dumps({"backend": self.backend, **self._handle()})

    @abc.abstractmethod
    def _handle(self) -> dict[str, Any]: ...


#: v1 cpu directories boosted now: directory -> [its own cpu.shares, how many boosts hold it].
_BOOSTS: dict[Path, list[Any]] = {}
_BOOSTS_LOCK = threading.Lock()


def _boost_dir(d: Path) -> None:
    with _BOOSTS_LOCK:  # the lander thread boosts and unboosts too (shared ancestors)
        entry = _BOOSTS.get(d)
        if entry is not None:
            entry[1] += 1
            return
        with contextlib.suppress(EnforcerError):
            own = _read(d / "cpu.shares").strip()
            _write(d / "cpu.shares", str(SHARES_MAX))
            _BOOSTS[d] = [own, 1]


def _unboost_dir(d: Path) -> None:
    with _BOOSTS_LOCK:
        entry = _BOOSTS.get(d)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _BOOSTS[d]
            with contextlib.suppress(EnforcerError):
                _write(d / "cpu.shares", entry[0])


def _set_shares(d: Path, shares: str) -> None:
    """Set ``d``'s cpu.shares; while it is boosted, the value it gets back at the last unboost."""
    with _BOOSTS_LOCK:
        if d in _BOOSTS:
            _BOOSTS[d][0] = shares
        else:
            _write(d / "cpu.shares", shares)


class CgroupV1Group(Group):
    """A group in each v1 hierarchy (``dirs``: controller -> directory)."""

    backend = CGROUP1

    def __init__(self, name: str, dirs: dict[str, Path]) -> None:
        super().__init__(name)
        self.dirs = dirs
        self._boosts: set[str] = set()  # why the group is boosted now (freeze, preempt)
        #: while a freeze is landing: the cpu dirs that borrowed a real-time budget, the tasks raised
        self._rt: tuple[list[Path], list[int]] | None = None

    def _handle(self) -> dict[str, Any]:
        return {"dirs": {k: str(v) for k, v in self.dirs.items()}}

    def sub(self, name: str, limits: Limits | None = None) -> "CgroupV1Group":
        _check_name(name)
        dirs = {c: d / name for c, d in self.dirs.items()}
        for d in dirs.values():
            try:
                d.mkdir(exist_ok=True)
            except OSError as exc:
                raise EnforcerError(f"cannot create group {d}: {exc.strerror}") from exc
        if "cpuset" in dirs:  # a new cpuset group is empty until it inherits cpus and mems
            for key in ("cpuset.cpus", "cpuset.mems"):
                _write(dirs["cpuset"] / key, _read(self.dirs["cpuset"] / key).strip() or "0")
        group = CgroupV1Group(f"{self.name}/{name}", dirs)
        if limits is not None:
            group.set_limits(limits)
        return group

    def place(self, pid: int) -> None:
        for d in self.dirs.values():
            try:
                _write(d / "cgroup.procs", str(pid))
            except EnforcerError:
                if not _alive(pid):
                    raise ProcessLookupError(pid) from None
                raise

    def pids(self) -> list[int]:
        out: set[int] = set()
        for path in self.dirs["freezer"].rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                out.update(int(p) for p in path.read_text().split())
        return sorted(out)

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> float:
        """A task enters the freezer only when it next runs: on a busy machine a runnable task of
        an ordinary policy waits for the scheduler's next tick or more.  So, once ``FROZEN`` is
        written, the group's tasks run at SCHED_FIFO (:func:`_fifo`) under a real-time budget the
        group borrows from the subtree's (:data:`RT_BUDGET_US`) until the OS reports the group
        frozen (or, past ``timeout``, until :meth:`thaw`).  Where that is not possible (no
        budget: the kernel's own cpu group has none, or a concurrent freeze holds the subtree's),
        the group is boosted instead (:meth:`boost`: its cpu.shares and its ancestors' up to the
        subtree's root at the maximum; under two CPU burners freeze p50 4 -> 0.15 ms, its tail
        bounded by the tick).  Either ends as soon as the group is frozen (it needs no CPU, and a
        boosted subtree root would run its other groups ahead of the whole machine until the
        thaw, a second later on the ladder)."""
        self._refuse_caller()
        state = self.dirs["freezer"] / "freezer.state"
        with self._lock:
            self._landing = None  # this freeze takes over what an earlier one still raised
            t0, since = time.perf_counter(), time.monotonic()
            _write(state, "FROZEN")
            # a task that was running (on another CPU) or asleep is stopped at once: raise only what waits
            if _read(state).strip() != "FROZEN" and not self._rt_start():
                self.boost("freeze")
        return self._await_landing(t0, since, timeout)

    def _raised(self) -> tuple[bool, bool]:
        return self._rt is not None or "freeze" in self._boosts, self._rt is not None

    def _landed(self) -> bool:
        return _read(self.dirs["freezer"] / "freezer.state").strip() == "FROZEN"

    def _give_rt(self) -> None:
        self._rt_end()

    def _end_raise(self) -> None:
        self._rt_end()
        self.unboost("freeze")

    def _rt_start(self) -> bool:
        """The group's tasks at SCHED_FIFO under a borrowed real-time budget (see :meth:`freeze`);
        False where none could be raised."""
        if self._rt is not None:
            return bool(self._rt[1])
        cpu = self.dirs.get("cpu")
        granted: list[Path] = []
        if cpu is not None and (cpu / "cpu.rt_runtime_us").exists():  # real-time group scheduling
            # the subtree's root got RT_BUDGET_US at open; its groups between it and this one, this
            # one, and each subgroup holding tasks (sharing its parent's) borrow it for the freeze
            chain = list(reversed(list(cpu.parents)[: max(0, self.name.count("/") - 1)]))
            try:
                for d in chain:
                    _write(d / "cpu.rt_runtime_us", str(RT_BUDGET_US))
                    granted.append(d)
                self._grant_rt(cpu, RT_BUDGET_US, granted)
            except EnforcerError:  # no budget here (none above, or a concurrent freeze holds it)
                self._release_rt(granted)
                return False
        tids = _fifo(_tids(self.dirs["freezer"], "tasks"))
        self._rt = (granted, tids)
        if not tids:
            self._rt_end()
        return bool(tids)

    def _grant_rt(self, d: Path, budget: int, granted: list[Path]) -> None:
        _write(d / "cpu.rt_runtime_us", str(budget))
        granted.append(d)
        busy = [c for c in d.iterdir() if c.is_dir() and _tids(c, "tasks")]
        for c in busy:
            self._grant_rt(c, budget // len(busy), granted)

    @staticmethod
    def _release_rt(granted: list[Path]) -> None:
        for d in reversed(granted):  # children first: a parent's budget covers its children's
            with contextlib.suppress(EnforcerError):
                _write(d / "cpu.rt_runtime_us", "0")

    def _rt_end(self) -> None:
        if self._rt is None:
            return
        granted, tids = self._rt
        self._rt = None
        _unfifo(tids)
        # a task that joined meanwhile (forked at SCHED_FIFO) would keep a group's budget busy:
        # reset_on_fork makes its children SCHED_OTHER, so only what _fifo raised is left
        self._release_rt(granted)

    def _boost_dirs(self) -> list[Path]:
        cpu = self.dirs.get("cpu")
        if cpu is None:
            return []
        return [cpu, *list(cpu.parents)[: self.name.count("/")]]  # up to the subtree's root (reca-<pid>)

    def boost(self, why: str = "preempt") -> None:
        """Give the group, and its ancestors up to the subtree's root, the largest cpu.shares
        until :meth:`unboost` with the same ``why``: its tasks run at once even when the machine
        is busy and reca's subtree holds one default share per group (a frozen one must run to
        enter the freezer; a preempted one to reach its safe point).  Nested boosts of one
        directory are counted; the weight it had comes back with the last."""
        with self._lock:
            if why in self._boosts:
                return
            self._boosts.add(why)
            if len(self._boosts) == 1:
                for d in self._boost_dirs():
                    _boost_dir(d)

    def unboost(self, why: str = "preempt") -> None:
        with self._lock:
            if why not in self._boosts:
                return
            self._boosts.discard(why)
            if not self._boosts:
                for d in self._boost_dirs():
                    _unboost_dir(d)

    def thaw(self) -> None:
        with self._lock:
            self._landing = None
            self._rt_end()  # before the thaw: a thawed task never runs at real-time priority
            _write(self.dirs["freezer"] / "freezer.state", "THAWED")
            self.unboost("freeze")

    def frozen(self) -> bool:
        return _read(self.dirs["freezer"] / "freezer.state").strip() != "THAWED"

    def cpu_seconds(self) -> float:
        return int(_read(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9

    def cpu_waited(self) -> float | None:
        return _run_delay(_tids(self.dirs["freezer"], "tasks"))

    def memory(self) -> MemoryStat:
        m = self.dirs["memory"]
        limit = int(_read(m / "memory.limit_in_bytes"))
        # v1 counts a kill in the group the task was in (a subgroup), so the subtree is summed
        oom = sum(_keyed(_read(f)).get("oom_kill", 0) for f in m.rglob("memory.oom_control"))
        return MemoryStat(
            int(_read(m / "memory.usage_in_bytes")),
            int(_read(m / "memory.max_usage_in_bytes")),
            None if limit >= 1 << 62 else limit,
            oom,
        )

    def set_limits(self, limits: Limits) -> None:
        if limits.mem_bytes is not None:
            m = self.dirs["memory"]
            memsw = m / "memory.memsw.limit_in_bytes"
            value = str(limits.mem_bytes)
            # memsw >= limit at every moment: raise memsw first when raising, last when lowering.
            current = int(_read(m / "memory.limit_in_bytes"))
            order = (
                [memsw, m / "memory.limit_in_bytes"]
                if limits.mem_bytes > current
                else [m / "memory.limit_in_bytes", memsw]
            )
            for path in order:
                if path.exists():
                    _write(path, value)
        if limits.cpu_weight is not None:
            _set_shares(self.dirs["cpu"], str(weight_to_shares(limits.cpu_weight)))
        if limits.pids_max is not None:
            _write(self.dirs["pids"] / "pids.max", str(limits.pids_max))

    def set_memory_ceiling(self, mem_bytes: int | None) -> None:
        if mem_bytes is not None:
            self.set_limits(Limits(mem_bytes=mem_bytes))
            return
        m = self.dirs["memory"]
        for path in (m / "memory.memsw.limit_in_bytes", m / "memory.limit_in_bytes"):  # memsw first: >= limit
            if path.exists():
                _write(path, "-1")

    def remove(self) -> None:
        if self.pids():
            self.kill()
            _wait_empty(self)
        with self._lock:
            self._landing = None
        for why in list(self._boosts):  # its ancestors get their own weight back
            self.unboost(why)
        for d in self.dirs.values():
            _rmtree_groups(d)


class CgroupV2Group(Group):
    """A group of the unified hierarchy.  ``controllers``: those enabled for this group (memory,
    cpu weight and pids.max need theirs; freeze, kill and ``cpu.stat`` are core files)."""

    backend = CGROUP2

    def __init__(self, name: str, path: Path, controllers: frozenset[str]) -> None:
        super().__init__(name)
        self.path = path
        self.controllers = controllers
        self._fifo: list[int] = []  # tasks raised while a freeze lands

    def _handle(self) -> dict[str, Any]:
        return {"path": str(self.path), "controllers": sorted(self.controllers)}

    def sub(self, name: str, limits: Limits | None = None) -> "CgroupV2Group":
        _check_name(name)
        path = self.path / name
        # A child group gets controllers only once the parent enables them for its children; a
        # parent that holds processes cannot (no internal processes), hence the leaf layout.
        if self.controllers:
            have = set(_read(self.path / "cgroup.subtree_control").split())
            want = [c for c in sorted(self.controllers) if c not in have]
            if want:
                _write(self.path / "cgroup.subtree_control", " ".join(f"+{c}" for c in want))
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise EnforcerError(f"cannot create group {path}: {exc.strerror}") from exc
        group = CgroupV2Group(f"{self.name}/{name}", path, self.controllers)
        if limits is not None:
            group.set_limits(limits)
        return group

    def place(self, pid: int) -> None:
        try:
            _write(self.path / "cgroup.procs", str(pid))
        except EnforcerError:
            if not _alive(pid):
                raise ProcessLookupError(pid) from None
            raise

    def pids(self) -> list[int]:
        out: set[int] = set()
        for path in self.path.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                out.update(int(p) for p in path.read_text().split())
        return sorted(out)

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> float:
        """Written, then the group's tasks run at SCHED_FIFO until it is reported frozen (see
        CgroupV1Group.freeze; v2 has no real-time budgets: where its cpu controller is enabled
        the raise is refused and skipped)."""
        self._refuse_caller()
        with self._lock:
            self._landing = None
            t0, since = time.perf_counter(), time.monotonic()
            _write(self.path / "cgroup.freeze", "1")
            self._fifo += _fifo(_tids(self.path, "cgroup.threads"))  # a freeze not landed kept the earlier ones
        return self._await_landing(t0, since, timeout)

    def _raised(self) -> tuple[bool, bool]:
        return bool(self._fifo), True

    def _give_rt(self) -> None:
        _unfifo(self._fifo)
        self._fifo = []

    def thaw(self) -> None:
        with self._lock:
            self._landing = None
            self._give_rt()
            _write(self.path / "cgroup.freeze", "0")

    def frozen(self) -> bool:
        return _keyed(_read(self.path / "cgroup.events")).get("frozen") == 1

    def kill(self) -> int:
        kill_file = self.path / "cgroup.kill"
        if not kill_file.exists():  # Linux < 5.14
            return super().kill()
        victims = self.pids()
        if os.getpid() in victims:  # never the caller itself: signal the others one by one
            return super().kill()
        _write(kill_file, "1")
        with contextlib.suppress(EnforcerError):
            self.thaw()  # the group stays usable: a restarted service placed here must run
        return len(victims)

    def cpu_seconds(self) -> float:
        return _keyed(_read(self.path / "cpu.stat")).get("usage_usec", 0) / 1e6

    def cpu_waited(self) -> float | None:
        return _run_delay(_tids(self.path, "cgroup.threads"))

    def memory(self) -> MemoryStat:
        if "memory" not in self.controllers:
            return MemoryStat(None, None, None, None)
        p = self.path
        limit = _read(p / "memory.max").strip()
        peak = p / "memory.peak"
        return MemoryStat(
            int(_read(p / "memory.current")),
            int(_read(peak)) if peak.exists() else None,
            None if limit == "max" else int(limit),
            _keyed(_read(p / "memory.events")).get("oom_kill"),
        )

    def set_limits(self, limits: Limits) -> None:
        needs = {"memory": limits.mem_bytes, "cpu": limits.cpu_weight, "pids": limits.pids_max}
        missing = [c for c, v in needs.items() if v is not None and c not in self.controllers]
        if missing:
            raise EnforcerError(f"group {self.name}: controller(s) {missing} not enabled in this subtree")
        if limits.mem_bytes is not None:
            _write(self.path / "memory.max", str(limits.mem_bytes))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                _write(swap, "0")
        if limits.cpu_weight is not None:
            _write(self.path / "cpu.weight", str(limits.cpu_weight))
        if limits.pids_max is not None:
            _write(self.path / "pids.max", str(limits.pids_max))

    def set_memory_ceiling(self, mem_bytes: int | None) -> None:
        if mem_bytes is not None:
            self.set_limits(Limits(mem_bytes=mem_bytes))
        elif "memory" in self.controllers:
            _write(self.path / "memory.max", "max")

    def remove(self) -> None:
        if self.pids():
            self.kill()
            _wait_empty(self)
        _rmtree_groups(self.path)


class SignalGroup(Group):
    """The fallback: a set of process trees this process knows by pid.  Freezing is per process
    (SIGSTOP to each, children found through ``psutil``), so a process forked while the tree is
    being stopped can escape; memory is ``RLIMIT_AS`` per process (allocation fails with
    ``MemoryError``), CPU is sampled (a process that exited is counted with its last sample, or
    in its parent's reaped-children times)."""

    backend = SIGNALS

    def __init__(self, name: str, parent: "SignalGroup | None" = None) -> None:
        super().__init__(name)
        self.parent = parent
        self.roots: set[int] = set()
        self.children: dict[str, SignalGroup] = {}
        self.limits = Limits()
        self._cpu_seen: dict[int, float] = {}  # pid -> last CPU sample (of processes seen here)
        self._seen: dict[int, psutil.Process] = {}  # every live process found in this group
        self._frozen = False
        self._fifo: list[int] = []  # tasks raised while a freeze lands
        self._stopping: list[psutil.Process] = []  # the processes the latest freeze stopped

    def _handle(self) -> dict[str, Any]:
        return {"limits": dataclasses.asdict(self.limits)}

    def sub(self, name: str, limits: Limits | None = None) -> "SignalGroup":
        _check_name(name)
        group = self.children.get(name)
        if group is None:
            group = self.children[name] = SignalGroup(f"{self.name}/{name}", self)
        if limits is not None:
            group.set_limits(limits)
        return group

    def _own_processes(self) -> list[psutil.Process]:
        """The roots placed here and their descendants, except a descendant placed in a group of
        its own (a service started by the kernel belongs to its service's group, not the
        kernel's) and that one's descendants."""
        claimed = {pid for group in self._root()._walk() if group is not self for pid in group.roots}
        out: dict[int, psutil.Process] = {}
        for pid in list(self.roots):
            try:
                root = psutil.Process(pid)
                if root.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(pid)
            except psutil.Error:
                self.roots.discard(pid)
                continue
            todo = [root]
            while todo:
                proc = todo.pop()
                out.setdefault(proc.pid, proc)
                with contextlib.suppress(psutil.Error):
                    todo.extend(c for c in proc.children() if c.pid not in claimed and c.pid not in out)
        # A descendant seen once stays ours after its parent died (orphans are re-parented to
        # init and leave the tree); psutil's is_running() also guards against pid reuse.
        for pid, proc in list(self._seen.items()):
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive or pid in claimed:
                del self._seen[pid]
            elif pid not in out:
                out[pid] = proc
        self._seen.update(out)
        return list(out.values())

    def _processes(self) -> list[psutil.Process]:
        procs = self._own_processes()
        for child in self.children.values():
            procs.extend(child._processes())
        return [p for p in procs if p.pid != os.getpid()]  # never stop or kill the caller itself

    def place_tree(self, pid: int) -> None:
        self.place(pid)  # the pid's whole tree is the group already

    def place(self, pid: int) -> None:
        if not _alive(pid):
            raise ProcessLookupError(pid)
        for group in self._root()._walk():
            group.roots.discard(pid)
        self.roots.add(pid)
        self._apply(pid)

    def _root(self) -> "SignalGroup":
        group = self
        while group.parent is not None:
            group = group.parent
        return group

    def _walk(self) -> Iterator["SignalGroup"]:
        yield self
        for child in self.children.values():
            yield from child._walk()

    def _effective(self) -> Limits:
        mem = weight = pids = None
        group: SignalGroup | None = self
        while group is not None:  # the tightest ceiling on the way up
            lim = group.limits
            if lim.mem_bytes is not None:
                mem = lim.mem_bytes if mem is None else min(mem, lim.mem_bytes)
            if weight is None:
                weight = lim.cpu_weight
            if lim.pids_max is not None:
                pids = lim.pids_max if pids is None else min(pids, lim.pids_max)
            group = group.parent
        return Limits(mem, weight, pids)

    def _apply(self, pid: int) -> None:
        eff = self._effective()
        with contextlib.suppress(psutil.Error, OSError):
            proc = psutil.Process(pid)
            if eff.mem_bytes is not None:
                proc.rlimit(psutil.RLIMIT_AS, (eff.mem_bytes, eff.mem_bytes))
            if eff.pids_max is not None:
                proc.rlimit(psutil.RLIMIT_NPROC, (eff.pids_max, eff.pids_max))
            if eff.cpu_weight is not None:
                proc.nice(weight_to_nice(eff.cpu_weight))

    def pids(self) -> list[int]:
        return sorted({p.pid for p in self._processes()})

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> float:
        with self._lock:
            self._landing = None
            t0, since = time.perf_counter(), time.monotonic()
            self._frozen = True
            procs = self._processes()
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGSTOP)
            tids: list[int] = []
            for proc in procs:  # each runs at once into its SIGSTOP (see _fifo)
                with contextlib.suppress(psutil.Error):
                    tids.extend(t.id for t in proc.threads())
            self._fifo += _fifo(tids)  # a freeze not landed kept the earlier ones
            self._stopping = procs
        return self._await_landing(t0, since, timeout)

    def _raised(self) -> tuple[bool, bool]:
        return bool(self._fifo), True

    def _landed(self) -> bool:
        for proc in self._stopping:
            try:
                if proc.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE):
                    return False
            except psutil.Error:
                continue
        return True

    def _give_rt(self) -> None:
        _unfifo(self._fifo)
        self._fifo = []

    def thaw(self) -> None:
        with self._lock:
            self._landing = None
            self._frozen = False
            self._give_rt()
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)

    def frozen(self) -> bool:
        return self._frozen

    def kill(self) -> int:
        procs = self._processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)  # none forks away while the rest are killed
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        with self._lock:
            self._frozen = False
            self._landing = None
            self._fifo = []  # the raised threads die with their processes; their ids may be reused
        return len(procs)

    def cpu_seconds(self) -> float:
        for proc in self._own_processes():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                self._cpu_seen[proc.pid] = t.user + t.system + t.children_user + t.children_system
        return sum(self._cpu_seen.values()) + sum(c.cpu_seconds() for c in self.children.values())

    def cpu_waited(self) -> float | None:
        tids: list[int] = []
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                tids.extend(t.id for t in proc.threads())
        return _run_delay(tids)

    def memory(self) -> MemoryStat:
        rss = 0
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                rss += proc.memory_info().rss
        return MemoryStat(rss, None, self._effective().mem_bytes, None)

    def set_limits(self, limits: Limits) -> None:
        self.limits = Limits(
            limits.mem_bytes if limits.mem_bytes is not None else self.limits.mem_bytes,
            limits.cpu_weight if limits.cpu_weight is not None else self.limits.cpu_weight,
            limits.pids_max if limits.pids_max is not None else self.limits.pids_max,
        )
        for group in self._walk():
            for pid in list(group.roots):
                group._apply(pid)

    def remove(self) -> None:
        if self.pids():
            self.kill()
            _wait_empty(self)
        if self.parent is not None:
            self.parent.children.pop(self.name.rsplit("/", 1)[-1], None)


def _wait_until(cond: Any, t0: float, timeout: float, name: str) -> float:
    """Poll ``cond()`` until true: busy for the first 2 ms (a freeze usually lands in under one),
    then every 0.2 ms; returns the seconds since ``t0``."""
    while True:
        if cond():
            return time.perf_counter() - t0
        elapsed = time.perf_counter() - t0
        if elapsed > timeout:
            raise FreezeTimeout(f"group {name} not frozen after {timeout:g} s")
        if elapsed > 0.002:
            time.sleep(0.0002)


def _wait_empty(group: Group, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while group.pids() and time.monotonic() < deadline:
        time.sleep(0.002)


# -- the enforcer ---------------------------------------------------------------------------------


class Enforcer:
    """The chosen backend's subtree ``reca-<pid>``: the kernel's group and one per service.

    ``reason`` says why this backend was chosen (and why stronger ones were not)."""

    def __init__(self, root: Group, reason: str, *, restore: Any = None) -> None:
        self.root = root
        self.backend = root.backend
        self.reason = reason
        self._restore = restore  # moves this process back where it was (close)
        self.groups: dict[str, Group] = {}
        self.kernel: Group | None = None
        self.closed = False
        # A kernel that exits by any path Python runs handlers on (return, exception, sys.exit,
        # a signal the kernel turns into a shutdown) thaws and kills what it froze: a frozen
        # service never outlives its kernel.  (SIGKILL runs nothing: the next start sweeps.)
        atexit.register(self.close)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "reason": self.reason,
            "root": self.root.handle(),
            "groups": sorted(self.groups),
        }

    def enter_kernel(self, weight: int = KERNEL_WEIGHT) -> Group:
        """Put this process (the kernel) in its own group at ``weight``."""
        self.kernel = self.root.sub("kernel", Limits(cpu_weight=weight) if self._weights() else None)
        self.kernel.place(os.getpid())
        self._rebalance()
        return self.kernel

    def _rebalance(self) -> None:
        """The subtree's weight against the rest of the machine: one default share per process
        group in it (as if its processes ran outside), so that nesting neither starves reca on
        a busy machine nor lets it take more than its processes would."""
        if self._weights() and not isinstance(self.root, SignalGroup):
            weight = min(10000, DEFAULT_WEIGHT * (len(self.groups) + (self.kernel is not None)))
            with contextlib.suppress(EnforcerError):
                self.root.set_limits(Limits(cpu_weight=max(DEFAULT_WEIGHT, weight)))

    def _weights(self) -> bool:
        return not isinstance(self.root, CgroupV2Group) or "cpu" in self.root.controllers

    def service(self, name: str, limits: Limits | None = None) -> Group:
        """The group of service ``name`` (created if missing)."""
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = self.root.sub(name)
            self._rebalance()
        if limits is not None:
            group.set_limits(limits)
        return group

    def place_service(self, name: str, pid: int, limits: Limits | None = None) -> Group:
        """Move ``pid`` and the children it already forked into ``<name>/main``; returns the
        service's group."""
        group = self.service(name, limits)
        group.sub("main").place_tree(pid)
        return group

    def remove_service(self, name: str) -> None:
        group = self.groups.pop(name, None)
        if group is not None:
            group.remove()

    def thaw_all(self) -> int:
        """Thaw every service group (the kernel's shutdown does this before it stops them: a
        frozen process cannot act on SIGTERM, and on cgroup v1 not even die of SIGKILL);
        returns how many groups were thawed."""
        n = 0
        for group in list(self.groups.values()):
            with contextlib.suppress(EnforcerError, OSError):
                group.thaw()
                n += 1
        return n

    def close(self) -> None:
        """Thaw and kill what the service groups hold, remove them, move this process back,
        remove the subtree."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        self.thaw_all()
        for name in list(self.groups):
            with contextlib.suppress(EnforcerError):
                self.remove_service(name)
        if self._restore is not None:
            with contextlib.suppress(EnforcerError, OSError):
                self._restore()
        if isinstance(self.kernel, SignalGroup):
            self.kernel.roots.discard(os.getpid())
        with contextlib.suppress(EnforcerError, OSError):
            self.root.remove()


# -- detection ------------------------------------------------------------------------------------


def _mounts(root: str) -> dict[str, tuple[Path, str]]:
    """controller (v1) or ``"unified"`` (v2) -> (mount point, mount root), under ``root``."""
    out: dict[str, tuple[Path, str]] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or not fields[4].startswith(root):
            continue
        fstype, options = rfields[0], rfields[2].split(",")
        if fstype == "cgroup2":
            out["unified"] = (Path(fields[4]), fields[3])
        elif fstype == "cgroup":
            for opt in options:
                if opt in V1_CONTROLLERS or opt == "cpuset":
                    out[opt] = (Path(fields[4]), fields[3])
    return out


def _own_cgroups(pid: int | str = "self") -> dict[str, str]:
    """controller -> this process's group path (``"unified"`` for v2's ``0::`` line)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            num, ctrls, path = line.split(":", 2)
            if num == "0" and not ctrls:
                out["unified"] = path
            for c in ctrls.split(","):
                if c:
                    out[c] = path
    return out


def _under(mount: tuple[Path, str], path: str) -> Path:
    point, mroot = mount
    rel = path[len(mroot) :] if path.startswith(mroot) else path
    return point / rel.lstrip("/")


def _sweep_stale(parent: Path) -> None:
    """Clear subtrees ``reca-<pid>`` whose kernel is gone (killed with SIGKILL: no exit handler
    ran).  What they still hold -- services that outlived their kernel, frozen ones included --
    is thawed and killed (v1: ``freezer.state``; v2: ``cgroup.freeze``), then the groups go."""
    with contextlib.suppress(OSError):
        for d in parent.iterdir():
            m = re.fullmatch(r"reca-(\d+)", d.name)
            if not (m and d.is_dir() and not _alive(int(m.group(1)))):
                continue
            left: set[int] = set()
            for p in d.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    left.update(int(x) for x in p.read_text().split())
            left.discard(os.getpid())
            if left:
                log.warning("enforcer: %s outlived its kernel: killing %d process(es)", d, len(left))
                for pid in left:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                for state in (*d.rglob("freezer.state"), *d.rglob("cgroup.freeze")):
                    with contextlib.suppress(OSError):
                        state.write_text("THAWED" if state.name == "freezer.state" else "0")
            with contextlib.suppress(OSError):
                _rmtree_groups(d, busy_wait=0.5 if left else 2.0)


def _open_v1(root: str, name: str) -> Enforcer:
    mounts, own = _mounts(root), _own_cgroups()
    missing = [c for c in V1_CONTROLLERS if c not in mounts]
    if missing:
        raise EnforcerUnavailable(CGROUP1, f"v1 hierarchies {missing} are not mounted under {root}")
    bases = {c: _under(mounts[c], own.get(c, "/")) for c in V1_CONTROLLERS}
    made: list[Path] = []
    try:
        for c, base in bases.items():
            _sweep_stale(base)
            (base / name).mkdir(exist_ok=True)
            made.append(base / name)
    except OSError as exc:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        why = (
            "no permission (run as root, or delegate)"
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            else exc.strerror
        )
        raise EnforcerUnavailable(CGROUP1, f"cannot create {exc.filename}: {why}") from exc
    group = CgroupV1Group(name, {c: b / name for c, b in bases.items()})
    rt = bases["cpu"] / name / "cpu.rt_runtime_us"
    if rt.exists():  # the budget a freezing group borrows (CgroupV1Group.freeze); none: it is boosted
        try:
            _write(rt, str(RT_BUDGET_US))
        except EnforcerError as exc:
            log.info("enforcer: no real-time budget for freezes (%s): a freezing group is boosted instead", exc)

    def restore() -> None:
        for c, base in bases.items():
            _write(base / "cgroup.procs", str(os.getpid()))

    return Enforcer(group, f"cgroup v1: {', '.join(V1_CONTROLLERS)} mounted writable under {root}", restore=restore)


def _open_v2(root: str, name: str, require: Iterable[str] = V2_CONTROLLERS) -> Enforcer:
    mounts, own = _mounts(root), _own_cgroups()
    if "unified" not in mounts:
        raise EnforcerUnavailable(CGROUP2, f"no cgroup2 hierarchy mounted under {root}")
    base = _under(mounts["unified"], own.get("unified", "/"))
    available = set(_read(base / "cgroup.controllers").split()) if (base / "cgroup.controllers").exists() else set()
    missing = [c for c in require if c not in available]
    if missing:
        raise EnforcerUnavailable(
            CGROUP2,
            f"controllers {missing} are not delegated to {base} (cgroup.controllers: {sorted(available) or 'empty'})",
        )
    if not os.access(base, os.W_OK):
        raise EnforcerUnavailable(CGROUP2, f"{base} is not writable: not a delegated subtree")
    controllers = frozenset(c for c in V2_CONTROLLERS if c in available)
    enabled = set(_read(base / "cgroup.subtree_control").split()) if controllers else set()
    try:
        _sweep_stale(base)
        if controllers - enabled:
            # Our group may not enable controllers while it holds processes: move them to a leaf.
            if (base / "cgroup.procs").read_text().split():
                leaf = base / "leaf"
                leaf.mkdir(exist_ok=True)
                for pid in (base / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        _write(leaf / "cgroup.procs", pid)
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(controllers - enabled)))
        (base / name).mkdir(exist_ok=True)
    except (OSError, EnforcerError) as exc:
        raise EnforcerUnavailable(CGROUP2, f"cannot set up {base / name}: {exc}") from exc
    group = CgroupV2Group(name, base / name, controllers)
    home = Path(_under(mounts["unified"], own.get("unified", "/")))

    def restore() -> None:
        target = home if not controllers else home / "leaf"
        if controllers:
            target.mkdir(exist_ok=True)
        _write(target / "cgroup.procs", str(os.getpid()))

    return Enforcer(group, f"cgroup v2: delegated subtree {base} with {sorted(controllers)}", restore=restore)


def _open_signals(name: str, why: str) -> Enforcer:
    return Enforcer(SignalGroup(name), why)


def open_enforcer(
    backend: str = "auto",
    *,
    root: str = CGROUP_ROOT,
    name: str | None = None,
    v2_require: Iterable[str] = V2_CONTROLLERS,
) -> Enforcer:
    """The enforcer for ``backend`` (``auto``, ``cgroup2``, ``cgroup1`` or ``signals``).

    A named backend that is not available raises :class:`EnforcerUnavailable` (refuse to start);
    ``auto`` takes the strongest available and logs a warning naming why it fell back."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"enforcer backend must be auto, {', '.join(BACKENDS)}; got {backend!r}")
    name = _check_name(name or f"reca-{os.getpid()}")
    if backend == CGROUP2:
        return _open_v2(root, name, v2_require)
    if backend == CGROUP1:
        return _open_v1(root, name)
    if backend == SIGNALS:
        return _open_signals(name, "signals and rlimits: configured")
    reasons = []
    for opener in (lambda: _open_v2(root, name, v2_require), lambda: _open_v1(root, name)):
        try:
            enforcer = opener()
        except EnforcerUnavailable as exc:
            reasons.append(f"{exc.backend}: {exc.reason}")
            continue
        if reasons:
            enforcer.reason += f" (not {'; not '.join(reasons)})"
        return enforcer
    why = "FALLBACK to signals and rlimits (freeze is per process, memory is RLIMIT_AS): " + "; ".join(reasons)
    log.warning("enforcer: %s", why)
    return _open_signals(name, why)


# -- the child side -------------------------------------------------------------------------------


def service_group(handle: str | None = None) -> Group | None:
    """The service group the supervisor passed in :data:`ENV_GROUP` (or ``handle``), without
    moving anything; ``None`` when this process runs under no enforcer.  On the signals backend
    it is a group of this process's own, holding the service's ceilings."""
    text = handle if handle is not None else os.environ.get(ENV_GROUP)
    if not text:
        return None
    spec = json.loads(text)
    backend = spec.get("backend")
    if backend == CGROUP1:
        return CgroupV1Group("service", {k: Path(v) for k, v in spec["dirs"].items()})
    if backend == CGROUP2:
        return CgroupV2Group("service", Path(spec["path"]), frozenset(spec["controllers"]))
    if backend == SIGNALS:
        group = SignalGroup("service")
        group.set_limits(Limits(**spec.get("limits", {})))
        return group
    raise EnforcerError(f"{ENV_GROUP} names an unknown backend {backend!r}")


def join_group(
    sub: str, limits: Limits | None = None, *, pid: int | None = None, handle: str | None = None
) -> Group | None:
    """Put ``pid`` (default: this process) in the helper group ``sub`` of the service group the
    supervisor passed in :data:`ENV_GROUP` (or ``handle``), with ``limits``; returns the group, or
    ``None`` when this process runs under no enforcer.  On the signals backend the limits become
    this process's rlimits (``RLIMIT_AS``: allocation past it fails with ``MemoryError``)."""
    service = service_group(handle)
    if service is None:
        return None
    group = service.sub(sub, limits)
    if pid is None:
        group.place(os.getpid())
    else:
        group.place_tree(pid)
    return group


def remove_helper_group(sub: str, handle: str | None = None) -> None:
    """Remove the helper group ``sub`` of this service (after its process was reaped)."""
    service = service_group(handle)
    if service is not None and not isinstance(service, SignalGroup):
        service.sub(sub).remove()


def limit_address_space(headroom: int) -> int:
    """Cap this process's address space at its current size plus ``headroom`` bytes (the
    signals-backend memory ceiling, usable anywhere); returns the cap."""
    vms = psutil.Process().memory_info().vms
    cap = vms + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return cap
