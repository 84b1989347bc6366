"""The live view (services/view): its model with a fake clock, its access token, and the page in
headless Chromium against a real ``python -m kernel`` — a job opened by a client appears and its
bar moves as the job spends.  The screenshot docs/img/view.png comes from this test."""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request

import pytest

from clients import Client
from kernel import errors
from services.view.model import ViewModel
from tests.support import REPO, kernel_fixture, service_block

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = os.path.join(REPO, "docs", "img", "view.png")


def _stats(restarts=0, state="running", refused=0, spent=0.0, exhausted=None):
    return {
        "health": "degraded" if state == "given_up" else "ready",
        "summary": {"workers": 1},
        "services": {"echo": {"workers": 1, "queued": 2, "inflight": 1}},
        "children": [
            {
                "name": "echo#0",
                "state": state,
                "pid": 10 + restarts,
                "restarts": restarts,
                "reason": "exit 1: boom" if restarts else None,
            }
        ],
        "counters": {"refused": refused},
        "jobs": {
            "j": {
                "limits": {"flops": 5000.0, "wall_ms": 1e6},
                "spent": {"flops": spent, "wall_ms": 0.0},
                "owner": "me",
                "parent": "root",
                "running": 1,
                "exhausted": exhausted,
            }
        },
    }


def test_model_turns_changes_into_events_and_jobs_into_bars():
    m = ViewModel(max_events=3)
    m.on_stats(_stats(), 1.0)
    m.on_stats(_stats(), 2.0)
    assert m.state()["events"] == []  # the same snapshot twice: nothing happened
    job = m.state()["jobs"][0]
    assert job["kind"] == "flops" and job["burn"] == 0.0
    m.on_stats(_stats(restarts=1, refused=2, spent=2500.0), 3.0)
    kinds = [e["kind"] for e in m.state()["events"]]
    assert kinds == ["restart", "refusal"] and "exit 1: boom" in m.state()["events"][0]["text"]
    assert m.state()["jobs"][0]["burn"] == 0.5
    assert m.state()["children"][0]["worker"] == "NO"  # running, but no worker of its pid registered
    m.on_stats(_stats(restarts=1, state="given_up", refused=2, spent=5000.0, exhausted="flops"), 4.0)
    events = m.state()["events"]
    assert len(events) == 3 and events[-1]["text"] == "job 'j' ran out of flops" and m.state()["health"] == "degraded"
    m.on_control("ctl/echo/preempt", {"job": "j"}, 5.0)
    m.on_control("ctl/echo/cancel", {"token": b"\x01\x02"}, 6.0)
    m.on_control("ctl/echo/fidelity", {"level": 1}, 7.0)  # not an event of the page
    assert [e["text"] for e in m.state()["events"][-2:]] == ["preempt job 'j' on echo", "cancel request 0102 on echo"]


kern = kernel_fixture(
    service_block("echo", "services.echo", replicas=2)
    + service_block("view", "services.view", args=["--poll", "0.2"])
    + service_block("work", "services.cpcs.work", replicas=2)
    + service_block("cpcs", "services.cpcs"),
    liveness=10,  # a 2 s window: this shared machine stalls processes
)


def _url(kern) -> str:
    with Client(kern.endpoint, timeout=30, retries=0) as c:
        c.wait_for_service("view", 30)
    with open(os.path.join(kern.dir, "view.url"), encoding="utf-8") as fh:
        return fh.read().strip()


@pytest.mark.system
def test_the_page_needs_its_token(kern):
    url = _url(kern)
    assert os.stat(os.path.join(kern.dir, "view.url")).st_mode & 0o077 == 0
    base, token = url.split("?token=")
    for path in ("", "state", "events"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + path, timeout=10)
        assert info.value.code == 401
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}{path}?token=wrong{token}", timeout=10)
    with urllib.request.urlopen(f"{base}state?token={token}", timeout=10) as resp:
        assert resp.status == 200 and b'"services"' in resp.read()


needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium and chromium-driver are not installed "
    "(./dev setup installs them: apt-get install chromium chromium-driver)",
)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,560"):
        options.add_argument(arg)
    return webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's page tests: a launch costs seconds of CPU on a busy
    machine, and each test loads the page afresh (``driver.get``)."""
    driver = _browser()
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


@pytest.mark.system
@needs_chromium
def test_in_chromium_a_new_job_appears_and_its_bar_moves(kern, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = _url(kern)
    driver = browser
    driver.get(url)
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "health").text == "ready")
    with Client(kern.endpoint, timeout=30, retries=0) as c:
        c.open_job("ui-job", {"flops": 40_000})
        row = '[data-job="ui-job"] .fill'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))  # the new job appears

        def burn() -> float:  # read in one script: the page redraws its rows on every update
            value = driver.execute_script(
                "const e = document.querySelector(arguments[0]); return e ? e.dataset.burn : null", row
            )
            return -1.0 if value is None else float(value)

        assert burn() == 0.0
        for _ in range(2):
            c.call("echo", {"steps": 5, "step_ms": 1}, job="ui-job")  # 5,000 flops each
        wait.until(lambda d: burn() >= 0.25)  # the bar moved: 10,000 of 40,000
        c.call("echo", {"steps": 10, "step_ms": 1}, job="ui-job")
        wait.until(lambda d: burn() >= 0.5)  # and moves on as the job spends
        width = driver.execute_script("return document.querySelector(arguments[0]).getBoundingClientRect().width", row)
        assert width > 0
        # An order on the bus shows as it happens.  An order needs a request of the job in
        # flight (not_found otherwise): a longer call runs on a second client meanwhile.
        import threading

        def long_call() -> None:
            with Client(kern.endpoint, timeout=60, retries=0) as c2:
                c2.call("echo", {"steps": 10, "step_ms": 300}, job="ui-job")  # 10,000 of the 25,000 left

        runner = threading.Thread(target=long_call, daemon=True)
        runner.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                c.call("mmi.preempt", {"job": "ui-job"})
                break
            except errors.NotFound:  # not in flight yet (bounded wait)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        wait.until(lambda d: "preempt job 'ui-job'" in d.find_element(By.ID, "events").text)
        time.sleep(0.5)  # let the bar's transition finish before the picture (not an assertion)
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        driver.save_screenshot(SCREENSHOT)
        c.call("mmi.resume", {"job": "ui-job"})
        runner.join(60)
    assert os.path.getsize(SCREENSHOT) > 10_000


@pytest.mark.system
@needs_chromium
def test_in_chromium_the_page_keeps_up_with_a_thousand_jobs(kern, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = _url(kern)
    with Client(kern.endpoint, timeout=30, retries=0) as c:
        for i in range(1000):
            c.open_job(f"many-{i:04d}", {"flops": 1000 + i})
    driver = browser
    driver.get(url)
    wait = WebDriverWait(driver, 120, poll_frequency=0.2)
    wait.until(lambda d: "more" in d.find_element(By.ID, "jobs-more").text)
    jobs = int(driver.find_element(By.ID, "summary").text.split(" jobs")[0].rsplit("· ", 1)[-1])
    assert jobs >= 1000
    rows = driver.execute_script("return document.querySelectorAll('#jobs tbody tr').length")
    assert rows == 500  # drawn; the rest counted
    first = driver.execute_script("return window.recaRenders")
    wait.until(lambda d: d.execute_script("return window.recaRenders") >= first + 3)  # it keeps updating
    print(f"render of {jobs} jobs: {driver.execute_script('return window.recaRenderMs'):.1f} ms")


def test_model_follows_the_latest_cpcs_run_from_the_decision_log():
    import json

    def audit(event):
        return json.dumps({"op": "audit", "input": {"source": "cpcs", "event": event}, "output": {"ok": True}})

    m = ViewModel()
    assert not m.on_log_line(json.dumps({"op": "charge", "input": {"job": "j"}}), 0.0)
    assert m.state()["gantt"] is None
    old = [{"t": 0.0, "ev": "submit"}, {"t": 0.1, "ev": "start", "task": "old", "worker": "work@0"}]
    new = [
        {"t": 0.0, "ev": "submit"},
        {"t": 0.0, "ev": "dispatch", "task": "a", "critical": True},
        {"t": 0.1, "ev": "start", "task": "a", "worker": "work@0"},
        {"t": 0.2, "ev": "start", "task": "b", "worker": "work@1"},
        {"t": 0.3, "ev": "paused", "task": "b", "worker": "work@1"},
        {"t": 0.5, "ev": "done", "task": "a"},
    ]
    for event in old + new:
        assert m.on_log_line(audit(event), 0.0)
    g = m.state()["gantt"]
    assert g["rows"] == ["work@0", "work@1"] and g["tasks"] == 2 and not g["done"]  # the old run is gone
    bars = {(s["task"], s["kind"]): s for s in g["segments"]}
    assert bars[("a", "run")]["critical"] and (bars[("a", "run")]["start"], bars[("a", "run")]["end"]) == (0.1, 0.5)
    assert ("b", "paused") in bars
    m.on_log_line(audit({"t": 0.9, "ev": "done", "task": "b"}), 0.0)
    assert m.state()["gantt"]["done"]


def test_the_views_gantt_reads_events_as_cpcs_own_chart_does():
    from services.cpcs import gantt
    from services.view.model import segments

    events = [
        {"t": 0.0, "ev": "submit"},
        {"t": 0.0, "ev": "dispatch", "task": "a", "critical": True},
        {"t": 0.1, "ev": "start", "task": "a", "worker": "w0"},
        {"t": 0.2, "ev": "start", "task": "b", "worker": "w1"},
        {"t": 0.3, "ev": "paused", "task": "b", "worker": "w1"},
        {"t": 0.4, "ev": "resumed", "task": "b", "worker": "w1"},
        {"t": 0.5, "ev": "failed", "task": "a"},
        {"t": 0.6, "ev": "start", "task": "a", "worker": "w0"},
        {"t": 0.7, "ev": "lost", "task": "b"},
        {"t": 0.9, "ev": "done", "task": "a"},
        {"t": 1.0, "ev": "start", "task": "c", "worker": "w1"},
    ]
    assert segments(events) == gantt.segments(events)


@pytest.mark.system
@needs_chromium
def test_in_chromium_a_cpcs_run_draws_its_gantt_chart_live(kern, browser):
    import threading

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = _url(kern)
    tasks = [
        {"id": tid, "service": "work", "eta_s": 0.4, "deps": deps, "payload": {"ms": 400, "steps": 20}}
        for tid, deps in (("load", []), ("fit", ["load"]), ("plot", ["load"]), ("report", ["fit", "plot"]))
    ]
    out: dict = {}

    def run() -> None:
        with Client(kern.endpoint, timeout=60, retries=0) as c:
            for name in ("cpcs", "work@0", "work@1"):
                c.wait_for_service(name, 60)
            out["result"] = c.call("cpcs", {"dag": {"tasks": tasks}}, timeout=60)

    driver = browser
    thread = threading.Thread(target=run)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120, poll_frequency=0.1)
        thread.start()
        bars = "return [...document.querySelectorAll('#gantt .seg')].map(e => e.dataset.task)"
        wait.until(lambda d: d.execute_script(bars))  # the first bar shows while the run goes on
        wait.until(lambda d: set(d.execute_script(bars)) >= {"load", "fit", "plot", "report"})
        wait.until(lambda d: "(done)" in d.find_element(By.ID, "gantt-head").text)
        thread.join(60)
        assert out["result"]["states"] == {"done": 4}
        driver.execute_script("document.getElementById('gantt-box').scrollIntoView()")
        driver.save_screenshot(os.path.join(REPO, "docs", "img", "view-gantt.png"))
    finally:
        thread.join(60)


@pytest.mark.system
def test_over_tcp_the_view_polls_with_an_operator_certificate_and_sees_every_job():
    import json

    from kernel import keys
    from tests.support import KernelProcess, short_tmpdir

    tmp = short_tmpdir()
    kd = os.path.join(tmp, "keys")
    _, op = keys.new(kd, "op", "operator")
    _, alice = keys.new(kd, "alice", "client")
    server = os.path.join(kd, "kernel.key")
    config = (
        f'[kernel]\nendpoint = "tcp://127.0.0.1:0"\nheartbeat_s = 0.2\n\n[auth]\nkeys = "{kd}"\n\n'
        + service_block("view", "services.view", args=["--poll", "0.2", "--operator-cert", op])
    )
    k = KernelProcess.from_config(config)
    try:
        with Client(k.endpoint, timeout=30, retries=0, cert=alice, server_cert=server) as c:
            c.open_job("alice-job", {"flops": 1000})
        with Client(k.endpoint, timeout=30, retries=0, cert=op, server_cert=server) as c:
            c.wait_for_service("view", 30)
        with open(os.path.join(k.dir, "view.url"), encoding="utf-8") as fh:
            base, token = fh.read().strip().split("?token=")

        def jobs() -> set:
            with urllib.request.urlopen(f"{base}state?token={token}", timeout=10) as resp:
                return {j["name"] for j in json.loads(resp.read()).get("jobs", [])}

        deadline = time.monotonic() + 60
        while "alice-job" not in jobs():  # bounded: the view polls every 0.2 s
            assert time.monotonic() < deadline, "the view never showed alice's job"
            time.sleep(0.1)
    finally:
        k.stop()
