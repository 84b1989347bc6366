"""``work``: the worker processes CPCS places tasks on (``python -m services.cpcs.work``).

Each process registers under its own name ``work@<r>`` (``r`` from its supervised child name
``work#r``), so the scheduler chooses the worker of every task itself.  A request
``{"ms": total, "steps": n, "fail": bool, "spin": bool}`` holds the worker for ``total`` ms in
``n`` steps with a safe point (``ctx.checkpoint()``) between steps, where the kernel's
preempt / resume / cancel take effect; every step sends a PARTIAL ``{"i", "progress"}`` and the
first PARTIAL says where it runs (``{"started", "kernel_token", "worker", "child", "pid", "where"}``;
``where`` = ``{"placement", "host"}``, the placement from :data:`ENV_PLACEMENT`, which a Ray-placed
``work`` sets in its ``[[service]] env``, services/cpcs/cluster.py).
``fail`` makes the attempt raise after its last step (a failed attempt that cost its full run
time); ``slow`` (default 1, at most :data:`MAX_SLOW`) stretches the attempt's every step by that
factor (a straggling attempt: a slow node, a bad draw).  A sleeping step makes up for the oversleep
of the steps before it (the hold is kept to its total, not to the sum of ``n`` late wake-ups).
Steps of all requests of one process are serialised by one lock: a process does one
step at a time, as one single-threaded worker does, so two tasks on one worker share it and a
paused one gives its share to the other.  ``spin`` busy-loops each step (real CPU work) instead of
sleeping (a timed hold of the worker, which keeps the comparison of schedulers independent of
how busy this machine's cores are).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from kernel import errors
from kernel.protocol import ENV_SERVICE
from services.base import Context, Service, main

#: Longest accepted task (ms) and most steps.
MAX_MS = 3_600_000
MAX_STEPS = 100_000
#: Largest straggler factor of an attempt.
MAX_SLOW = 100.0
#: The environment variable naming where this process was placed (``local`` when unset).
ENV_PLACEMENT = "RECA_WORK_PLACEMENT"


def worker_name(pool: str, child: str | None) -> str:
    """``work#2`` -> ``work@2``; a lone (unreplicated) child -> ``work@0``."""
    rank = child.rsplit("#", 1)[1] if child and "#" in child else "0"
    return f"{pool}@{rank}"


def hold(step_s: float, spin: bool) -> None:
    """One step of work: sleep (timed hold) or spin for ``step_s`` seconds."""
    if spin:
        deadline = time.perf_counter() + step_s
        x = 0
        while time.perf_counter() < deadline:
            x = (x * 31 + 7) % 1_000_003
    else:
        time.sleep(step_s)


class Work(Service):
    name = "work"
    capacity = 2  # one running, one paused at a safe point

    def __init__(self) -> None:
        self.pool = "work"
        self.child = os.environ.get(ENV_SERVICE, "")
        self._lock: asyncio.Lock | None = None
        self.where = {"placement": os.environ.get(ENV_PLACEMENT, "local"), "host": socket.gethostname()}

    def configure(self, args: Any) -> None:
        self.pool = self.name
        self.child = os.environ.get(ENV_SERVICE, "")
        self.name = worker_name(self.pool, self.child)

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("a work request is a map {ms, steps, fail, spin}")
        ms, steps = payload.get("ms", 0), payload.get("steps", 10)
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms <= MAX_MS \
                or isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= MAX_STEPS:
            raise errors.BadRequest(f"'ms' must be in [0, {MAX_MS}] and 'steps' in 1..{MAX_STEPS}")
        slow = payload.get("slow", 1.0)
        if isinstance(slow, bool) or not isinstance(slow, (int, float)) or not 1.0 <= slow <= MAX_SLOW:
            raise errors.BadRequest(f"'slow' must be in [1, {MAX_SLOW}]")
        if self._lock is None:
            self._lock = asyncio.Lock()
        spin = bool(payload.get("spin", False))
        await ctx.partial({"started": True, "kernel_token": ctx.token, "worker": self.name,
                           "child": self.child, "pid": os.getpid(), "where": self.where})
        step_s = ms / 1000.0 / steps * slow
        held = 0.0  # seconds this attempt has held the worker (sleeping steps)
        for i in range(steps):
            await ctx.checkpoint()
            async with self._lock:
                if spin:  # real CPU work, off the event loop so heartbeats go on
                    await asyncio.get_running_loop().run_in_executor(None, hold, step_s, True)
                else:
                    t0 = time.perf_counter()
                    await asyncio.sleep(max(0.0, (i + 1) * step_s - held))
                    held += time.perf_counter() - t0
            ctx.charge(flops=step_s * 1e9)
            await ctx.partial({"i": i, "progress": (i + 1) / steps})
        if payload.get("fail"):
            raise errors.ServiceError("the attempt failed (as drawn)", kind="attempt_failed")
        return {"ok": True, "worker": self.name, "steps": steps}


if __name__ == "__main__":
    raise SystemExit(main(Work()))
