"""Tool runs as Ray tasks: the ``--runner ray`` side of :class:`services.ttc.runner.Coordinator`.

:class:`RayRunner` has the local :class:`~services.ttc.runner.Runner`'s interface (start, reap,
kill, wait, result_of) so the coordinator, the state machine, the log and the independent checker
are the same for both.  One run is one Ray task (:func:`_run_tool`, ``num_cpus`` small,
``max_retries=0``: a lost task is the state machine's to retry, never Ray's, so a call is never run
twice behind the log's back).  The task is a thin wrapper: on its node it starts the ordinary
tool-worker (``python -m services.ttc.toolworker``, its own session and process group, the run tag
``RECA_TTC_RUN`` in its environment, RLIMITs, ``PR_SET_PDEATHSIG`` to the Ray worker process),
waits for it and returns ``{"status", "cpu_s", "result", "pid"}`` — the same end status strings as
a local worker (``exit:0``, ``signal:SIGKILL``, ``cpu_limit``).  Right after starting the worker it
writes ``<run>.pid.json`` (pid and start token) so the coordinator records ``run_started`` as for a
local run.

Faults map to the local outcomes:

* the tool-worker is killed: the task returns ``signal:SIGKILL`` — a lost run, retried if the tool
  is retriable (exactly as locally);
* the Ray worker process running the task dies, or its node: ``ray.get`` raises
  (``WorkerCrashedError``, ``NodeDiedError``, ...); the end status is ``ray_lost:<error>`` and
  ``result`` None — again a lost run (the tool-worker dies with the task process by PDEATHSIG);
* abort / expiry / close: ``ray.cancel(ref, force=True)`` (kills the task's worker process, the
  tool-worker follows); if the task has not ended :data:`CANCEL_GRACE_S` later, the run's processes
  are SIGKILLed by their tag (:func:`~services.ttc.runner.kill_run`), which reaches them only on
  this host.

Files: where the node sees the coordinator's ``workdir`` (one host, a shared file system) the
request/result/checkpoint files live there, as for a local run.  Where it does not (another host),
they travel with the task: the request is the task's argument, the node runs the tool in a scratch
directory of its own, and the result, pid and start token come back in the task's return value
(``run_started`` is then logged when the run ends; its checkpoints stay on that node and go with
its scratch directory, so a retry elsewhere starts from the beginning).  The checker and recovery
find live runs through the OS process table of *this* host; a run on another host is reached by
``ray.cancel`` (and its tool-worker dies with its task process by PDEATHSIG), not by tag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
from typing import Any

from services.ttc.logic import RunRef, RunTicket
from services.ttc.runner import _ROOT, ENV_RUN_TAG, Runner, kill_run
from services.ttc.toolworker import write_atomically

#: Ray CPUs one run asks for (small: the tool's own RLIMIT_CPU is the real bound).
TASK_NUM_CPUS = 0.25
#: Seconds a cancelled task may take to end before its processes are killed by tag.
CANCEL_GRACE_S = 5.0
#: Bound on one ``ray.get`` of a finished task (seconds).
GET_TIMEOUT_S = 30.0


def _run_tool(req: dict, req_path: str, pid_path: str, tag: str, python: str, root: str) -> dict:
    """The Ray task body (runs in a Ray worker process on some node).

    Where the coordinator's ``workdir`` is visible here (one host, a shared file system) the run's
    files are there, as for a local run.  Where it is not (another host), they *travel with the
    task*: the request came as this task's argument, the tool-worker runs in a scratch directory
    of this node (request, result, checkpoints; removed at the end), and the result, the pid and
    its start token go back in the return value (``shipped: True``)."""
    import shutil
    import tempfile

    import psutil
    import ray

    if not os.path.exists(python):
        python = sys.executable  # another host: this node's interpreter
    scratch = None
    if not os.path.isdir(os.path.dirname(req_path)):
        scratch = tempfile.mkdtemp(prefix="reca-ttc-")
        req = {
            **req,
            "result_path": os.path.join(scratch, "result.json"),
            "checkpoint_dir": os.path.join(scratch, "ckpt"),
        }
        os.makedirs(req["checkpoint_dir"], exist_ok=True)
        req_path = os.path.join(scratch, "req.json")
    try:
        out = _spawn_and_wait(
            {**req, "parent_pid": os.getpid(), "die_with_parent": True},
            req_path,
            None if scratch else pid_path,
            tag,
            python,
            root,
            psutil,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {**out, "shipped": scratch is not None, "node_ip": ray.util.get_node_ip_address()}


def _spawn_and_wait(
    req: dict, req_path: str, pid_path: str | None, tag: str, python: str, root: str, psutil: Any
) -> dict:
    """Start the tool-worker on ``req``, write its pid file (if ``pid_path``), wait, read its result."""
    write_atomically(req_path, json.dumps(req).encode())
    env = dict(os.environ)
    # Never join an enforcer group the node happened to inherit: nobody here would remove it.
    env.pop("RECA_ENFORCE_GROUP", None)  # kernel.enforce.ENV_GROUP
    env[ENV_RUN_TAG] = tag
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    pid = os.posix_spawn(python, [python, "-m", "services.ttc.toolworker", req_path, tag], env, setsid=True)
    try:
        token = round(psutil.Process(pid).create_time() * 100)
    except psutil.Error:
        token = None
    if pid_path is not None:
        write_atomically(pid_path, json.dumps({"pid": pid, "token": token}).encode())
    _, status, usage = os.wait4(pid, 0)
    cpu = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= req["cpu_limit_s"]):
            end = "cpu_limit"
        else:
            end = f"signal:{signal.Signals(sig).name}"
    else:
        end = f"exit:{os.WEXITSTATUS(status)}"
    result = None
    try:
        with open(req["result_path"]) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        pass
    return {"status": end, "cpu_s": cpu, "result": result, "pid": pid, "token": token}


@dataclasses.dataclass
class RayRun:
    """A run submitted as a Ray task and not yet ingested.  ``pid``/``token`` are the tool-worker's,
    known once its pid file appears (None before); ``pidfd`` is always None (the pump polls)."""

    ticket: RunTicket
    ref: Any
    pid: int | None = None
    pgid: int | None = None
    token: int | None = None
    pidfd: None = None
    killed: bool = False
    cancelled_at: float | None = None
    outcome: dict | None = None
    started_recorded: bool = False


class RayRunner(Runner):
    """Runs each tool as a Ray task on the cluster at ``address`` (``None``: the one this process
    is already connected to).  ``token_path``: Ray's token file (token authentication);
    ``task_options``: extra ``.options(...)`` of the task (placement), ``max_retries`` stays 0."""

    def __init__(
        self,
        workdir: str,
        *,
        address: str | None = None,
        token_path: str | None = None,
        num_cpus: float = TASK_NUM_CPUS,
        python: str = sys.executable,
        task_options: dict | None = None,
    ) -> None:
        super().__init__(workdir, die_with_manager=True, python=python)
        import ray

        if not ray.is_initialized():
            if token_path:
                os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path})
                from ray._raylet import Config  # type: ignore[attr-defined]

                Config.initialize("")
            ray.init(
                address=address,
                log_to_driver=False,
                logging_level="ERROR",
                runtime_env={"env_vars": {"PYTHONPATH": _ROOT}},
            )
        self._ray = ray
        # max_retries=0 is not overridable: a retry is the log's decision, never Ray's.
        self._base_task = ray.remote(num_cpus=num_cpus, max_retries=0)(_run_tool)
        self._task = self._base_task
        self.place(task_options)

    def place(self, task_options: dict | None) -> None:
        """Where the next runs go: extra ``.options(...)`` of the task (a scheduling_strategy, a
        label_selector; None: anywhere).  Runs already submitted stay where they are."""
        self._task = self._base_task
        if task_options:  # never retries
            self._task = self._base_task.options(**{**task_options, "max_retries": 0})

    def _pid_path(self, tag: str) -> str:
        return self._base(tag) + ".pid.json"

    def start(self, ticket: RunTicket) -> RayRun:  # type: ignore[override]
        req = {
            "entry": ticket.entry,
            "inputs": ticket.inputs,
            "call_id": ticket.call_id,
            "attempt": ticket.attempt,
            "checkpoint_dir": self.checkpoint_dir(ticket.call_id),
            "result_path": self.result_path(ticket.tag),
            "cpu_limit_s": ticket.cpu_limit_s,
            "mem_bytes": ticket.mem_bytes,
        }
        req_path = self._base(ticket.tag) + ".req.json"
        ref = self._task.remote(req, req_path, self._pid_path(ticket.tag), ticket.tag, self.python, _ROOT)
        return RayRun(ticket, ref)

    def started(self, proc: RayRun) -> bool:  # type: ignore[override]
        """Whether the tool-worker's pid became known just now (the coordinator records it once):
        from its pid file, or -- a run on a node without the workdir -- from the task's return
        value once it ended (the pid is the one it had on its node)."""
        if proc.started_recorded or proc.pid is not None:
            return False
        try:
            with open(self._pid_path(proc.ticket.tag)) as fh:
                facts = json.load(fh)
        except (OSError, ValueError):
            if not self._poll(proc) or not (proc.outcome or {}).get("shipped") or proc.outcome.get("pid") is None:
                return False
            facts = proc.outcome
        proc.pid = proc.pgid = facts["pid"]
        proc.token = facts["token"]
        return True

    def _poll(self, proc: RayRun) -> bool:
        if proc.outcome is not None:
            return True
        ready, _ = self._ray.wait([proc.ref], num_returns=1, timeout=0)
        if not ready:
            if proc.cancelled_at is not None and time.monotonic() - proc.cancelled_at > CANCEL_GRACE_S:
                self._kill_by_tag(proc)
                proc.cancelled_at = time.monotonic()  # again later if it still has not ended
            return False
        try:
            proc.outcome = self._ray.get(proc.ref, timeout=GET_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - every way a task is lost is a lost run
            # The task's process (or node) is gone; its tool-worker dies with it (PDEATHSIG) or by tag.
            self._kill_by_tag(proc)
            status = "killed" if proc.killed else f"ray_lost:{type(exc).__name__}"
            proc.outcome = {"status": status, "cpu_s": None, "result": None}
        return True

    def _kill_by_tag(self, proc: RayRun) -> None:
        kill_run(RunRef(proc.ticket.call_id, proc.ticket.attempt, proc.ticket.tag, proc.pid, proc.pgid, proc.token))

    def reap(self, proc: RayRun) -> tuple[str, float] | None:  # type: ignore[override]
        if not self._poll(proc):
            return None
        assert proc.outcome is not None
        return proc.outcome["status"], proc.outcome["cpu_s"]

    def result_of(self, proc: RayRun) -> dict | None:  # type: ignore[override]
        result = proc.outcome.get("result") if proc.outcome else None
        if isinstance(result, dict) and "ok" in result:
            return result
        return self.read_result(proc.ticket.tag)

    def kill(self, proc: RayRun) -> None:  # type: ignore[override]
        """Abort: ``ray.cancel(force=True)``; the tag kill follows if it ignores the cancel."""
        proc.killed = True
        if proc.cancelled_at is None:
            proc.cancelled_at = time.monotonic()
            try:
                self._ray.cancel(proc.ref, force=True)
            except Exception:  # noqa: BLE001 - already finished / unknown: the tag kill covers it
                self._kill_by_tag(proc)

    def wait(self, procs: list[RayRun], timeout: float) -> bool:  # type: ignore[override]
        pending = [p.ref for p in procs if p.outcome is None]
        if not pending:
            return bool(procs)
        ready, _ = self._ray.wait(pending, num_returns=1, timeout=max(0.0, min(timeout, 1.0)))
        return bool(ready)

    def wait_ended(self, proc: RayRun, timeout: float) -> None:  # type: ignore[override]
        deadline = time.monotonic() + timeout
        while not self._poll(proc) and time.monotonic() < deadline:
            self.wait([proc], deadline - time.monotonic())

    def discard(self, tag: str) -> None:
        super().discard(tag)
        try:
            os.unlink(self._pid_path(tag))
        except FileNotFoundError:
            pass


def start_local_cluster(
    temp: str, *, start_s: float = 150.0, tries: int = 3, num_cpus: int = 1, token_path: str | None = None
) -> tuple[Any, str, str]:
    """A one-node Ray cluster for tests and the fault harness (``ray start --head`` under
    kernel.raynode, token authentication on) with this process connected as a driver:
    ``(node runner, address, token path)``.  Raises RuntimeError with the reason if no try came up
    within ``start_s`` seconds.  Stop it with :func:`stop_local_cluster`."""
    import ray
    from ray._raylet import Config  # type: ignore[attr-defined]

    from kernel.rayplace import free_ports, make_token, node_argv, start_node, stop_node, token_env

    token = token_path or make_token(os.path.join(temp, "auth_token"))
    os.environ.update(token_env(token))
    Config.initialize("")  # Ray re-reads RAY_AUTH_MODE (as kernel/rayplace.py does)
    env = {**os.environ, "PYTHONPATH": _ROOT}
    why = "no try made"
    for _ in range(tries):
        port = free_ports(1)[0]
        with open(os.path.join(temp, "head.err"), "ab") as err:
            head = start_node(node_argv(head_port=port, num_cpus=num_cpus, temp_dir=temp), env, stderr=err)
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + start_s
        # ray.init's own GCS connect retries are not bounded by our deadline: call it only once the
        # head's GCS port accepts a connection (and bound each of its GCS connects: Ray reads these).
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "20")
        os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", "20")
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                time.sleep(0.5)
                continue
            try:
                ray.init(
                    address=address,
                    log_to_driver=False,
                    logging_level="ERROR",
                    runtime_env={"env_vars": {"PYTHONPATH": _ROOT}},
                )
                if any(n["Alive"] for n in ray.nodes()):
                    return head, address, token
            except Exception as exc:  # noqa: BLE001 - not up yet
                why = f"{type(exc).__name__}: {exc}"[:300]
            ray.shutdown()
            time.sleep(2.0)
        why = f"Ray head did not come up (runner rc={head.poll()}, last error {why}); see {temp}/head.err"
        stop_node(head)
    raise RuntimeError(why)


def stop_local_cluster(head: Any) -> None:
    """Disconnect this driver and stop the node (every Ray process of it reaped)."""
    import ray

    from kernel.rayplace import stop_node

    ray.shutdown()
    stop_node(head)
