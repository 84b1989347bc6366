"""Test support: start a real ``python -m kernel`` with a config, wait for it, stop it cleanly.

Every wait is bounded; teardown checks that no process the kernel started is left behind.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Iterable

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def short_tmpdir(prefix: str = "reca-") -> str:
    """A short temporary directory (ipc:// paths must stay under ~100 characters)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def service_block(name: str, module: str | None = None, *, command: list[str] | None = None,
                  replicas: int = 1, restart: str = "permanent", args: Iterable[str] = (),
                  shutdown_timeout_s: float = 5.0, env: dict | None = None) -> str:
    lines = ["[[service]]", f'name = "{name}"']
    if module:
        lines.append(f'module = "{module}"')
    if command:
        lines.append("command = [" + ", ".join(f'"{c}"' for c in command) + "]")
    lines += [f"replicas = {replicas}", f'restart = "{restart}"', f"shutdown_timeout_s = {shutdown_timeout_s}"]
    if args:
        lines.append("args = [" + ", ".join(f'"{a}"' for a in args) + "]")
    if env:
        lines.append("env = { " + ", ".join(f'{k} = "{v}"' for k, v in env.items()) + " }")
    return "\n".join(lines) + "\n"


class KernelProcess:
    """``python -m kernel`` in a fresh runtime directory, with short heartbeats by default."""

    def __init__(self, services: str = "", *, heartbeat: float = 0.2, liveness: int = 3,
                 unavailable_wait: float = 0.5, intensity: int = 5, period: float = 10.0,
                 endpoint: str | None = None, extra_args: Iterable[str] = ()) -> None:
        self.dir = short_tmpdir()
        self.config = os.path.join(self.dir, "reca.toml")
        self.decision_log = os.path.join(self.dir, "decisions.jsonl")
        with open(self.config, "w") as fh:
            fh.write(textwrap.dedent(f"""
                [kernel]
                endpoint = "{endpoint or 'ipc://{runtime}/kernel.sock'}"
                heartbeat_s = {heartbeat}
                liveness = {liveness}
                unavailable_wait_s = {unavailable_wait}
                decision_log = "{{runtime}}/decisions.jsonl"

                [supervisor]
                intensity = {intensity}
                period_s = {period}
                backoff_initial_s = 0.02
                backoff_max_s = 0.5
            """))
            fh.write(services)
        env = dict(os.environ, RECA_RUNTIME_DIR=self.dir, PYTHONPATH=REPO, RECA_LOG_LEVEL="WARNING")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernel", "--config", self.config, *extra_args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self.endpoint = self._wait_line("reca kernel endpoint ").split()[-1]
        self.control = self._wait_line("reca kernel control ").split()[-1]
        self._wait_line("reca kernel ready")
        self.pid = self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def _wait_line(self, prefix: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"kernel did not print {prefix!r} within {timeout} s: {self.lines[-20:]}")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"kernel exited before {prefix!r}: {self.lines[-30:]}")
            if line.startswith(prefix):
                return line

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the kernel; returns its exit status and asserts nothing it started survives."""
        kids = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(STOP_TIMEOUT)
            raise AssertionError("kernel did not stop within the shutdown bound")
        finally:
            self._reader.join(5)
        _, alive = psutil.wait_procs(kids, timeout=STOP_TIMEOUT)
        for p in alive:
            p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not alive, f"processes left behind: {[p.pid for p in alive]}"
        return rc

    def __enter__(self) -> "KernelProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
