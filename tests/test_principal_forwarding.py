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
