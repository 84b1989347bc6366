"""``python -m kernel.raynode ARGV...``: run a Ray node (``ray start --block ...``) so that stopping
it leaves nothing behind.

Ray's daemons (gcs_server, raylet, agents, workers) are started by ``ray start`` and outlive it
when it is killed; in a container whose init does not reap, they stay as zombies.  This runner is
their *subreaper* (``PR_SET_CHILD_SUBREAPER``): every orphaned Ray process is re-parented to it.
On SIGTERM / SIGINT (or when its parent dies: ``PR_SET_PDEATHSIG``) it sends SIGTERM to every
descendant, waits :data:`GRACE_S`, SIGKILLs what is left and reaps them all, then exits.  The
kernel (a local cluster) and the tests (a multi-node cluster in network namespaces) start nodes
through it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

#: Seconds between SIGTERM and SIGKILL of the node's processes.
GRACE_S = 5.0
#: ``RECA_RAYNODE_STARTUP_NICE`` (an integer, e.g. -10): the node's processes start at this nice
#: value (if below the runner's) and are set back to the runner's own after ``RECA_RAYNODE_STARTUP_S`` seconds (default
#: :data:`STARTUP_S`).  Ray gives a new raylet a hard-coded 30 s to register with the GCS
#: (ray/_private/node.py ``raylet_start_wait_time_s``); on a machine loaded 15-20x past its cores a
#: node at the default priority misses it and ``ray start`` fails.  A priority it may not take
#: (not root) is skipped.
ENV_STARTUP_NICE = "RECA_RAYNODE_STARTUP_NICE"
ENV_STARTUP_S = "RECA_RAYNODE_STARTUP_S"
STARTUP_S = 90.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_all(grace: float = GRACE_S) -> None:
    """SIGTERM every descendant, SIGKILL what is left after ``grace``, reap all."""
    me = psutil.Process()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            procs = me.children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            _reap()
            if not [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]:
                break
            time.sleep(0.1)
    _reap()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m kernel.raynode ARGV...", file=sys.stderr)
        return 2
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    stopping = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    boost = _startup_nice()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=boost.enter if boost.value else None)
    until = time.monotonic() + boost.seconds
    while not stopping and child.poll() is None:
        time.sleep(0.2)
        _reap_orphans(child.pid)
        if boost.value and time.monotonic() > until:
            boost.leave()
    stop_all()
    return 0 if stopping else (child.returncode or 1)


class _Boost:
    """The node's start-up priority (:data:`ENV_STARTUP_NICE`): ``enter`` in the child before exec,
    ``leave`` sets every descendant back to the runner's nice value, once."""

    def __init__(self, value: int, seconds: float) -> None:
        self.value, self.seconds = value, seconds
        self.base = os.getpriority(os.PRIO_PROCESS, 0)

    def enter(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, min(self.base, self.value))
        except OSError:
            pass  # not permitted: the default priority

    def leave(self) -> None:
        self.value = 0
        for p in psutil.Process().children(recursive=True):
            try:
                if p.nice() < self.base:
                    p.nice(self.base)
            except psutil.Error:
                pass


def _startup_nice() -> _Boost:
    try:
        value = int(os.environ.get(ENV_STARTUP_NICE, "0"))
        seconds = float(os.environ.get(ENV_STARTUP_S, STARTUP_S))
    except ValueError:
        value, seconds = 0, STARTUP_S
    return _Boost(min(0, value), seconds)


def _reap_orphans(keep: int) -> None:
    """Reap re-parented Ray processes that ended (never ``keep``, which Popen waits for)."""
    for p in psutil.Process().children():
        if p.pid != keep and p.status() == psutil.STATUS_ZOMBIE:
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
