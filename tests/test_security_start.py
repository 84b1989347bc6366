"""The kernel refuses to start where it cannot protect itself (issue 13: "tcp:// without
authentication", "the runtime directory is used unchecked"), and clients refuse a socket in a
directory that is not private.  Real ``python -m kernel`` processes."""

from __future__ import annotations

import os
import shutil

import pytest

from clients import Client
from clients.launch import KernelStartError, LocalKernel, kernel_config
from kernel import auth
from tests.support import short_tmpdir

pytestmark = pytest.mark.system

NOBODY = 65534


def _kernel(runtime: str, config: str | None = None) -> LocalKernel:
    """``python -m kernel`` with runtime directory ``runtime`` (its config file kept outside it)."""
    path = os.path.join(os.path.dirname(runtime), "reca.toml")
    with open(path, "w") as fh:
        fh.write(config if config is not None else kernel_config(""))
    return LocalKernel(None, runtime_dir=runtime, extra_args=["--config", path])


def _refused(runtime: str, config: str | None = None) -> str:
    """Start a kernel in ``runtime``; it must exit before serving.  Returns its output."""
    with pytest.raises(KernelStartError) as info:
        _kernel(runtime, config).stop()
    return str(info.value)


@pytest.fixture
def tmp():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_tcp_without_curve_refuses_to_start(tmp):
    out = _refused(os.path.join(tmp, "rt"), kernel_config("", endpoint="tcp://127.0.0.1:0"))
    assert "refusing to start" in out and "CURVE" in out


def test_insecure_tcp_starts_and_says_so_loudly(tmp):
    config = kernel_config("", endpoint="tcp://127.0.0.1:0") + "\n[auth]\ninsecure = true\n"
    k = _kernel(os.path.join(tmp, "rt"), config)
    try:
        assert any("insecure tcp:// without CURVE" in line for line in k.lines)
        with Client(k.endpoint, timeout=10, retries=0) as c:
            assert c.stats()["auth"] == {"curve": False, "principals": 0, "zap_refused": 0}
    finally:
        k.stop()


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o777])
def test_runtime_dir_open_to_others_is_refused(tmp, mode):
    rt = os.path.join(tmp, "rt")
    os.mkdir(rt)
    os.chmod(rt, mode)
    assert "accessible to group or others" in _refused(rt)
    assert os.listdir(rt) == []  # nothing was created in it


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_runtime_dir_of_another_user_is_refused(tmp):
    rt = os.path.join(tmp, "rt")
    os.mkdir(rt, 0o700)
    os.chown(rt, NOBODY, NOBODY)
    assert f"owned by uid {NOBODY}" in _refused(rt)


def test_runtime_dir_that_is_a_symlink_is_refused(tmp):
    real = os.path.join(tmp, "real")
    os.mkdir(real, 0o700)
    link = os.path.join(tmp, "rt")
    os.symlink(real, link)
    assert "is a symlink" in _refused(link)
    assert os.listdir(real) == []


def test_planted_decision_log_symlink_is_not_followed(tmp):
    rt = os.path.join(tmp, "rt")
    os.mkdir(rt, 0o700)
    victim = os.path.join(tmp, "victim")
    with open(victim, "w") as fh:
        fh.write("precious\n")
    os.symlink(victim, os.path.join(rt, "decisions.jsonl"))
    assert "symlink" in _refused(rt)
    with open(victim) as fh:
        assert fh.read() == "precious\n"


def test_fresh_runtime_dir_is_created_private(tmp):
    os.mkdir(os.path.join(tmp, "fresh"))
    rt = os.path.join(tmp, "fresh", "rt")
    k = _kernel(rt)
    try:
        st = os.lstat(rt)
        assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
        log = os.lstat(k.decision_log)
        assert log.st_mode & 0o077 == 0
    finally:
        k.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_client_refuses_a_socket_in_another_users_directory(tmp):
    """A listener planted by another user at the socket path never sees the client's request."""
    rt = os.path.join(tmp, "rt")
    os.mkdir(rt, 0o700)
    os.chown(rt, NOBODY, NOBODY)
    with pytest.raises(auth.UnsafeRuntimeDir, match="owned by uid"):
        Client(f"ipc://{rt}/kernel.sock", timeout=1, retries=0)


def test_client_refuses_a_socket_in_a_world_writable_directory(tmp):
    rt = os.path.join(tmp, "rt")
    os.mkdir(rt)
    os.chmod(rt, 0o777)
    with pytest.raises(auth.UnsafeRuntimeDir, match="group or others"):
        Client(f"ipc://{rt}/kernel.sock", timeout=1, retries=0)


def test_keys_cli_writes_zmq_auth_certificates(tmp):
    import subprocess
    import sys

    import zmq.auth

    from tests.support import REPO

    kd = os.path.join(tmp, "keys")
    run = lambda *a: subprocess.run([sys.executable, "-m", "kernel", "keys", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    assert run("new", "alice", "--role", "client", "--dir", kd).returncode == 0
    assert run("new", "sim-svc", "--role", "service:sim,igms", "--dir", kd).returncode == 0
    bad = run("new", "eve", "--role", "root", "--dir", kd)
    assert bad.returncode == 2 and "unknown role" in bad.stderr
    again = run("new", "alice", "--role", "operator", "--dir", kd)
    assert again.returncode == 2 and "already has a certificate" in again.stderr
    assert run("new", "kernel", "--role", "client", "--dir", kd).returncode == 2
    listed = run("list", "--dir", kd).stdout.splitlines()
    assert [line.split("\t")[:2] for line in listed] == [["alice", "client"], ["kernel", "kernel"],
                                                          ["sim-svc", "service:sim,igms"]]
    # pyzmq reads them; the secret file is private.
    pub, sec = zmq.auth.load_certificate(os.path.join(kd, "alice.key_secret"))
    assert zmq.auth.load_certificate(os.path.join(kd, "alice.key")) == (pub, None) and sec is not None
    assert os.stat(os.path.join(kd, "alice.key_secret")).st_mode & 0o777 == 0o600
    assert len(zmq.auth.load_certificates(kd)) == 3
