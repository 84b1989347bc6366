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
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    while not stopping and child.poll() is None:
        time.sleep(0.2)
        _reap_orphans(child.pid)
    stop_all()
    return 0 if stopping else (child.returncode or 1)


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
