"""``python -m clients`` — the command-line client: every control of the kernel from a shell.

Run ``python -m clients --help`` (and ``python -m clients COMMAND --help``) for the whole list.
``--endpoint`` (or ``$RECA_ENDPOINT``) names the kernel; the default is the embedded ipc endpoint.
Tokens and ids are printed as hex text, which every command takes back.

Exit status: 0 done; 1 the kernel or the service answered with an error (printed as JSON on
stdout: ``{"error": code, "message": ...}``); 2 bad usage, a payload that is not JSON, or a
certificate problem; 3 the kernel cannot be reached (nothing listening, handshake refused, no
reply in time); 130 interrupted with Ctrl-C (a running ``call`` is cancelled first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

from clients.core import ConnectError, default_endpoint, to_text
from clients.progress import progress
from clients.sync import Client
from clients.table import cell, render
from kernel import auth, errors
from kernel import protocol as P

#: Exit statuses (module docstring).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(ValueError):
    """Bad input on the command line (exit 2)."""


def table(rows: list[dict], cols: list[str]) -> str:
    return render(rows, cols, digits=3)


def dumps(value: Any) -> str:
    """One value as a JSON line, bytes as hex (pasteable into the next command)."""
    return json.dumps(to_text(value), default=str)


def parse_json(text: str | None, what: str) -> Any:
    """``text`` as JSON; a :class:`UsageError` that says where it is wrong."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        lines = text.splitlines() or [""]
        line = lines[exc.lineno - 1] if 0 < exc.lineno <= len(lines) else ""
        raise UsageError(f"{what} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})\n"
                         f"    {line}\n    {' ' * (exc.colno - 1)}^\n"
                         "(quote it for the shell, e.g. '{\"steps\": 3}'; a plain string is '\"text\"')") from None


def bar(fraction: float, width: int = 20) -> str:
    """``[#######-------]`` for ``fraction`` in [0, 1]."""
    fraction = min(1.0, max(0.0, fraction))
    done = int(round(fraction * width))
    return "[" + "#" * done + "-" * (width - done) + "]"


def burn(limits: dict, spent: dict) -> tuple[str, float] | None:
    """The most-spent limited kind of a job and the fraction of its limit spent."""
    best = None
    for kind, limit in (limits or {}).items():
        if isinstance(limit, (int, float)) and limit > 0:
            frac = float(spent.get(kind, 0) or 0) / float(limit)
            if best is None or frac > best[1]:
                best = (kind, frac)
    return best


def job_rows(jobs: dict) -> list[dict]:
    rows = []
    for name, j in sorted(jobs.items()):
        b = burn(j.get("limits") or {}, j.get("spent") or {})
        rows.append(dict(j, name=name, burn=(f"{bar(b[1], 10)} {b[1] * 100:.0f}% {b[0]}" if b else "-")))
    return rows


def registered(child: dict, stats: dict) -> str:
    """Whether a running process has a worker registered with the kernel: ``yes``, or ``NO`` (it
    runs but serves nothing: refused for its role, still loading, or stuck before READY; its log
    says which), ``-`` when it is not running."""
    if child.get("state") != "running" or child.get("pid") is None:
        return "-"
    pids = {w.get("pid") for w in stats.get("workers", []) if isinstance(w, dict)}
    return "yes" if child["pid"] in pids else "NO"


def render_status(stats: dict) -> str:
    parts = []
    health = stats.get("health")
    if health:
        summary = stats.get("summary", {})
        down = [c["name"] for c in stats.get("children", []) if c.get("state") == "given_up"]
        parts.append(f"kernel {health}" + (f" (gave up on {', '.join(down)})" if down else "")
                     + f"; {summary.get('workers', 0)} worker(s), {summary.get('inflight', 0)} request(s) in flight")
    services = [dict(v, name=k) for k, v in sorted(stats.get("services", {}).items())]
    parts.append("SERVICES\n" + table(services, ["name", "workers", "free_slots", "queued", "inflight",
                                                 "requests", "finals", "errors", "p50_ms", "p99_ms"]))
    children = [dict(c, worker=registered(c, stats)) for c in stats.get("children", [])]
    if children:
        cols = ["name", "state", "pid", "worker", "restarts", "last_exit", "restart"]
        if any(c.get("group") for c in children):  # the enforcer's group of each process (enforce branch)
            cols.append("group")
        if any(c.get("reason") for c in children):
            cols.append("reason")
        parts.append("PROCESSES\n" + table(children, cols))
    enforcer = stats.get("enforcer")
    if enforcer:
        parts.append(f"ENFORCER  {enforcer.get('backend')}: {enforcer.get('reason')}")
    jobs = job_rows(stats.get("jobs", {}))
    if jobs:
        parts.append("JOBS\n" + table(jobs, ["name", "parent", "burn", "limits", "spent", "remaining", "exhausted"]))
    durability = stats.get("durability")
    if durability is not None:  # the kernel says where its decision log is, or that it keeps none
        parts.append("DECISION LOG  " + (durability["decision_log"] if durability.get("decision_log")
                                         else f"off ({durability.get('why', 'no durability')})"))
    counters = {**stats.get("counters", {}), **stats.get("ledger", {})}
    if counters:
        parts.append("COUNTERS  " + cell(counters, 3))
    return "\n\n".join(parts)


def _client(args: argparse.Namespace, **kw: Any) -> Client:
    return Client(args.endpoint, timeout=args.timeout, **kw)


class Progress:
    """The one-line progress of ``call`` on stderr (a terminal only): partials, elapsed time and
    the budget spent as a bar against the limit the job (or the request's own budget) has.  A
    ticker thread redraws it every :data:`TICK_S` so the elapsed time moves between replies."""

    TICK_S = 0.25

    #: Seconds between two looks at the job's ledger (the ticker's own client).
    POLL_JOB_S = 1.0

    def __init__(self, service: str, limits: dict | None, enabled: bool, *, endpoint: str | None = None,
                 job: str | None = None) -> None:
        self.service = service
        self.endpoint = endpoint
        self.job = job
        self.limits = limits or {}
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.partials = 0
        self.paused = False
        self.spent: dict = {}
        self.width = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self) -> "Progress":
        if self.enabled:
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        """Redraw every TICK_S; with a job, read its spending from the ledger every POLL_JOB_S (the
        worker reports spending with its replies, so between them the ledger is the live figure)."""
        client = Client(self.endpoint, timeout=2.0, retries=0) if self.job and self.endpoint else None
        next_poll = time.monotonic()
        try:
            while not self._stop.wait(self.TICK_S):
                if client is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.POLL_JOB_S
                    try:
                        ledger = client.call(P.MMI_JOB_STATS, {"job": self.job})
                        self.spent = dict(ledger.get("spent") or {})
                    except errors.RecaError:
                        pass
                self.draw()
        finally:
            if client is not None:
                client.close()

    def update(self, reply: Any) -> None:
        self.partials += 1
        self.paused = reply.status == P.STATUS_PAUSED
        if not self.job:  # with a job the ticker reads the job's ledger instead
            self.spent = reply.spent or self.spent
        self.draw()

    def draw(self, spent: dict | None = None) -> None:
        if not self.enabled:
            return
        spent = self.spent if spent is None else spent
        text = f"{self.service}: {self.partials} partial(s)  {time.monotonic() - self.t0:.1f} s"
        b = burn(self.limits, spent or {})
        if b is not None:
            text += f"  {bar(b[1])} {b[0]} {cell(float(spent.get(b[0], 0)), 4)}/{cell(float(self.limits[b[0]]), 4)}"
        elif spent:
            text += f"  spent {cell(spent, 4)}"
        if self.paused:
            text += "  (paused by the kernel)"
        text += "  (Ctrl-C cancels)"
        with self._lock:
            sys.stderr.write("\r" + text.ljust(self.width))
            self.width = len(text)
            sys.stderr.flush()

    def clear(self) -> None:
        """Wipe the line (before a partial is printed on stdout); the ticker draws it again."""
        if self.enabled and self.width:
            with self._lock:
                sys.stderr.write("\r" + " " * self.width + "\r")
                self.width = 0
                sys.stderr.flush()

    def done(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(1.0)
        self.clear()


def explain_budget(client: Client, exc: errors.RecaError, job: str | None, asked: dict | None) -> None:
    """Add what ran out to a budget_exceeded error, in words: ``job 'x' ran out of flops:
    5000/5000`` (the job's ledger), else the request's own budget that was exceeded."""
    spent = exc.detail.get("spent") or {}
    if job:
        try:
            stats = client.call(P.MMI_JOB_STATS, {"job": job}, retries=0, timeout=5)
        except errors.RecaError:
            stats = None
        if isinstance(stats, dict):
            for kind, limit in (stats.get("limits") or {}).items():
                used = (stats.get("spent") or {}).get(kind, 0)
                if kind == stats.get("exhausted") or (limit and used >= limit):
                    exc.detail["explain"] = f"job {job!r} ran out of {kind}: {cell(float(used), 6)}/{cell(float(limit), 6)}"
                    return
    for kind, value in spent.items():
        if asked and kind in asked and value >= asked[kind]:
            exc.detail["explain"] = f"this request's own budget ran out: {kind} {cell(float(value), 6)}/{asked[kind]}"
            return


def print_error(exc: errors.RecaError) -> None:
    print(dumps({"error": exc.code, "message": exc.message, **exc.detail}))


def cmd_call(args: argparse.Namespace) -> int:
    payload = parse_json(args.payload, "the payload")
    budget = parse_json(args.budget, "--budget")
    with _client(args) as client:
        limits = budget
        if limits is None and args.job and not args.quiet and sys.stderr.isatty():
            try:
                limits = client.call(P.MMI_JOB_STATS, {"job": args.job}, retries=0).get("limits")
            except errors.RecaError:
                limits = None
        progress = Progress(args.service, limits, enabled=not args.quiet and sys.stderr.isatty(),
                            endpoint=args.endpoint, job=args.job if budget is None else None).start()

        def on_partial(reply: Any) -> None:
            progress.clear()
            print(dumps({"partial": reply.payload, "status": reply.status}), flush=True)
            progress.update(reply)

        try:
            result = client.call(args.service, payload, job=args.job, budget=budget, priority=args.priority,
                                 on_partial=on_partial)
        except KeyboardInterrupt:
            progress.done()
            rid = client.current
            try:
                if rid is not None:
                    client.cancel(rid)
                print(f"interrupted: request {rid} to {args.service!r} cancelled by you", file=sys.stderr)
            except errors.RecaError as exc:
                print(f"interrupted; cancelling request {rid} failed: {exc}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except ConnectError:
            progress.done()
            raise
        except errors.RecaError as exc:
            progress.done()
            if isinstance(exc, errors.BudgetExceeded):
                explain_budget(client, exc, args.job or exc.detail.get("job"), budget)
            print_error(exc)
            return EXIT_UNREACHABLE if isinstance(exc, errors.Timeout) else EXIT_ERROR
        finally:
            progress.done()
    if args.service.startswith(P.MMI_PREFIX) and result in (P.MMI_NOT_IMPLEMENTED, P.MMI_NOT_IMPLEMENTED.decode()):
        known = ", ".join(sorted(P.MMI_OPS))
        print(dumps({"error": "not_implemented", "message": f"unknown management operation {args.service!r}; "
                                                             f"the kernel answers: {known}"}))
        return EXIT_ERROR
    print(dumps(result))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args, retries=0) as client:
        print(render_status(client.stats()))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """``status`` again every ``--interval`` seconds (``--count`` times; 0: until Ctrl-C)."""
    clear = sys.stdout.isatty()
    n = 0
    with _client(args, retries=0) as client:
        while True:
            text = render_status(client.stats())
            stamp = time.strftime("%H:%M:%S")
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(f"reca at {client.endpoint}  {stamp}  (every {args.interval:g} s; Ctrl-C to stop)\n\n{text}",
                  flush=True)
            n += 1
            if args.count and n >= args.count:
                return EXIT_OK
            time.sleep(args.interval)


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args, retries=0) as client:
        if args.job:
            out = client.call(P.MMI_JOB_STATS, {"job": args.job})
        else:  # the kernel answers a page of jobs at a time; a short page is the last
            out, page = {}, 0
            while True:
                got = client.call(P.MMI_JOB_STATS, {"page": page})
                out.update(got)
                if len(got) < P.STATS_PAGE:
                    break
                page += 1
    if args.json:
        print(dumps(out))
        return EXIT_OK
    jobs = {args.job: out} if args.job else out
    cols = ["name", "owner", "parent", "burn", "limits", "spent", "remaining", "running", "exhausted"]
    print(table(job_rows(jobs), cols) if jobs else "no open jobs")
    return EXIT_OK


def cmd_open(args: argparse.Namespace) -> int:
    budget = parse_json(args.budget, "--budget") or {}
    if not isinstance(budget, dict):
        raise UsageError("--budget must be a JSON object of kind -> amount, e.g. '{\"flops\": 5000}'")
    with _client(args, retries=0) as client:
        print(dumps(client.open_job(args.job, budget, parent=args.parent, priority=args.priority)))
    return EXIT_OK


def cmd_close(args: argparse.Namespace) -> int:
    with _client(args, retries=0) as client:
        print(dumps(client.close_job(args.job)))
    return EXIT_OK


def cmd_order(args: argparse.Namespace) -> int:
    """cancel / preempt / resume: by --job or --token (hex, as ``call`` prints it)."""
    arg: dict[str, Any] = {"service": args.service or P.CTL_ALL}
    if args.token:
        try:
            bytes.fromhex(args.token)
        except ValueError:
            raise UsageError(f"--token must be hex text (as `call` prints it), got {args.token!r}") from None
        arg[P.C_TOKEN] = args.token
    else:
        arg[P.C_JOB] = args.job
    name = {"cancel": P.MMI_CANCEL, "preempt": P.MMI_PREEMPT, "resume": P.MMI_RESUME}[args.cmd]
    with _client(args, retries=0) as client:
        out = client.call(name, arg)
    print(dumps(out))
    return EXIT_OK


def cmd_restart(args: argparse.Namespace) -> int:
    with _client(args, retries=0) as client:
        print(dumps(client.call(P.MMI_RESTART, {"child": args.child})))
    return EXIT_OK


def cmd_view(args: argparse.Namespace) -> int:
    """The live view's URL, with its token (read from the runtime directory: this machine only)."""
    from clients.logs import logs_dir

    path = os.path.join(os.path.dirname(logs_dir(args.endpoint)), "view.url")
    try:
        with open(path, encoding="utf-8") as fh:
            print(fh.read().strip())
    except OSError as exc:
        print(f"python -m clients view: no live view here ({exc}); add the view service to the kernel's config:\n"
              '[[service]]\nname = "view"\nmodule = "services.view"', file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_agent_demo(args: argparse.Namespace) -> int:
    """The planner's demo, ``python -m planner.demo`` (planner/ is a layer above clients/: it runs
    as its own program rather than being imported here)."""
    import subprocess

    argv = [sys.executable, "-m", "planner.demo"] + (["--endpoint", args.endpoint] if args.endpoint else [])
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 130


def cmd_logs(args: argparse.Namespace) -> int:
    from clients import logs

    return logs.main(args)


# -- demo -------------------------------------------------------------------------------------------


def _view_url(client: Client) -> str | None:
    """The live view's URL with its token, when the kernel runs the view service on this machine."""
    from clients.logs import logs_dir

    try:
        client.wait_for_service("view", 30)
        with open(os.path.join(os.path.dirname(logs_dir(client.endpoint)), "view.url"), encoding="utf-8") as fh:
            return fh.read().strip()
    except (errors.RecaError, OSError):
        return None


def _demo(client: Client, out=print) -> None:
    configured = {ch["name"].split("#")[0] for ch in client.stats().get("children", [])}
    if "view" in configured:
        url = _view_url(client)
        if url:
            out(f"\nwatch it live in a browser: {url}")
    out("\n== 1. a request, streamed ==")
    client.wait_for_service("echo")
    result = client.call("echo", {"partials": 3, "hello": "reca"},
                         on_partial=lambda r: out(f"   partial {r.payload}"))
    out(f"   final   {result}")

    out("\n== 2. a budget the kernel enforces (job 'demo': 20,000 flops, 2 s of wall time) ==")
    client.open_job("demo", {"flops": 20_000, "wall_ms": 2_000})
    done = 0
    try:
        for i in range(100):
            client.call("echo", {"steps": 4, "step_ms": 1}, job="demo")  # 4,000 flops each
            done += 1
    except errors.BudgetExceeded as exc:
        out(f"   request {done + 1} refused or cut off: budget_exceeded ({exc.message})")
    stats = client.call(P.MMI_JOB_STATS, {"job": "demo"})
    out(f"   {done} requests ran; job spent {stats['spent']}, remaining {stats['remaining']}")
    try:
        client.call("echo", "more?", job="demo")
    except errors.BudgetExceeded:
        out("   a further request is refused: the job takes no more work (no client flag overrides this)")
    try:
        client.call("echo", {"steps": 2}, job="demo", budget={"flops": 10**9})
    except errors.BudgetExceeded:
        out("   ... even one that asks for a larger budget: asks are clamped to what the job has left")

    out("\n== 3. a gate for a counted resource (job 'grow': 3 prototypes) ==")
    client.open_job("grow", {"prototypes": 3})
    answers = []
    for _ in range(5):
        try:
            client.reserve("grow", "prototypes", 1, commit=True)
            answers.append("granted")
        except errors.Refused:
            answers.append("refused")
    out(f"   5 spawn requests: {answers}")

    out("\n== 4. preemption by priority ==")
    client.open_job("batch", {}, priority=0)
    client.open_job("urgent", {}, priority=10)
    results: dict[str, Any] = {}
    paused = []

    def low(tag: str) -> None:
        with Client(client.endpoint, timeout=20) as c:
            results[tag] = c.call("echo", {"steps": 60, "step_ms": 10}, job="batch", priority=0,
                                  on_partial=lambda r: paused.append(tag) if r.status == "paused" else None)

    threads = [threading.Thread(target=low, args=(f"low{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.15)  # let both low-priority runs occupy the two echo workers
    t0 = time.monotonic()
    urgent = client.call("echo", {"steps": 5, "step_ms": 10}, job="urgent", priority=10)
    out(f"   urgent request (priority 10) finished in {(time.monotonic() - t0) * 1000:.0f} ms: {urgent}")
    for t in threads:
        t.join(30)
    out(f"   low-priority runs paused at a safe point: {sorted(set(paused))}; "
        f"both resumed and finished: {sorted(results)}")
    reference = client.call("echo", {"steps": 60, "step_ms": 0})
    same = all(r == reference for r in results.values())
    out(f"   resumed results equal an uninterrupted run: {same}")

    configured = {ch["name"].split("#")[0] for ch in client.stats().get("children", [])}
    waiting = [name for name in ("ttc", "igms", "decode", "ids", "rois", "lot") if name in configured]
    for name in progress(waiting, desc="waiting for services to register", unit="service"):
        client.wait_for_service(name, 90)  # the decode worker loads torch and its weights first

    if client.call(P.MMI_SERVICE, "ttc") == "200":
        out("\n== 5. transactional tool calls: prepare two SAT solves, the plan changes, only one runs ==")
        client.open_job("plan", {"cpu_s": 60})
        keep = client.call("ttc", {"op": "prepare", "tool": "sat", "inputs": {"n_vars": 120, "seed": 6},
                                   "est_cost": 5, "consumers": ["step-a"]}, job="plan")
        drop = client.call("ttc", {"op": "prepare", "tool": "sat", "inputs": {"n_vars": 120, "seed": 7},
                                   "est_cost": 5, "consumers": ["step-b"]}, job="plan")
        out(f"   prepared {keep['call_id']} and {drop['call_id']} (nothing runs yet; budget held "
            f"{client.call(P.MMI_JOB_STATS, {'job': 'plan'})['remaining']})")
        aborted = client.call("ttc", {"op": "withdraw", "consumer": "step-b"})
        done = client.call("ttc", {"op": "commit", "call_id": keep["call_id"], "wait": True}, timeout=60)
        out(f"   plan dropped step-b: aborted {aborted['aborted']} before any heavy run; "
            f"committed one ran: {done['state']}, satisfiable={done['result']['value']['sat']}")

    if client.call(P.MMI_SERVICE, "igms") == "200":
        out("\n== 6. a simulation refined only where an invariant is breached (job 'dam': 5 refinements) ==")
        client.open_job("dam", {"refinements": 5})
        run = client.call("igms", {"case": "radial_dam_break", "blocks": 4, "cells": 8, "t_end": 1.0,
                                   "refine_tol": 1e-3}, job="dam", timeout=120)
        stats = client.call(P.MMI_JOB_STATS, {"job": "dam"})
        out(f"   radial dam break to t=1.0: {run['igms']['refinements_granted']} refinements granted, "
            f"{run['igms']['refinements_refused']} refused by the kernel's gate; "
            f"job spent {stats['spent']}")

    if client.call(P.MMI_SERVICE, "decode") == "200":
        out("\n== 7. reasoning: decode, verify, repair only the broken span, force a thunk ==")
        from clients import demo_reasoning

        demo_reasoning.run(client, out=out)

    out("\n== where the compute went ==")
    out(render_status(client.stats()))


def _replay_summary(path: str) -> None:
    """Re-run the ledger on the demo kernel's decision log (what ``python -m kernel replay`` does)."""
    from kernel.replay import replay_file

    try:
        report = replay_file(path)
    except OSError as exc:
        print(f"no decision log to replay: {exc}")
        return
    print(f"decision log {path}: {report.replayed} ledger decisions replayed, {len(report.divergences)} "
          f"divergences; {report.observed} other records (preemptions, services' audit records)\n"
          f"   (python -m kernel replay {path})")


def cmd_demo(args: argparse.Namespace) -> int:
    from clients.launch import KernelStartError, LocalKernel

    kernel = None
    endpoint = args.endpoint
    started = threading.Event()  # once set, the kernel's output is kept (kernel.lines), not printed
    if endpoint is None:
        rundir = tempfile.mkdtemp(prefix="reca-demo-", dir="/tmp")
        print(f"starting python -m kernel (runtime {rundir}) ...", flush=True)
        try:
            kernel = LocalKernel(None, runtime_dir=rundir, log_level=None, start_timeout=60,
                                 echo=lambda line: None if started.is_set() else print("   kernel:", line, flush=True))
        except KernelStartError as exc:
            print(f"the kernel did not start: {exc}", file=sys.stderr)
            return 1
        endpoint = kernel.endpoint
    started.set()
    try:
        with Client(endpoint, timeout=30) as client:
            _demo(client)
    finally:
        if kernel is not None:
            rc, _ = kernel.stop(timeout=30)
            print(f"\nkernel stopped (exit {rc})")
            _replay_summary(kernel.decision_log)
    return 0


EPILOG = """\
examples:
  python -m clients status                        services, processes, jobs (one page)
  python -m clients watch                         the same, redrawn every second
  python -m clients call echo '{"steps": 50, "step_ms": 20}' --job mine
  python -m clients open mine --budget '{"flops": 5000}'
  python -m clients jobs                          your jobs and how much of each budget is spent
  python -m clients preempt --job mine            pause its requests at their next safe point
  python -m clients resume --job mine
  python -m clients cancel --token 9f3c...        a request's kernel token, as printed by call
  python -m clients logs echo -f                  a service's own log file, followed
  python -m clients view                          the live view's URL (open it in a browser)
  python -m clients call mmi.stats                any management operation (docs/protocol.md)

exit status: 0 done, 1 error answered by the kernel or a service, 2 bad usage or certificate,
3 kernel not reachable, 130 interrupted (a running call is cancelled first).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients", description="reca command-line client: "
                                     "requests, jobs, orders, status and logs", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default=None,
                        help=f"kernel endpoint, ipc:// or tcp:// (default $RECA_ENDPOINT or {default_endpoint()})")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds without a reply before giving up (default 10)")
    parser.add_argument("--cert", default=None, help="your secret certificate for tcp:// (default $RECA_CERT)")
    parser.add_argument("--server-cert", default=None,
                        help="the kernel's public certificate for tcp:// (default $RECA_SERVER_CERT)")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("call", help="send one request; partials stream, Ctrl-C cancels it",
                       description="Send one request and print its partial replies and result as JSON lines. "
                                   "On a terminal a progress line shows partials, elapsed time and budget spent.")
    p.add_argument("service", help="service name (or a management operation, mmi.*)")
    p.add_argument("payload", nargs="?", help="the request as JSON (default: null)")
    p.add_argument("--job", help="the job to charge (default: your default job)")
    p.add_argument("--budget", help="a budget for this request as JSON, e.g. '{\"flops\": 5000}' "
                                    "(clamped to what the job has left)")
    p.add_argument("--priority", type=int, help="priority (higher preempts lower)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    sub.add_parser("status", help="services, processes (with last exit reasons), jobs")
    p = sub.add_parser("watch", help="status, redrawn every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between two views (default 1)")
    p.add_argument("--count", type=int, default=0, help="stop after this many views (default: never)")
    p = sub.add_parser("jobs", help="open jobs: limits, spent, remaining, a bar of the budget burnt")
    p.add_argument("job", nargs="?", help="one job (default: every job you may see)")
    p.add_argument("--json", action="store_true", help="the kernel's answer as JSON")
    p = sub.add_parser("open", help="open a job with a budget carved from its parent")
    p.add_argument("job")
    p.add_argument("--budget", help="limits as JSON, kind -> amount, e.g. '{\"flops\": 5000, \"wall_ms\": 2000}'")
    p.add_argument("--parent", help="parent job (default: your default job, or root for an operator)")
    p.add_argument("--priority", type=int, default=0, help="the job's priority (default 0)")
    p = sub.add_parser("close", help="close a job (and its children); unspent budget returns to the parent")
    p.add_argument("job")
    for name, what in (("cancel", "cancel"), ("preempt", "pause"), ("resume", "resume")):
        p = sub.add_parser(name, help=f"{what} requests at their next safe point, by --job or --token")
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--job", help="every request of this job")
        target.add_argument("--token", help="one request's kernel token (hex, as printed by call / jobs)")
        p.add_argument("--service", help="only requests of this service")
    p = sub.add_parser("restart", help="start a given-up or exited service process again (operator)")
    p.add_argument("child", help="the process name, as in status (e.g. echo#0)")
    p = sub.add_parser("logs", help="a service's log file in the runtime directory (this machine)")
    p.add_argument("name", help="service or process name (echo: every echo#N replica)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    p.add_argument("-n", "--lines", type=int, default=50, help="last lines to print first (default 50)")
    p.add_argument("--dir", default=None, help="the logs directory (default: logs/ beside the ipc endpoint, "
                                                "else the runtime directory's)")
    sub.add_parser("view", help="the live view's URL (with its access token), when the view service runs")
    sub.add_parser("agent-demo", help="a planner suggests, reca decides: one task narrated (docs/agent.md)")
    sub.add_parser("demo", help="the guided demo (starts a kernel unless --endpoint is given)")
    return parser


COMMANDS = {"call": cmd_call, "status": cmd_status, "watch": cmd_watch, "jobs": cmd_jobs, "open": cmd_open,
            "close": cmd_close, "cancel": cmd_order, "preempt": cmd_order, "resume": cmd_order,
            "restart": cmd_restart, "logs": cmd_logs, "view": cmd_view}
#: Commands that start their own kernel unless --endpoint is given (no default endpoint for them).
OWN_KERNEL = {"demo": cmd_demo, "agent-demo": cmd_agent_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cert:
        os.environ[auth.ENV_CERT] = args.cert
    if args.server_cert:
        os.environ[auth.ENV_SERVER_CERT] = args.server_cert
    try:
        if args.cmd in OWN_KERNEL:
            return OWN_KERNEL[args.cmd](args)
        args.endpoint = args.endpoint or default_endpoint()
        return COMMANDS[args.cmd](args)
    except UsageError as exc:
        print(f"python -m clients {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (auth.AuthError, auth.UnsafeRuntimeDir) as exc:
        print(f"python -m clients: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectError as exc:
        print(f"python -m clients: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except errors.Timeout as exc:
        print(f"python -m clients: no answer from the kernel at {args.endpoint}: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except errors.RecaError as exc:
        print_error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
