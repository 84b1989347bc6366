"""Services on another host: the kernel in this network namespace, a service and clients in a
second namespace joined by a veth pair, over tcp:// with CURVE (issue 13, "What to build" 6).

The namespace, the veth pair and a /30 of 10.231.0.0/16 (picked from this process's pid, so
parallel runs do not collide) are created here and deleted afterwards.  Skipped, with the
reason, only where namespaces cannot be created (not root, no ``ip``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import zmq

from clients import Client
from kernel import keys
from tests.support import REPO, KernelProcess, short_tmpdir
from kernel.logstore import read_records

pytestmark = pytest.mark.system

PEER_TIMEOUT_S = 60
#: How a NULL-mechanism peer sees a CURVE server close on it (libzmq reports either, by timing).
NULL_REFUSED = {"HANDSHAKE_FAILED_PROTOCOL", "HANDSHAKE_FAILED_NO_DETAIL"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture(scope="module")
def netns():
    """``(namespace, kernel address)``: a namespace whose veth end has ``.2`` of a /30 and whose
    other end, in this namespace, has ``.1`` (where the kernel binds)."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces unavailable: no `ip` command")
    tag = os.getpid() % 16384
    ns, host_if, ns_if = f"reca-t{tag}", f"rcv{tag}a", f"rcv{tag}b"
    base = f"10.231.{tag // 64}.{(tag % 64) * 4}"
    host_addr, ns_addr = base[:base.rfind(".") + 1] + str((tag % 64) * 4 + 1), \
        base[:base.rfind(".") + 1] + str((tag % 64) * 4 + 2)
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"network namespaces cannot be created here: {made.stderr.strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_addr
    finally:
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def keydir():
    d = short_tmpdir()
    kd = os.path.join(d, "keys")
    keys.new(kd, "op", "operator")
    keys.new(kd, "echo-svc", "service:echo")
    keys.new(kd, "alice", "client")
    # A key the kernel does not know: made in another directory.
    keys.new(os.path.join(d, "elsewhere"), "stranger", "operator")
    yield d, kd
    shutil.rmtree(d, ignore_errors=True)


def _in_ns(ns: str, *argv: str, **kw) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, *argv]


def _peer(ns: str, *args: str) -> dict:
    out = subprocess.run(_in_ns(ns, "-m", "tests.netns_peer", *args), cwd=REPO, capture_output=True, text=True,
                         timeout=PEER_TIMEOUT_S, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_service_in_another_namespace_over_curve(netns, keydir):
    ns, addr = netns
    d, kd = keydir
    config = textwrap.dedent(f"""
        [kernel]
        endpoint = "tcp://{addr}:0"
        control = "tcp://{addr}:0"
        heartbeat_s = 0.2
        decision_log = "{{runtime}}/decisions.jsonl"
        [auth]
        keys = "{kd}"
    """)
    kern = KernelProcess.from_config(config, extra_args=["--no-services"])
    svc = None
    try:
        cert, server = os.path.join(kd, "echo-svc.key_secret"), os.path.join(kd, "kernel.key")
        svc = subprocess.Popen(_in_ns(ns, "-m", "services.echo", "--endpoint", kern.endpoint, "--control",
                                      kern.control, "--cert", cert, "--server-cert", server, "--heartbeat", "0.2"),
                               cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, RECA_LOG_LEVEL="WARNING"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with Client(kern.endpoint, timeout=20, retries=0, context=zmq.Context.instance(),
                    cert=os.path.join(kd, "op.key_secret"), server_cert=server) as op:
            op.wait_for_service("echo", 30)
            workers = op.stats()["workers"]
            # The one echo worker is the process in the other namespace, on its service key (the
            # kernel runs no services of its own).  The pid it declared is not kept: the kernel
            # cannot verify a pid of a peer that is not its supervised child (on another host it
            # would name some other process), so it does not measure that worker's CPU.
            assert [(w["service"], w["pid"]) for w in workers] == [("echo", None)]

            alice = [os.path.join(kd, "alice.key_secret"), server]
            # A client in the namespace, on its client key: served by that worker.
            assert _peer(ns, "call", kern.endpoint, "echo", *alice) == {"result": {"x": 1}}
            # No certificate: the CURVE server refuses the NULL greeting; a key the kernel does
            # not know: ZAP refuses it.  Neither reaches the router.
            before = op.stats()["counters"]
            assert _peer(ns, "handshake", kern.endpoint, "dealer")["event"] in NULL_REFUSED
            stranger = [os.path.join(d, "elsewhere", "stranger.key_secret"), server]
            assert _peer(ns, "handshake", kern.endpoint, "dealer", *stranger)["event"] == "HANDSHAKE_FAILED_AUTH"
            # The control PUB: anonymous and client subscribers get nothing; a service may listen.
            assert _peer(ns, "handshake", kern.control, "sub")["event"] in NULL_REFUSED
            assert _peer(ns, "handshake", kern.control, "sub", *alice)["event"] == "HANDSHAKE_FAILED_AUTH"
            assert _peer(ns, "handshake", kern.control, "sub", cert, server)["event"] == "HANDSHAKE_SUCCEEDED"
            # A client key trying to register as echo: authenticated, but READY is refused with a
            # DISCONNECT and the worker table is unchanged.
            reg = _peer(ns, "register", kern.endpoint, "echo", *alice)
            assert reg["event"] == "HANDSHAKE_SUCCEEDED"
            assert reg["reply"] == [b"MDPW02".hex(), b"\x06".hex()]
            after = op.stats()
            assert [(w["service"], w["pid"]) for w in after["workers"]] == [("echo", None)]
            assert after["counters"].get("forbidden_ready", 0) == before.get("forbidden_ready", 0) + 1
            assert after["auth"]["zap_refused"] >= 2  # the stranger and the client subscriber
            # The refusal is a decision in the log.
            op.call("mmi.stats")  # flushes the log
        refused = [r for r in read_records(kern.decision_log) if r["op"] == "forbidden"]
        assert any(r["in"].get("principal") == "alice" and r["in"].get("op") == "ready" for r in refused)
    finally:
        if svc is not None:
            svc.terminate()
            svc.wait(20)
        kern.stop()
