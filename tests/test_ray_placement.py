"""Ray placement (issue 28): the pure parts, the config rows, and a kernel whose Ray cluster cannot
be reached (that service is ``unavailable`` with the reason; the rest of reca runs).

The multi-node cluster tests are in tests/test_ray_cluster.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from kernel import config, errors
from kernel.rayplace import LABEL_KEY, PlacementUnavailable, RayResources, parse_label, remote_endpoint
from tests.ray_support import curve_kernel, kernel_toml

#: Ray gives up on an unreachable GCS after about 20 s; the supervisor retries with its back-off.
UNAVAILABLE_S = 180.0


def test_resources_become_actor_options():
    assert RayResources().options() == {"num_cpus": 1.0, "num_gpus": 0.0}
    opts = RayResources(0.5, 1.0, 1 << 30, "gpu-box").options()
    assert opts == {"num_cpus": 0.5, "num_gpus": 1.0, "memory": 1 << 30, "label_selector": {LABEL_KEY: "gpu-box"}}


def test_labels():
    assert parse_label("w1") == (LABEL_KEY, "w1")
    assert parse_label("zone=eu") == ("zone", "eu")
    for bad in ("", "=x", "k="):
        with pytest.raises(ValueError):
            parse_label(bad)


def test_remote_endpoint():
    assert remote_endpoint("tcp://10.0.0.1:5555", None) == "tcp://10.0.0.1:5555"
    assert remote_endpoint("tcp://127.0.0.1:5555", "10.1.2.3") == "tcp://10.1.2.3:5555"
    with pytest.raises(PlacementUnavailable, match="tcp://"):
        remote_endpoint("ipc:///tmp/k.sock", None)


def _parse(text: str) -> config.KernelConfig:
    import tomllib

    return config.parse(tomllib.loads(textwrap.dedent(text)), runtime="/tmp/rt", source="t.toml")


def test_config_rows():
    cfg = _parse("""
        [ray]
        address = "10.0.0.1:6379"
        token_path = "/etc/ray/token"
        [[service]]
        name = "echo"
        module = "services.echo"
        placement = "ray"
        replicas = 2
        ray_num_cpus = 0.5
        ray_label = "w1"
        [[service]]
        name = "plain"
        module = "services.echo"
    """)
    assert cfg.ray is not None and cfg.ray.address == "10.0.0.1:6379" and cfg.ray.token_path == "/etc/ray/token"
    assert [(s.name, s.placement) for s in cfg.services] == [("echo#0", "ray"), ("echo#1", "ray"), ("plain", "local")]
    assert cfg.ray_resources == {"echo": RayResources(0.5, 0.0, None, "w1")}


@pytest.mark.parametrize(
    "text, where",
    [
        ('[[service]]\nname = "e"\nmodule = "m"\nplacement = "ray"\n', "needs a [ray] table"),
        ('[[service]]\nname = "e"\nmodule = "m"\nray_num_cpus = 1.0\n', "ray_num_cpus"),
        ('[ray]\nlocal = true\naddress = "h:1"\n', "local"),
        (
            '[ray]\nlocal = true\n[[service]]\nname = "e"\nmodule = "m"\nplacement = "ray"\nray_label = "=x"\n',
            "ray_label",
        ),
        ("[ray]\nport = 1\n", "unknown key 'port'"),
        ('[[service]]\nname = "e"\nmodule = "m"\nplacement = "k8s"\n', "placement"),
    ],
)
def test_config_refusals(text, where):
    with pytest.raises(config.ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        _parse(text)


@pytest.mark.system
@pytest.mark.timeout(600)
def test_unreachable_cluster_leaves_the_service_unavailable_and_the_rest_running():
    k = curve_kernel(
        lambda kd: kernel_toml(
            kd,
            """
            address = "127.0.0.1:1"
            connect_timeout_s = 5.0
            """,
            f"""
            [[service]]
            name = "far"
            module = "services.echo"
            placement = "ray"
            [[service]]
            name = "near"
            command = ["{sys.executable}", "-m", "services.echo", "--name", "near"]
            """,
            liveness=10,
            unavailable_wait_s=1.0,
            intensity=2,
            backoff_initial_s=0.1,
        )
    )
    try:
        with k.client(60) as c:
            c.wait_for_service("near", 60)
            assert c.call("near", {"x": 1}) == {"x": 1}
            deadline = time.monotonic() + UNAVAILABLE_S
            far = None
            while time.monotonic() < deadline:
                far = next(ch for ch in c.stats()["children"] if ch["name"] == "far")
                if far["reason"]:
                    break
                time.sleep(1.0)
            assert far is not None and far["reason"].startswith("unavailable: Ray cluster 127.0.0.1:1 unreachable")
            with pytest.raises(errors.RecaError) as info:
                c.call("far", 1)
            assert info.value.code == "unavailable"
            assert c.call("near", 2) == 2  # still served
    finally:
        k.stop(timeout=60)


#: Run in a child process (the agent opens an enforcer on this host; pytest never joins a group):
#: a node agent's service left SIGSTOPped, as the agent's fallback leaves it when a cgroup freeze
#: is not confirmed in time (its group stays THAWED), then the agent's thaw.  Prints one JSON line.
_SIGSTOP_FALLBACK = r"""
import json, os, signal, sys, time
import zmq
from kernel.rayplace import ServiceAgent

def state(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return None

def wait_for(pred, bound=20.0):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline and not pred():
        time.sleep(0.01)
    return pred()

agent = ServiceAgent("sigstop-fallback", "service")
public, _ = zmq.curve_keypair()
info = agent.start([sys.executable, "-c", "import time\nwhile True: time.sleep(0.005)"], {}, public.decode(),
                   {"backend": "auto"})
pid = info["pid"]
try:
    os.killpg(pid, signal.SIGSTOP)
    stopped = wait_for(lambda: state(pid) in ("T", "t"))
    frozen_group = agent.frozen()
    sent = agent.signal(signal.SIGCONT)
    resumed = wait_for(lambda: state(pid) not in ("T", "t", None))
    print(json.dumps({"backend": info["enforcer"]["backend"], "stopped": stopped, "group_frozen": frozen_group,
                      "sent": sent, "resumed": resumed, "state": state(pid)}))
finally:
    agent.stop(5.0)
"""


def test_the_agents_thaw_resumes_a_service_its_freeze_fallback_left_sigstopped():
    """Regression (bench ray at load ~20): a remote freeze not confirmed in time falls back to
    SIGSTOP of the service's process group; the thaw then only thawed the (THAWED) cgroup, and the
    worker stayed stopped for good.  The thaw also sends SIGCONT now (kernel/rayplace.py
    ``ServiceAgent.signal``).  No Ray needed: the agent class runs as a plain object."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-c", _SIGSTOP_FALLBACK], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["stopped"] is True, got
    assert got["group_frozen"] in (False, None), got  # the cgroup itself never froze: only SIGSTOP
    assert got["sent"] is True and got["resumed"] is True, got
