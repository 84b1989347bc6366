"""The kernel core's structure and its pure parts: no import cycle inside kernel/, the pure
modules touch no sockets, processes or randomness of their own, MDP is parsed once into typed
events against the declared tables, and the router's invariants hold (driven with a fake host)."""

from __future__ import annotations

import ast
import pathlib

import pytest

from kernel import codec, errors, mdp
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.host import FakeHost
from kernel.mmi import Management
from kernel.policy import Order
from kernel.router import Router
from tests.support import Wire

KERNEL = pathlib.Path(__file__).resolve().parent.parent / "kernel"
#: The pure core: time is passed in, the machine comes through kernel.host.
PURE = ("admission", "codec", "errors", "ledger", "mdp", "mmi", "policy", "principal", "protocol", "router", "state")
#: What no pure module may import (sockets, processes, clocks, randomness, files).
IMPURE = {"zmq", "psutil", "os", "random", "secrets", "time", "socket", "asyncio", "subprocess"}


def kernel_imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at any depth (TYPE_CHECKING blocks and functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            if node.module == "kernel":
                out |= {f"kernel.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    mods = {p.stem for p in KERNEL.glob("*.py")}
    return {
        p.stem: {m.split(".")[1] for m in kernel_imports(p) if m.startswith("kernel.") and m.split(".")[1] in mods}
        - {p.stem}
        for p in KERNEL.glob("*.py")
    }


def test_no_import_cycle_inside_the_kernel():
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for mod in sorted(g):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []
    assert g["router"] >= {"mdp", "policy", "state"} and "router" not in g["admission"] | g["mmi"]


@pytest.mark.parametrize("module", PURE)
def test_the_pure_core_imports_no_io(module):
    bad = {m for m in kernel_imports(KERNEL / f"{module}.py") if m.split(".")[0] in IMPURE}
    assert bad == set()


def test_the_checker_sees_a_cycle(tmp_path):
    """The cycle check can fail: the old triangle router -> mmi -> admission -> router is one."""
    g = {"router": {"mmi"}, "mmi": {"admission"}, "admission": {"router"}}
    seen, stack, found = set(), [], []

    def visit(n):
        stack.append(n)
        seen.add(n)
        for m in g[n]:
            if m in stack:
                found.append(stack[stack.index(m) :] + [m])
            elif m not in seen:
                visit(m)
        stack.pop()

    visit("router")
    assert found == [["router", "mmi", "admission", "router"]]


# -- MDP: one parse, typed events -------------------------------------------------------------------


def test_both_dialects_parse_into_the_same_events():
    hdr = codec.pack({"v": 1, "id": 7, "job": "j", "priority": 3, "deadline": 50, "budget": {"tokens": 5}})
    spec = mdp.parse([b"C", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", hdr, b"x"])
    maj = mdp.parse([b"C", b"", P.MDPC, P.MajortomoClientCmd.REQUEST.value, b"echo", hdr, b"x"])
    for ev, form in ((spec, mdp.Form.SPEC), (maj, mdp.Form.MAJORTOMO)):
        assert isinstance(ev, mdp.Request) and ev.form is form and ev.service == b"echo"
        assert ev.checked is not None and ev.bad is None
        assert (ev.checked.id, ev.checked.job, ev.checked.priority, ev.checked.deadline) == (7, "j", 3, 50)
        assert ev.checked.budget == {"tokens": 5} and ev.rid == 7
    ready = mdp.parse([b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": 4, "pid": 9})])
    assert ready == mdp.Ready(b"W", mdp.Form.SPEC, b"echo", 4, 9)
    final = mdp.parse([b"W", b"", P.MDPW, P.WorkerCmd.FINAL.value, b"tok", b"", b"s", b"p"])
    assert final == mdp.Reply(b"W", mdp.Form.MAJORTOMO, b"tok", [b"s", b"p"], True)
    assert isinstance(mdp.parse([b"W", P.MDPW, P.WorkerCmd.HEARTBEAT.value]), mdp.Heartbeat)
    assert isinstance(mdp.parse([b"W", P.MDPW, P.WorkerCmd.DISCONNECT.value]), mdp.Disconnect)


@pytest.mark.parametrize(
    "frames, kind, why",
    [
        ([b"X"], mdp.Unreadable, "fewer than two frames"),
        ([b"X", b"HELLO"], mdp.Unreadable, "unknown protocol header"),
        ([b"X", b""], mdp.Unreadable, "empty message"),
        ([b"X", P.MDPC], mdp.BadClient, "without command"),
        ([b"X", P.MDPC, b"\x09", b"echo"], mdp.BadClient, "unexpected client command"),
        ([b"X", P.MDPC, P.ClientCmd.REQUEST.value, b""], mdp.BadClient, "service name"),
        ([b"X", P.MDPW], mdp.BadWorker, "without command"),
        ([b"X", P.MDPW, b"\x42"], mdp.BadWorker, "unknown worker command"),
        ([b"X", P.MDPW, P.WorkerCmd.READY.value, b"mmi.x"], mdp.BadWorker, "valid service name"),
        ([b"X", P.MDPW, P.WorkerCmd.READY.value, b"s", codec.pack({"capacity": 0})], mdp.BadWorker, "READY options"),
        ([b"X", P.MDPW, P.WorkerCmd.FINAL.value, b"tok", b"not-empty"], mdp.BadWorker, "envelope"),
    ],
)
def test_malformed_messages_are_typed_with_their_reason(frames, kind, why):
    ev = mdp.parse(frames)
    assert isinstance(ev, kind) and why in ev.why


@pytest.mark.parametrize(
    "field, value, text",
    [
        ("v", 2, "unsupported protocol version 2"),
        ("id", [1], "header field 'id'"),
        ("job", 5, "header field 'job'"),
        ("priority", 10**6, "header field 'priority'"),
        ("priority", True, "header field 'priority'"),
        ("deadline", -1, "header field 'deadline'"),
        ("budget", {"tokens": -1}, "header field 'budget'"),
        ("idem", 3, "header field 'idem'"),
        ("txn", b"x", "header field 'txn'"),
        ("for", 7, "header field 'for'"),
    ],
)
def test_the_header_schema_gives_the_error_text(field, value, text):
    raw = {"v": 1, "id": 1, field: value}
    with pytest.raises(errors.BadRequest, match=text.replace("(", r"\(").replace("[", r"\[")):
        mdp.parse_header(raw)
    ev = mdp.parse([b"C", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack(raw)])
    assert isinstance(ev, mdp.Request) and ev.checked is None and text in str(ev.bad)


def test_every_header_field_of_the_protocol_is_in_the_schema():
    assert [f.name for f in P.HEADER] == [
        P.H_VERSION,
        P.H_ID,
        P.H_JOB,
        P.H_PRIORITY,
        P.H_DEADLINE,
        P.H_BUDGET,
        P.H_IDEM,
        P.H_TXN,
        P.H_FOR,
    ]


def test_roles_and_budget_kinds_are_one_table_each():
    assert [r for r in P.ROLES] == list(P.Role)
    assert P.Role.REVOKED.rank < P.Role.CLIENT.rank < P.Role.SERVICE.rank < P.Role.OPERATOR.rank
    assert P.role_kind("service:a,b") is P.Role.SERVICE and P.role_kind("nonsense") is P.Role.REVOKED
    assert P.COMPUTE_KINDS == ("wall_ms", "cpu_ms", "tokens", "flops", "vm_steps")
    assert tuple(P.BUDGET_KINDS) == (*P.COMPUTE_KINDS, "mem_bytes")  # a ceiling, not a compute kind
    from kernel.ledger import COMPUTE

    assert COMPUTE == P.COMPUTE_KINDS


# -- the router over a fake host ----------------------------------------------------------------------


def test_tokens_come_from_the_host_and_invariants_hold_through_a_life():
    host = FakeHost(seed=1)
    wire = Wire()
    adm = BudgetAdmission(root_limits={"tokens": 100.0}, default_limits={"tokens": 50.0}, host=host)
    published = []
    router = Router(
        wire,
        admission=adm,
        management=Management(adm),
        host=host,
        publish=lambda topic, msg: published.append((topic, msg)),
    )
    router.on_message([b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": 1})], 0.0)
    router.check_invariants()
    twin = FakeHost(seed=1)
    assert adm.ledger.session == f"{twin.token(4).hex()}."  # the session id came from the host too
    expected = twin.token(16)
    router.on_message([b"C", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack({"v": 1, "id": 1}), b"x"], 0.1)
    router.on_message([b"C", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack({"v": 1, "id": 2}), b"y"], 0.1)
    router.check_invariants()
    assert list(router.inflight)[0] == expected
    to_worker = [m for m in wire.sent if m[0] == b"W" and m[2] == P.WorkerCmd.REQUEST.value]
    assert to_worker[0][3] == expected
    status = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {"tokens": 60}})
    router.on_message([b"W", P.MDPW, P.WorkerCmd.FINAL.value, expected, b"", status, b"out"], 0.2)
    router.check_invariants()
    # 60 tokens of a 50-token default job: exhausted; the queued request 2 is answered too.
    finals = [codec.unpack(m[4]) for m in wire.sent if m[0] == b"C" and m[2] == P.ClientCmd.FINAL.value]
    assert [f["error"]["code"] for f in finals] == ["budget_exceeded", "budget_exceeded"]
    # The job-wide cancel goes to the service holding its requests, never ctl/all (any service key reads that).
    assert any(topic == P.control_topic("echo", "cancel") for topic, _ in published)
    assert not any(topic.startswith(f"{P.CTL_PREFIX}{P.CTL_ALL}/".encode()) for topic, _ in published)
    assert router.inflight == {}


def test_every_order_is_published_and_recorded_once_in_one_shape():
    recorded = []

    class Journal:
        session = "s."
        state = None

        def append(self, op, now, inputs, outputs):
            recorded.append((op, inputs))

        def flush(self):
            pass

    adm = BudgetAdmission(decision_log=Journal(), host=FakeHost())
    published = []
    router = Router(
        Wire(),
        admission=adm,
        management=Management(adm),
        host=FakeHost(),
        publish=lambda topic, msg: published.append((topic, msg)),
    )
    router.order(Order("sim", "fidelity", {"level": 2, "blob": b"\x01"}), 1.0)
    assert published == [(b"ctl/sim/fidelity", {"level": 2, "blob": b"\x01"})]
    assert recorded[-1] == ("fidelity", {"service": "sim", "level": 2, "blob": "01"})


def test_a_bug_in_a_handler_is_internal_error_not_bad_request():
    mgmt = Management()
    router = Router(Wire(), management=mgmt, host=FakeHost())

    def broken(router, arg, now, caller):
        raise TypeError("a bug")

    mgmt.handlers[P.MMI_STATS] = broken
    out = mgmt.handle(router, P.MMI_STATS, {}, 0.0)
    assert isinstance(out, errors.InternalError) and out.code == "internal_error"
    # Bad input is still the caller's: typed by the schema.
    assert isinstance(mgmt.handle(router, P.MMI_PROC_NICE, {"child": "x", "nice": 99}, 0.0), errors.BadRequest)


def test_the_ledger_refuses_with_values_never_exceptions():
    from kernel.ledger import Ledger, refusal

    led = Ledger()
    for out in (
        led.admit(0.0, "nope"),
        led.reserve(0.0, "nope", "gpu"),
        led.close(0.0, "nope"),
        led.open(0.0, "", None),
        led.renew(0.0, "x"),
    ):
        assert out["ok"] is False and out["code"] in set(P.ErrorCode)
        exc = refusal(out)
        assert isinstance(exc, errors.RecaError) and exc.code == out["code"] and exc.message == out["message"]
    assert refusal({"ok": True}) is None
    assert isinstance(refusal(led.admit(0.0, "nope"), "default job: "), errors.Refused)
