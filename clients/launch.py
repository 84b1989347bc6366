"""Start ``python -m kernel`` as a child process, wait (bounded) until it serves, stop it cleanly.

Used by the demo (``python -m clients demo``), the benchmarks that need a whole kernel and the
system tests.  The kernel prints ``reca kernel endpoint E``, ``reca kernel control C`` and
``reca kernel ready`` on stdout when it serves; :class:`LocalKernel` waits for those lines and
keeps reading its output on a thread (so the pipe never fills).

:func:`kernel_config` and :func:`service_block` write the TOML of ``docs/architecture.md``.
"""

from __future__ import annotations

import collections
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable

import psutil
import tomli_w

from kernel import protocol as P

#: The repository root (the kernel is started with it as working directory and on PYTHONPATH).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Bounds on start-up and on shutdown, seconds.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
#: Output lines kept (``LocalKernel.lines``); older ones are dropped.
MAX_LINES_KEPT = 10_000


def short_tmpdir(prefix: str = "reca-") -> str:
    """A short temporary directory (ipc:// paths must stay under ~100 characters)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def service_block(name: str, module: str | None = None, *, command: list[str] | None = None,
                  replicas: int = 1, restart: str = "permanent", args: Iterable[str] = (),
                  shutdown_timeout_s: float = 5.0, env: dict | None = None) -> str:
    """One ``[[service]]`` table (TOML text): a Python service ``module`` or an arbitrary ``command``."""
    table: dict[str, Any] = {"name": name}
    if module:
        table["module"] = module
    if command:
        table["command"] = list(command)
    table.update(replicas=replicas, restart=restart, shutdown_timeout_s=shutdown_timeout_s)
    if args:
        table["args"] = list(args)
    if env:
        table["env"] = {str(k): str(v) for k, v in env.items()}
    return tomli_w.dumps({"service": [table]})


def kernel_config(services: str = "", *, heartbeat: float = 0.2, liveness: int = 3,
                  unavailable_wait: float = 0.5, intensity: int = 5, period: float = 10.0,
                  endpoint: str | None = None, kernel_extra: dict | None = None) -> str:
    """A whole config (TOML text): the ``[kernel]`` and ``[supervisor]`` tables (short heartbeats
    and restart back-off by default, for tests and benchmarks) followed by ``services``.
    ``kernel_extra``: more ``[kernel]`` keys."""
    return tomli_w.dumps({
        "kernel": {"endpoint": endpoint or "ipc://{runtime}/kernel.sock", "heartbeat_s": heartbeat,
                   "liveness": liveness, "unavailable_wait_s": unavailable_wait,
                   "decision_log": "{runtime}/decisions.jsonl", **(kernel_extra or {})},
        "supervisor": {"intensity": intensity, "period_s": period, "backoff_initial_s": 0.02, "backoff_max_s": 0.5},
    }) + "\n" + services


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_ended(procs: Iterable[psutil.Process], timeout: float, poll: float = 0.02) -> list[psutil.Process]:
    """Wait (bounded by ``timeout``) until each of ``procs`` has ended; returns those still running.
    One that has exited but is not reaped yet has ended: a kernel's children are orphans once it
    is gone, and where PID 1 reaps orphans only every second or two (some containers),
    ``psutil.wait_procs`` would wait for that reaping."""
    alive = [p for p in procs if _running(p)]
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(poll)
        alive = [p for p in alive if _running(p)]
    return alive


class KernelStartError(RuntimeError):
    """The kernel exited, or did not report ready within the bound."""


class LocalKernel:
    """``python -m kernel`` in its own runtime directory.

    ``config``: TOML text (written to ``<dir>/reca.toml``), or None for the embedded default.
    ``echo``: called with every output line (the demo prints them).  Attributes once started:
    ``endpoint``, ``control``, ``pid``, ``dir``, ``lines`` (the last output lines) and
    ``decision_log`` (where the default and :func:`kernel_config` put it).  A runtime directory
    the launcher made itself is removed by :meth:`stop`; one passed in is kept."""

    def __init__(self, config: str | None = None, *, runtime_dir: str | None = None,
                 extra_args: Iterable[str] = (), echo: Callable[[str], None] | None = None,
                 log_level: str | None = "WARNING", start_timeout: float = START_TIMEOUT_S) -> None:
        self._own_dir = runtime_dir is None
        self.dir = runtime_dir or short_tmpdir()
        self.decision_log = os.path.join(self.dir, "decisions.jsonl")
        argv = [sys.executable, "-m", "kernel"]
        if config is not None:
            self.config = os.path.join(self.dir, "reca.toml")
            with open(self.config, "w", encoding="utf-8") as fh:
                fh.write(config)
            argv += ["--config", self.config]
        env = dict(os.environ, **{P.ENV_RUNTIME_DIR: self.dir},
                   PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        if log_level:
            env[P.ENV_LOG_LEVEL] = log_level
        self._echo = echo
        self.proc = subprocess.Popen([*argv, *extra_args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid
        self._lines: collections.deque[str] = collections.deque(maxlen=MAX_LINES_KEPT)
        self._lines_lock = threading.Lock()
        self._q: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        try:
            deadline = time.monotonic() + start_timeout
            self.endpoint = self._wait_line("reca kernel endpoint ", deadline).split()[-1]
            self.control = self._wait_line("reca kernel control ", deadline).split()[-1]
            self._wait_line("reca kernel ready", deadline)
        except BaseException:  # not ready in time, or interrupted: leave nothing behind
            self.kill()
            raise

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._lines_lock:
                self._lines.append(line)
            if self._echo is not None:
                try:
                    self._echo(line)
                except Exception:  # a broken echo must not stop the draining (the pipe would fill)
                    self._echo = None
            self._q.put(line)
        self._q.put(None)

    def _wait_line(self, prefix: str, deadline: float) -> str:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KernelStartError(f"the kernel did not print {prefix!r} in time: {self.lines[-20:]}")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise KernelStartError(f"the kernel exited before {prefix!r}: {self.lines[-30:]}")
            if line.startswith(prefix):
                return line

    @property
    def lines(self) -> list[str]:
        """The last output lines (up to ``MAX_LINES_KEPT``), as a snapshot."""
        with self._lines_lock:
            return list(self._lines)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> tuple[int, list[psutil.Process]]:
        """Signal the kernel and wait (bounded) for it and everything it started.  Returns its
        exit status (SIGKILLed after ``timeout``: then negative) and the processes that outlived
        it (killed before returning)."""
        kids = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout)
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        alive = wait_ended(kids, timeout)
        for p in alive:
            p.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        return rc, alive

    def kill(self) -> list[psutil.Process]:
        """SIGKILL the kernel alone (its children die with it: ``PR_SET_PDEATHSIG``); returns the
        children still alive after the stop bound (killed too)."""
        return LocalKernel.stop(self, signal.SIGKILL)[1]

    def __enter__(self) -> "LocalKernel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
