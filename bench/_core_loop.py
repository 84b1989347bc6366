"""The pure core's CPU per request, in-process: router + admission + ledger + decision log, no
sockets.  ``python -m bench._core_loop N`` prints one JSON line; bench routing runs it for its
"pure core" row (and on an older tree, with PYTHONPATH pointing there, for a before/after).

One echo worker of capacity 64 is registered; requests arrive in turns of 64 (what one turn of
the kernel's loop receives under pipelined load), each answered by the worker with a FINAL that
reports ``tokens``; the decision log is flushed once per turn (the server's group commit), with
the default fsync policy.  Every request is a budgeted ledger decision (the default [limits]).
Only the stable entry points are used (``Router.on_message``, ``BudgetAdmission``,
``DecisionLog``), so the same driver measures any version of the core.

``--queued``: the worker declares capacity 1 and always holds one request, so every measured
request queues and is dispatched later by the FINAL before it (the capacity-1 path: the fair
queue's push and pop and the ``queue`` and ``dispatch`` ledger decisions and records on top of
``admit`` and ``finish``).  The rhythm is the default's (turns of 64 requests, one flush after
the turn's requests and one after its FINALs), so the difference to the default figure is what
queueing costs.  ``--no-log``: no decision log.  ``--session``: :func:`measure_session`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

TURN = 64
#: Requests per measured round (the minimum over rounds is the least disturbed figure).
ROUND = 1024


def measure(n: int, log: bool = True, queued: bool = False) -> dict:
    from kernel import codec
    from kernel import protocol as P
    from kernel.admission import BudgetAdmission
    from kernel.config import DEFAULT_JOB_LIMITS
    from kernel.router import Router

    tmp = tempfile.mkdtemp(prefix="reca-core-")
    dlog = None
    if log:
        from kernel.decisions import DecisionLog

        dlog = DecisionLog(os.path.join(tmp, "decisions.log"))
    adm = BudgetAdmission(
        decision_log=dlog,
        root_limits={k: v * 1e6 for k, v in DEFAULT_JOB_LIMITS.items()},
        default_limits=DEFAULT_JOB_LIMITS,
    )
    to_worker: list[list[bytes]] = []

    def send(frames: list[bytes]) -> bool:
        if frames[0] == b"W":
            to_worker.append(frames)
        return True

    router = Router(send, admission=adm)
    capacity = 1 if queued else TURN
    router.on_message([b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": capacity})], 0.0)
    body = codec.pack({"x": 1, "y": "payload"})
    headers = [codec.pack({"v": 1, "id": i}) for i in range(TURN)]
    status = codec.pack({"v": 1, "id": 0, "status": "ok", "spent": {"tokens": 1}})
    on_message = router.on_message
    # the driver's own per-message work kept out of the figure: command bytes looked up once
    # (an Enum's ``.value`` is a Python-level descriptor call)
    request_cmd, final_cmd, mdpw = P.ClientCmd.REQUEST.value, P.WorkerCmd.FINAL.value, P.MDPW
    now = 1.0
    if queued:  # the request the worker holds while a turn arrives (not counted)
        on_message([b"C", P.MDPC, request_cmd, b"echo", headers[0], body], now)
        adm.flush_log()
        if len(to_worker) != 1:
            raise RuntimeError(f"--queued: expected one request at the worker, got {len(to_worker)}")
    per_round: list[float] = []
    done = 0
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    while done < n:
        r0 = time.process_time()
        for _ in range(ROUND // TURN):
            now += 0.001
            for i in range(TURN):
                on_message([b"C", P.MDPC, request_cmd, b"echo", headers[i], body], now)
            adm.flush_log()
            now += 0.001
            if queued:
                # one FINAL at a time, each freeing the slot for the next queued request; after
                # TURN of them the worker holds the turn's last request into the next turn
                for _ in range(TURN):
                    m = to_worker.pop()
                    token = m[3] if m[1] == mdpw else m[4]
                    on_message([b"W", mdpw, final_cmd, token, b"", status, b"out"], now)
                if len(to_worker) != 1:
                    raise RuntimeError(f"--queued: the worker holds {len(to_worker)} requests, not 1")
            else:
                batch, to_worker[:] = list(to_worker), []
                for m in batch:
                    token = m[3] if m[1] == mdpw else m[4]
                    on_message([b"W", mdpw, final_cmd, token, b"", status, b"out"], now)
            adm.flush_log()
        per_round.append((time.process_time() - r0) / ROUND * 1e6)
        done += ROUND
    cpu, wall = time.process_time() - t_cpu, time.perf_counter() - t_wall
    if dlog is not None:
        dlog.close()
    per_round.sort()
    return {
        "requests": done,
        "cpu_us_per_req": cpu / done * 1e6,
        "wall_us_per_req": wall / done * 1e6,
        "min_round_cpu_us": per_round[0],
        "median_round_cpu_us": per_round[len(per_round) // 2],
        "log": log,
        "queued": queued,
    }


def measure_session(n: int) -> dict:
    """The worker side's pure part, in process: a :class:`kernel.worker.WorkerSession` of capacity
    64 takes each REQUEST as the kernel sends it (reca header with ``granted``) and answers its
    FINAL (what services/base.py's runtime does around a handler, without the asyncio shell)."""
    from kernel import codec
    from kernel import protocol as P
    from kernel.worker import WorkerSession

    out: list[list[bytes]] = []
    session = WorkerSession("echo", out.append, capacity=TURN)
    session.connect(0.0)
    header = codec.pack({"v": 1, "id": 1, "granted": {"tokens": 1e8, "wall_ms": 3.6e6}, "job": "default"})
    body = codec.pack({"x": 1, "y": "payload"})
    tokens = [i.to_bytes(16, "big") for i in range(TURN)]
    per_round: list[float] = []
    done = 0
    t_cpu = time.process_time()
    while done < n:
        r0 = time.process_time()
        for _ in range(ROUND // TURN):
            for token in tokens:
                for event in session.on_message([P.MDPW, P.WorkerCmd.REQUEST.value, token, b"", header, body], 1.0):
                    payload = event.payload  # type: ignore[union-attr]
                    session.final(event.state.token, 1.0, result=payload)  # type: ignore[union-attr]
            out.clear()
        per_round.append((time.process_time() - r0) / ROUND * 1e6)
        done += ROUND
    per_round.sort()
    return {
        "requests": done,
        "cpu_us_per_req": (time.process_time() - t_cpu) / done * 1e6,
        "min_round_cpu_us": per_round[0],
        "median_round_cpu_us": per_round[len(per_round) // 2],
    }


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    if "--session" in sys.argv:
        print(json.dumps(measure_session(n)))
    else:
        print(json.dumps(measure(n, log="--no-log" not in sys.argv, queued="--queued" in sys.argv)))
