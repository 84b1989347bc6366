"""``python -m clients``: every control from a shell, clear failures, exit codes, per-service logs.

Real ``python -m kernel`` processes; the CLI runs in-process (``main(argv)``) except where a
signal is sent to it (Ctrl-C) or where its exit must be seen from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from clients import Client
from clients.__main__ import main
from clients.core import FirstContact, to_text
from clients.launch import REPO
from tests.support import KernelProcess, kernel_fixture, service_block, short_tmpdir

pytestmark = pytest.mark.system

CRASH = [sys.executable, "-c", "import sys; print('starting up'); sys.exit('boom: no such model file m.bin')"]

kern = kernel_fixture(
    service_block("echo", "services.echo", replicas=2) + service_block("crash", command=CRASH, restart="permanent"),
    intensity=2,
    period=30.0,
)


def cli(kern, capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["--endpoint", kern.endpoint, "--timeout", "30", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def cli_process(kern, *argv: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO, RECA_ENDPOINT=kern.endpoint)
    return subprocess.Popen(
        [sys.executable, "-m", "clients", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_until(predicate, what: str, bound_s: float = 60.0) -> None:
    """Poll ``predicate`` (bounded; the bound is a safety net, not a timing assertion)."""
    deadline = time.monotonic() + bound_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {bound_s:g} s: {what}"
        time.sleep(0.05)


@pytest.fixture
def client(kern):
    c = Client(kern.endpoint, timeout=30, retries=0, context=zmq.Context.instance())
    c.wait_for_service("echo", 30)
    yield c
    c.close()


def _given_up(client) -> dict:
    return next(ch for ch in client.stats()["children"] if ch["name"] == "crash")


def test_status_shows_the_exit_reason_and_degraded_health(kern, client, capsys):
    wait_until(lambda: _given_up(client)["state"] == "given_up", "the crashing child is given up")
    child = _given_up(client)
    assert child["reason"] == "exit 1: boom: no such model file m.bin"
    assert client.stats()["health"] == "degraded"
    assert any(line.startswith("reca kernel degraded: gave up on crash (exit 1: boom") for line in kern.lines)
    rc, out, _ = cli(kern, capsys, "status")
    assert rc == 0 and "boom: no such model file m.bin" in out and "degraded" in out.splitlines()[0]


def test_each_service_logs_to_its_own_file(kern, client, capsys):
    wait_until(lambda: _given_up(client)["state"] == "given_up", "the crashing child is given up")
    rc, out, _ = cli(kern, capsys, "logs", "crash", "-n", "100")
    assert rc == 0
    assert out.splitlines().count("starting up") == 3  # the first start and two restarts, in its own file
    assert "exit 1: boom: no such model file m.bin" in out
    assert "starting up" not in kern.lines  # not in the kernel's output
    rc, out, _ = cli(kern, capsys, "logs", "echo", "-n", "5")
    assert rc == 0 and "echo#0| " in out and "echo#1| " in out  # a service name: every replica
    rc, _, err = cli(kern, capsys, "logs", "nosuch")
    assert rc == 1 and "no log file for 'nosuch'" in err and "crash" in err


def test_jobs_open_call_and_a_budget_that_runs_out(kern, client, capsys):
    rc, out, _ = cli(kern, capsys, "open", "cli-job", "--budget", '{"flops": 5000}')
    assert rc == 0 and json.loads(out)["ok"] is True
    rc, out, _ = cli(kern, capsys, "call", "echo", '{"steps": 3, "step_ms": 1}', "--job", "cli-job")
    assert rc == 0 and json.loads(out)["steps_done"] == 3
    rc, out, _ = cli(kern, capsys, "call", "echo", '{"steps": 10, "step_ms": 1}', "--job", "cli-job")
    error = json.loads(out)
    assert (
        rc == 1
        and error["error"] == "budget_exceeded"
        and error["explain"] == "job 'cli-job' ran out of flops: 5000/5000"
    )
    rc, out, _ = cli(kern, capsys, "jobs")
    row = next(line for line in out.splitlines() if line.startswith("cli-job "))
    assert "[##########] 100% flops" in row
    rc, out, _ = cli(kern, capsys, "jobs", "cli-job", "--json")
    assert rc == 0 and json.loads(out)["spent"]["flops"] == 5000
    rc, out, _ = cli(kern, capsys, "close", "cli-job")
    assert rc == 0


def test_bad_json_says_where_and_exits_2(kern, capsys):
    rc, _, err = cli(kern, capsys, "call", "echo", '{"steps": 3, "step_ms": 1')
    assert rc == 2 and "line 1 column 26" in err and "Traceback" not in err
    rc, _, err = cli(kern, capsys, "open", "j", "--budget", "[1,")
    assert rc == 2 and "--budget is not JSON" in err


def test_unknown_operations_and_errors_exit_non_zero(kern, client, capsys):
    rc, out, _ = cli(kern, capsys, "call", "mmi.nosuch")
    assert rc == 1 and "unknown management operation 'mmi.nosuch'" in out and "mmi.stats" in out
    rc, out, _ = cli(kern, capsys, "call", "echo", '{"fail": "bad input"}')
    assert rc == 1 and json.loads(out)["error"] == "service_error"
    rc, out, _ = cli(kern, capsys, "cancel", "--token", "zz")
    assert rc == 2
    rc, out, _ = cli(kern, capsys, "cancel", "--token", "00" * 16)
    assert rc == 1 and json.loads(out)["error"] == "not_found"  # no such request (strict control, issue 25)


def test_tokens_are_printed_as_pasteable_hex(kern, client, capsys):
    rc, out, _ = cli(kern, capsys, "call", "echo", '{"report_token": true}')
    token = json.loads(out.splitlines()[0])["partial"]["token"]
    assert rc == 0 and bytes.fromhex(token)
    assert to_text({"t": b"\x00\xff", "l": [b"a"]}) == {"t": "00ff", "l": ["61"]}


def read_line(proc: subprocess.Popen, bound_s: float = 60.0) -> str:
    """The next stdout line of ``proc`` (bounded: select before each read)."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], bound_s)
    assert ready, f"no output from the call within {bound_s:g} s"
    return proc.stdout.readline()


def test_preempt_resume_and_cancel_a_job_from_the_shell(kern, client, capsys):
    assert cli(kern, capsys, "open", "longrun")[0] == 0
    proc = cli_process(kern, "call", "echo", '{"steps": 100000, "step_ms": 1}', "--job", "longrun")
    try:
        wait_until(lambda: client.stats()["services"]["echo"]["inflight"] >= 1, "the long call runs")
        rc, out, _ = cli(kern, capsys, "preempt", "--job", "longrun")
        assert rc == 0 and json.loads(out)["targets"] == 1
        line = json.loads(read_line(proc))
        assert line["status"] == "paused"  # the pause reached the caller
        rc, out, _ = cli(kern, capsys, "resume", "--job", "longrun")
        assert rc == 0
        rc, out, _ = cli(kern, capsys, "cancel", "--job", "longrun", "--service", "echo")
        assert rc == 0
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert proc.returncode == 1 and lines[-1]["error"] == "cancelled", (stdout, stderr)


def test_ctrl_c_cancels_the_call_without_a_traceback(kern, client):
    # --timeout: the call sends no partials, and the CLI's default 10 s of silence would end it
    # (exit 3) before a busy machine got the SIGINT to it
    # preexec_fn: a shell that starts the suite in the background (`./dev test &`) passes SIGINT on
    # ignored, and Python then keeps it ignored -- a terminal's Ctrl-C is what is tested here
    proc = cli_process(
        kern,
        "--timeout",
        "600",
        "call",
        "echo",
        '{"steps": 100000, "step_ms": 1}',
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until(lambda: client.stats()["services"]["echo"]["inflight"] >= 1, "the call runs")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "cancelled by you" in stderr and "Traceback" not in stderr
    # the request really ended in the kernel (the worker is free again), not just in the shell
    wait_until(lambda: client.stats()["services"]["echo"]["inflight"] == 0, "the cancelled request ends")


def test_watch_redraws_status(kern, client, capsys):
    rc, out, _ = cli(kern, capsys, "watch", "--interval", "0.1", "--count", "2")
    assert rc == 0 and out.count("SERVICES") == 2


def test_no_kernel_is_an_error_at_once_naming_the_endpoint(capsys):
    d = short_tmpdir()
    # --timeout 600: an answer within the test's bound shows the CLI did not wait for a reply.
    rc = main(["--endpoint", f"ipc://{d}/kernel.sock", "--timeout", "600", "status"])
    err = capsys.readouterr().err
    assert rc == 3 and f"ipc://{d}/kernel.sock" in err and "python -m kernel" in err
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(f"{d}/stale.sock")  # a socket file nobody listens on (a kernel that was killed)
    s.close()
    rc = main(["--endpoint", f"ipc://{d}/stale.sock", "--timeout", "600", "status"])
    assert rc == 3 and "nothing is listening" in capsys.readouterr().err
    rc = main(["--endpoint", "tcp://127.0.0.1:1", "--timeout", "600", "status"])
    assert rc == 3 and "nothing is listening at tcp://127.0.0.1:1" in capsys.readouterr().err


def test_first_contact_reads_monitor_events():
    fc = FirstContact("tcp://h:1", curve=True, cert="me.key_secret", server_cert="kernel.key")
    assert "nothing is listening" in fc.on_event(zmq.EVENT_CONNECT_RETRIED).message
    fc = FirstContact("tcp://h:1", curve=True, cert="me.key_secret", server_cert="kernel.key")
    assert fc.on_event(zmq.EVENT_CONNECTED) is None
    assert "me.key_secret" in fc.on_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400).message
    fc = FirstContact("tcp://h:1", curve=True, cert="me.key_secret", server_cert="kernel.key")
    fc.on_event(zmq.EVENT_CONNECTED)
    assert fc.on_event(zmq.EVENT_DISCONNECTED) is None  # once: a kernel over its peer cap does that too
    assert fc.on_event(zmq.EVENT_DISCONNECTED) is None
    assert "RECA_SERVER_CERT=kernel.key" in fc.on_event(zmq.EVENT_DISCONNECTED).message
    fc = FirstContact("ipc:///x/k.sock", curve=False)
    fc.on_event(zmq.EVENT_CONNECTED)
    assert all(fc.on_event(zmq.EVENT_DISCONNECTED) is None for _ in range(5))  # no CURVE: never blamed
    fc = FirstContact("tcp://h:1", curve=False)
    fc.on_event(zmq.EVENT_CONNECTED)
    assert fc.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED) is None and fc.done
    assert fc.on_event(zmq.EVENT_CONNECT_RETRIED) is None  # a later reconnect is no first contact


def test_curve_failures_name_the_certificate(capsys):
    from kernel import keys

    tmp = short_tmpdir()
    kd = os.path.join(tmp, "keys")
    _, alice = keys.new(kd, "alice", "client")
    other = os.path.join(tmp, "other")
    _, mallory = keys.new(other, "mallory", "client")  # a key this kernel does not know
    config = f'[kernel]\nendpoint = "tcp://127.0.0.1:0"\nheartbeat_s = 0.2\n\n[auth]\nkeys = "{kd}"\n'
    k = KernelProcess.from_config(config)
    try:
        right, wrong = os.path.join(kd, "kernel.key"), os.path.join(other, "kernel.key")
        base = ["--endpoint", k.endpoint, "--timeout", "600"]
        assert main([*base, "--cert", alice, "--server-cert", right, "status"]) == 0
        capsys.readouterr()
        assert main([*base, "--cert", mallory, "--server-cert", right, "status"]) == 3
        assert f"refused this client's key (RECA_CERT={mallory}" in capsys.readouterr().err
        assert main([*base, "--cert", alice, "--server-cert", wrong, "status"]) == 3
        assert f"RECA_SERVER_CERT={wrong} is not this kernel's public key" in capsys.readouterr().err
    finally:
        os.environ.pop("RECA_CERT", None)
        os.environ.pop("RECA_SERVER_CERT", None)
        k.stop()


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "clients", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=REPO),
    ).stdout
    for cmd in (
        "call",
        "status",
        "watch",
        "jobs",
        "open",
        "close",
        "cancel",
        "preempt",
        "resume",
        "restart",
        "logs",
        "demo",
    ):
        assert f"    {cmd} " in out, cmd
    out = subprocess.run(
        [sys.executable, "-m", "kernel", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=REPO),
    ).stdout
    assert "kernel replay LOG" in out and "kernel keys new NAME" in out and "docs/config.md" in out


def test_progress_line_shows_partials_elapsed_and_the_budget_bar(capsys):
    from clients.__main__ import Progress, bar
    from clients.core import Reply

    assert bar(0.5, 10) == "[#####-----]" and bar(2.0, 4) == "[####]" and bar(-1, 2) == "[--]"
    progress = Progress("echo", {"flops": 4000.0}, enabled=True)
    progress.update(Reply(False, "partial", None, {"flops": 1000.0}, {}))
    progress.update(Reply(False, "paused", None, {"flops": 2000.0}, {}))
    line = capsys.readouterr().err.split("\r")[-1]
    assert line.startswith("echo: 2 partial(s)") and "[##########----------] flops 2000/4000" in line
    assert "paused by the kernel" in line
    progress.done()
    Progress("echo", None, enabled=False).update(Reply(False, "partial", None, {}, {}))
    assert capsys.readouterr().err.strip("\r ") == ""


def test_progress_bars_only_where_someone_watches(monkeypatch, capsys):
    from clients import progress as pg

    monkeypatch.setenv("RECA_PROGRESS", "0")
    assert list(pg.progress(range(3))) == [0, 1, 2] and capsys.readouterr().err == ""
    monkeypatch.delenv("RECA_PROGRESS")
    monkeypatch.setenv("CI", "true")
    assert not pg.enabled() and list(pg.progress(total=2)) == [0, 1]
    monkeypatch.delenv("CI")
    monkeypatch.setenv("RECA_PROGRESS", "1")
    assert list(pg.progress(["a", "b"], desc="work")) == ["a", "b"]
    assert "work" in capsys.readouterr().err  # tqdm drew its bar on stderr


def test_a_worker_refused_for_its_role_shows_as_not_registered(capsys):
    """Over tcp:// each child's certificate names its own service: a child ``impostor`` running the
    echo module registers as ``echo``, which its role does not allow; the kernel refuses its READY.
    status says the process runs but serves nothing, and its log file says why it keeps trying."""
    from kernel import keys

    tmp = short_tmpdir()
    kd = os.path.join(tmp, "keys")
    _, op = keys.new(kd, "op", "operator")
    config = (
        f'[kernel]\nendpoint = "tcp://127.0.0.1:0"\nheartbeat_s = 0.2\n\n[auth]\nkeys = "{kd}"\n\n'
        + service_block("impostor", "services.echo")
    )
    k = KernelProcess.from_config(config)
    try:
        base = [
            "--endpoint",
            k.endpoint,
            "--timeout",
            "30",
            "--cert",
            op,
            "--server-cert",
            os.path.join(kd, "kernel.key"),
        ]
        with Client(k.endpoint, timeout=30, retries=0, cert=op, server_cert=os.path.join(kd, "kernel.key")) as c:
            wait_until(lambda: c.stats()["counters"].get("forbidden_ready", 0) >= 1, "the READY is refused")
        assert main([*base, "status"]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("impostor "))
        assert row.split()[1:2] == ["running"] and " NO " in row
        log = os.path.join(k.dir, "logs", "impostor.log")
        wait_until(lambda: "disconnected by the kernel" in open(log).read(), "the worker logs the refusal")
        assert main([*base, "logs", "impostor", "--dir", os.path.join(k.dir, "logs")]) == 0
        assert "echo lost the kernel (disconnected by the kernel)" in capsys.readouterr().out
    finally:
        os.environ.pop("RECA_CERT", None)
        os.environ.pop("RECA_SERVER_CERT", None)
        k.stop()
