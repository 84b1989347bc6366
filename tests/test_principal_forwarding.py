"""The kernel forwards the caller's verified principal to the worker (issue 24): set by the kernel
on the header it forwards, replacing anything the client wrote there, and exposed to handlers as
``ctx.principal`` by the worker session."""

from __future__ import annotations

from kernel import codec
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.auth import Principal
from kernel.router import Router
from kernel.worker import WorkerSession

C, W = P.ClientCmd, P.WorkerCmd


def _forwarded(router: Router, sent: list, principal: Principal, header: dict) -> dict:
    router.on_message([b"C1", P.MDPC, C.REQUEST.value, b"echo", codec.pack(header), codec.pack("x")], 0.0, principal)
    (msg,) = [f for f in sent if f[0] == b"W1"]
    sent.clear()
    return codec.unpack(msg[5])


def test_the_worker_gets_the_verified_principal_never_the_clients_own(tmp_path):
    for admission in (None, BudgetAdmission()):
        sent: list = []
        router = Router(lambda f: sent.append(f) or True, admission=admission)
        router.on_message(
            [b"W1", P.MDPW, W.READY.value, b"echo", codec.pack({"capacity": 4})], 0.0, Principal("svc", "service:echo")
        )
        bob = Principal("bob", "client")
        got = _forwarded(
            router, sent, bob, {"v": P.VERSION, "id": 1, P.H_PRINCIPAL: "alice", P.H_GRANTED: {"tokens": 1e9}}
        )
        assert got[P.H_PRINCIPAL] == "bob" and got["id"] == 1
        assert got.get(P.H_GRANTED, {}).get("tokens") != 1e9  # only the kernel grants
        # The worker session hands it to the handler's context.
        session = WorkerSession("echo", lambda frames: None)
        ev = session._on_request([b"tok", b"", codec.pack(got), codec.pack("x")], 0.0)
        assert ev is not None and ev.state.principal == "bob"
        # An opaque (non-reca) body carries none.
        ev = session._on_request([b"tok2", b"", b"raw"], 0.0)
        assert ev is not None and ev.state.principal is None


def test_a_service_acts_for_a_caller_only_while_serving_its_request():
    """Header ``for``: rois repairing alice's decode calls decode *for alice* (so decode finds
    alice's decode); it may do so only while one of its workers serves a request of alice's."""
    sent: list = []
    router = Router(lambda f: sent.append(f) or True)
    svc = Principal("child:rois", "service:rois")
    for ident, name, role in ((b"W1", "rois", svc), (b"W2", "decode", Principal("child:decode", "service:decode"))):
        router.on_message([ident, P.MDPW, W.READY.value, name.encode(), codec.pack({"capacity": 4})], 0.0, role)
    alice, mallory = Principal("alice", "client"), Principal("mallory", "client")

    def call(ident, principal, service, header):
        router.on_message(
            [ident, P.MDPC, C.REQUEST.value, service, codec.pack({"v": P.VERSION, "id": 1, **header}), codec.pack({})],
            0.0,
            principal,
        )

    def forwarded(worker):
        msgs = [f for f in sent if f[0] == worker]
        sent.clear()
        return [codec.unpack(m[5]) for m in msgs]

    def refused(ident):
        msgs = [f for f in sent if f[0] == ident]
        sent.clear()
        return msgs and codec.unpack(msgs[-1][4])["error"]["code"] == "forbidden"

    # Not serving alice yet: refused (and so is a client naming anyone but itself).
    call(b"S1", svc, b"decode", {P.H_FOR: "alice"})
    assert refused(b"S1") and not forwarded(b"W2")
    call(b"M1", mallory, b"decode", {P.H_FOR: "alice"})
    assert refused(b"M1")
    # While rois serves alice: its call for alice reaches decode as alice; for mallory, refused.
    call(b"A1", alice, b"rois", {})
    (got,) = forwarded(b"W1")
    assert got[P.H_PRINCIPAL] == "alice"
    call(b"S1", svc, b"decode", {P.H_FOR: "alice"})
    (got,) = forwarded(b"W2")
    assert got[P.H_PRINCIPAL] == "alice" and P.H_FOR not in got
    call(b"S1", svc, b"decode", {P.H_FOR: "mallory"})
    assert refused(b"S1")
    call(b"S1", svc, b"decode", {})  # on its own account: its own principal
    (got,) = forwarded(b"W2")
    assert got[P.H_PRINCIPAL] == "child:rois"
