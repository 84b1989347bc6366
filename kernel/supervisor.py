"""The supervisor: Erlang/OTP ``one_for_one`` supervision of the service processes.

Pure parts (tested with time passed in): :class:`RestartIntensity` (at most ``intensity``
restarts in any ``period`` seconds, else the child is given up), :func:`should_restart` (the
restart types) and :class:`Backoff` (delay between restarts, reset once a child has run stably).

The shell, :class:`Supervisor`, owns the OS processes: it starts children in declaration order,
each in its own session and process group, restarts them by those rules, and stops them all
at once, each with SIGTERM (to the child; its helpers are its own to stop), its shutdown
timeout, then SIGKILL of its whole group.  Because it
owns the processes it also offers the hard controls of preemption: SIGSTOP / SIGCONT, CPU
affinity and nice value.  With an :class:`kernel.enforce.Enforcer` (``enforcer=``) every child
runs in a group of its own (``<service>/main`` under the kernel's ``reca-<pid>`` subtree, with
the child's ``mem_bytes`` / ``cpu_weight`` / ``pids_max`` ceilings): :meth:`Supervisor.freeze`
stops that group atomically (resume thaws it), :meth:`Supervisor.kill_group` kills it whole,
:meth:`Supervisor.cpu_seconds` reads what the OS measured, and the group is removed when the child
stops for good.  A child learns its group from :data:`kernel.enforce.ENV_GROUP` so that it can
put its own helper processes in groups beside it (:func:`kernel.enforce.join_group`).  Children
learn the kernel's endpoints from environment variables
(:data:`ENV_ENDPOINT`, :data:`ENV_CONTROL`, ...) and arm ``PR_SET_PDEATHSIG`` themselves so that
they die with the kernel even when the kernel is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Protocol

import psutil

from kernel import enforce as E
from kernel import protocol as P
from kernel.protocol import ENV_CONTROL, ENV_ENDPOINT, ENV_HEARTBEAT, ENV_LIVENESS, ENV_PARENT, ENV_SERVICE

log = logging.getLogger("reca.supervisor")

#: Credentials never inherited from the kernel's own environment: each child gets its own.
ENV_CREDENTIALS = (P.ENV_CERT, P.ENV_SERVER_CERT)

__all__ = ["ENV_CONTROL", "ENV_ENDPOINT", "ENV_HEARTBEAT", "ENV_LIVENESS", "ENV_PARENT", "ENV_SERVICE",
           "Backoff", "ChildSpec", "ProcessControl", "RestartIntensity", "RestartType", "Supervisor",
           "process_cpu_seconds", "python_module_argv", "should_restart"]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (psutil; None if it is gone or not readable)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.Error, OSError):
        return None
    return times.user + times.system


class ProcessControl(Protocol):
    """The hard controls of preemption the management calls use (the Supervisor implements it).
    Each raises LookupError for a child that is unknown or not running."""

    def suspend(self, name: str) -> int: ...

    def resume(self, name: str) -> int: ...

    def set_nice(self, name: str, nice: int) -> int: ...

    def set_affinity(self, name: str, cpus: list[int]) -> int: ...

    def owns_pid(self, name: str, pid: int) -> bool: ...
    def restart(self, name: str) -> int: ...


class RestartType(str, enum.Enum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only after an abnormal exit (non-zero status or a signal)
    TEMPORARY = "temporary"  # never restarted


def should_restart(restart: RestartType, returncode: int) -> bool:
    """Whether a child that exited with ``returncode`` is restarted (outside shutdown)."""
    if restart is RestartType.PERMANENT:
        return True
    if restart is RestartType.TRANSIENT:
        return returncode != 0
    return False


class RestartIntensity:
    """At most ``intensity`` restarts within any window of ``period`` seconds.

    ``allow(now)`` records a restart and answers True, or answers False (and records nothing)
    when one more would exceed the intensity: the supervisor then gives the child up.
    """

    def __init__(self, intensity: int, period: float) -> None:
        if intensity < 0 or period <= 0:
            raise ValueError("intensity must be >= 0 and period > 0")
        self.intensity = intensity
        self.period = period
        self._times: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        while self._times and self._times[0] <= now - self.period:
            self._times.popleft()
        if len(self._times) >= self.intensity:
            return False
        self._times.append(now)
        return True

    def recent(self, now: float) -> int:
        return sum(1 for t in self._times if t > now - self.period)


class Backoff:
    """Exponential delay between restarts: ``initial * 2**n`` capped at ``maximum``, where n is
    the number of consecutive short-lived runs; a run longer than ``stable_after`` resets n."""

    def __init__(self, initial: float = P.BACKOFF_INITIAL, maximum: float = P.BACKOFF_MAX,
                 stable_after: float = P.STABLE_AFTER) -> None:
        self.initial = initial
        self.maximum = maximum
        self.stable_after = stable_after
        self.failures = 0

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= self.stable_after:
            self.failures = 0
        delay = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        return delay


#: Per-child log files: rotated past this size, keeping this many older files (``NAME.log.1`` ...).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
#: Last output lines kept per child: the last one names why it exited (status's ``reason``).
LOG_TAIL_LINES = 20
#: Longest ``reason`` text shown in status.
REASON_MAX_CHARS = 300


class ChildLog:
    """A child's stdout and stderr, written to ``DIR/NAME.log`` and rotated by size (``.log.1`` is
    the newest older file, up to ``backups``).  Keeps the last lines in memory: the last one is
    usually the reason a process exited.  Pure file I/O, no asyncio."""

    def __init__(self, directory: str, name: str, *, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
        self.path = os.path.join(directory, f"{name}.log")
        self.max_bytes = max_bytes
        self.backups = backups
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._partial = b""
        self._fh = open(self.path, "ab")

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for line in lines:
            text = line.decode(errors="replace").strip()
            if text:
                self.tail.append(text)
        if self._fh.tell() >= self.max_bytes:
            self.rotate()

    def rotate(self) -> None:
        self._fh.close()
        for n in range(self.backups - 1, 0, -1):
            if os.path.exists(f"{self.path}.{n}"):
                os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        if self.backups:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._fh = open(self.path, "ab")

    def mark(self, text: str) -> None:
        """A line of the supervisor's own in the child's log (start, exit)."""
        self._fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {text} ---\n".encode())
        self._fh.flush()

    def last_line(self) -> str | None:
        if self._partial.strip():
            return self._partial.decode(errors="replace").strip()
        return self.tail[-1] if self.tail else None

    def close(self) -> None:
        self._fh.close()


def exit_reason(returncode: int, last_line: str | None) -> str:
    """``exit 1: <the child's last line>`` / ``killed by SIGKILL``: why a child ended, for status."""
    if returncode < 0:
        try:
            what = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            what = f"killed by signal {-returncode}"
    else:
        what = f"exit {returncode}"
    if last_line and returncode != 0:
        what += f": {last_line}"
    return what[:REASON_MAX_CHARS]


#: Graces that services declare, by module (CPU ms): how much CPU one may burn on a request the
#: kernel has answered before the ladder freezes it (kernel/ladder.py).  scch answers when its
#: bounded solver call returns: its bound (reason.solve.SOLVE_SECONDS, 20 s of CPU) + 1 s.
#: decode answers when its beam or splice returns (a thread, no safe point inside), bounded by
#: its beam limits (services/decode ``--max-beam-width`` / ``--max-beam-tokens``: ~0.2 s of CPU
#: for the chain model at the bound; 2 s leaves room for larger models and a busy machine).
#: A [[service]] ``grace_ms`` overrides it.
DECLARED_GRACE_MS: dict[str, float] = {"services.scch": 21_000.0, "services.decode": 2_000.0}
#: The ladder's answer window for a child on another node before its agent's round trips are added,
#: seconds (``[enforce] remote_answer_grace_ms``): measured with ``bench ray``, a remote thaw and
#: answer took ~100 ms at load 25, the local window (kernel.ladder.ANSWER_GRACE_S) in all.
REMOTE_ANSWER_GRACE_S = 0.5
#: Services that keep state between requests, by module, which other principals may hold: decode's
#: sessions (``decode`` ids, and the ``long_*`` tiered decodes with their held arenas); sim's runs
#: and finished results; kvtp's runs (each holds a long decode and its ``kv_blocks`` on decode,
#: freed by kvtp when the run ends -- and kept with ``keep``); ttc's prepared and committed calls,
#: their subscribers' waits and the tool workers in its group (a kill takes every principal's
#: running tool calls with it).  The ladder never kills their worker for one request's tombstone
#: before its hard ceiling (kernel/ladder.py, "Shared workers").  A [[service]] ``keeps_state``
#: overrides it.
KEEPS_STATE: frozenset[str] = frozenset({"services.decode", "services.sim", "services.kvtp", "services.ttc"})
#: Environment variable giving a child its incarnation: a number larger than every earlier run's
#: of the same child, across restarts and kernel restarts (tenths of a second since 2026, or the
#: last one + 1), so that it can tell state of an earlier run (``session_lost``) from none.
ENV_INCARNATION = P.ENV_INCARNATION


def incarnation_now(last: int = 0) -> int:
    """A new incarnation number for a child started now (:func:`kernel.protocol.incarnation_at`)."""
    return P.incarnation_at(time.time(), last)


@dataclasses.dataclass
class ChildSpec:
    """One supervised process, as declared in the TOML config (``[[service]]``)."""

    name: str
    argv: list[str]
    restart: RestartType = RestartType.PERMANENT
    shutdown_timeout: float = P.SHUTDOWN_TIMEOUT
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    nice: int | None = None
    cpus: list[int] | None = None
    #: OS ceilings of the child's group (enforcer): memory, cpu weight (v2 scale), processes.
    mem_bytes: int | None = None
    cpu_weight: int | None = None
    pids_max: int | None = None
    #: The grace the service declares: how long after the kernel answered one of its requests
    #: (cancel, budget) it may still hold it before the escalation ladder freezes it, ms (the
    #: ladder waits the larger of this and its own freeze grace).  None: the grace its module
    #: declares in :data:`DECLARED_GRACE_MS`, else 0.
    grace_ms: float | None = None
    #: The service keeps state between requests (sessions): None: as its module declares in
    #: :data:`KEEPS_STATE`.
    keeps_state: bool | None = None
    #: ``local`` (a process here) or ``ray`` (an actor on a Ray node, started by the supervisor's
    #: ``remote`` placement: kernel/rayplace.py).
    placement: str = "local"

    def __post_init__(self) -> None:
        module = self.argv[2] if len(self.argv) >= 3 and self.argv[1] == "-m" else None
        if self.grace_ms is None:
            self.grace_ms = DECLARED_GRACE_MS.get(module or "", 0.0)
        if self.keeps_state is None:
            self.keeps_state = (module or "") in KEEPS_STATE

    def limits(self) -> E.Limits:
        return E.Limits(self.mem_bytes, self.cpu_weight, self.pids_max)


class ChildState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPED = "stopped"  # SIGSTOPped by preemption
    EXITED = "exited"  # exited and not restarted (transient/temporary)
    GIVEN_UP = "given_up"  # restart intensity exceeded
    SHUTDOWN = "shutdown"


class Child:
    def __init__(self, spec: ChildSpec, intensity: RestartIntensity, backoff: Backoff) -> None:
        self.spec = spec
        self.intensity = intensity
        self.backoff = backoff
        #: The child's process (a kernel.rayplace.RemoteProcess, which quacks like one, when Ray-placed).
        self.proc: asyncio.subprocess.Process | None = None
        self.state = ChildState.STARTING
        self.restarts = 0
        self.started_at = 0.0
        self.last_exit: int | None = None
        self.pids: list[int] = []
        self.watcher: asyncio.Task | None = None
        #: The child's enforcer group (None without an enforcer).
        self.group: E.Group | None = None
        #: The child's log file (None: its output goes to the kernel's own stdout/stderr).
        self.log: ChildLog | None = None
        #: Why it last exited (``exit 1: <last line>``), or None.
        self.reason: str | None = None
        #: Its current run's incarnation (:func:`incarnation_now`), passed as :data:`ENV_INCARNATION`.
        self.incarnation = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def info(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "restart": self.spec.restart.value,
            "group": None if self.group is None else self.group.name,
            "reason": self.reason,
            "log": None if self.log is None else self.log.path,
            "where": getattr(self.proc, "where", None) if self.spec.placement != "local" else None,
        }


class Supervisor:
    """one_for_one supervisor of the children declared in ``specs`` (started in order)."""

    def __init__(
        self,
        specs: list[ChildSpec],
        *,
        env: dict[str, str],
        intensity: int = P.RESTART_INTENSITY,
        period: float = P.RESTART_PERIOD,
        backoff_initial: float = P.BACKOFF_INITIAL,
        backoff_max: float = P.BACKOFF_MAX,
        enforcer: E.Enforcer | None = None,
        log_dir: str | None = None,
    ) -> None:
        #: Where each child's output goes (``DIR/NAME.log``, rotated); None: the kernel's own output.
        self.log_dir = log_dir
        #: Called with (health, child) when a child is given up or an operator restarts one.
        self.on_health: Callable[[str, Child], None] | None = None
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate child names in {names}")
        self.env = env
        #: The OS backstop (None: signals to process groups only, as before).
        self.enforcer = enforcer
        self.children = [
            Child(s, RestartIntensity(intensity, period), Backoff(backoff_initial, backoff_max)) for s in specs
        ]
        self._by_name = {c.spec.name: c for c in self.children}
        self._shutting_down = False
        #: Every task the supervisor starts (process watchers, restarts); Invariant: a task is
        #: here until it is done; shutdown() awaits or cancels each.
        self._tasks: set[asyncio.Task] = set()
        #: Pending restart timers, cancelled at shutdown.
        self._timers: set[asyncio.TimerHandle] = set()
        #: Starts children whose placement is not ``local`` (kernel.rayplace.RayPlacement: its
        #: ``spawn(name, argv, env)`` returns a process-like handle); None: such children are
        #: reported unavailable.
        self.remote: Any = None
        #: The ladder's answer window after a thaw for a child placed on another node, before the
        #: round trips to its agent are added (``[enforce] remote_answer_grace_ms``; answer_grace_of).
        self.remote_answer_grace = REMOTE_ANSWER_GRACE_S

    def _own(self, coro: Any) -> asyncio.Task:
        """Start ``coro`` as a task the supervisor owns (awaited or cancelled at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        for child in self.children:
            if child.spec.placement != "local":  # placed in the background: a cluster may take minutes
                self._own(self._spawn(child))
            else:
                await self._spawn(child)

    async def _spawn(self, child: Child) -> None:
        if child.spec.placement != "local":
            await self._spawn_remote(child)
            return
        env = dict(os.environ)
        for key in ENV_CREDENTIALS:  # a child gets its own certificate (spec.env), never the kernel's caller's
            env.pop(key, None)
        env.update(self.env)
        env.update(child.spec.env)
        env[ENV_SERVICE] = child.spec.name
        env[ENV_PARENT] = str(os.getpid())
        child.incarnation = incarnation_now(child.incarnation)
        env[ENV_INCARNATION] = str(child.incarnation)
        group = None
        if self.enforcer is not None:
            try:
                group = self.enforcer.service(child.spec.name, child.spec.limits())
                if group.pids():  # what a crashed run left behind (a helper it forked) goes first
                    group.kill()
                with contextlib.suppress(E.EnforcerError):  # never a per-request ceiling of the last run,
                    group.set_memory_ceiling(child.spec.mem_bytes)
                group.thaw()  # nor its freeze: a new process must not start frozen
                env[E.ENV_GROUP] = group.handle()
            except E.EnforcerError as exc:
                log.error("cannot make the group of %s: %s; it runs without one", child.spec.name, exc)
                group = None
        if self.log_dir is not None:
            env.setdefault("PYTHONUNBUFFERED", "1")  # a Python child's prints reach its log as they happen
        child.state = ChildState.STARTING
        output: dict[str, Any] = {}
        if self.log_dir is not None:
            try:
                if child.log is None:
                    child.log = ChildLog(self.log_dir, child.spec.name)
                output = {"stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.STDOUT}
            except OSError as exc:
                log.warning("cannot open the log file of %s in %s: %s; its output goes to the kernel's",
                            child.spec.name, self.log_dir, exc)
        try:
            proc = await asyncio.create_subprocess_exec(
                *child.spec.argv, env=env, start_new_session=True, stdin=asyncio.subprocess.DEVNULL, **output
            )
        except OSError as exc:
            log.error("cannot start %s (%s): %s", child.spec.name, child.spec.argv, exc)
            child.last_exit = -1
            child.reason = f"cannot start: {exc}"[:REASON_MAX_CHARS]
            child.proc = None
            self._after_exit(child, -1, 0.0)
            return
        if output and child.log is not None:
            child.log.mark(f"started pid {proc.pid}: {' '.join(child.spec.argv)}")
        child.proc = proc
        child.pids.append(proc.pid)
        child.started_at = time.monotonic()
        child.state = ChildState.RUNNING
        if group is not None:
            try:
                group.sub("main").place_tree(proc.pid)
                child.group = group
            except (E.EnforcerError, ProcessLookupError) as exc:
                log.error("cannot place %s (pid %d) in its group: %s", child.spec.name, proc.pid, exc)
        self._apply_limits(child)
        log.info("started %s pid %d", child.spec.name, proc.pid)
        child.watcher = self._own(self._watch(child, proc))

    async def _spawn_remote(self, child: Child) -> None:
        """Start a child through :attr:`remote` (a Ray actor): the environment it gets is the
        kernel's endpoints and its spec's, never this process's; a placement that cannot start it
        (cluster unreachable) counts as an exit with the reason ``unavailable: ...``."""
        child.state = ChildState.STARTING
        env = {**self.env, **child.spec.env, ENV_SERVICE: child.spec.name}
        for key in ENV_CREDENTIALS:
            env.pop(key, None)
        try:
            if self.remote is None:
                raise LookupError(f"no {child.spec.placement} placement configured")
            proc = await self.remote.spawn(child.spec.name, child.spec.argv, env)
        except Exception as exc:  # noqa: BLE001 - any placement failure is the reason status shows
            log.error("cannot place %s: %s", child.spec.name, exc)
            child.last_exit = -1
            child.reason = f"unavailable: {exc}"[:REASON_MAX_CHARS]
            child.proc = None
            if self._shutting_down:
                child.state = ChildState.SHUTDOWN
            else:
                self._after_exit(child, -1, 0.0)
            return
        child.proc = proc
        child.pids.append(proc.pid)
        child.started_at = time.monotonic()
        child.state = ChildState.RUNNING
        if self._shutting_down:  # shut down while it was being placed
            await proc.stop(child.spec.shutdown_timeout)
            child.state = ChildState.SHUTDOWN
            return
        child.watcher = self._own(self._watch(child, proc))

    def _remote(self, name: str) -> Any:
        """The running remote child's handle (kernel.rayplace.RemoteProcess), else None."""
        child = self.child(name)
        return child.proc if child.spec.placement != "local" else None

    def _apply_limits(self, child: Child) -> None:
        pid = child.pid
        if pid is None:
            return
        try:
            if child.spec.nice is not None:
                os.setpriority(os.PRIO_PROCESS, pid, child.spec.nice)
            if child.spec.cpus:
                os.sched_setaffinity(pid, child.spec.cpus)
        except OSError as exc:
            log.warning("cannot apply limits to %s: %s", child.spec.name, exc)

    async def _pump(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        """Copy the child's output to its log file until the pipe closes."""
        assert proc.stdout is not None and child.log is not None
        while True:
            data = await proc.stdout.read(65536)
            if not data:
                return
            try:
                child.log.write(data)
            except (OSError, ValueError) as exc:  # disk full: keep draining (a full pipe would block the child)
                log.warning("log of %s: %s", child.spec.name, exc)

    async def _watch(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        pump = self._own(self._pump(child, proc)) if proc.stdout is not None and child.log is not None else None
        returncode = await proc.wait()
        if pump is not None:
            try:  # the rest of its output, bounded: a grandchild may hold the pipe open
                await asyncio.wait_for(asyncio.shield(pump), 1.0)
            except asyncio.TimeoutError:
                pass
        if child.proc is not proc:
            return
        child.last_exit = returncode
        child.reason = exit_reason(returncode, getattr(proc, "last_line", None) if child.log is None
                                   else child.log.last_line())
        if child.log is not None:
            child.log.mark(child.reason)
        ran_for = time.monotonic() - child.started_at
        if child.group is not None and not self._shutting_down:
            try:  # let it crash: the helpers a dead service started die with it
                if child.group.pids():
                    child.group.kill()
            except E.EnforcerError as exc:
                log.warning("cannot clear the group of %s: %s", child.spec.name, exc)
        if self._shutting_down:
            child.state = ChildState.SHUTDOWN
            return
        self._after_exit(child, returncode, ran_for)

    def _after_exit(self, child: Child, returncode: int, ran_for: float) -> None:
        name = child.spec.name
        if not should_restart(child.spec.restart, returncode):
            child.state = ChildState.EXITED
            log.info("%s exited (%s); not restarted (%s)", name, child.reason or returncode, child.spec.restart.value)
            return
        if not child.intensity.allow(time.monotonic()):
            child.state = ChildState.GIVEN_UP
            log.critical(
                "GIVING UP on %s: more than %d restarts in %.1f s (%s); the rest keep running",
                name, child.intensity.intensity, child.intensity.period, child.reason or returncode,
            )
            if self.on_health is not None:
                self.on_health(self.health(), child)
            return
        delay = child.backoff.next_delay(ran_for)
        child.state = ChildState.BACKOFF
        log.warning("%s exited (%s); restarting in %.2f s%s", name, child.reason or returncode, delay,
                    "" if child.log is None else f" (its log: {child.log.path})")
        box: list[asyncio.TimerHandle] = []
        box.append(asyncio.get_running_loop().call_later(delay, lambda: self._restart_later(child, box[0])))
        self._timers.add(box[0])

    def _restart_later(self, child: Child, timer: asyncio.TimerHandle) -> None:
        self._timers.discard(timer)
        if self._shutting_down or child.state is not ChildState.BACKOFF:
            return
        child.restarts += 1
        self._own(self._spawn(child))

    async def shutdown(self) -> None:
        """Stop every child at once: SIGTERM to each, then SIGKILL to each that outlives its own
        timeout, and to whatever is left in each one's process group.  Every group is thawed first (a frozen child acts on no signal)."""
        self._shutting_down = True
        if self.enforcer is not None:
            self.enforcer.thaw_all()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        # All at once: every child is signalled before any is waited for, and each still gets its
        # own shutdown_timeout before SIGKILL (a kernel stop costs the slowest child's stop, not the
        # sum).  asyncio's own proc.wait(), not psutil.wait_procs: the event loop reaps its children
        # and must not block while the server still answers.
        results = await asyncio.gather(*(self._stop_child(c) for c in reversed(self.children)),
                                       return_exceptions=True)
        for child, result in zip(reversed(self.children), results):
            if isinstance(result, BaseException):  # the rest were stopped all the same
                log.error("stopping %s failed: %r", child.spec.name, result)
        # Watchers end with their processes; a restart caught mid-spawn is cancelled.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=P.SHUTDOWN_TIMEOUT)
            for task in still:
                task.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
        for child in self.children:
            if child.log is not None:
                child.log.close()

    async def _stop_child(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            child.state = ChildState.SHUTDOWN
            self._remove_group(child)
            return
        if child.spec.placement != "local":  # the node agent stops it (SIGTERM, timeout, SIGKILL)
            await self._remote(child.spec.name).stop(child.spec.shutdown_timeout)
            child.state = ChildState.SHUTDOWN
            return
        self._thaw(child)  # a frozen child cannot act on SIGTERM (nor, on cgroup v1, die of SIGKILL)
        self._signal_group(proc.pid, signal.SIGCONT)  # nor a stopped one
        # SIGTERM to the child alone: its helpers are its own to stop in its teardown (a group
        # SIGTERM killed scch's idle solver-pool worker holding the pool's queue lock, and the
        # service's pool.close() then waited for that lock until SIGKILL); SIGKILL below takes
        # whatever is left in its group (systemd's KillMode=mixed).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), child.spec.shutdown_timeout)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.1f s; killing it", child.spec.name, child.spec.shutdown_timeout)
            self._signal_group(proc.pid, signal.SIGKILL)
            self._thaw(child)
            await proc.wait()
        # Anything the child left in its process group goes too.
        self._signal_group(proc.pid, signal.SIGKILL)
        child.state = ChildState.SHUTDOWN
        self._remove_group(child)

    @staticmethod
    def _thaw(child: Child) -> None:
        if child.group is not None:
            try:
                child.group.thaw()
            except E.EnforcerError as exc:
                log.warning("cannot thaw the group of %s: %s", child.spec.name, exc)

    def _remove_group(self, child: Child) -> None:
        """Kill what is left in the child's group (helpers in other sessions too) and remove it."""
        if self.enforcer is not None and child.group is not None:
            try:
                self.enforcer.remove_service(child.spec.name)
            except E.EnforcerError as exc:
                log.warning("cannot remove the group of %s: %s", child.spec.name, exc)
            child.group = None

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -- hard preemption controls ------------------------------------------------------------------

    def child(self, name: str) -> Child:
        try:
            return self._by_name[name]
        except KeyError:
            raise LookupError(f"no supervised child named {name!r}") from None

    def _live_pid(self, name: str) -> int:
        child = self.child(name)
        if child.proc is None or child.proc.returncode is not None:
            raise LookupError(f"child {name!r} is not running")
        return child.proc.pid

    def owns_pid(self, name: str, pid: int) -> bool:
        """Whether ``pid`` is the running child ``name`` or one of its descendants (a READY's
        pid is measured for CPU time only then: a peer cannot point the kernel at another
        process)."""
        try:
            root = self._live_pid(name)
            if self._remote(name) is not None:  # a pid on its node: only the one it reported
                return pid == root
            return pid == root or any(p.pid == root for p in psutil.Process(pid).parents())
        except (LookupError, psutil.Error, OSError):
            return False
    def restart(self, name: str) -> int:
        """Start a child that was given up (restart intensity exceeded) or exited (not restarted
        by its type) again, with its restart intensity and back-off reset; returns how many
        restarts it has had.  LookupError for an unknown child or one that is running."""
        child = self.child(name)
        if child.state not in (ChildState.GIVEN_UP, ChildState.EXITED) or self._shutting_down:
            raise LookupError(f"child {name!r} is {child.state.value}, not given up or exited")
        child.intensity = RestartIntensity(child.intensity.intensity, child.intensity.period)
        child.backoff.failures = 0
        child.restarts += 1
        child.state = ChildState.BACKOFF
        log.warning("%s restarted by an operator (mmi.restart)", name)
        self._own(self._spawn(child))
        if self.on_health is not None:
            self.on_health(self.health(), child)
        return child.restarts

    def suspend(self, name: str) -> int:
        """SIGSTOP the child's process group; returns its pid.  (:meth:`freeze` stops its whole
        enforcer group, helpers in other sessions included, atomically.)"""
        pid = self._live_pid(name)
        remote = self._remote(name)
        if remote is not None:
            remote.signal(signal.SIGSTOP)
        else:
            os.killpg(pid, signal.SIGSTOP)
        self.child(name).state = ChildState.STOPPED
        return pid

    def resume(self, name: str) -> int:
        """Thaw the child's group, else SIGCONT its process group; returns its pid."""
        pid = self._live_pid(name)
        child = self.child(name)
        if child.group is not None:
            child.group.thaw()
        remote = self._remote(name)
        if remote is not None:
            remote.signal(signal.SIGCONT)
        else:
            os.killpg(pid, signal.SIGCONT)
        child.state = ChildState.RUNNING
        return pid

    def freeze(self, name: str, timeout: float = E.FREEZE_TIMEOUT) -> float:
        """Freeze the child's whole group; returns the seconds until the OS reported it frozen
        (:class:`kernel.enforce.FreezeTimeout` past ``timeout``: the freeze is written and lands
        when the OS gets to it).  LookupError without a group (no enforcer), for a child not
        running, or once shutdown began (nothing is frozen that the shutdown would not thaw)."""
        self._live_pid(name)
        remote = self._remote(name)
        if remote is not None:  # SIGSTOP by the node agent; sent, not confirmed: 0.0
            remote.signal(signal.SIGSTOP)
            self.child(name).state = ChildState.STOPPED
            return 0.0
        group = self.child(name).group
        if group is None:
            raise LookupError(f"child {name!r} has no enforcer group")
        if self._shutting_down:
            raise LookupError(f"child {name!r}: the supervisor is shutting down")
        self.child(name).state = ChildState.STOPPED
        return group.freeze(timeout)

    def thaw(self, name: str) -> None:
        """Thaw child ``name``'s group (running or not); a child on another node is thawed by its
        node agent (SIGCONT: its group there; sent, not confirmed).  LookupError without a
        group."""
        child = self.child(name)
        remote = self._remote(name)
        if remote is not None and child.proc is not None and child.proc.returncode is None:
            remote.signal(signal.SIGCONT)
            child.state = ChildState.RUNNING
            return
        if child.group is None:
            raise LookupError(f"child {name!r} has no enforcer group")
        child.group.thaw()
        if child.state is ChildState.STOPPED:
            child.state = ChildState.RUNNING

    def boost(self, name: str, why: str = "preempt") -> None:
        """Run child ``name``'s group ahead of others until :meth:`unboost` (kernel/enforce.py
        ``Group.boost``; nothing without a group)."""
        group = self.child(name).group
        if group is not None:
            group.boost(why)

    def unboost(self, name: str, why: str = "preempt") -> None:
        group = self.child(name).group
        if group is not None:
            group.unboost(why)

    def grace_of(self, name: str) -> float:
        """The grace child ``name`` declared (``grace_ms``), CPU seconds."""
        return max(0.0, self.child(name).spec.grace_ms or 0.0) / 1000.0

    def hurry(self, name: str) -> None:
        """The ladder holds a tombstone of child ``name``: a child on another node has its CPU
        read every few tens of milliseconds for a while (kernel/rayplace.py
        ``RemoteProcess.hurry``) instead of every second; a local child's is read at each poll
        anyway."""
        remote = self._remote(name)
        if remote is not None and hasattr(remote, "hurry"):
            remote.hurry()

    def answer_grace_of(self, name: str) -> float | None:
        """The ladder's answer window after a thaw for child ``name``, seconds: None (the
        ladder's own) for a local child; for one on another node, :attr:`remote_answer_grace`
        plus twice the longest recent round trip to its node agent -- the thaw travels there as
        a Ray actor call, and the answer comes back over the network.  The ladder takes it once
        per tombstone, when it first sees it, clamped to [its own answer grace,
        remote_answer_grace + kernel.ladder.ANSWER_CAP_S] (kernel/__main__.py)."""
        remote = self._remote(name)
        if remote is None:
            return None
        rtt = getattr(remote, "rtt", None)
        return self.remote_answer_grace + 2.0 * (float(rtt()) if callable(rtt) else 0.0)

    def stopped(self, name: str) -> bool:
        """Whether child ``name`` is stopped (frozen or SIGSTOPped: by the ladder or an operator)."""
        return self.child(name).state is ChildState.STOPPED

    def keeps_of(self, name: str) -> bool:
        """Whether child ``name`` keeps state between requests (``keeps_state``)."""
        return bool(self.child(name).spec.keeps_state)

    def group_cpu_of_pid(self, pid: int) -> float | None:
        """CPU seconds of the enforcer group of the running child whose process is ``pid`` (what
        the kernel bills: the worker and every helper it started), None if it has none."""
        name = self.child_of_pid(pid)
        if name is not None and self._remote(name) is not None:
            return float(self._remote(name).cpu)  # measured on its node, polled by the placement
        if name is None or self.child(name).group is None:
            return None
        return self.cpu_seconds(name)

    def child_of_pid(self, pid: int) -> str | None:
        """The running child whose process is ``pid`` (a worker's READY pid), else None."""
        # Local children first: a Ray-placed child's pid is of its node and may equal a local one.
        for child in sorted(self.children, key=lambda c: c.spec.placement != "local"):
            if child.pid == pid and child.proc is not None and child.proc.returncode is None:
                return child.spec.name
        return None

    def kill_group(self, name: str) -> int:
        """Kill every process of the child's group (its process group without an enforcer):
        the escalation ladder's last rung; the supervisor then restarts it by its type.
        Returns how many processes were signalled."""
        pid = self._live_pid(name)
        remote = self._remote(name)
        if remote is not None:
            remote.signal(signal.SIGKILL)
            return 1
        group = self.child(name).group
        if group is not None:
            return group.kill()
        self._signal_group(pid, signal.SIGCONT)
        self._signal_group(pid, signal.SIGKILL)
        return 1

    def memory_ceiling(self, name: str, headroom: int | None) -> int | None:
        """Put a ceiling on child ``name``'s group: what it uses now plus ``headroom`` bytes (a
        request's ``mem_bytes``); ``None`` restores the service's own (``mem_bytes`` of its
        [[service]], else none).  Returns the ceiling set.  LookupError without a group;
        EnforcerError where the backend has none (signals)."""
        group = self.child(name).group
        if group is None:
            raise LookupError(f"child {name!r} has no enforcer group")
        if headroom is None:
            group.set_memory_ceiling(self.child(name).spec.mem_bytes)
            return self.child(name).spec.mem_bytes
        usage = group.memory().usage or 0
        ceiling = max(1 << 20, usage + headroom)
        own = self.child(name).spec.mem_bytes
        if own is not None:
            ceiling = min(ceiling, own)  # never above the service's own
        group.set_memory_ceiling(ceiling)
        return ceiling

    def oom_kills(self, name: str) -> int | None:
        """Processes of child ``name``'s group the OOM killer took (None: not recorded here)."""
        group = self.child(name).group
        if group is None:
            return None
        try:
            return group.memory().oom_kills
        except E.EnforcerError:
            return None

    def cpu_seconds(self, name: str) -> float | None:
        """CPU seconds the child's group used as the OS measured it (its helpers included and
        across restarts), else its live process's; None when unknown."""
        child = self.child(name)
        if child.spec.placement != "local":
            remote = self._remote(name)
            return None if remote is None else float(remote.cpu)
        if child.group is not None:
            try:
                return child.group.cpu_seconds()
            except E.EnforcerError:
                return None
        return None if child.pid is None else process_cpu_seconds(child.pid)

    def cpu_waited(self, name: str) -> float | None:
        """Seconds the tasks of the child's group have waited runnable for a CPU (kernel/enforce.py
        ``Group.cpu_waited``); None without a local group."""
        child = self.child(name)
        if child.spec.placement != "local" or child.group is None:
            return None
        try:
            return child.group.cpu_waited()
        except E.EnforcerError:
            return None

    def set_nice(self, name: str, nice: int) -> int:
        """Set the child's nice value; returns its pid."""
        pid = self._live_pid(name)
        if self._remote(name) is not None:  # a pid on another node: never a local process's
            raise LookupError(f"child {name!r} runs on a Ray node")
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        return pid

    def set_affinity(self, name: str, cpus: list[int]) -> int:
        """Pin the child to ``cpus``; returns its pid."""
        pid = self._live_pid(name)
        if self._remote(name) is not None:  # a pid on another node: never a local process's
            raise LookupError(f"child {name!r} runs on a Ray node")
        os.sched_setaffinity(pid, cpus)
        return pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self._live_pid(name)
        remote = self._remote(name)
        if remote is not None:
            remote.signal(sig)
        else:
            os.kill(pid, sig)
        return pid

    def health(self) -> str:
        """``degraded`` while a permanent child is given up, else ``ready``."""
        given_up = any(c.state is ChildState.GIVEN_UP and c.spec.restart is RestartType.PERMANENT
                       for c in self.children)
        return "degraded" if given_up else "ready"

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"children": [c.info() for c in self.children], "health": self.health()}
        if self.enforcer is not None:
            out["enforcer"] = {"backend": self.enforcer.backend, "reason": self.enforcer.reason}
        return out

    def all_pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None and c.proc.returncode is None]


def python_module_argv(module: str, args: list[str] | None = None) -> list[str]:
    """argv that runs ``python -m module`` with this interpreter."""
    return [sys.executable, "-m", module, *(args or [])]
