"""The tool-worker process: ``python -m services.ttc.toolworker REQUEST.json TAG``.

Started by :class:`services.ttc.runner.Runner` as the leader of a new session and process group,
with ``RECA_TTC_RUN=<tag>`` in its environment (inherited by anything it starts).  Before
importing the tool it applies its OS limits to itself, so they bind the tool and its children:
RLIMIT_CPU (soft = the run's CPU limit: SIGXCPU, hard = +1 s: SIGKILL), RLIMIT_AS (address space),
RLIMIT_CORE = 0; and, when asked, PR_SET_PDEATHSIG so the kernel kills it if its manager dies.

Contract: exit status 0 after the result file is durable; the result is written to a temporary
file in the same directory, fsynced, renamed over ``result_path`` (atomic), and the directory is
fsynced.  A worker that dies earlier leaves no result file, never a partial one.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import sys

from services.ttc.tools import RunContext

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the manager died before prctl took effect
        os._exit(3)


def apply_limits(cpu_s: int, mem_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))


def helper_group_name(pid: int) -> str:
    """The enforcer helper group of tool worker ``pid`` (beside the ttc service's own)."""
    return f"tool-{pid}"


def _join_group(mem_bytes: int) -> None:
    """Join a helper group of the ttc service's enforcer group (kernel/enforce.py), so the run and
    everything it starts are frozen, killed and billed with the service, under ``mem_bytes``."""
    from kernel import enforce

    try:
        enforce.join_group(helper_group_name(os.getpid()), enforce.Limits(mem_bytes=max(mem_bytes, 1 << 20)))
    except (enforce.EnforcerError, OSError, ValueError) as exc:
        print(f"toolworker: runs outside an enforcer group: {exc}", file=sys.stderr)


def write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m services.ttc.toolworker REQUEST.json TAG", file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        req = json.load(fh)
    if req.get("die_with_parent"):
        _die_with_parent(req["parent_pid"])
    _join_group(req["mem_bytes"])
    apply_limits(req["cpu_limit_s"], req["mem_bytes"])
    ctx = RunContext(req["call_id"], req["attempt"], req["checkpoint_dir"])
    try:
        module, _, name = req["entry"].partition(":")
        fn = getattr(importlib.import_module(module), name)
        result = {"ok": True, "value": fn(req["inputs"], ctx)}
    except MemoryError:
        result = {"ok": False, "error": "memory_limit: the run exceeded its address-space limit"}
    except Exception as exc:  # the tool's own failure is a result, delivered to its consumers
        result = {"ok": False, "error": f"tool_error: {type(exc).__name__}: {exc}"}
    result["cpu_s"] = _cpu_seconds()
    try:
        data = json.dumps(result, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        data = json.dumps({"ok": False, "error": f"tool_error: result is not JSON-encodable: {exc}",
                           "cpu_s": result["cpu_s"]}).encode()
    write_atomically(req["result_path"], data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
