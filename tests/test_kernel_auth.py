"""Unit tests of principals, roles, certificates, the runtime-directory checks and the router's
per-message principal (no sockets; time passed in)."""

from __future__ import annotations

import os
import shutil

import pytest
import zmq
import zmq.auth

from kernel import auth, codec, keys
from kernel import protocol as P
from tests.support import short_tmpdir
from kernel.router import Router
from tests.test_kernel_router import Wire

W = P.WorkerCmd


@pytest.fixture
def tmp():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("text,want", [("operator", "operator"), (" client ", "client"),
                                       ("service:sim", "service:sim"), ("service:sim, igms", "service:sim,igms")])
def test_roles_parse(text, want):
    assert auth.parse_role(text) == want


@pytest.mark.parametrize("bad", ["root", "", "service:", "service:mmi.stats", "service:a b", "kernel", 7, None])
def test_unknown_roles_are_refused(bad):
    with pytest.raises(ValueError):
        auth.parse_role(bad)


def test_what_each_role_may_serve_and_audit():
    op, client = auth.Principal("o", "operator"), auth.Principal("c", "client")
    svc = auth.Principal("s", "service:sim,igms")
    assert op.may_serve("anything") and op.may_audit("kernel")
    assert not client.may_serve("sim") and not client.may_audit("client")
    assert svc.may_serve("sim") and svc.may_serve("sim@123") and svc.may_serve("igms")
    assert not svc.may_serve("simx") and not svc.may_serve("echo") and not svc.may_serve("sims@1")
    assert svc.may_audit("igms") and not svc.may_audit("ttc")


def test_certificates_round_trip_in_zmq_auth_format(tmp):
    kd = os.path.join(tmp, "keys")
    public_path, secret_path = keys.new(kd, "alice", "service:ttc")
    cert = auth.read_certificate(public_path)
    assert (cert.name, cert.role) == ("alice", "service:ttc")
    pub, sec = zmq.auth.load_certificate(secret_path)
    assert pub == cert.public and sec is not None
    assert zmq.utils.z85.decode(pub) and len(zmq.utils.z85.decode(sec)) == 32
    assert os.stat(secret_path).st_mode & 0o777 == 0o600
    assert {c.name for c in auth.list_certificates(kd)} == {"alice", "kernel"}
    with pytest.raises(auth.AuthError, match="already"):
        keys.new(kd, "alice", "client")
    with pytest.raises(auth.AuthError, match="bad principal name"):
        keys.new(kd, "../evil", "client")


def test_principals_reload_revokes_and_ignores_bad_files(tmp):
    kd = os.path.join(tmp, "keys")
    keys.new(kd, "alice", "client")
    keys.new(kd, "bob", "operator")
    table = auth.Principals(kd)
    alice = auth.read_certificate(os.path.join(kd, "alice.key"))
    assert table.by_key(alice.public) == auth.Principal("alice", "client")
    assert table.by_name("bob").operator and table.by_name("kernel") is None  # the kernel is no peer
    assert not table.reload()  # nothing changed
    os.unlink(os.path.join(kd, "alice.key"))
    with open(os.path.join(kd, "junk.key"), "w") as fh:
        fh.write("not a certificate\n")
    assert table.reload()
    assert table.by_key(alice.public) is None and table.by_name("alice") is None
    assert table.by_name("junk") is None and table.by_name("bob") is not None
    child = table.add_child("child:echo#0", "service:echo", b"x" * 40)
    assert table.by_key(b"x" * 40) is child
    os.unlink(os.path.join(kd, "bob.key"))
    table.reload()
    assert table.by_name("child:echo#0") is child  # children survive a reload of the directory


def test_zap_callback_admits_known_keys_and_control_only_to_services(tmp):
    kd = os.path.join(tmp, "keys")
    keys.new(kd, "alice", "client")
    keys.new(kd, "svc", "service:echo")
    table = auth.Principals(kd)
    from kernel.zap import ZapHandler

    zap = ZapHandler(zmq.Context.instance(), table)
    alice = auth.read_certificate(os.path.join(kd, "alice.key")).public
    svc = auth.read_certificate(os.path.join(kd, "svc.key")).public
    assert zap.callback(auth.ZAP_DOMAIN_ROUTER, alice) and zap.callback(auth.ZAP_DOMAIN_ROUTER, svc)
    assert not zap.callback(auth.ZAP_DOMAIN_CONTROL, alice) and zap.callback(auth.ZAP_DOMAIN_CONTROL, svc)
    assert not zap.callback(auth.ZAP_DOMAIN_ROUTER, zmq.curve_keypair()[0])
    assert zap.refused == 2
    assert zap.curve_user_id(zmq.utils.z85.decode(alice)) == "alice"


def test_peer_credentials_need_both_files(tmp, monkeypatch):
    kd = os.path.join(tmp, "keys")
    keys.new(kd, "alice", "client")
    monkeypatch.delenv(auth.ENV_CERT, raising=False)
    monkeypatch.delenv(auth.ENV_SERVER_CERT, raising=False)
    assert auth.peer_credentials() is None
    with pytest.raises(auth.AuthError, match="both"):
        auth.peer_credentials(os.path.join(kd, "alice.key_secret"))
    monkeypatch.setenv(auth.ENV_CERT, os.path.join(kd, "alice.key_secret"))
    monkeypatch.setenv(auth.ENV_SERVER_CERT, os.path.join(kd, "kernel.key"))
    creds = auth.peer_credentials()
    assert creds.server == auth.read_certificate(os.path.join(kd, "kernel.key")).public
    with pytest.raises(auth.AuthError, match="no secret"):
        auth.peer_credentials(os.path.join(kd, "alice.key"), os.path.join(kd, "kernel.key"))


def test_private_dir_checks(tmp):
    d = os.path.join(tmp, "new", "rt")
    os.mkdir(os.path.join(tmp, "new"))
    auth.ensure_private_dir(d)
    assert os.stat(d).st_mode & 0o777 == 0o700
    auth.ensure_private_dir(d)  # an existing private one is fine
    os.chmod(d, 0o710)
    with pytest.raises(auth.UnsafeRuntimeDir, match="group or others"):
        auth.ensure_private_dir(d)
    os.chmod(d, 0o700)
    link = os.path.join(tmp, "link")
    os.symlink(d, link)
    with pytest.raises(auth.UnsafeRuntimeDir, match="symlink"):
        auth.ensure_private_dir(link)
    target = os.path.join(tmp, "target")
    open(target, "w").close()
    os.symlink(target, os.path.join(d, "log"))
    with pytest.raises(auth.UnsafeRuntimeDir, match="symlink"):
        auth.open_append(os.path.join(d, "log"))
    with auth.open_append(os.path.join(d, "real")) as fh:
        fh.write("x")
    assert os.stat(os.path.join(d, "real")).st_mode & 0o777 == 0o600


# -- the router and the per-message principal --------------------------------------------------

ALICE = auth.Principal("alice", "client")
SVC = auth.Principal("svc", "service:echo")


@pytest.fixture
def rw() -> tuple[Router, Wire]:
    wire = Wire()
    return Router(wire, heartbeat_interval=1.0, liveness=3, unavailable_wait=2.0), wire


def test_ready_is_accepted_only_for_the_principals_services(rw):
    router, wire = rw
    router.on_message([b"W1", P.MDPW, W.READY.value, b"echo", codec.pack({"capacity": 4096})], 0.0, ALICE)
    assert wire.to(b"W1") == [[b"W1", P.MDPW, W.DISCONNECT.value]]
    router.on_message([b"W2", P.MDPW, W.READY.value, b"sim"], 0.0, SVC)
    assert wire.to(b"W2") == [[b"W2", P.MDPW, W.DISCONNECT.value]]
    assert router.workers == {} and router.counters["forbidden_ready"] == 2
    router.on_message([b"W3", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    assert list(router.workers) == [b"W3"] and router.workers[b"W3"].principal == SVC


def test_a_routing_id_reused_by_another_principal_is_not_that_worker(rw):
    router, wire = rw
    router.on_message([b"W1", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    router.on_message([b"C1", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", b"x"], 0.0, ALICE)
    (req,) = wire.to(b"W1")
    # Another principal's message on W1's routing id: a forged FINAL is not delivered.
    router.on_message([b"W1", P.MDPW, W.FINAL.value, req[3], b"", b"forged"], 0.1, ALICE)
    client = wire.to(b"C1")
    assert all(b"forged" not in m for m in client)
    assert b"W1" not in router.workers  # the real worker is dropped: its request failed at once
    assert client and codec.unpack(client[-1][-1])["error"]["code"] == "worker_died"


def test_revoked_principals_get_forbidden_and_their_workers_are_dropped(rw):
    router, wire = rw
    router.on_message([b"W1", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    router.revoke(lambda name: name != "svc", 1.0)
    assert router.workers == {} and wire.to(b"W1")[-1] == [b"W1", P.MDPW, W.DISCONNECT.value]
    gone = auth.Principal("alice", auth.REVOKED)
    router.on_message([b"C1", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", b"x"], 1.0, gone)
    (reply,) = wire.to(b"C1")
    assert codec.unpack(reply[-1])["error"]["code"] == "forbidden"
