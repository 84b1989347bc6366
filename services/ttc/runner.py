"""The process side of the transaction manager: heavy runs in OS-limited process groups.

:class:`Runner` starts one tool-worker per run (``python -m services.ttc.toolworker``) with
``posix_spawn(setsid=True)``: the worker leads its own session and process group, so killing the
group (``killpg``) stops the tool and anything it started.  The worker applies RLIMIT_CPU /
RLIMIT_AS to itself before importing the tool and carries ``RECA_TTC_RUN=<store>/<call>/<attempt>``
in its environment (inherited by its children): that tag is how recovery and the checker find a
heavy run whose pid was never recorded or whose manager died.  A start-time token (the process's
creation time in centiseconds, from psutil) guards every kill of a non-child against PID reuse.

:class:`Coordinator` joins the state machine (:class:`~services.ttc.logic.TransactionManager`) and
the runner.  One coordinator per log at a time (an ``flock`` on ``<db>.lock``).  It applies the
state machine's kill orders, starts COMMITTED calls up to ``max_parallel``, reaps workers through
pidfds (``wait`` blocks on them with a bound, no polling sleeps), and ingests each result in the
same SQLite transaction that decides the call.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from kernel import enforce
from services.ttc import logic
from services.ttc.logic import RecoveryReport, RunFacts, RunRef, RunTicket, TransactionManager
from services.ttc.store import Store
from services.ttc.toolworker import helper_group_name, write_atomically
from services.ttc.tools import ToolRegistry, default_registry

log = logging.getLogger("reca.ttc")

ENV_RUN_TAG = "RECA_TTC_RUN"
#: The repository root, put on the worker's PYTHONPATH so ``services.ttc`` imports there.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Upper bound of one ``Coordinator.wait`` when no deadline is nearer (seconds).
WAIT_SLICE_S = 1.0
#: Bound on waiting for a killed Ray task to end when the coordinator closes (seconds).
CLOSE_WAIT_S = 30.0


def _token(proc: psutil.Process) -> int:
    return round(proc.create_time() * 100)


def start_token(pid: int) -> int | None:
    """The identity of process ``pid``: its creation time in centiseconds (psutil), or None if
    it does not exist.  A pid reused by another process has another token."""
    try:
        return _token(psutil.Process(pid))
    except psutil.Error:
        return None


def is_alive(pid: int | None, token: int | None) -> bool:
    """True if ``pid`` runs (not a zombie) and is the same process that had ``token``."""
    if pid is None or token is None:
        return False
    try:
        proc = psutil.Process(pid)
        return _token(proc) == token and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def tagged_processes(prefix: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose environment tags them as a heavy run under ``prefix``."""
    found = []
    for proc in psutil.process_iter():
        try:
            tag = proc.environ().get(ENV_RUN_TAG)
            if tag is not None and tag.startswith(prefix) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append((proc.pid, tag))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def kill_run(ref: RunRef, *, sweep: bool = True) -> int:
    """SIGKILL one run that may not be our child: its process group if the leader is still the
    same process (token check), then (``sweep``) every live process carrying its tag.  Returns
    the number of kill signals sent."""
    sent = 0
    if ref.pgid is not None and is_alive(ref.pid, ref.start_token):
        try:
            os.killpg(ref.pgid, signal.SIGKILL)
            sent += 1
        except ProcessLookupError:
            pass
    if sweep:
        for pid, tag in tagged_processes(ref.tag):
            if tag == ref.tag:
                try:
                    os.kill(pid, signal.SIGKILL)
                    sent += 1
                except ProcessLookupError:
                    pass
    return sent


@dataclasses.dataclass
class RunProc:
    """A worker this process started and has not reaped.  Invariant: ``pid`` is our unreaped
    child, so it cannot be reused and ``killpg(pgid)`` reaches exactly its group."""

    ticket: RunTicket
    pid: int
    pgid: int
    token: int | None
    pidfd: int
    killed: bool = False


class Runner:
    """Starts, reaps and kills tool-workers; owns the request/result/checkpoint files under ``workdir``."""

    def __init__(self, workdir: str, *, die_with_manager: bool = True, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.die_with_manager = die_with_manager
        self.python = python
        os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "ckpt"), exist_ok=True)

    def _base(self, tag: str) -> str:
        return os.path.join(self.workdir, "runs", tag.replace("/", "_"))

    def result_path(self, tag: str) -> str:
        return self._base(tag) + ".result.json"

    def checkpoint_dir(self, call_id: str) -> str:
        return os.path.join(self.workdir, "ckpt", call_id)

    def start(self, ticket: RunTicket) -> RunProc:
        req_path = self._base(ticket.tag) + ".req.json"
        req = {
            "entry": ticket.entry, "inputs": ticket.inputs, "call_id": ticket.call_id, "attempt": ticket.attempt,
            "checkpoint_dir": self.checkpoint_dir(ticket.call_id), "result_path": self.result_path(ticket.tag),
            "cpu_limit_s": ticket.cpu_limit_s, "mem_bytes": ticket.mem_bytes,
            "parent_pid": os.getpid(), "die_with_parent": self.die_with_manager,
        }
        write_atomically(req_path, json.dumps(req).encode())
        env = dict(os.environ)
        env[ENV_RUN_TAG] = ticket.tag
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        pid = os.posix_spawn(self.python, [self.python, "-m", "services.ttc.toolworker", req_path, ticket.tag],
                             env, setsid=True)
        return RunProc(ticket, pid, pid, start_token(pid), os.pidfd_open(pid))

    def reap(self, proc: RunProc) -> tuple[str, float] | None:
        """(end status, CPU seconds of the worker and its reaped children) once it exited, else None."""
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        os.close(proc.pidfd)
        try:  # its enforcer helper group (toolworker joined it); whatever it left there dies
            enforce.remove_helper_group(helper_group_name(proc.pid))
        except (enforce.EnforcerError, OSError) as exc:
            log.warning("cannot remove the group of tool worker %d: %s", proc.pid, exc)
        cpu = usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and not proc.killed
                                         and cpu >= proc.ticket.cpu_limit_s):
                return "cpu_limit", cpu
            return f"signal:{signal.Signals(sig).name}", cpu
        return f"exit:{os.WEXITSTATUS(status)}", cpu

    def result_of(self, proc: RunProc) -> dict | None:
        """The result an ended run left (its file)."""
        return self.read_result(proc.ticket.tag)

    def started(self, proc: RunProc) -> bool:
        """Whether ``proc``'s pid became known since the last call (a local one is known at start)."""
        return False

    def kill(self, proc: RunProc) -> None:
        """SIGKILL the run's process group (our unreaped child: the group cannot be reused)."""
        proc.killed = True
        try:
            os.killpg(proc.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, procs: list[RunProc], timeout: float) -> bool:
        """Block until one of ``procs`` exits or ``timeout`` seconds pass; True if one exited."""
        fds = [p.pidfd for p in procs]
        if not fds:
            return False
        ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        return bool(ready)

    def wait_ended(self, proc: RunProc, timeout: float) -> None:
        """Block until ``proc`` has exited (a killed child: soon), without reaping it."""
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)

    def read_result(self, tag: str) -> dict | None:
        try:
            with open(self.result_path(tag)) as fh:
                result = json.load(fh)
        except FileNotFoundError:
            return None
        return result if isinstance(result, dict) and "ok" in result else None

    def discard(self, tag: str) -> None:
        for suffix in (".req.json", ".result.json"):
            try:
                os.unlink(self._base(tag) + suffix)
            except FileNotFoundError:
                pass


class ManagerBusy(RuntimeError):
    """Another live coordinator holds this log."""


class Coordinator:
    """The transaction manager with real heavy runs.  Methods take ``now`` (default ``clock()``)."""

    def __init__(self, db_path: str, *, tools: ToolRegistry | None = None, gate: logic.Gate | None = None,
                 audit_sink: Callable[[dict], None] | None = None, workdir: str | None = None,
                 die_with_manager: bool = True, max_parallel: int = 2,
                 clock: Callable[[], float] = time.time, runner: str = "local",
                 ray_address: str | None = None, ray_token_path: str | None = None,
                 ray_task_options: dict | None = None) -> None:
        if max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
        if runner not in ("local", "ray"):
            raise ValueError(f"runner must be 'local' or 'ray', got {runner!r}")
        self.clock = clock
        self.max_parallel = max_parallel
        self._lock_fd = os.open(db_path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise ManagerBusy(f"another manager holds {db_path}") from exc
        self.store = Store(db_path)
        self.manager_id = uuid.uuid4().hex[:12]
        with self.store.tx():
            self.store.conn.execute("INSERT INTO managers VALUES (?,?,?,?,NULL)",
                                    (self.manager_id, os.getpid(), start_token(os.getpid()), clock()))
        self.tm = TransactionManager(self.store, tools or default_registry(), gate, audit_sink, self.manager_id)
        if runner == "ray":  # tool runs as Ray tasks (services/ttc/rayrun.py); same log, same checker
            from services.ttc.rayrun import RayRunner

            self.runner: Runner = RayRunner(workdir or db_path + ".d", address=ray_address,
                                            token_path=ray_token_path, task_options=ray_task_options)
        else:
            self.runner = Runner(workdir or db_path + ".d", die_with_manager=die_with_manager)
        self._procs: dict[str, RunProc] = {}
        self.closed = False

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    # ------------------------------------------------------------------------------ recovery

    def recover(self, now: float | None = None, *, rereserve: bool = True) -> RecoveryReport:
        """Decide every call left by earlier managers, kill their runs, sweep tagged orphans.
        ``rereserve=False`` for a gate that outlives this process (the kernel's): see
        :meth:`TransactionManager.recover`."""
        now = self._now(now)
        facts: dict[str, RunFacts] = {}
        tagged = {tag: pid for pid, tag in tagged_processes(self.store.store_id + "/")}
        for ref in self.tm.open_runs():
            if ref.tag in self._procs:
                continue
            alive = is_alive(ref.pid, ref.start_token) or ref.tag in tagged
            result = self.runner.read_result(ref.tag)
            facts[ref.tag] = RunFacts(alive, result, None, None if result is None else result.get("cpu_s"))
        report = self.tm.recover(now=now, facts=facts, rereserve=rereserve)
        for ref in report.kills:
            kill_run(ref)
        self.sweep_orphans()
        for tag in facts:
            self.runner.discard(tag)
        self._start_runnable(now)
        return report

    def sweep_orphans(self) -> int:
        """SIGKILL every live process tagged with this log's id that is not one of our runs."""
        killed = 0
        for pid, tag in tagged_processes(self.store.store_id + "/"):
            if tag not in self._procs:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        return killed

    # ------------------------------------------------------------------------------ protocol

    def prepare(self, tool: str, inputs: Any, est_cost: float, consumers: Iterable[str], timeout: float,
                idem_key: str | None = None, now: float | None = None) -> str:
        return self.tm.prepare(tool, inputs, est_cost, consumers, timeout, idem_key, now=self._now(now))

    def commit(self, call_id: str, idem_key: str | None = None, now: float | None = None) -> logic.Outcome:
        now = self._now(now)
        self.tm.commit(call_id, now=now, idem_key=idem_key)
        self._start_runnable(now)
        return self.tm.outcome(call_id)

    def abort(self, call_id: str, reason: str = "requested", now: float | None = None) -> None:
        self._kill(self.tm.abort(call_id, now=self._now(now), reason=reason))

    def withdraw(self, consumer: str, now: float | None = None) -> list[str]:
        aborted, kills = self.tm.withdraw(consumer, now=self._now(now))
        self._kill(kills)
        return aborted

    def subscribe(self, call_id: str, consumer: str, now: float | None = None) -> None:
        self.tm.subscribe(call_id, consumer, now=self._now(now))

    def deliver(self, consumer: str, now: float | None = None) -> list[logic.Delivery]:
        return self.tm.deliver(consumer, now=self._now(now))

    def attach(self, call_id: str, consumer: str, now: float | None = None) -> bool:
        return self.tm.attach(call_id, consumer, now=self._now(now))

    def outcome(self, call_id: str) -> logic.Outcome:
        return self.tm.outcome(call_id)

    def running(self) -> dict[str, RunProc]:
        """Our unreaped workers by tag (killed ones included until reaped)."""
        return dict(self._procs)

    # ------------------------------------------------------------------------------ processes

    def _kill(self, refs: Iterable[RunRef]) -> None:
        for ref in refs:
            proc = self._procs.get(ref.tag)
            if proc is not None:
                self.runner.kill(proc)
            else:
                kill_run(ref)

    def _start_runnable(self, now: float) -> None:
        for call_id in self.tm.runnable():
            if sum(not p.killed for p in self._procs.values()) >= self.max_parallel:
                return
            ticket = self.tm.claim_run(call_id, now=now)
            if ticket is None:
                continue
            try:
                proc = self.runner.start(ticket)
            except OSError as exc:
                self.tm.run_finished(call_id, ticket.attempt, now=now, result=None,
                                     end_status=f"spawn_failed:{exc.strerror}")
                continue
            self._procs[ticket.tag] = proc
            if proc.pid is not None:  # a Ray task's worker pid comes later (_reap)
                self.tm.run_started(call_id, ticket.attempt, proc.pid, proc.pgid, proc.token, now=now)

    def _reap(self, now: float) -> int:
        reaped = 0
        for tag, proc in list(self._procs.items()):
            if self.runner.started(proc):
                assert proc.pid is not None and proc.pgid is not None
                self.tm.run_started(proc.ticket.call_id, proc.ticket.attempt, proc.pid, proc.pgid, proc.token,
                                    now=now)
            ended = self.runner.reap(proc)
            if ended is None:
                continue
            end_status, cpu = ended
            result = self.runner.result_of(proc)
            if result is not None:
                result.pop("cpu_s", None)
            self.tm.run_finished(proc.ticket.call_id, proc.ticket.attempt, now=now, result=result,
                                 end_status=end_status, cpu_s=cpu)
            self.runner.discard(tag)
            del self._procs[tag]
            reaped += 1
        return reaped

    def step(self, now: float | None = None) -> None:
        """Reap finished workers, enforce deadlines, start what is runnable."""
        now = self._now(now)
        self._reap(now)
        self._kill(self.tm.expire(now=now))
        self._start_runnable(now)

    def wait(self, timeout: float) -> bool:
        """Block until one of our workers exits or ``timeout`` seconds pass; True if one exited."""
        return self.runner.wait(list(self._procs.values()), timeout)

    def run_until_settled(self, call_ids: Iterable[str], timeout: float) -> dict[str, logic.Outcome]:
        """Drive the calls until each is DONE, FAILED or ABORTED and every worker of theirs is
        reaped (so its CPU time is recorded); raises TimeoutError after ``timeout``."""
        ids = list(call_ids)
        deadline = time.monotonic() + timeout
        while True:
            self.step()
            outcomes = {c: self.tm.outcome(c) for c in ids}
            unreaped = {p.ticket.call_id for p in self._procs.values()}
            if all(o.state in logic.TERMINAL_STATES and c not in unreaped for c, o in outcomes.items()):
                return outcomes
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"calls not settled after {timeout}s: "
                                   f"{ {c: o.state for c, o in outcomes.items() if o.state not in logic.TERMINAL_STATES} }")
            self.wait(min(left, WAIT_SLICE_S))

    def close(self, now: float | None = None) -> None:
        """Stop: kill and reap our workers (their calls become lost runs, re-run by the next
        manager if retriable), mark this manager ended, release the log."""
        if self.closed:
            return
        now = self._now(now)
        for proc in self._procs.values():
            self.runner.kill(proc)
        for tag, proc in list(self._procs.items()):
            self.runner.wait_ended(proc, CLOSE_WAIT_S)
            ended = self.runner.reap(proc)  # a local worker has exited; a Ray task within the bound
            self.tm.run_finished(proc.ticket.call_id, proc.ticket.attempt, now=now, result=None,
                                 end_status="manager_shutdown", cpu_s=ended[1] if ended else None)
            self.runner.discard(tag)
        self._procs.clear()
        with self.store.tx():
            self.store.conn.execute("UPDATE managers SET ended_at=? WHERE manager_id=?", (now, self.manager_id))
        self.store.close()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self.closed = True

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
