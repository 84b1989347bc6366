"""``python -m bench ttc_faults``: seeded, randomised SIGKILL schedules against the ttc stack.

One *schedule* (seeded by ``(seed, index)``): 1-3 heavy calls (random 3-SAT, n 60..220, or a 2-D
diffusion run), each prepared by a client process with an idempotency key and then committed,
aborted, withdrawn or left to expire; its consumers then fetch and attach the results.  One kill
(SIGKILL) lands on a random target — the ttc service, the running tool worker, the client
process or the kernel itself — either between two operations or while one is in flight (after a
random 0-60 ms delay).  The supervisor restarts the ttc service; when the kernel is killed its
children die with it (``PR_SET_PDEATHSIG``) and the harness starts a new kernel on the same log.
Then a *restarted client* retries every call with its key (prepare, commit, abort), waits for the
decision, fetches and attaches each consumer's result twice (the second attach must say False).

After every schedule the independent checker (:mod:`services.ttc.checker`: the SQLite log read-only
plus the OS process table) counts orphaned heavy runs, lost committed results, results delivered
twice and calls stuck undecided.  The harness adds what the client saw: a commit acknowledged but
never decided DONE/FAILED (lost), a second ``attached: True`` (twice), a call not decided within
the bound (stuck), and a tool run to completion twice for one call (``completed_twice``).

Schedules run many per kernel lifetime (a kernel kill restarts it), so one costs well under a
second.  Recovery time: kill -> the new manager's ``recover`` decision (its audit row) for ttc and
kernel kills; kill -> the lost run's retry decision for tool kills; kill -> the respawned client's
first answered request for client kills.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import psutil

from bench._common import Result, cdf_plot, percentile
from services.ttc import checker
from services.ttc.runner import tagged_processes

TARGETS = ("ttc", "tool", "client", "kernel", "none")
#: Probability of each target in a random schedule (kernel kills are the expensive ones).
TARGET_WEIGHTS = (0.35, 0.25, 0.15, 0.1, 0.15)
#: Bound on any wait of the harness (seconds).
WAIT_S = 30.0
#: Bound on waiting for a committed call's tool process to appear before killing it (seconds).
TOOL_WAIT_S = 2.0
JOB = "faults"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ the client process

def client_main(endpoint: str) -> int:
    """``python bench/ttc_faults.py --client ENDPOINT``: one request per stdin line
    ``{"payload", "job"}``; one stdout line per answer ``{"ok": result}`` or ``{"err": code}``."""
    from clients import Client
    from kernel import errors

    c = Client(endpoint, timeout=10.0, retries=0)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            out: dict[str, Any] = {"ok": c.call("ttc", req["payload"], job=req.get("job"))}
        except errors.RecaError as exc:
            out = {"err": exc.code, "detail": {k: v for k, v in exc.detail.items() if k != "spent"}}
        print(json.dumps(out), flush=True)
    return 0


class ClientProc:
    """A client in its own process, so the harness can SIGKILL it mid-request."""

    def __init__(self, endpoint: str) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client", endpoint],
                                     cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        if "ready" not in json.loads(self.proc.stdout.readline() or "{}"):
            raise RuntimeError("fault client did not start")

    def send(self, payload: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"payload": payload, "job": JOB}) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("fault client died")
        return json.loads(line)

    def call(self, payload: dict) -> dict:
        self.send(payload)
        return self.recv()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def _dead(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # dead; its reaper (init) may take a while
    except psutil.NoSuchProcess:
        return True


def _wait_dead(procs: list[psutil.Process], timeout: float = WAIT_S) -> list[psutil.Process]:
    """Wait (bounded, polling every 5 ms) until every process is gone or a zombie; returns the living."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _dead(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.005)
        alive = [p for p in alive if not _dead(p)]
    return alive


# ------------------------------------------------------------------------------ schedules

def make_schedule(seed: int, index: int, target: str | None = None) -> dict:
    """A reproducible schedule: calls, their intended fate, and one kill point."""
    rng = random.Random(f"{seed}/{index}")
    calls = []
    for j in range(rng.randint(1, 3)):
        if rng.random() < 0.7:
            tool, inputs = "sat", {"n_vars": rng.randint(60, 220), "seed": rng.randrange(1 << 30)}
        else:
            tool, inputs = "diffusion", {"n": 32, "steps": rng.randint(2000, 8000), "checkpoint_every": 1000}
        fate = rng.choices(["commit", "abort", "withdraw", "expire"], (0.7, 0.1, 0.1, 0.1))[0]
        consumers = [f"s{index}c{j}a"] + ([f"s{index}c{j}b"] if rng.random() < 0.3 else [])
        calls.append({"tool": tool, "inputs": inputs, "fate": fate, "consumers": consumers,
                      "idem": f"{seed}-{index}-{j}", "timeout": 0.2 if fate == "expire" else 30.0})
    ops = [("prepare", j) for j in range(len(calls))] + [(c["fate"], j) for j, c in enumerate(calls)]
    target = target or rng.choices(TARGETS, TARGET_WEIGHTS)[0]
    kill_at, inflight, delay = rng.randrange(len(ops)), rng.random() < 0.6, rng.uniform(0, 0.06)
    commits = [k for k, (op, _) in enumerate(ops) if op == "commit"]
    if target == "tool" and commits:
        # A tool runs only after a commit: the kill follows one, into the run it starts.
        kill_at, inflight = commits[rng.randrange(len(commits))], True
    return {"index": index, "calls": calls, "ops": ops, "target": target, "kill_at": kill_at,
            "inflight": inflight, "delay": delay}


class FaultHarness:
    """One log, one kernel at a time (restarted when killed), one client process at a time."""

    def __init__(self, workdir: str) -> None:
        from clients.launch import service_block

        self.workdir = workdir
        self.db = os.path.join(workdir, "ttc.db")
        self.endpoint = f"ipc://{workdir}/kernel.sock"
        self.services = service_block("ttc", "services.ttc", args=["--db", self.db])
        self.kernel: Any = None
        self.client: ClientProc | None = None
        self.ctl: Any = None
        self.counts: Counter[str] = Counter()
        self.recovery: dict[str, list[float]] = {t: [] for t in TARGETS[:4]}
        self.kills: Counter[str] = Counter()
        self.kernel_starts = 0
        #: Tool kills whose run had already finished (exit 0) when the signal came: not counted.
        self.tool_kills_late = 0
        self._start_kernel()

    # -- lifecycle ----------------------------------------------------------------------------------

    def _start_kernel(self) -> None:
        from clients import Client
        from clients.launch import LocalKernel, kernel_config

        self.kernel = LocalKernel(kernel_config(self.services, heartbeat=0.2, liveness=3, intensity=100000,
                                                period=1.0, endpoint=self.endpoint))
        self.kernel_starts += 1
        self.ctl = Client(self.kernel.endpoint, timeout=WAIT_S + 15.0, retries=0)
        self.ctl.wait_for_service("ttc", WAIT_S)
        self.ctl.open_job(JOB, {"cpu_s": 1e9})
        self.client = ClientProc(self.kernel.endpoint)

    def _kill_kernel(self) -> None:
        kids = self.kernel.descendants()
        self.kernel.proc.kill()
        self.kernel.proc.wait(WAIT_S)
        alive = _wait_dead(kids)  # they die with it (PR_SET_PDEATHSIG)
        if alive:
            raise AssertionError(f"children outlived the kernel: {[p.pid for p in alive]}")
        self.kernel._reader.join(5)
        shutil.rmtree(self.kernel.dir, ignore_errors=True)
        self.ctl.close()
        if self.client is not None:
            self.client.kill()
        self._start_kernel()

    def close(self) -> None:
        if self.client is not None:
            self.client.kill()
        if self.ctl is not None:
            self.ctl.close()
        if self.kernel is not None:
            self.kernel.stop()

    def ttc_pid(self) -> int:
        return {ch["name"]: ch["pid"] for ch in self.ctl.stats()["children"]}["ttc"]

    def ttc(self, payload: dict) -> Any:
        """A request by the (restarted) client, retried while the service restarts (bounded)."""
        from kernel import errors

        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                return self.ctl.call("ttc", payload, job=JOB)
            except (errors.WorkerDied, errors.Unavailable, errors.Timeout):
                if time.monotonic() >= deadline:
                    raise

    # -- one schedule -------------------------------------------------------------------------------

    def _op_payload(self, sched: dict, op: str, j: int, ids: dict[int, str]) -> dict | None:
        call = sched["calls"][j]
        if op == "prepare":
            return {"op": "prepare", "tool": call["tool"], "inputs": call["inputs"], "est_cost": 10,
                    "consumers": call["consumers"], "idem": call["idem"], "timeout": call["timeout"]}
        if j not in ids:
            return None
        if op == "commit":
            return {"op": "commit", "call_id": ids[j], "idem": call["idem"]}
        if op == "abort":
            return {"op": "abort", "call_id": ids[j]}
        if op == "withdraw":
            return {"op": "withdraw", "consumer": call["consumers"][0]}
        return None  # expire: do nothing, the deadline decides

    def _kill(self, target: str, delay: float = 0.0) -> tuple[float, Any] | None:
        """SIGKILL ``target`` now; returns (wall time of the kill, context) or None if it had nothing
        to kill (no tool running)."""
        if target == "ttc":
            pid = self.ttc_pid()
            os.kill(pid, signal.SIGKILL)
            return time.time(), pid
        if target == "tool":
            # Wait (bounded) for the run the commit starts, then kill it a random moment in.
            store_id = self._store_id()
            deadline = time.monotonic() + TOOL_WAIT_S
            while time.monotonic() < deadline:
                for pid, tag in tagged_processes(store_id + "/"):
                    time.sleep(delay)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:  # it finished in the meantime
                        return None
                    return time.time(), tag
                time.sleep(0.002)
            return None
        if target == "client":
            assert self.client is not None
            self.client.kill()
            return time.time(), None
        if target == "kernel":
            t = time.time()
            self._kill_kernel()
            return t, None
        return None

    def _query_one(self, sql: str, args: tuple = ()) -> tuple | None:
        """One row from the log, read-only (the harness never writes it)."""
        import sqlite3

        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchone()
        finally:
            conn.close()

    def _store_id(self) -> str:
        row = self._query_one("SELECT value FROM meta WHERE key='store_id'")
        assert row is not None
        return row[0]

    def run_schedule(self, sched: dict) -> dict[str, int]:
        ids: dict[int, str] = {}
        acked_commit: set[int] = set()
        killed: tuple[float, Any] | None = None
        client_dead = False
        for k, (op, j) in enumerate(sched["ops"]):
            payload = self._op_payload(sched, op, j, ids)
            kill_now = k == sched["kill_at"] and sched["target"] != "none"
            if kill_now and not sched["inflight"]:
                killed = self._kill(sched["target"])
                client_dead = sched["target"] in ("client", "kernel")
            if payload is None or client_dead:
                continue
            assert self.client is not None
            self.client.send(payload)
            if kill_now and sched["inflight"]:
                if sched["target"] == "tool":
                    killed = self._kill("tool", sched["delay"])  # the run the commit starts
                else:
                    time.sleep(sched["delay"])  # fault timing: the kill lands at a random moment of the op
                    killed = self._kill(sched["target"])
                client_dead = sched["target"] in ("client", "kernel")
                if client_dead:
                    continue
            try:
                reply = self.client.recv()
            except EOFError:
                client_dead = True
                continue
            if "ok" in reply:
                if op == "prepare":
                    ids[j] = reply["ok"]["call_id"]
                elif op == "commit":
                    acked_commit.add(j)
        if killed is not None:
            self.kills[sched["target"]] += 1
        if client_dead and sched["target"] == "client":
            self.client = ClientProc(self.kernel.endpoint)
            assert killed is not None
            self.client.call({"op": "stats"})
            self.recovery["client"].append(time.time() - killed[0])
        return self._settle(sched, ids, acked_commit, killed)

    def _settle(self, sched: dict, ids: dict[int, str], acked_commit: set[int],
                killed: tuple[float, Any] | None) -> dict[str, int]:
        """The restarted client: retry every call with its key, wait for the decisions, attach."""
        from kernel import errors

        found: Counter[str] = Counter()
        if sched["target"] in ("ttc", "kernel") and killed is not None:
            self.ttc({"op": "stats"})  # the restarted service answers (bounded retry)
        for j, call in enumerate(sched["calls"]):
            try:
                prep = self.ttc({"op": "prepare", "tool": call["tool"], "inputs": call["inputs"], "est_cost": 10,
                                 "consumers": call["consumers"], "idem": call["idem"], "timeout": call["timeout"]})
                call_id = prep["call_id"]
            except errors.RecaError as exc:
                found[f"prepare_error:{exc.code}"] += 1
                continue
            if j in ids and ids[j] != call_id:
                found["idem_broken"] += 1
            fate = call["fate"]
            try:
                if fate == "commit":
                    out = self.ttc({"op": "commit", "call_id": call_id, "idem": call["idem"], "wait": True,
                                    "timeout": WAIT_S})
                else:
                    if fate == "abort":
                        self.ttc({"op": "abort", "call_id": call_id})
                    elif fate == "withdraw":
                        # The plan drops the step: every consumer withdraws.  While one is left
                        # the call must stay live (PREPARED until its timeout); with none, aborted.
                        self.ttc({"op": "withdraw", "consumer": call["consumers"][0]})
                        if len(call["consumers"]) > 1:
                            st = self.ttc({"op": "status", "call_id": call_id})["state"]
                            if st not in ("PREPARED", "ABORTED"):  # ABORTED: expired, or a kill's recovery
                                found["withdraw_kept_wrong_state"] += 1
                            for consumer in call["consumers"][1:]:
                                self.ttc({"op": "withdraw", "consumer": consumer})
                    out = self.ttc({"op": "result", "call_id": call_id, "wait": True, "timeout": WAIT_S})
            except errors.RecaError as exc:
                if exc.code == "aborted" and fate == "commit" and j not in acked_commit:
                    out = self.ttc({"op": "status", "call_id": call_id})  # e.g. prepared, then expired
                else:
                    raise
            state = out["state"]
            if state not in ("DONE", "FAILED", "ABORTED"):
                found["stuck"] += 1
                trail = [(round(e["t"] - time.time(), 2), e["op"]) for e in
                         self.ttc({"op": "audit", "call_id": call_id})["events"]]
                print(f"schedule {sched['index']} ({sched['target']}, kill at op {sched['kill_at']}): call "
                      f"{call_id} ({call['tool']}, {fate}) still {state} after {WAIT_S:g} s; audit (s ago, op): "
                      f"{trail}; ttc stats {self.ttc({'op': 'stats'})}", file=sys.stderr)
            if j in acked_commit and state not in ("DONE", "FAILED") and fate == "commit":
                found["lost"] += 1
            if state in ("DONE", "FAILED"):
                if out.get("result") is None:
                    found["lost"] += 1
                for consumer in call["consumers"]:
                    if fate == "withdraw" and consumer == call["consumers"][0]:
                        continue
                    got = [d for d in self.ttc({"op": "deliver", "consumer": consumer})["deliveries"]
                           if d["call_id"] == call_id]
                    first = self.ttc({"op": "attach", "call_id": call_id, "consumer": consumer})["attached"]
                    second = self.ttc({"op": "attach", "call_id": call_id, "consumer": consumer})["attached"]
                    found["twice"] += int(second)
                    if not first and not got:
                        found["lost"] += 1  # never delivered, yet already attached by nobody we know
            events = self.ttc({"op": "audit", "call_id": call_id})["events"]
            if killed is not None and sched["target"] == "tool" and killed[1].split("/")[1] == call_id:
                after = [e["t"] for e in events if e["t"] >= killed[0] and e["op"] in ("retry", "finish", "abort")]
                if after and self._signalled(killed[1]):  # a kill that came after the run ended is no fault
                    self.recovery["tool"].append(after[0] - killed[0])
        if killed is not None and sched["target"] in ("ttc", "kernel"):
            rec = [e["t"] for e in self.ttc({"op": "audit", "since": 0})["events"]
                   if e["op"] == "recover" and e["t"] >= killed[0]]
            if rec:
                self.recovery[sched["target"]].append(rec[0] - killed[0])
        if killed is not None and sched["target"] == "tool" and not self._signalled(killed[1]):
            self.kills["tool"] -= 1  # the run ended on its own just before the signal: no fault
            self.tool_kills_late += 1
        found["completed_twice"] += self._completed_twice()
        c = checker.check(self.db)
        found["orphaned_runs"] += c.orphaned_runs
        found["lost"] += c.lost_results
        found["twice"] += c.double_attached
        found["stuck"] += c.stuck_calls
        if c.total():
            print(f"schedule {sched['index']} ({sched['target']}): checker {c.details}", file=sys.stderr)
        self.counts.update(found)
        return dict(found)

    def _signalled(self, tag: str) -> bool:
        """Whether the run ``tag`` ended by a signal (our kill), per the log."""
        row = self._query_one("SELECT end_status FROM runs WHERE tag=?", (tag,))
        return row is not None and str(row[0] or "").startswith("signal:")

    def _completed_twice(self) -> int:
        row = self._query_one("SELECT COUNT(*) FROM (SELECT call_id FROM runs WHERE end_status='exit:0'"
                              " GROUP BY call_id HAVING COUNT(*) > 1)")
        assert row is not None
        return row[0]


def run_schedules(n: int, seed: int, workdir: str, targets: list[str] | None = None) -> dict:
    """Run ``n`` schedules (``targets[i % len]`` forces the kill target); returns the totals."""
    h = FaultHarness(workdir)
    t0 = time.monotonic()
    try:
        for i in range(n):
            h.run_schedule(make_schedule(seed, i, targets[i % len(targets)] if targets else None))
    finally:
        h.close()
    return {"schedules": n, "wall_s": time.monotonic() - t0, "counts": h.counts, "recovery": h.recovery,
            "kills": h.kills, "kernel_starts": h.kernel_starts, "tool_kills_late": h.tool_kills_late}


#: one run of 1,000 schedules (about 15 minutes); its counts are the headline, pooled over all schedules
RUNS = 1


def run(quick: bool) -> Result:
    import tempfile

    n = 5 if quick else 1000  # quick: a smoke run of the harness
    workdir = tempfile.mkdtemp(prefix="ttcf-", dir="/tmp")
    try:
        out = run_schedules(n, 20251124, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    c = out["counts"]
    allrec = [x for v in out["recovery"].values() for x in v]
    metrics = {
        "schedules": float(n),
        "orphaned_heavy_runs": float(c["orphaned_runs"]),
        "lost_committed_results": float(c["lost"]),
        "results_delivered_twice": float(c["twice"]),
        "calls_stuck_undecided": float(c["stuck"]),
        "tool_completed_twice": float(c["completed_twice"]),
        "wall_s": out["wall_s"],
        "s_per_schedule": out["wall_s"] / n,
        "recovery_p50_ms": 1000 * percentile(allrec, 50),
        "recovery_p99_ms": 1000 * percentile(allrec, 99),
    }
    table = [{"target": t, "kills": out["kills"][t], "recoveries": len(v),
              "p50_ms": 1000 * percentile(v, 50), "p99_ms": 1000 * percentile(v, 99),
              "max_ms": 1000 * max(v) if v else float("nan")} for t, v in out["recovery"].items()]
    extra = {k: v for k, v in c.items() if k not in ("orphaned_runs", "lost", "twice", "stuck", "completed_twice")}
    return Result(
        metrics=metrics,
        samples={"recovery_p50_ms": len(allrec), "recovery_p99_ms": len(allrec)},
        plots=[cdf_plot("recovery_cdf", "recovery time after a kill, by what was killed", "ms",
                        {t: [1000 * x for x in v] for t, v in out["recovery"].items() if v})],
        targets={k: ("<=", 0.0) for k in ("orphaned_heavy_runs", "lost_committed_results",
                                          "results_delivered_twice", "calls_stuck_undecided",
                                          "tool_completed_twice")},
        table=table,
        notes=[f"{n} schedules, {out['kernel_starts']} kernel lifetimes, {out['wall_s']:.0f} s wall; "
               f"{out['tool_kills_late']} tool kill(s) came after the run had finished (not counted)",
               f"other findings: {dict(extra) or 'none'}"],
    )


# ------------------------------------------------------------------------------ --ray: runs as Ray tasks

#: Kill targets of a ``--ray`` schedule: the Ray worker process running a call's task, the
#: tool-worker under it, an abort (``ray.cancel(force=True)``), a whole Ray worker node (every
#: process of it SIGKILLed at once: the machine is gone), its raylet alone (SIGKILL; the node's
#: workers and their tool-workers must follow on their own), or nothing.
RAY_TARGETS = ("task", "tool", "abort", "node", "raylet", "none")
RAY_TARGET_WEIGHTS = (0.25, 0.25, 0.15, 0.15, 0.1, 0.1)
#: Targets that kill the worker node (a new one is started after the schedule settles).
NODE_TARGETS = ("node", "raylet")
#: Bound on settling one ``--ray`` schedule (seconds; Ray on a loaded machine).
RAY_SETTLE_S = 120.0
#: Bound on a (replacement) worker node joining the cluster (seconds).
NODE_JOIN_S = 150.0


def make_ray_schedule(seed: int, index: int) -> dict:
    """1-3 diffusion calls (2k-16k steps on 32x32), one target, which call it hits, and a 0-400 ms delay
    after that call's tool-worker started."""
    rng = random.Random(f"ray:{seed}:{index}")
    calls = [rng.randrange(2_000, 16_001, 1_000) for _ in range(rng.randint(1, 3))]
    target = rng.choices(RAY_TARGETS, RAY_TARGET_WEIGHTS)[0]
    return {"index": index, "calls": calls, "target": target, "victim": rng.randrange(len(calls)),
            "delay": rng.uniform(0.0, 0.4)}


def _ray_victim_pid(c: Any, call_id: str, timeout: float) -> int | None:
    """Step until ``call_id``'s tool-worker pid is known (None: it ended first or the bound passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.step()
        for proc in c.running().values():
            if proc.ticket.call_id == call_id and proc.pid is not None:
                return proc.pid
        if c.outcome(call_id).state in ("DONE", "FAILED", "ABORTED"):
            return None
        c.wait(0.1)
    return None


class WorkerNode:
    """The harness's second Ray node (``ray start --address`` under kernel.raynode, 1 CPU): runs
    are placed on it (soft node affinity) while it is up, on the head while it is not.  ``kill``
    takes the whole node down; ``settle`` reaps it and starts a replacement (joined later)."""

    def __init__(self, address: str, head_id: str) -> None:
        self.address, self.head_id = address, head_id
        self.proc: subprocess.Popen | None = None
        self.node_id: str | None = None
        self.joins = 0
        #: Seconds from each (re)start until its join was seen (at the next schedule's start: an upper bound).
        self.join_s: list[float] = []
        self.started_at = 0.0
        self.killed = False
        #: Node ids killed here: the GCS may list one as alive for a while after (health checks).
        self.dead: set[str] = set()

    def start(self) -> None:
        from kernel.rayplace import node_argv, start_node

        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        self.proc = start_node(node_argv(address=self.address, num_cpus=1), env)
        self.started_at = time.monotonic()
        self.node_id = None
        self.killed = False

    def _joined(self) -> str | None:
        import ray

        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in (self.head_id, *self.dead)]
        return alive[0] if alive and self.proc is not None and self.proc.poll() is None else None

    def place(self, c: Any, wait_s: float = 0.0) -> bool:
        """Place the next runs on this node if it has joined (waiting up to ``wait_s``; a node whose
        runner exited is started again), else on the head."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        deadline = time.monotonic() + wait_s
        while self.node_id is None:
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            self.node_id = self._joined()
            if self.node_id is not None:
                self.joins += 1
                self.join_s.append(time.monotonic() - self.started_at)
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        target = self.node_id or self.head_id
        c.runner.place({"scheduling_strategy": NodeAffinitySchedulingStrategy(target, soft=True)})
        return self.node_id is not None

    def hosts(self, pid: int) -> bool:
        """Whether ``pid`` runs on this node (a descendant of its runner)."""
        try:
            return self.proc is not None and any(p.pid == self.proc.pid for p in psutil.Process(pid).parents())
        except psutil.Error:
            return False

    def kill(self, how: str, c: Any) -> None:
        """``node``: SIGKILL every process of the node at once; ``raylet``: SIGKILL its raylet only.
        The next runs go to the head."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        assert self.proc is not None
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        if how == "raylet":
            procs = [p for p in procs if _name(p) == "raylet"]
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.node_id is not None:
            self.dead.add(self.node_id)
        self.node_id = None
        self.killed = True
        c.runner.place({"scheduling_strategy": NodeAffinitySchedulingStrategy(self.head_id, soft=True)})

    def settle(self) -> None:
        """After a kill: reap the old node (its runner stops what is left) and start a new one."""
        from kernel.rayplace import stop_node

        if self.proc is not None and self.killed:
            stop_node(self.proc, timeout=10)
            self.start()

    def stop(self) -> None:
        from kernel.rayplace import stop_node

        if self.proc is not None:
            stop_node(self.proc, timeout=10)


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def run_ray_schedule(c: Any, db: str, sched: dict, counts: Counter, kills: Counter,
                     node: WorkerNode | None = None, phases: Counter | None = None) -> None:
    """One ``--ray`` schedule on coordinator ``c``; adds violations to ``counts``.  A node target
    needs ``node`` (the worker node the runs are placed on).  ``phases`` adds the seconds spent in
    each phase (join, submit, victim, settle, node_restart, check)."""
    from services.ttc.logic import ABORTED, DONE, TERMINAL_STATES

    phases = phases if phases is not None else Counter()
    t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        phases[name] += now - t
        t = now

    target = sched["target"]
    if node is not None:
        joined = node.place(c, NODE_JOIN_S if target in NODE_TARGETS else 0.0)
        if target in NODE_TARGETS and not joined:
            kills["node_not_joined"] += 1
    lap("join")
    consumer = f"s{sched['index']}"
    ids = [c.prepare("diffusion", {"n": 32, "steps": steps, "checkpoint_every": 2_000, "seed": k}, 30.0,
                     [consumer], 120) for k, steps in enumerate(sched["calls"])]
    for cid in ids:
        c.commit(cid)
    victim = ids[sched["victim"]]
    lap("submit")
    landed = False
    if target != "none":
        pid = _ray_victim_pid(c, victim, RAY_SETTLE_S)
        if pid is not None:
            time.sleep(sched["delay"])
            try:
                proc = psutil.Process(pid)
                if target == "abort":
                    landed = c.outcome(victim).state not in TERMINAL_STATES
                    c.abort(victim)
                elif target in NODE_TARGETS:
                    if node is not None and node.node_id is not None:
                        landed = not _dead(proc) and node.hosts(pid)
                        node.kill(target, c)
                else:
                    p = psutil.Process(proc.ppid()) if target == "task" else proc
                    landed = not _dead(p)
                    p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                landed = False
            except Exception as exc:  # noqa: BLE001 - AlreadyFinished: the abort came after the result
                landed = type(exc).__name__ != "AlreadyFinished" and landed
    kills[target if landed or target == "none" else f"{target}_late"] += 1
    lap("victim")
    try:
        out = c.run_until_settled(ids, RAY_SETTLE_S)
    except TimeoutError:
        out = {cid: c.outcome(cid) for cid in ids}
    lap("settle")
    if node is not None and target in NODE_TARGETS:
        node.settle()
    lap("node_restart")
    for cid in ids:
        state = out[cid].state
        if state not in TERMINAL_STATES:
            counts["stuck"] += 1
        elif state != DONE and not (target == "abort" and cid == victim and state == ABORTED):
            counts["lost"] += 1  # a committed, never-aborted call that did not end DONE
        n_results = c.store.one("SELECT COUNT(*) AS n FROM results WHERE call_id=?", (cid,))["n"]
        counts["duplicated_results"] += max(0, n_results - 1)
        done_runs = c.store.one("SELECT COUNT(*) AS n FROM runs WHERE call_id=? AND end_status='exit:0'", (cid,))["n"]
        counts["completed_twice"] += max(0, done_runs - 1)
    for d in c.deliver(consumer):
        if not c.attach(d.call_id, consumer):
            counts["lost"] += 1
        if c.attach(d.call_id, consumer):
            counts["twice"] += 1
    # No tool-worker of a settled call may outlive it (a node's orphan included).
    counts["orphaned_runs"] += sum(len(tagged_processes(f"{c.store.store_id}/{cid}/")) for cid in ids)
    got = checker.check(db)
    for k, v in got.as_dict().items():
        counts[k] += v
    if got.details:
        print(f"schedule {sched['index']}: {got.details[:3]}", file=sys.stderr)
    lap("check")


def run_ray_schedules(n: int, seed: int, workdir: str, *, nodes: int = 2, wall_s: float | None = None) -> dict:
    """``n`` ``--ray`` schedules on a local Ray head (and, ``nodes=2``, a second node that node
    targets kill) with one coordinator (``runner="ray"``).  ``nodes=1`` skips the node targets;
    ``wall_s`` stops starting schedules after that many seconds (the counts are of those run)."""
    import ray

    from services.ttc.rayrun import start_local_cluster, stop_local_cluster
    from services.ttc.runner import Coordinator

    load0 = os.getloadavg()
    head, address, _ = start_local_cluster(workdir, tries=8)  # Ray's own start fails often at load 25+
    counts: Counter = Counter({k: 0 for k in ("lost", "stuck", "twice", "duplicated_results", "completed_twice",
                                              "orphaned_runs")})
    kills: Counter = Counter()
    phases: Counter = Counter()
    t0 = time.monotonic()
    done = 0
    db = os.path.join(workdir, "ray.db")
    node = None
    try:
        if nodes > 1:
            node = WorkerNode(address, ray.get_runtime_context().get_node_id())
            node.start()
        with Coordinator(db, runner="ray", max_parallel=2) as c:
            for i in range(n):
                if wall_s is not None and time.monotonic() - t0 > wall_s:
                    break
                sched = make_ray_schedule(seed, i)
                if node is None and sched["target"] in NODE_TARGETS:
                    sched["target"] = "none"
                run_ray_schedule(c, db, sched, counts, kills, node, phases)
                done += 1
                print(f"{done} schedules {time.monotonic() - t0:.0f} s load {os.getloadavg()[0]:.1f}"
                      f" counts {dict(counts)} kills {dict(kills)}"
                      f" phases {({k: round(v, 1) for k, v in phases.items()})}", file=sys.stderr, flush=True)
            counts["orphaned_runs"] += len(tagged_processes(c.store.store_id + "/"))
        counts["final_checker_total"] = checker.check(db).total()
    finally:
        if node is not None:
            node.stop()
        stop_local_cluster(head)
    return {"schedules": done, "wall_s": time.monotonic() - t0, "counts": dict(counts), "kills": dict(kills),
            "node_joins": node.joins if node else 0,
            "phase_s": {k: round(v, 1) for k, v in phases.items()},
            "node_join_seen_s": {"n": len(node.join_s), "p50": percentile(node.join_s, 50), "max": max(node.join_s)}
            if node and node.join_s else None,
            "loadavg_start": load0, "loadavg_end": os.getloadavg()}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--ray":  # python -m bench.ttc_faults --ray [N] [SEED] [OUT.json] [WALL_S]
        import tempfile

        n_ray = int(sys.argv[2]) if len(sys.argv) > 2 else 200
        seed_ray = int(sys.argv[3]) if len(sys.argv) > 3 else 20251207
        wall = float(sys.argv[5]) if len(sys.argv) > 5 else None
        wd = tempfile.mkdtemp(prefix="ttcr-", dir="/tmp")
        try:
            text = json.dumps(run_ray_schedules(n_ray, seed_ray, wd, wall_s=wall), indent=1)
        finally:
            shutil.rmtree(wd, ignore_errors=True)
        if len(sys.argv) > 4:  # Ray prints its own worker-death lines on stdout: a clean file
            with open(sys.argv[4], "w") as fh:
                fh.write(text + "\n")
        print(text)
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        sys.exit(client_main(sys.argv[2]))
    print("usage: python -m bench ttc_faults [--quick]  (or: bench/ttc_faults.py --client ENDPOINT | --ray [N] [SEED] [OUT.json] [WALL_S])",
          file=sys.stderr)
    sys.exit(2)
